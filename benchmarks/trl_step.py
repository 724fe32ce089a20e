"""One GRPO training step through TRL: trl.GRPOTrainer vs grpo_kernels.integrations.trl.GRPOTrainer.

    python benchmarks/trl_step.py [--dtypes bfloat16 float32] [--layers 1] [--batch 8] [--completion 512]
                                  [--beta 0.0] [--out bench_results/trl_step.json]

A Qwen2.5-0.5B-shaped model (V = 151936, D = 896, tied head) with a ``--layers``-layer body and
random weights is saved to a temporary directory. Completions of exactly ``--completion`` tokens
come from a fixed ``rollout_func`` (no generation), ``--batch`` of them per step, one group. Each
(trainer, dtype) runs in a fresh process: two optimizer steps (plain SGD), the second one timed
(TRL's own ``step_time`` metric: inputs, reference log-probs if beta > 0, loss forward and
backward). Peak memory is the process's peak RSS during ``train()`` above its RSS just before
(``/proc/self/clear_refs`` resets the peak), so model, gradients of a finished step and the
Python heap are not counted. Prints one table with the ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TAG = "TRL_STEP_RESULT "
IMPLS = ("trl", "grpo_kernels")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def worker(impl: str, dtype: str, model_dir: str, args: argparse.Namespace) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig

    if impl == "trl":
        from trl import GRPOTrainer
    else:
        from grpo_kernels.integrations.trl import GRPOTrainer

    T = args.completion

    def rollout(prompts, trainer):
        g = torch.Generator().manual_seed(0)
        tok = trainer.processing_class
        ids = [tok(p)["input_ids"] for p in prompts]
        comp = [torch.randint(4, 18, (T,), generator=g).tolist() for _ in prompts]  # never <eos>: full length
        return {"prompt_ids": ids, "completion_ids": comp, "logprobs": [[-1.0] * T for _ in prompts]}

    def reward(prompts, completions, **_):
        return [float(sum(c == "7" for c in s)) for s in completions]

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0,
        max_steps=2, per_device_train_batch_size=args.batch, num_generations=args.batch, max_completion_length=T,
        learning_rate=1e-6, optim="sgd", beta=args.beta, loss_type="grpo", logging_steps=1, disable_tqdm=True,
        model_init_kwargs={"dtype": dtype}, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=config,
                          train_dataset=Dataset.from_dict({"prompt": ["12+34="] * 4}), rollout_func=rollout)
    trainer.remove_callback(PrinterCallback)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS counter (VmHWM)
        f.write("5")
    base = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    peak = _rss_kb("VmHWM")
    steps = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"impl": impl, "dtype": dtype, "step_time_s": steps[-1], "first_step_s": steps[0], "train_wall_s": wall,
            "peak_extra_mb": (peak - base) / 1024, "rss_before_mb": base / 1024, "loss": losses[-1],
            "threads": torch.get_num_threads()}


def build_model(path: str, args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from grpo_kernels.trainer.model import ASSETS

    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(ASSETS)
    tok.save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--completion", type=int, default=512)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--out", default="bench_results/trl_step.json")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "DTYPE", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(TAG + json.dumps(worker(*args.worker, args)), flush=True)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_model(tmp, args)
        for dtype in args.dtypes:
            for impl in IMPLS:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, dtype, tmp,
                       "--layers", str(args.layers), "--batch", str(args.batch), "--completion", str(args.completion),
                       "--beta", str(args.beta)]
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1])] + sys.path)}
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                line = next((x for x in proc.stdout.splitlines() if x.startswith(TAG)), None)
                if line is None:
                    print(f"{impl} {dtype}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(line[len(TAG):]))
                r = rows[-1]
                print(f"  {impl:13s} {dtype:9s} step {r['step_time_s']:7.2f} s  peak +{r['peak_extra_mb']:7.0f} MB", flush=True)

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\nOne GRPO step, B x T = {args.batch} x {args.completion}, V = 151936, D = 896, {args.layers}-layer body, "
          f"beta = {args.beta}; {cpu}, {os.cpu_count()} CPUs")
    print("| dtype | trainer | step time | vs TRL | peak memory above pre-step RSS | vs TRL |")
    print("|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        base = next((r for r in rows if r["dtype"] == dtype and r["impl"] == "trl"), None)
        for r in (x for x in rows if x["dtype"] == dtype):
            t = f"{r['step_time_s'] / base['step_time_s']:.2f}x" if base else "-"
            m = f"{r['peak_extra_mb'] / base['peak_extra_mb']:.2f}x" if base and base["peak_extra_mb"] > 0 else "-"
            print(f"| {dtype} | {r['impl']} | {r['step_time_s']:.2f} s | {t} | {r['peak_extra_mb']:.0f} MB | {m} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu, "cpus": os.cpu_count(), "args": {k: v for k, v in vars(args).items() if k != "worker"},
                               "results": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
