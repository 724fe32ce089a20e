"""pytest-benchmark suite: linear log-probs at the Qwen2.5-0.5B head (D=896, V=151936).

``logprobs_fwd``: old/ref log-probs, forward only under no_grad. ``logprobs_fwd_bwd``: forward and
backward of ``sum(logp * g)`` w.r.t. hidden and weight. Every provider of cases.py, bf16 and fp32,
N in {1024, 4096, 16384}; ids read ``op-provider-dtype-N<n>``.

    pytest benchmarks/test_bench_logprobs.py --benchmark-only
    BENCH_QUICK=1 pytest benchmarks/test_bench_logprobs.py --benchmark-only -k "bf16"
"""

from __future__ import annotations

from cases import Case

BENCH_OPS = ("logprobs_fwd", "logprobs_fwd_bwd")  # read by conftest.pytest_generate_tests


def test_logprobs(run_benchmark, case: Case, provider: str) -> None:
    run_benchmark(case, provider)
