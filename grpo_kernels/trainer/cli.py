"""``python -m grpo_kernels train``: the main job, and the same trainer on any local model.

With no flags it builds the built-in tiny model (random weights, nothing downloaded), reports
its held-out greedy accuracy on two-digit addition, trains it with GRPO, and reports the accuracy
again, with where the metrics, the checkpoint and the plot went. Every TrainerConfig field is a
flag (``--num-generations 8``); ``--resume RUN_DIR`` continues a run with its saved settings,
overridden only by flags given explicitly, in the directory the checkpoint is in (wherever the run
has been moved to) unless ``--out`` says otherwise. A run stopped before its first checkpoint has
nothing to resume: ``--restart`` starts it again from step 0 in its directory.

Under ``torchrun --nproc_per_node N -m grpo_kernels train ...`` the same job runs data-parallel
(:mod:`grpo_kernels.trainer.parallel`; ``--fsdp`` shards the model with FSDP2 instead of DDP):
every rank parses the same flags, rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import parallel
from .._checks import is_real_number
from .checkpoint import STATE_FILE, latest_checkpoint, read_state
from .config import TrainerConfig
from .model import load_model_and_tokenizer
from .tasks import ArithmeticTask, digit_match, exact_match
from .trainer import GRPOTrainer

ALIASES = {"out_dir": ["--out"], "learning_rate": ["--lr"]}
# Weight of the shaping reward next to the exact-match verifier (weight 1).
DEFAULT_SHAPING_WEIGHT = 0.5


def _field_type(hint: Any) -> type:
    """int / float / str from a field's type hint (Optional[X] -> X)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m grpo_kernels", description="grpo_kernels command line")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a causal LM with GRPO on the arithmetic task (default: the built-in tiny model)")
    hints = typing.get_type_hints(TrainerConfig)
    defaults = TrainerConfig()
    for f in dataclasses.fields(TrainerConfig):
        flags = ["--" + f.name.replace("_", "-")] + ALIASES.get(f.name, [])
        kind = _field_type(hints[f.name])
        help_text = f.metadata["help"] + f" (default: {getattr(defaults, f.name)})"
        if f.name == "out_dir":
            help_text = f.metadata["help"] + " (default: runs/grpo-<date>-<time>)"
        # SUPPRESS: only flags given explicitly land in the namespace, so --resume can tell them apart.
        if kind is bool:  # --share-prompts / --no-share-prompts
            train.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            train.add_argument(*flags, dest=f.name, type=kind, default=argparse.SUPPRESS, help=help_text)
    task = ArithmeticTask()
    train.add_argument("--max-operand", type=int, default=argparse.SUPPRESS,
                       help=f"task: operands are 0..max_operand (default: {task.max_operand})")
    train.add_argument("--ops", default=argparse.SUPPRESS, help=f"task: operators drawn from these, a subset of '+-*' (default: {task.ops})")
    train.add_argument("--num-eval", type=int, default=argparse.SUPPRESS,
                       help=f"task: held-out prompts, never trained on (default: {task.num_eval})")
    train.add_argument("--shaping-weight", type=float, default=argparse.SUPPRESS,
                       help=f"weight of the digit_match shaping reward next to exact_match (default: {DEFAULT_SHAPING_WEIGHT})")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="continue from the newest complete checkpoint of a run (or from a checkpoint dir), with its "
                            "saved settings (flags given override them); every state.json field and each file's "
                            "checksum is verified first; it writes where the run is now, unless --out is given")
    again.add_argument("--restart", action="store_true",
                       help="start again from step 0 in an --out directory whose run stopped before its first checkpoint "
                            "(its metrics are replaced); a run with a checkpoint is resumed, never restarted over")
    train.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (default: every core this process may run on)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard the policy and the reference over the processes with FSDP2 "
                            "fully_shard (default there: DDP, a whole replica per process)")
    return parser


