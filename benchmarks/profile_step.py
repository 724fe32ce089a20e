"""Where one step of the main job goes: generation, rewards, old/ref log-probs, updates, evaluation, checkpoints.

    python benchmarks/profile_step.py [--steps 60] [--warmup 10] [--threads N] [--json out.json] [TRAIN FLAGS...]

Builds the main job exactly as ``python -m grpo_kernels train`` does (the built-in tiny model, the
two-digit addition task, exact_match + 0.5 digit_match; any further flags are the train command's,
e.g. ``--num-generations 4``), runs ``--warmup`` steps untimed, then ``--steps`` steps with every
phase timed by wrapping the trainer's own methods (nothing in the trainer changes). Evaluation and
checkpoints are timed once each and amortized over the main job's ``eval_steps`` / ``save_steps``,
so the table's total is the per-step cost of the whole job. Prints one table (ms per step and share
of the total) and optionally writes it as JSON. Run it under ``flock /tmp/gk-heavy.lock`` on a
shared machine: the numbers are wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script is in, not an installed copy
from grpo_kernels.trainer import cli  # noqa: E402
from grpo_kernels.trainer.trainer import GRPOTrainer  # noqa: E402

# Phases in the order of a step; "update" is the optimizer updates alone (log-probs taken out).
PHASES = ("generate", "decode", "rewards", "advantages", "old_logprobs", "ref_logprobs", "update", "bookkeeping")


def _timed(fn: Callable[..., Any], name: Callable[..., str] | str, acc: dict[str, float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        acc[name(*args) if callable(name) else name] += time.perf_counter() - t0
        return out
    return wrapper


def instrument(trainer: GRPOTrainer) -> dict[str, float]:
    """Wrap the trainer's phase methods on the instance; returns the seconds accumulated per phase."""
    acc: dict[str, float] = defaultdict(float)
    trainer._generate = _timed(trainer._generate, "generate", acc)
    trainer._decode = _timed(trainer._decode, "decode", acc)
    trainer.rewards = _timed(trainer.rewards, "rewards", acc)
    trainer.advantages = _timed(trainer.advantages, "advantages", acc)
    trainer.logprobs = _timed(trainer.logprobs, lambda model, batch: "old_logprobs" if model is trainer.model
                              else "ref_logprobs", acc)
    trainer.update = _timed(trainer.update, "update_total", acc)
    return acc


def build(argv: list[str], out_dir: str) -> GRPOTrainer:
    """The main job's trainer, from train-command flags (as cli.train builds it)."""
    args = cli.build_parser().parse_args(["train", "--out", out_dir, *argv])
    config, task_values, _ = cli._settings(args)
    shaping = float(task_values.get("shaping_weight", cli.DEFAULT_SHAPING_WEIGHT))
    task = cli._task(task_values)
    train_rows, eval_rows = task.split()
    from grpo_kernels.trainer import digit_match, exact_match, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(config.model, config.seed)
    return GRPOTrainer(config, model, tokenizer, train_rows, [exact_match, digit_match], reward_weights=[1.0, shaping],
                       eval_rows=eval_rows, eval_fn=exact_match)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="timed steps")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the main job's default)")
    ap.add_argument("--json", default=None, help="write the table here")
    args, train_flags = ap.parse_known_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    else:
        threads = getattr(cli, "default_threads", None)
        torch.set_num_threads(threads() if threads else 1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(train_flags, tmp)
        cfg = trainer.config
        for _ in range(args.warmup):
            trainer.train_step()
        acc = instrument(trainer)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        step_s = (time.perf_counter() - t0) / args.steps
        per_step = {k: v / args.steps for k, v in acc.items()}
        per_step["update"] = per_step.pop("update_total") - per_step.get("old_logprobs", 0.0) - per_step.get("ref_logprobs", 0.0)
        per_step["bookkeeping"] = step_s - sum(per_step.values())  # metrics, the record, the sync
        for k in PHASES:
            per_step.setdefault(k, 0.0)
        # Evaluation and checkpoints, once each (the first evaluation warms nothing new: generate is warm).
        acc.clear()
        t = time.perf_counter()
        trainer.evaluate()
        eval_s = time.perf_counter() - t
        t = time.perf_counter()
        trainer.save_checkpoint()
        ckpt_s = time.perf_counter() - t
    rows = [(k, per_step[k]) for k in PHASES]
    if cfg.eval_steps:
        rows.append((f"evaluation ({eval_s * 1e3:.0f} ms / {cfg.eval_steps} steps)", eval_s / cfg.eval_steps))
    if cfg.save_steps:
        rows.append((f"checkpoint ({ckpt_s * 1e3:.0f} ms / {cfg.save_steps} steps)", ckpt_s / cfg.save_steps))
    total = sum(v for _, v in rows)
    machine = f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    print(f"main job step profile: {args.steps} timed steps after {args.warmup}, batch {cfg.prompts_per_step} x "
          f"{cfg.num_generations}, max_new_tokens {cfg.max_new_tokens}; {machine}")
    print("| phase | ms / step | share |\n|---|---|---|")
    for name, v in rows:
        print(f"| {name} | {v * 1e3:.2f} | {v / total:.0%} |")
    print(f"| **total** | **{total * 1e3:.2f}** | 100% |")
    print(f"\ntrain_step alone: {step_s * 1e3:.2f} ms; whole job estimate for {cfg.steps} steps: {total * cfg.steps:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "argv": sys.argv, "cpu": cpu_name(), "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
            "config": cfg.to_dict(), "ms_per_step": {k: v * 1e3 for k, v in rows}, "total_ms": total * 1e3,
            "train_step_ms": step_s * 1e3, "eval_s": eval_s, "checkpoint_s": ckpt_s,
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
