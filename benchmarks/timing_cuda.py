"""The CUDA side of benchmarks/run.py: CUDA-event timing and the caching allocator's peak memory.

``run.py --device cuda`` hands each measurement to :func:`worker` (in its own subprocess, like the
CPU path). One subprocess measures both time and memory, which on a GPU do not disturb each other:

1. build the case's inputs (seeded, on the CPU as for every provider, then moved to the GPU as
   leaves that require grad exactly when the op has a backward), and the provider's callable (the
   GEMM floor preallocates its outputs on the GPU here: cuBLAS GEMMs into them, ``torch.mm(out=)``);
2. warm up: ``WARMUP`` calls (Triton JIT compiles, cuBLAS heuristics, torch.compile);
3. memory: ``torch.cuda.reset_peak_memory_stats()``, one call, ``max_memory_allocated()`` minus the
   allocated bytes before it and minus the outputs the op returns = the extra peak (the floor's
   preallocated [N, V] buffer is outside the call and is added back, as on the CPU);
4. time: ``repeats`` calls, each bracketed by CUDA events on the current stream and synchronized,
   outputs freed between calls; the median is reported.

Nothing here touches CUDA at import: the module imports (and its functions are defined) without a GPU.
"""

from __future__ import annotations

import gc
import statistics
from typing import Any, Callable

import torch
from torch import Tensor

WARMUP = 2


def to_device(inp, device: torch.device):
    """A copy of ``inp`` (cases.Inputs) on ``device``: hidden and weight stay leaves with their grad flag."""
    moved = {}
    for name, value in vars(inp).items():
        if isinstance(value, Tensor):
            value = value.detach().to(device).requires_grad_(value.requires_grad)
        moved[name] = value
    return type(inp)(**moved)


def _sync() -> None:
    torch.cuda.synchronize()


def time_cuda(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds per call of ``fn`` by CUDA events, ``repeats`` calls after the caller's warm-up."""
    times = []
    for _ in range(repeats):
        gc.collect()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _sync()
        start.record()
        res = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        del res  # free the outputs before the next call
    return times


def output_bytes(res) -> int:
    if isinstance(res, Tensor):
        return res.numel() * res.element_size()
    if isinstance(res, (tuple, list)):
        return sum(output_bytes(r) for r in res)
    return 0


def peak_extra_cuda(build: Callable[[], Callable[[], Any]]) -> dict:
    """Extra peak bytes of one call: max_memory_allocated during build + call, above the allocation
    before it, minus the returned outputs."""
    gc.collect()
    _sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn = build()
    res = fn()
    _sync()
    peak = torch.cuda.max_memory_allocated()
    kept = output_bytes(res)
    del res, fn
    return {"status": "ok", "base_bytes": base, "peak_bytes": peak, "output_bytes": kept,
            "extra_bytes": peak - base - kept, "hwm_reset": True}


def device_info() -> dict:
    """Name, SM count, memory and capability of GPU 0 (for the JSON next to every number)."""
    if not torch.cuda.is_available():
        return {"gpu": None}
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "sm_count": p.multi_processor_count, "gpu_mem_gb": round(p.total_memory / 1e9, 1),
            "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda,
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def worker(spec: dict, cases, providers) -> dict:
    """One provider on one case on GPU 0: time and memory (see the module docstring).

    ``cases`` / ``providers``: benchmarks' case-grid and providers modules (imported by run.py's worker).
    """
    if not torch.cuda.is_available():
        return {"status": "n/a", "reason": "--device cuda but torch.cuda.is_available() is False"}
    dev = torch.device("cuda")
    case = cases.Case.from_json(spec["case"])
    prov = providers.PROVIDERS[spec["provider"]]
    reason = prov.unavailable()
    if reason:
        return {"status": "n/a", "reason": reason}
    inp = to_device(cases.make_inputs(case, spec["seed"]), dev)
    floor_dtype = cases.DTYPES[spec["floor"]] if spec.get("floor", "dtype") != "dtype" else None
    out: dict[str, Any] = {"status": "ok", "input_bytes": inp.nbytes(), "device": torch.cuda.get_device_name(0)}

    def build() -> Callable[[], Any]:
        return prov.build(case, inp, floor_dtype)

    fn = build()
    _sync()
    t0 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0[0].record()
    for _ in range(WARMUP):
        res = fn()
        del res
    t0[1].record()
    _sync()
    out["warmup_s"] = t0[0].elapsed_time(t0[1]) / 1e3
    del fn
    out["memory"] = peak_extra_cuda(build)
    fn = build()
    times = time_cuda(fn, spec["repeats"])
    out["times_s"] = times
    out["median_s"] = statistics.median(times)
    out["backend"] = prov.backend(case.op)
    return out
