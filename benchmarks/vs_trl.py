"""The main job against TRL, side by side: grpo_kernels' trainer and ``trl.GRPOTrainer`` on the same work.

    python benchmarks/vs_trl.py [--seeds 0 1 2 3 4] [--steps 2000] [--threads 2]
                                [--trainers ours trl trl-bias-kl] [--eval-every 500]
                                [--ours-flags "--prompt-sampling passes"] [--json vs_trl.json]
    python benchmarks/vs_trl.py --large-head --steps 5    # untied 151,936-token head: step time, peak memory
    python benchmarks/vs_trl.py --tabulate a.json b.json ...   # one table from several runs' JSON files

Both trainers get the main job: the built-in 0.26M-parameter Llama and character tokenizer (the
same initial weights for a seed; saved to a directory, from which TRL loads its policy and its
reference model), the same 2,250 / 250 split of two-digit addition, the project's rewards
(exact_match weight 1, digit_match 0.5), 32 prompts x 8 completions per step,
max_completion_length 2, temperature 1, top_p 1, top_k off, loss_type grpo, beta 0.1, epsilon 0.2,
scale_rewards group, lr 1e-3 cosine with 20 warm-up steps, weight decay 0, max_grad_norm 1.0,
fp32, gradient checkpointing off, one update per generation round. Held-out accuracy is the
project's own greedy evaluation (:meth:`GRPOTrainer.evaluate`) for both.

Trainers (columns): ``ours`` (grpo_kernels.trainer, with ``--ours-flags`` added to its train
flags), ``trl`` (TRL with ``use_bias_correction_kl=False``: its gradient then equals ours; the
matched setting) and ``trl-bias-kl`` (TRL's default, ``use_bias_correction_kl=True``). TRL's own
remaining differences (kept, since they are TRL's behaviour): prompts in shuffled passes without
replacement, warm-up from rate 0, fused AdamW.

Every (trainer, seed) runs in a fresh subprocess with ``--threads`` torch threads. Reported per
run: wall time of the training loop (held-out evaluations at ``--eval-every`` excluded; they are
timed separately), median step time, peak RSS, and held-out accuracy at the end (and at each
``--eval-every`` step). One table on stdout; every run, the settings and the machine go to the
JSON file. TRL is an optional extra: without it only ``ours`` runs. On a shared machine run it
under ``flock /tmp/gk-heavy.lock``.

``--tabulate``: the runs of several JSON files (e.g. one per trainer and seed, each run with the
machine to itself) in one table; a column per trainer (``ours`` with ``--ours-flags`` is its own
column, so option ablations tabulate too). Files with different steps, threads or head are refused.

``--large-head``: the same body with its 18-token embedding padded to 151,936 rows and an untied
151,936-token head (real checkpoints pad their vocabularies far beyond the tokenizer's); the
padded rows are random, so the policy samples mostly tokens the tokenizer does not know (decoded
as nothing) and the accuracy means nothing there: it measures the step time and the memory a
realistic head costs each trainer. Use a few ``--steps``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this script is in, not an installed copy

TRAINERS = ("ours", "trl", "trl-bias-kl")
LARGE_VOCAB = 151_936
# The settings both trainers share (the list); TrainerConfig names.
SHARED = dict(prompts_per_step=32, num_generations=8, max_new_tokens=2, temperature=1.0, top_p=1.0, learning_rate=1e-3,
              lr_scheduler="cosine", warmup_steps=20, weight_decay=0.0, max_grad_norm=1.0, loss_type="grpo", beta=0.1,
              epsilon_low=0.2, scale_rewards="group", dtype="float32")
SHAPING_WEIGHT = 0.5


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one run per trainer per seed")
    ap.add_argument("--steps", type=int, default=2000, help="generation rounds (= optimizer updates) per run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    ap.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    ap.add_argument("--eval-every", type=int, default=0, help="held-out accuracy every this many steps too (0: end only)")
    ap.add_argument("--ours-flags", default="", help="extra `python -m grpo_kernels train` flags for ours, one string")
    ap.add_argument("--large-head", action="store_true", help=f"pad the vocabulary to {LARGE_VOCAB:,} with an untied head")
    ap.add_argument("--json", default="vs_trl.json", help="where every run's results go")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    ap.add_argument("--tabulate", nargs="+", metavar="JSON", default=None,
                    help="run nothing: one table from these result files (written by --json)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one run, JSON spec
    return ap


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("steps", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be an int >= 1; got {getattr(args, name)}")
    if args.eval_every < 0:
        ap.error(f"--eval-every must be an int >= 0; got {args.eval_every}")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        ap.error(f"--seeds must be distinct ints >= 0; got {args.seeds}")
    ours_config(args.ours_flags, seed=0, steps=args.steps, error=ap.error)  # bad --ours-flags fail here, not in a worker
    return args


def ours_config(flags: str, *, seed: int, steps: int, error: Any = None, out_dir: str = "vs_trl_run") -> Any:
    """Our TrainerConfig: the shared settings, then ``flags`` (train-command flags) on top."""
    from grpo_kernels.trainer import cli

    fixed = ["--seed", str(seed), "--steps", str(steps), "--out", out_dir, "--save-steps", "0", "--eval-steps", "0"]
    for name, value in SHARED.items():
        fixed += ["--" + name.replace("_", "-"), str(value)]
    try:
        ns = cli.build_parser().parse_args(["train", *fixed, *shlex.split(flags)])
    except SystemExit as exc:
        if error is None:
            raise
        error(f"--ours-flags {flags!r} are not valid train flags ({exc})")
    given = {k: v for k, v in vars(ns).items() if k in {f for f in cli.TrainerConfig.__dataclass_fields__}}
    try:
        return cli.TrainerConfig(**given)
    except (TypeError, ValueError) as exc:
        if error is None:
            raise
        error(f"--ours-flags {flags!r}: {exc}")


def build_model(seed: int, large_head: bool) -> tuple[Any, Any]:
    """The built-in model for a seed (and, with ``large_head``, its vocabulary padded with an untied head)."""
    import torch

    from grpo_kernels.trainer import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(None, seed)
    if large_head:
        torch.manual_seed(seed + 1)
        model.resize_token_embeddings(LARGE_VOCAB, mean_resizing=False)
        embed = model.get_input_embeddings().weight
        head = torch.nn.Linear(embed.shape[1], LARGE_VOCAB, bias=False)
        with torch.no_grad():
            head.weight.copy_(embed)  # untied: the same start, separate parameters from here on
        model.config.tie_word_embeddings = False
        model.set_output_embeddings(head)
    return model, tokenizer


class _Evaluator:
    """The project's greedy held-out evaluation, for any trainer's model; times itself."""

    def __init__(self, tokenizer: Any, eval_rows: list[dict[str, Any]]) -> None:
        self.tokenizer, self.eval_rows, self.seconds, self.curve = tokenizer, eval_rows, 0.0, {}

    def __call__(self, model: Any, step: int) -> float:
        import random

        import numpy as np
        import torch

        from grpo_kernels.trainer import GRPOTrainer, TrainerConfig, exact_match

        t0 = time.perf_counter()
        was_training = model.training
        # Evaluation must not change the training run's samples (building a GRPOTrainer seeds the RNGs).
        state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        generation_config = model.generation_config
        ev = GRPOTrainer(TrainerConfig(beta=0.0, max_new_tokens=SHARED["max_new_tokens"]), model, self.tokenizer,
                         self.eval_rows, [exact_match], eval_rows=self.eval_rows, eval_fn=exact_match)
        acc = ev.evaluate()
        model.generation_config = generation_config
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])
        model.train(was_training)
        self.seconds += time.perf_counter() - t0
        self.curve[step] = acc
        return acc


def run_ours(spec: dict[str, Any], model: Any, tokenizer: Any, train_rows: list, evaluator: _Evaluator,
             out_dir: str) -> list[float]:
    from grpo_kernels.trainer import GRPOTrainer, digit_match, exact_match

    config = ours_config(spec["ours_flags"], seed=spec["seed"], steps=spec["steps"], out_dir=out_dir)
    trainer = GRPOTrainer(config, model, tokenizer, train_rows, [exact_match, digit_match],
                          reward_weights=[1.0, SHAPING_WEIGHT])
    step_s: list[float] = []
    step = trainer.train_step

    def timed_step() -> dict[str, float]:
        t0 = time.perf_counter()
        record = step()
        step_s.append(time.perf_counter() - t0)
        if spec["eval_every"] and trainer.step % spec["eval_every"] == 0 and trainer.step < spec["steps"]:
            evaluator(model, trainer.step)
        return record

    trainer.train_step = timed_step
    trainer.train(progress=False)
    return step_s


def run_trl(spec: dict[str, Any], model_dir: str, tokenizer: Any, train_rows: list, evaluator: _Evaluator,
            out_dir: str) -> tuple[list[float], Any]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_kernels.trainer import digit_match, exact_match

    s, G = SHARED, SHARED["num_generations"]
    args = GRPOConfig(
        output_dir=out_dir, use_cpu=True, report_to="none", save_strategy="no", logging_steps=50, seed=spec["seed"],
        max_steps=spec["steps"], per_device_train_batch_size=s["prompts_per_step"] * G, gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"],
        top_k=0, loss_type=s["loss_type"], beta=s["beta"], epsilon=s["epsilon_low"], scale_rewards=s["scale_rewards"],
        learning_rate=s["learning_rate"], lr_scheduler_type="cosine", warmup_steps=s["warmup_steps"],
        weight_decay=s["weight_decay"], max_grad_norm=s["max_grad_norm"], bf16=False, gradient_checkpointing=False,
        reward_weights=[1.0, SHAPING_WEIGHT], use_bias_correction_kl=spec["trainer"] == "trl-bias-kl",
        model_init_kwargs={"dtype": "float32"}, disable_tqdm=True,
    )
    ds = Dataset.from_list(train_rows)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[exact_match, digit_match], args=args, train_dataset=ds,
                          processing_class=tokenizer)
    step_s: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            step_s.append(time.perf_counter() - self.t0)
            if spec["eval_every"] and state.global_step % spec["eval_every"] == 0 and state.global_step < spec["steps"]:
                evaluator(trainer.model, state.global_step)

    trainer.add_callback(Timer())
    trainer.train()
    return step_s, trainer.model


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (trainer, seed) run in this process; returns its results."""
    import torch

    from grpo_kernels.trainer import ArithmeticTask

    torch.set_num_threads(spec["threads"])
    train_rows, eval_rows = ArithmeticTask().split()
    model, tokenizer = build_model(spec["seed"], spec["large_head"])
    evaluator = _Evaluator(tokenizer, eval_rows)
    with tempfile.TemporaryDirectory() as tmp:
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        if spec["trainer"] == "ours":
            step_s = run_ours(spec, model, tokenizer, train_rows, evaluator, tmp)
        else:
            model_dir = str(Path(tmp) / "model")
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            del model
            step_s, model = run_trl(spec, model_dir, tokenizer, train_rows, evaluator, str(Path(tmp) / "out"))
        wall = time.perf_counter() - t0 - evaluator.seconds
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        eval_s = evaluator.seconds
        accuracy = evaluator(model.cpu().eval(), spec["steps"])
    return {**spec, "wall_s": wall, "median_step_s": statistics.median(step_s), "mean_step_s": statistics.fmean(step_s),
            "first_step_s": step_s[0], "eval_s": eval_s, "peak_rss_mb": peak_rss, "rss_before_train_mb": base_rss,
            "accuracy": accuracy, "curve": {str(k): v for k, v in sorted(evaluator.curve.items())}}


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "amx": "amx_bf16" in flags, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def label(result: dict[str, Any]) -> str:
    """A result's column: its trainer, and for ``ours`` its extra train flags (an ablation is its own column)."""
    flags = result.get("ours_flags", "") if result["trainer"] == "ours" else ""
    return f"ours {flags}" if flags else result["trainer"]


