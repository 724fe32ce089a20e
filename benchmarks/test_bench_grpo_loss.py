"""pytest-benchmark suite: hidden states -> GRPO loss -> gradients at the Qwen2.5-0.5B head.

``grpo_fwd_bwd``: hidden [B, T, D] -> GRPO loss (loss_type "dapo", beta 0.04, old and ref log-probs
given) -> backward w.r.t. hidden and weight. Every provider of cases.py, bf16 and fp32,
B x T in {8x512, 4x2048, 16x1024} (2x512 with BENCH_QUICK=1); ids read ``op-provider-dtype-BxT``.

    pytest benchmarks/test_bench_grpo_loss.py --benchmark-only
    BENCH_QUICK=1 pytest benchmarks/test_bench_grpo_loss.py --benchmark-only -k "bf16"
"""

from __future__ import annotations

from cases import Case

BENCH_OPS = ("grpo_fwd_bwd",)  # read by conftest.pytest_generate_tests


def test_grpo_loss(run_benchmark, case: Case, provider: str) -> None:
    run_benchmark(case, provider)
