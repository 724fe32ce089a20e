"""Accuracy tables: log-probs, the GRPO loss and their gradients of each path against the float64 oracle.

    python benchmarks/accuracy.py [--tokens 256] [--grpo 2x160] [--dtypes bf16 fp32] [--seed 0]

At the benchmark head (D = 896, V = 151936), for each dtype, as max |error| / max |fp64 value|:
- on the inputs of cases.py's ``logprobs_fwd_bwd`` case, the error of logp, dH and dW (of
  sum(logp * g));
- on the inputs of its ``grpo_fwd_bwd`` case (B x T; 2 x 160 spans two one-pass chunks of the C++
  backend, so dW crosses chunks), the error of the loss, dH and dW;
for the ``ours`` provider (grpo_kernels, backend "auto") and the ``materialize`` one (the
materializing path in the inputs' dtype). About 8 minutes on 2 cores, mostly the float64 oracle's
backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import providers  # noqa: E402
import grpo_kernels as gk  # noqa: E402

PATHS = ("ours", "materialize")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(cases.DTYPES), default=["bf16", "fp32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grpo", type=cases.parse_size, default="2x160", help="B x T of the GRPO-loss table")
    args = ap.parse_args()
    print("| dtype | path | logp | dH | dW |\n|---|---|---|---|---|")
    for name in args.dtypes:
        case = cases.Case("logprobs_fwd_bwd", name, args.tokens)
        inp = cases.make_inputs(case, args.seed)
        gold = providers.gold(case, inp)
        for path in PATHS:
            h = inp.hidden.detach().clone().requires_grad_()
            w = inp.weight.detach().clone().requires_grad_()
            logp = providers.PROVIDERS[path].logprobs(h, w, inp.targets)
            got = (logp.detach(), *torch.autograd.grad((logp.float() * inp.grad_logp).sum(), (h, w)))
            label = f"{path} ({gk.last_backend('linear_logprobs')})" if path == "ours" else path
            print(f"| {name} | {label} | " + " | ".join(f"{providers.rel_error(g, w):.1e}" for g, w in zip(got, gold)) + " |")
    print(f"\nmax |error| / max |fp64 value| over {args.tokens} tokens, D={cases.D}, V={cases.V}, seed {args.seed}\n")

    print("| dtype | path | loss | dH | dW |\n|---|---|---|---|---|")
    for name in args.dtypes:
        case = cases.Case("grpo_fwd_bwd", name, args.grpo)
        inp = cases.make_inputs(case, args.seed)
        gold = providers.gold(case, inp)
        for path in PATHS:
            inp.hidden.grad = inp.weight.grad = None
            loss = providers.PROVIDERS[path].grpo(inp)
            got = (loss.detach().reshape(1), *torch.autograd.grad(loss, (inp.hidden, inp.weight)))
            label = f"{path} ({gk.last_backend('fused_linear_grpo_loss')})" if path == "ours" else path
            print(f"| {name} | {label} | " + " | ".join(f"{providers.rel_error(g, w):.1e}" for g, w in zip(got, gold)) + " |")
    B, T = args.grpo
    print(f"\nmax |error| / max |fp64 value| over {B}x{T} tokens, {cases.GRPO_CONFIG.loss_type}, "
          f"beta {cases.GRPO_CONFIG.beta}, old + ref log-probs, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
