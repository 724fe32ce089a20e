"""Accuracy table: log-probs and gradients of each path against the float64 oracle.

    python benchmarks/accuracy.py [--tokens 256] [--dtypes bf16 fp32]

At the benchmark head (D = 896, V = 151936, inputs as in cases.py), for each dtype: the max abs
error of logp, dH and dW (of sum(logp * g)) relative to the largest gold value, for grpo_kernels
(backend "auto") and for the materializing path in the inputs' dtype. About 5 minutes on 2 cores,
mostly the float64 oracle's backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import grpo_kernels as gk  # noqa: E402
from grpo_kernels import reference  # noqa: E402


def rel_err(x: Tensor, gold: Tensor) -> float:
    return ((x.double() - gold).abs().max() / gold.abs().max()).item()


def errors(fn, h: Tensor, w: Tensor, t: Tensor, g: Tensor, gold: tuple[Tensor, Tensor, Tensor]) -> list[float]:
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    logp = fn(h, w, t)
    (logp.float() * g).sum().backward()
    return [rel_err(logp, gold[0]), rel_err(h.grad, gold[1]), rel_err(w.grad, gold[2])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(cases.DTYPES), default=["bf16", "fp32"])
    args = ap.parse_args()
    torch.manual_seed(0)
    print("| dtype | path | logp | dH | dW |\n|---|---|---|---|---|")
    for name in args.dtypes:
        dt = cases.DTYPES[name]
        h = torch.randn(args.tokens, cases.D).to(dt)
        w = (torch.randn(cases.V, cases.D) * cases.WEIGHT_STD).to(dt)
        t = torch.randint(0, cases.V, (args.tokens,))
        g = torch.randn(args.tokens)
        h64 = h.double().requires_grad_()
        w64 = w.double().requires_grad_()
        logp64 = reference.linear_logprobs(h64, w64, t)
        (logp64 * g.double()).sum().backward()
        gold = (logp64.detach(), h64.grad, w64.grad)
        paths = {"grpo_kernels": lambda a, b, c: gk.linear_logprobs(a, b, c),
                 "materialize": lambda a, b, c: reference.linear_logprobs(a, b, c)}
        for path, fn in paths.items():
            errs = errors(fn, h, w, t, g, gold)
            label = f"{path} ({gk.last_backend('linear_logprobs')})" if path == "grpo_kernels" else path
            print(f"| {name} | {label} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
    print(f"\nmax |error| / max |fp64 value| over {args.tokens} tokens, D={cases.D}, V={cases.V}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
