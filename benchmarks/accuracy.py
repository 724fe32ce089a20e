"""Accuracy table: log-probs and gradients of each path against the float64 oracle.

    python benchmarks/accuracy.py [--tokens 256] [--dtypes bf16 fp32] [--seed 0]

At the benchmark head (D = 896, V = 151936), on the inputs of cases.py's ``logprobs_fwd_bwd`` case,
for each dtype: the error of logp, dH and dW (of sum(logp * g)) as max |error| / max |fp64 value|,
for the ``ours`` provider (grpo_kernels, backend "auto") and the ``materialize`` one (the
materializing path in the inputs' dtype). About 5 minutes on 2 cores, mostly the float64 oracle's
backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import grpo_kernels as gk  # noqa: E402
from grpo_kernels import reference  # noqa: E402

PATHS = ("ours", "materialize")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(cases.DTYPES), default=["bf16", "fp32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print("| dtype | path | logp | dH | dW |\n|---|---|---|---|---|")
    for name in args.dtypes:
        inp = cases.make_inputs(cases.Case("logprobs_fwd_bwd", name, args.tokens), args.seed)
        h64 = inp.hidden.detach().double().requires_grad_()
        w64 = inp.weight.detach().double().requires_grad_()
        logp64 = reference.linear_logprobs(h64, w64, inp.targets, compute_dtype=torch.float64)
        gold = (logp64.detach(), *torch.autograd.grad((logp64 * inp.grad_logp.double()).sum(), (h64, w64)))
        for path in PATHS:
            h = inp.hidden.detach().clone().requires_grad_()
            w = inp.weight.detach().clone().requires_grad_()
            logp = cases.PROVIDERS[path].logprobs(h, w, inp.targets)
            got = (logp.detach(), *torch.autograd.grad((logp.float() * inp.grad_logp).sum(), (h, w)))
            label = f"{path} ({gk.last_backend('linear_logprobs')})" if path == "ours" else path
            print(f"| {name} | {label} | " + " | ".join(f"{cases.rel_error(g, w):.1e}" for g, w in zip(got, gold)) + " |")
    print(f"\nmax |error| / max |fp64 value| over {args.tokens} tokens, D={cases.D}, V={cases.V}, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