def table(results: list[dict[str, Any]], trainers: Sequence[str], seeds: Sequence[int]) -> str:
    """One row per seed, one column per trainer (a :func:`label`): held-out accuracy and wall time; then the
    means, the wall-time ratios and the accuracy spread."""
    by = {(label(r), r["seed"]): r for r in results if "error" not in r}
    failed = {(label(r), r["seed"]) for r in results if "error" in r}
    head = "| seed | " + " | ".join(trainers) + " |\n|---|" + "---|" * len(trainers)
    lines = [head]
    for seed in seeds:
        cells = []
        for t in trainers:
            r = by.get((t, seed))
            if r is None:  # a run that failed, or one not in these results (e.g. a --tabulate file left out)
                cells.append("failed" if (t, seed) in failed else "-")
                continue
            cells.append(f"{r['accuracy']:.3f}, {r['wall_s']:.0f} s ({r['median_step_s'] * 1e3:.0f} "
                         f"ms/step, {r['peak_rss_mb']:.0f} MB)")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    means = []
    for t in trainers:
        rs = [by[(t, s)] for s in seeds if (t, s) in by]
        means.append(f"{statistics.fmean(r['accuracy'] for r in rs):.3f}, {statistics.fmean(r['wall_s'] for r in rs):.0f} s"
                     if rs else "-")
    lines.append("| mean | " + " | ".join(means) + " |")
    if "ours" in trainers and len(trainers) > 1:
        ours = [by[("ours", s)]["wall_s"] for s in seeds if ("ours", s) in by]
        ratios = []
        for t in trainers:
            theirs = [by[(t, s)]["wall_s"] for s in seeds if (t, s) in by]
            ratios.append(f"{statistics.fmean(ours) / statistics.fmean(theirs):.2f}x" if ours and theirs else "-")
        lines.append("| ours' wall time / column's | " + " | ".join(ratios) + " |")
    spreads = []
    for t in trainers:
        accs = [by[(t, s)]["accuracy"] for s in seeds if (t, s) in by]
        spreads.append(f"{statistics.stdev(accs):.3f} ({min(accs):.3f}-{max(accs):.3f})" if len(accs) > 1 else "-")
    lines.append("| accuracy sd (min-max) | " + " | ".join(spreads) + " |")
    return "\n".join(lines)


