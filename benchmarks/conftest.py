"""pytest glue of the benchmark suites: parametrization from cases.py and the timed run.

Each ``test_bench_*.py`` declares ``BENCH_OPS`` and one test taking ``case`` and ``provider``; the
grid (ops x providers x dtypes x sizes) is generated here from cases.py, the same definitions
run.py uses. These suites time in one process (no per-provider subprocess, no memory numbers):
``benchmarks/run.py`` is the tool for the memory column and for ratios measured in fresh processes.

Environment:
    BENCH_QUICK=1      only the smoke-test sizes (N=1024, B x T = 2x512); otherwise the bigger
                       sizes are collected too, marked ``slow`` (``-m "not slow"`` deselects them)
    BENCH_ROUNDS=K     timed rounds per case (default 3), after one warm-up round
    BENCH_MAX_GB=G     skip cases whose estimated peak memory exceeds G GB (default 16)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import cases` under any pytest import mode

import cases  # noqa: E402
import providers  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # pyproject registers "slow" for tests/; register it here too for runs with another rootdir/inifile.
    config.addinivalue_line("markers", "slow: long-running cases (still run in CI)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not {"case", "provider"} <= set(metafunc.fixturenames):
        return
    ops = getattr(metafunc.module, "BENCH_OPS")
    params = []
    for case in cases.suite_cases(ops):
        for prov in providers.providers_for(case.op):
            marks = [] if case.is_quick else [pytest.mark.slow]
            params.append(pytest.param(case, prov.name, id=case.test_id(prov.name), marks=marks))
    metafunc.parametrize(("case", "provider"), params)


_inputs_cache: dict[cases.Case, cases.Inputs] = {}


def _inputs(case: cases.Case) -> cases.Inputs:
    """The case's inputs, kept while consecutive tests (the providers of one case) share them.

    One entry only: building the 151936 x 896 head takes seconds, and holding the inputs of several
    cases would only add memory pressure to the machine being measured.
    """
    if case not in _inputs_cache:
        _inputs_cache.clear()
        _inputs_cache[case] = cases.make_inputs(case)
    return _inputs_cache[case]


@pytest.fixture
def run_benchmark(benchmark) -> Callable[[cases.Case, str], None]:
    """Time ``provider`` on ``case`` with pytest-benchmark's pedantic mode (1 warm-up, few rounds)."""
    def run(case: cases.Case, provider: str) -> None:
        prov = providers.PROVIDERS[provider]
        why = prov.unavailable()
        if why:
            pytest.skip(f"{provider} n/a: {why}")
        est = providers.estimate_total_bytes(case, prov)
        max_gb = float(os.environ.get("BENCH_MAX_GB", "16"))
        if est > max_gb * 1e9:
            pytest.skip(f"estimated peak {est / 1e9:.1f} GB > BENCH_MAX_GB={max_gb:g}")
        fn = prov.build(case, _inputs(case))
        # One group per case: pytest-benchmark's table then shows each provider's multiple of the
        # fastest in the group, which is the GEMM floor whenever nobody beats it.
        benchmark.group = f"{case.op}-{case.dtype}-{case.size_id}"
        benchmark.extra_info.update(op=case.op, dtype=case.dtype, size=case.size_label, n_tokens=case.n_tokens,
                                    provider=provider, gemm_gflop=case.gemm_flops() / 1e9)
        # Cases take seconds each: one warm-up round (imports, thread pools, torch.compile), a few rounds.
        benchmark.pedantic(fn, rounds=int(os.environ.get("BENCH_ROUNDS", "3")), iterations=1, warmup_rounds=1)
        backend = prov.backend(case.op)
        if backend:
            benchmark.extra_info["backend"] = backend
    return run