def default_threads() -> int:
    """The CPU cores this process may run on: its affinity mask (a container's or taskset's limit), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def _run_dir(ckpt: Path) -> Optional[Path]:
    """The run directory a checkpoint belongs to: ``RUN/checkpoints/step_N`` -> ``RUN`` (None elsewhere)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def _holds_run(out: Path) -> bool:
    return (out / "metrics.jsonl").exists() or (out / "checkpoints").exists()


def _settings(args: argparse.Namespace) -> tuple[TrainerConfig, dict[str, Any], Optional[Path]]:
    """(config, task settings, checkpoint to resume from) from the flags and, on resume, the checkpoint."""
    given = vars(args)
    config_keys = {f.name for f in dataclasses.fields(TrainerConfig)}
    task_keys = {"max_operand", "ops", "num_eval", "shaping_weight"}
    ckpt = None
    if args.resume:
        where = Path(args.resume)
        ckpt = latest_checkpoint(where)
        if ckpt is None:
            if _holds_run(where):
                raise SystemExit(f"--resume: the run in {where} stopped before its first checkpoint, so there is nothing "
                                 f"to resume; start it again from step 0 with its flags and --out {where} --restart")
            raise SystemExit(f"--resume: no checkpoint found in {where}")
        try:
            state = read_state(ckpt, verify_files=False)  # the files' checksums: when the checkpoint is loaded
            task_values = state["metadata"].get("task", {})
            if not isinstance(task_values, dict):
                raise ValueError(f"{ckpt / STATE_FILE}: metadata.task must be a JSON object; got {task_values!r}")
            _task(task_values, where=f"{ckpt / STATE_FILE}: metadata.task: ")
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from exc
        config_values, task_values = dict(state["config"]), dict(task_values)
        if "out_dir" not in given:
            # Continue where the run is now: it may have been moved since state.json recorded out_dir.
            run = _run_dir(ckpt)
            if run is None:
                raise SystemExit(f"--resume: {ckpt} is not in a run's checkpoints/ directory, so there is no run "
                                 "directory to continue in; pass --out DIR")
            config_values["out_dir"] = str(run)
    else:
        config_values = {"out_dir": time.strftime("runs/grpo-%Y%m%d-%H%M%S")}
        task_values = {}
    config_values.update({k: v for k, v in given.items() if k in config_keys})
    task_values.update({k: v for k, v in given.items() if k in task_keys})
    if ckpt is None and "max_new_tokens" not in given:
        # Answers are fixed-width: the completion is exactly that many digits.
        config_values["max_new_tokens"] = _task(task_values).answer_width
    try:
        config = TrainerConfig(**config_values)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    out = Path(config.out_dir)
    run = None if ckpt is None else _run_dir(ckpt)
    if ckpt is not None and (run is None or out.resolve() != run.resolve()) and _holds_run(out):
        raise SystemExit(f"error: --out {out} already holds another run; resuming {ckpt} there would mix the two runs' "
                         "metrics and checkpoints: choose another --out")
    if ckpt is None and _holds_run(out):
        found = latest_checkpoint(out / "checkpoints")
        if found is not None:
            raise SystemExit(f"error: {out} already holds a run (checkpoint {found.name}); pass --resume {out} to "
                             "continue it, or choose another --out")
        if not args.restart:
            raise SystemExit(f"error: {out} holds a run that stopped before its first checkpoint; add --restart to "
                             "start it again from step 0 there (its metrics are replaced), or choose another --out")
    return config, task_values, ckpt


def _task(values: dict[str, Any], where: str = "") -> ArithmeticTask:
    """The task from its settings (``where`` prefixes the error: the file they were read from)."""
    shaping = values.get("shaping_weight", DEFAULT_SHAPING_WEIGHT)
    if not isinstance(shaping, (int, float)) or not is_real_number(shaping):
        raise SystemExit(f"error: {where}shaping_weight must be a finite number; got {shaping!r}")
    try:
        return ArithmeticTask(**{k: v for k, v in values.items() if k != "shaping_weight"})
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {where}{exc}") from exc


