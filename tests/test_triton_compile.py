"""Ahead-of-time sm_80 / sm_90 compiles of every Triton launch, on a machine without a GPU.

The interpreter tests check the kernels' arithmetic; these check what a GPU compiler makes of them.
The grid (``grpo_kernels.backends.triton.aot.cases``) plans each case with the backend's own
launchers (``forward_plan`` / ``backward_plan`` / ``group_advantages_plan`` on meta tensors, at the
configuration ``cuda_config`` picks for an A100 / H100), so every argument and constexpr a launcher
passes is compiled, with Triton's own specialization. Each case fails on a compile error, on local
memory (register spills or a stack frame), on shared memory above the target's per-block limit,
and, for a tensor-core tile kernel, on missing MMA instructions (wgmma on sm_90, mma.sync on sm_80).

The compiles run once per session in one subprocess (the tests' conftest sets TRITON_INTERPRET=1,
which turns every kernel into an interpreted function; the subprocess imports the package without
it), on up to 8 processes; each distinct specialization is compiled once. Registers, local and
shared memory of every launch are in the terminal summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

try:  # aot.py binds arguments with Triton 3.9's runtime internals (create_function_from_signature, _pack_args)
    from grpo_kernels.backends.triton import aot
except ImportError as exc:  # pragma: no cover - another Triton
    pytest.skip(f"Triton {triton.__version__} lacks the internals the ahead-of-time compile uses: {exc}",
                allow_module_level=True)

CASES = aot.cases()
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
if not all((_BIN / tool).exists() for tool in ("ptxas", "cuobjdump")):
    pytest.skip(f"ptxas / cuobjdump are not in the Triton wheel ({_BIN})", allow_module_level=True)


@pytest.fixture(scope="session")
def compiled(tmp_path_factory, request) -> dict:
    """Every distinct launch of the grid compiled for its target: aot.run_grid's result."""
    out = tmp_path_factory.mktemp("triton_aot") / "grid.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(aot.__file__).resolve().parents[3])  # the grpo_kernels being tested, not an installed one
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning
    jobs = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "grpo_kernels.backends.triton.aot", "--json", str(out), "--jobs", str(jobs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    res = json.loads(out.read_text())
    request.config._triton_compile_summary = [  # printed by conftest's pytest_terminal_summary
        f"{res['distinct_compiles']} distinct compiles of {len(res['cases'])} cases in {res['wall_s']:.0f} s "
        f"({res['jobs']} processes, triton {res['triton']})"] + proc.stdout.strip().splitlines()
    return res


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_compiles_without_spills(case, compiled, record_property):
    entries = compiled["cases"][case.id]
    assert entries, f"{case.id}: the launchers planned no kernel launch"
    failures, lines = [], []
    for e in entries:
        r = compiled["reports"][e["job"]]
        if "error" in r:
            failures.append(f"{e['kernel']}: {r['error']}")
            continue
        rep = aot.CompileReport(**r)
        lines.append(rep.summary)
        failures += [f"{e['kernel']} (grid {e['grid']}): {why}" for why in aot.problems(rep, e["mma"])]
    record_property("resources", "; ".join(lines))
    print("\n".join(lines))
    assert not failures, f"{case.id}:\n" + "\n".join(failures)


def test_every_kernel_is_in_the_grid(compiled):
    """A new ``*_kernel`` in a kernel module that no launcher of the grid launches fails here."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from grpo_kernels.backends.triton import advantages, logprobs_kernels

    defined = {name for mod in (logprobs_kernels, advantages) for name, obj in vars(mod).items()
               if isinstance(obj, (JITFunction, InterpretedFunction)) and name.endswith("_kernel")}
    launched = {e["kernel"] for entries in compiled["cases"].values() for e in entries}
    assert defined - launched == set(), f"kernels never compiled by the grid: {sorted(defined - launched)}"
    for arch in aot.ARCHS:  # and each on both targets
        on_arch = {e["kernel"] for cid, entries in compiled["cases"].items() if cid.startswith(f"sm{arch}-")
                   for e in entries}
        assert defined <= on_arch, f"sm_{arch} misses {sorted(defined - on_arch)}"


def test_mma_count_tells_tensor_cores_from_fma(compiled):
    """The MMA check can fail: IEEE-fp32 dots compile to FMA (no MMA), TF32 / bf16 ones to MMA."""
    counts: dict[tuple[int, str, str], set[int]] = {}
    for case in CASES:
        if not isinstance(case, aot.LogprobsCase):
            continue
        for e in compiled["cases"][case.id]:
            if e["kernel"] in aot.TILE_KERNELS:
                counts.setdefault((case.arch, case.dtype, e["kernel"]), set()).add(
                    compiled["reports"][e["job"]]["sass_mma"])
    for (arch, dtype, kernel), seen in counts.items():
        if dtype == "fp32":
            assert seen == {0}, f"sm_{arch} {kernel} fp32 (IEEE) has MMA instructions: {seen}"
        else:
            assert 0 not in seen, f"sm_{arch} {kernel} {dtype} has no MMA in some variant: {seen}"


def test_problems_flags_spills_shared_memory_and_fma():
    base = dict(kernel="_fwd_kernel", arch=90, registers=128, local_bytes=0, shared_bytes=40 << 10, ptx_mma=2,
                sass_mma=2, num_warps=8, num_stages=3)
    assert aot.problems(aot.CompileReport(**base), True) == []
    spill = aot.problems(aot.CompileReport(**{**base, "local_bytes": 8}), True)
    assert len(spill) == 1 and "local memory" in spill[0]
    smem = aot.problems(aot.CompileReport(**{**base, "shared_bytes": 228 << 10}), True)
    assert len(smem) == 1 and "per-block limit" in smem[0]
    assert aot.problems(aot.CompileReport(**{**base, "arch": 80, "shared_bytes": 164 << 10}), False)
    fma = aot.problems(aot.CompileReport(**{**base, "ptx_mma": 0, "sass_mma": 0}), True)
    assert len(fma) == 1 and "wgmma" in fma[0]
    assert aot.problems(aot.CompileReport(**{**base, "ptx_mma": 0, "sass_mma": 0}), False) == []


def test_plans_are_what_the_launchers_run():
    """forward / backward run exactly their plan's steps (the compiled launches are the launched ones)."""
    import torch

    from grpo_kernels.backends import LogprobsParams
    from grpo_kernels.backends.triton import launch_plan, logprobs_launch as L

    calls = []
    real_run = launch_plan.run
    h, w, t = torch.randn(5, 16), torch.randn(40, 16), torch.randint(0, 40, (5,))
    p = LogprobsParams(return_entropy=True)
    try:
        L.run = lambda steps: (calls.append([getattr(s, "name", "copy") for s in steps]), real_run(steps))
        logp, ent, lse = L.forward(h, w, None, t, p)
        L.backward(h, w, None, t, lse, ent, torch.ones(5), None, p, (True, True, False))
    finally:
        L.run = real_run
    assert calls[0] == ["_fwd_kernel"] and calls[1][0] == "_bwd_dh_kernel" and "_bwd_dw_kernel" in calls[1]