def curve_table(results: list[dict[str, Any]], trainers: Sequence[str]) -> str:
    """Mean held-out accuracy over the seeds at each evaluated step (rows), one column per trainer."""
    ok = [r for r in results if "error" not in r]
    steps = sorted({int(k) for r in ok for k in r.get("curve", {})})
    lines = ["| step | " + " | ".join(trainers) + " |\n|---|" + "---|" * len(trainers)]
    for step in steps:
        cells = []
        for t in trainers:
            accs = [r["curve"][str(step)] for r in ok if label(r) == t and str(step) in r.get("curve", {})]
            cells.append(f"{statistics.fmean(accs):.3f} (n={len(accs)})" if accs else "-")
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tabulate(paths: Sequence[str]) -> tuple[str, list[dict[str, Any]], list[str], list[int]]:
    """The runs of several result files as one table: (header line, results, columns, seeds).

    Columns keep the order they first appear in; a (column, seed) that succeeded twice, or files whose
    steps, threads or head differ, are refused (ValueError naming the file)."""
    results: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], str] = {}
    first: Optional[dict[str, Any]] = None
    machines, commits = [], []
    for path in paths:
        info = json.loads(Path(path).read_text())
        if first is None:
            first = info
        for key in ("steps", "threads", "large_head"):
            if info.get(key) != first.get(key):
                raise ValueError(f"tabulate: {path} has {key}={info.get(key)!r}; {paths[0]} has {first.get(key)!r}")
        cpu = info.get("machine", {}).get("cpu", "?")
        machines += [cpu] if cpu not in machines else []
        commit = info.get("commit", "?")
        commits += [commit] if commit not in commits else []
        for r in info["results"]:
            key = (label(r), r["seed"])
            if "error" in r:  # a failed run (a rerun in another file may have succeeded): kept, as "failed"
                results.append(r)
                continue
            if key in seen:
                raise ValueError(f"tabulate: {key[0]} seed {key[1]} is in both {seen[key]} and {path}")
            seen[key] = path
            results.append(r)
    columns = list(dict.fromkeys(label(r) for r in results))
    seeds = sorted({r["seed"] for r in results})
    assert first is not None  # argparse's nargs="+" gives at least one path
    header = (f"{'large-head (V = 151,936, untied) ' if first.get('large_head') else ''}main job, {first.get('steps')} steps, "
              f"{first.get('threads')} threads, {' / '.join(machines)}; commit {', '.join(commits)}")
    return header, results, columns, seeds


