"""torch's own bf16 matmul at the materializing peers' shapes (N = 1024 tokens, D = 896, V = 151936).

    timeout 900 python docs/bench/2026-12-02-amd-zen3/n16384_and_engines/torch_bf16_mm.py

AMD EPYC Zen 3, 2 vCPU, torch 2.13.0, 2026-12-02: "logits h@w.T: 17.65s 15.8 GFLOP/s", then dH = z @ w
had not finished when the 900 s timeout stopped it (< 0.32 GFLOP/s).
"""
import time

import torch

N, D, V = 1024, 896, 151936
h = torch.randn(N, D).bfloat16()
w = (torch.randn(V, D) * 0.02).bfloat16()
t0 = time.perf_counter()
z = h @ w.t()
dt = time.perf_counter() - t0
print(f"logits h@w.T: {dt:.2f}s {2 * N * D * V / dt / 1e9:.1f} GFLOP/s", flush=True)
for name, f in [("dh z@w", lambda: z @ w), ("dw z.T@h", lambda: z.t() @ h)]:
    t0 = time.perf_counter()
    f()
    dt = time.perf_counter() - t0
    print(f"{name}: {dt:.2f}s {2 * N * D * V / dt / 1e9:.1f} GFLOP/s", flush=True)
