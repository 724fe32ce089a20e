"""One linear_logprobs forward (no_grad, bf16 or fp32) at N x 896 x 151936 in this process: a warm-up, then
REPEATS timed calls; prints the median and one torch GEMM of the same shape timed right after, in the
same process. Run from each tree (PYTHONPATH=<tree>) alternately, fresh processes:

    python one_forward.py bf16 4096
"""
import statistics
import sys
import time

import torch

import grpo_kernels as gk

dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[1]]
n, D, V, REPEATS = int(sys.argv[2]), 896, 151936, 3
torch.manual_seed(0)
h = torch.randn(n, D, dtype=dtype)
w = (torch.randn(V, D) / D**0.5).to(dtype)
t = torch.randint(0, V, (n,))
out = torch.empty(n, V, dtype=dtype)


def timed(f):
    f()
    ts = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


with torch.no_grad():
    ours = timed(lambda: gk.linear_logprobs(h, w, t, backend="cpu"))
    gemm = timed(lambda: torch.matmul(h, w.t(), out=out))
print(f"{gk.__file__.split('/grpo_kernels/')[0]} {sys.argv[1]} N={n}: ours {ours:.3f} s, GEMM {gemm:.3f} s, "
      f"ratio {ours / gemm:.3f}")