def _commit() -> str:
    """The checkout's commit (with ``+dirty`` when tracked files differ from it), or ``?`` without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=ROOT, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head + ("+dirty" if dirty else "")) if head else "?"


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return 0
    args = parse_args(argv)
    if args.tabulate:
        try:
            header, results, columns, seeds = tabulate(args.tabulate)
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(header)
        print(table(results, columns, seeds))
        if any(r.get("curve") for r in results):
            print("\nmean held-out accuracy over the seeds at each evaluated step:")
            print(curve_table(results, columns))
        return 0
    trainers = list(args.trainers)
    try:
        import trl  # noqa: F401
    except ImportError:
        if any(t != "ours" for t in trainers):
            print("trl is not installed: running ours only (pip install trl for the side-by-side)", file=sys.stderr)
        trainers = [t for t in trainers if t == "ours"]
    results: list[dict[str, Any]] = []
    info = {"machine": machine(), "commit": _commit(), "argv": sys.argv,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "shared_settings": SHARED, "steps": args.steps, "threads": args.threads, "ours_flags": args.ours_flags,
            "large_head": args.large_head}
    for seed in args.seeds:
        for t in trainers:
            spec = {"trainer": t, "seed": seed, "steps": args.steps, "threads": args.threads, "eval_every": args.eval_every,
                    "ours_flags": args.ours_flags, "large_head": args.large_head}
            print(f"running {t} seed {seed} ({args.steps} steps, {args.threads} threads)...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                      capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
                if proc.returncode:
                    raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
                # process_wall_s: the whole run (start-up, model, training, evaluations), as a user waits for it
                results.append({**json.loads(proc.stdout.strip().splitlines()[-1]),
                                "process_wall_s": time.perf_counter() - t0})
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as exc:
                results.append({**spec, "error": str(exc)})
                print(f"  failed: {exc}", file=sys.stderr)
            Path(args.json).write_text(json.dumps({**info, "results": results}, indent=1))
    print(f"{'large-head (V = 151,936, untied) ' if args.large_head else ''}main job, {args.steps} steps, "
          f"{args.threads} threads, {info['machine']['cpu']}; ours flags: {args.ours_flags or '(defaults)'}")
    print("accuracy = held-out greedy accuracy at the end; wall time of the training loop (evaluation excluded); "
          "median step time; peak RSS")
    print(table(results, [label({"trainer": t, "ours_flags": args.ours_flags}) for t in trainers], args.seeds))
    if args.eval_every:
        print("\nheld-out accuracy curves:")
        for r in results:
            if "curve" in r:
                print(f"  {r['trainer']} seed {r['seed']}: " + ", ".join(f"{k}: {v:.3f}" for k, v in r["curve"].items()))
    print(f"\nresults: {args.json}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