def train(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    try:
        dp = parallel.current(args.fsdp)  # None: one process (main() joined torchrun's process group, if any)
    except ValueError:
        raise SystemExit("error: --fsdp shards the model over torchrun's processes; launch with torchrun "
                         "--nproc_per_node N -m grpo_kernels train --fsdp ...") from None
    say = print if dp is None or dp.is_main else (lambda *a, **k: None)
    if dp is not None and not args.resume and "out_dir" not in vars(args):  # one default directory for all ranks
        args.out_dir = parallel.broadcast(time.strftime("runs/grpo-%Y%m%d-%H%M%S"), dp)
    config, task_values, ckpt = _settings(args)
    if dp is not None:  # every rank has checked the run directory before any writes to it
        torch.distributed.barrier()
    shaping = float(task_values.get("shaping_weight", DEFAULT_SHAPING_WEIGHT))
    task = _task(task_values)
    train_rows, eval_rows = task.split()
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"error: --threads must be an int >= 1; got {args.threads}")
    # Even the built-in model's step ran 1.18x faster on 2 threads than on 1 (Intel Xeon with AMX,
    # 2 vCPU, benchmarks/profile_step.py, 2026-12-02), so the default is every core this process may use, not torch's guess (physical cores). On a
    # machine other jobs keep busy, --threads 1 avoids waiting on a descheduled second thread.
    torch.set_num_threads(args.threads if args.threads is not None else default_threads())
    if dp is not None and args.threads is None:  # this machine's processes share its cores
        torch.set_num_threads(max(1, torch.get_num_threads() // dp.local_world_size))
    model, tokenizer = load_model_and_tokenizer(config.model, config.seed)
    if dp is not None:
        model.to(dp.device)  # cuda:LOCAL_RANK under nccl
    try:
        trainer = GRPOTrainer(
            config, model, tokenizer, train_rows, [exact_match, digit_match], reward_weights=[1.0, shaping],
            eval_rows=eval_rows, eval_fn=exact_match, metadata={"task": {**dataclasses.asdict(task), "shaping_weight": shaping}},
            fsdp=args.fsdp,
        )
    except ValueError as exc:  # e.g. prompts per step not divisible by the world size
        raise SystemExit(f"error: {exc}") from exc
    where = "the built-in tiny model (random init)" if config.model is None else config.model
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {where}, {n_params / 1e6:.2f}M parameters; task: {len(train_rows)} training prompts like "
        f"{train_rows[0]['prompt']!r}, {len(eval_rows)} held-out prompts")
    if ckpt is not None:
        try:
            trainer.load_checkpoint(ckpt)
        except ValueError as exc:  # CheckpointError: names the file and the field
            raise SystemExit(f"error: {exc}") from exc
        say(f"resumed from {ckpt} at step {trainer.step}, writing to {config.out_dir}")
        if trainer.step == config.steps:
            say(f"the run is complete at step {trainer.step}; pass --steps N (> {trainer.step}) to train it further")
    before = trainer.evaluate()
    say(f"held-out greedy accuracy at step {trainer.step}: {before:.3f}")
    t_train = time.perf_counter()
    trainer.train(progress=not args.no_progress)
    train_s = time.perf_counter() - t_train
    after = trainer.evaluate()
    out = Path(config.out_dir)
    checkpoint = latest_checkpoint(out / "checkpoints")
    say(f"held-out greedy accuracy ({len(eval_rows)} prompts never seen in training): {before:.3f} -> {after:.3f}")
    say(f"steps: {config.steps}; training wall time {train_s:.0f} s, total {time.perf_counter() - t_start:.0f} s")
    say(f"metrics:    {out / 'metrics.jsonl'}")
    say(f"checkpoint: {checkpoint}")
    say(f"plot:       {out / 'metrics.png'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    created = parallel.init_from_env()  # under torchrun: its process group (nccl on CUDA, gloo on CPU)
    try:
        return train(args)  # the only command so far; argparse rejects anything else
    finally:
        if created:
            torch.distributed.destroy_process_group()
