"""Tile-GEMM engines at the kernels' shapes, bf16 -> fp32, 1 and 2 threads (``grpo_kernels._C.tile_gemm_gflops``).

    flock /tmp/gk-heavy.lock python benchmarks/tile_gemm_bench.py [--reps R] [--out FILE.json]

Engines: ATen brgemm on plain operands, brgemm on VNNI operands (oneDNN's JIT micro-kernel through ATen),
MKL cblas_gemm_bf16bf16f32, mkl-upcast, our AMX kernel (csrc/amx_gemm.h) and our AVX-512-BF16 kernel
(csrc/avx512_bf16_gemm.h), each through the kernels' own ``tile_gemm`` (csrc/tile_engine.h), B in the layout
the kernels hand that engine (VNNI pairs for brgemm-vnni and amx on AMX, and for avx512-bf16), A streaming
through 16 blocks. The last column is our kernel (amx or avx512-bf16, whichever runs here) over the best
other. Shapes (M x N x K, lda, ldb) are the tile GEMMs of csrc/forward.cpp, backward.cpp and one_pass.cpp
at D = 896. Engines this machine cannot run are left out (``cpu_engines.available_engines``); correctness of every engine is
tests/test_cpu_engines.py's job.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
from grpo_kernels.backends import cpu_engines, cpu_extension  # noqa: E402

D = 896
# name, M, N, K, lda, ldb, add
SHAPES = [
    ("forward logits 256x256xD", 256, 256, D, D, 272, False),
    ("2-pass dW^T (vnni) Dx256x256", D, 256, 256, 4112, 272, True),
    ("2-pass dH^T (vnni) Dx256x1024", D, 256, 1024, 1056, 272, True),
    ("2-pass dW (plain) 1024xDx1024", 1024, D, 1024, 1040, D, False),
    ("2-pass dW (plain) 1024xDx4096", 1024, D, 4096, 4112, D, False),
    ("2-pass dH^T (plain) Dx4096x1024", D, 4096, 1024, 1056, 4112, True),
    ("1-pass dW 256xDx256", 256, D, 256, 272, D, False),
    ("1-pass dH 256xDx1024", 256, D, 1024, 1056, D, True),
]
ENGINES = ["brgemm", "brgemm-vnni", "mkl", "mkl-upcast", "amx", "avx512-bf16"]
OURS = ("amx", "avx512-bf16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ext = cpu_extension()
    if ext is None:
        sys.exit("tile_gemm_bench: needs the C++ extension grpo_kernels._C (pip install -e . builds it)")
    engines = [e for e in ENGINES if e in cpu_engines.available_engines(torch.bfloat16)]
    rows = []
    # the floor's GEMM for reference: torch's bf16 matmul on a whole [4096 x D] x [D x V/4] (bf16 out)
    h = torch.randn(4096, D).to(torch.bfloat16)
    w = torch.randn(151936 // 4, D).to(torch.bfloat16)
    out = torch.empty(4096, w.shape[0], dtype=torch.bfloat16)
    for nt in args.threads:
        torch.set_num_threads(nt)
        torch.mm(h, w.t(), out=out)
        best = 1e30
        for _ in range(3):
            t0 = time.perf_counter()
            torch.mm(h, w.t(), out=out)
            best = min(best, time.perf_counter() - t0)
        rate = 2 * h.shape[0] * D * w.shape[0] / best * 1e-9
        print(f"torch.mm [4096 x {D}] x [{D} x {w.shape[0]}] bf16, {nt} thread(s): {rate:.0f} GFLOP/s ({rate / nt:.0f} per thread)")
        rows.append({"shape": "torch.mm whole op", "threads": nt, "gflops_per_thread": {"torch.mm": rate / nt}})
    del h, w, out
    ours = [e for e in OURS if e in engines]
    print(f"{'shape':34s} thr " + " ".join(f"{e:>12s}" for e in engines) + ("   ours/best-other" if ours else ""))
    for nt in args.threads:
        torch.set_num_threads(nt)
        for name, m, n, k, lda, ldb, add in SHAPES:
            reps = max(1, int(args.reps * (256 * 256 * D) / (m * n * k)))
            r = {e: ext.tile_gemm_gflops(e, torch.bfloat16, m, n, k, lda, ldb, add, reps) / nt for e in engines}
            other = max(v for e, v in r.items() if e not in OURS)
            ratio = f"   {max(r[e] for e in ours) / other:.2f}x" if ours else ""
            print(f"{name:34s} {nt:3d} " + " ".join(f"{r[e]:12.0f}" for e in engines) + ratio)
            rows.append({"shape": name, "threads": nt, "gflops_per_thread": r})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "unit": "GFLOP/s per thread", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
