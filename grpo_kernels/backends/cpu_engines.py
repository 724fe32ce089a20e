"""Which tile-GEMM engine the C++ CPU kernels run, per input dtype.

The kernels' GEMMs go through one interface (csrc/tile_engine.h) with seven engines, and one for tests:

- ``brgemm``: ATen's ``cpublas::brgemm`` on plain row-major operands; for 16-bit inputs ATen then runs
  its full 16-bit x 16-bit -> fp32 GEMM (its own packing and blocking). Runs every dtype.
- ``brgemm-vnni``: the same entry with VNNI-packed B operands, which on AMX runs oneDNN's JIT brgemm
  micro-kernel; 16-bit on AMX only. Opt-in: measured slower than ``brgemm`` (below).
- ``mkl``: MKL's ``cblas_gemm_bf16bf16f32`` / ``cblas_gemm_f16f16f32`` (16-bit x 16-bit -> fp32) and
  ``sgemm``, found at run time in the libtorch_cpu the torch wheel ships (no extra dependency; a torch
  without them reports the engine unavailable).
- ``mkl-upcast``: 16-bit tiles only: both operands widened to fp32 (exactly) in per-thread scratch, then
  MKL's ``sgemm``. Products of 16-bit values are exact in fp32 and the sums are fp32, as in the 16-bit
  engines, so the accuracy class is theirs; it is for CPUs whose 16-bit GEMMs widen to fp32 anyway.
- ``atmm``: ``at::mm`` on strided views (fp32 only).
- ``amx``: our own cache-blocked AMX kernel (csrc/amx_gemm.h), bf16 only, on the brgemm-vnni operand
  layout (B VNNI-packed once by the schedules, read in place by the tile loads); ragged edges and
  plain-operand calls go to ATen's brgemm. Needs a CPU with AMX-BF16 and Linux's permission.
- ``avx512-bf16``: our own cache-blocked AVX-512-BF16 (``vdpbf16ps``) kernel (csrc/avx512_bf16_gemm.h),
  bf16 only, on the same VNNI operand layout as ``amx``, for CPUs with the instruction and no AMX (AMD
  Zen 4 / Zen 5). Every GEMM of both schedules takes VNNI operands on it; an odd hidden size takes the plain
  path (ATen's brgemm). Measured on AMD EPYC Zen 5 (2 threads): 949-999 GFLOP/s at the kernels' tile
  shapes against 204-215 for ``brgemm``, ``mkl`` and ``mkl-upcast``, and 905 for torch's own bf16 matmul.
- ``amx-emulated`` (tests): the ``amx`` engine's kernel on software tiles, bf16 only, on every machine,
  taking every branch the schedules take for ``amx`` (VNNI operands, the one-pass and two-pass VNNI
  gradient GEMMs), so those are tested where AMX is not. Scalar and slow: never chosen
  nor probed, only forced (``GRPO_KERNELS_CPU_ENGINE=bf16=amx-emulated``).

Every engine writes fp32 logits tiles, so the choice changes speed, never the accuracy class.

Selection, per dtype, cached per process (``engine_for``):

1. the user's choice: ``GRPO_KERNELS_CPU_ENGINE=<engine>`` for every dtype, or per dtype
   ``GRPO_KERNELS_CPU_ENGINE="bf16=mkl,fp32=atmm"`` (keys ``bf16``, ``fp16``, ``fp32``); an engine that
   cannot run that dtype here raises, naming why (``GRPO_KERNELS_CPU_ENGINE=amx`` therefore makes fp32
   calls raise; ``bf16=amx`` forces it for bf16 alone);
2. capability where it decides: bf16 tiles on AMX run ``amx`` when it can run (see the benchmark
   record docs/bench/2026-12-02-intel-amx/amx_engine); else 16-bit tiles on AMX run ``brgemm`` on plain operands (measured on an
   Intel Xeon with AMX, 1 thread, bf16, ATen's brgemm at the kernels' shapes such as 256 x 256 x 896 and
   896 x 256 x 1024: plain 600-1,000 GFLOP/s, VNNI-packed micro-kernel 250-550, MKL 710-860; the
   two-pass backward at N = 4096 took 2.7 s plain against 3.8-5.1 s VNNI-packed); fp32 runs ``mkl``
   (torch.mm's own sgemm without the tensor wrapping);
3. otherwise (16-bit without AMX: AVX-512-BF16 or AVX2 machines) a short measured probe: the forward's
   tile on every thread for each runnable engine (tens of milliseconds); on AMD Zen 5 it picks
   ``avx512-bf16`` for bf16 by 4-5x. The fastest wins, except that
   ``mkl-upcast`` must beat the fastest 16-bit engine by ``WIDEN_MARGIN`` (10 %): its per-thread fp32
   scratch costs cache that the tile probe does not see. Measured on AMD EPYC Zen 3 (AVX2, 2 threads,
   fresh processes alternating, the GRPO loss at 4 x 512): bf16, where the tile probe ties all three
   engines (106-147 GFLOP/s), took a median 16.8 s (16.1-19.5) on ``brgemm`` against 17.9 s (17.1-18.4) on ``mkl-upcast``;
   fp16, where ``mkl-upcast`` leads the probe (100-126 against 79-82), took 19.1 s (17.5-19.9) on it
   against 23.4 s (21.6-24.2) on ``brgemm``.

``gemm_path(dtype, d)`` names what ran, e.g. ``"amx/amx-vnni"``, ``"avx512-bf16/vnni"``, ``"brgemm/plain"`` or
``"brgemm-vnni/amx-vnni"``.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from . import cpu_extension

ENGINES = ("brgemm", "brgemm-vnni", "mkl", "mkl-upcast", "atmm", "amx", "avx512-bf16", "amx-emulated")
# engines for tests only: runnable everywhere, never probed nor chosen
TEST_ENGINES = ("amx-emulated",)
ENV_VAR = "GRPO_KERNELS_CPU_ENGINE"
_DTYPE_KEYS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_PROBE_D = 896  # the Qwen2.5-0.5B hidden size the benchmarks use; the ranking does not hinge on it
_PROBE_REPS = 6


def _ext():
    ext = cpu_extension()
    assert ext is not None, "backend 'cpu' resolved without grpo_kernels._C"
    return ext


def unavailable(engine: str, dtype: torch.dtype) -> Optional[str]:
    """None when ``engine`` runs tiles of ``dtype`` on this machine, else the reason it cannot."""
    if engine not in ENGINES:
        raise ValueError(f"unavailable: engine one of {ENGINES}; got {engine!r}")
    return _ext().engine_unavailable(engine, dtype) or None


def available_engines(dtype: torch.dtype) -> list[str]:
    """The engines that run tiles of ``dtype`` here."""
    return [e for e in ENGINES if unavailable(e, dtype) is None]


def _forced(dtype: torch.dtype) -> Optional[str]:
    """The engine the user forced for ``dtype`` through GRPO_KERNELS_CPU_ENGINE, or None."""
    spec = os.environ.get(ENV_VAR, "").strip()
    if not spec:
        return None
    if "=" not in spec:
        choice = spec
    else:
        choice = None
        for item in spec.split(","):
            key, sep, value = (s.strip() for s in item.partition("="))
            if not sep or key not in _DTYPE_KEYS:
                raise ValueError(
                    f"{ENV_VAR}: an engine or 'dtype=engine' items with dtype in {sorted(_DTYPE_KEYS)}; got {spec!r}"
                )
            if _DTYPE_KEYS[key] == dtype:
                choice = value
        if choice is None:
            return None
    if choice not in ENGINES:
        raise ValueError(f"{ENV_VAR}: engine one of {ENGINES}; got {choice!r}")
    why = unavailable(choice, dtype)
    if why is not None:
        raise ValueError(f"{ENV_VAR}: engine {choice!r} cannot run {dtype} here ({why})")
    return choice


# How much faster than the best 16-bit engine the widening one must probe to be chosen (see above).
WIDEN_MARGIN = 1.10


def probe(dtype: torch.dtype) -> dict[str, float]:
    """GFLOP/s of every runnable engine but the test engines on the forward's tile (all threads at once),
    measured now."""
    ext = _ext()
    return {e: ext.tile_gflops(e, dtype, _PROBE_D, _PROBE_REPS) for e in available_engines(dtype) if e not in TEST_ENGINES}


@functools.lru_cache(maxsize=None)
def _chosen(dtype: torch.dtype, threads: int) -> tuple[str, str]:
    """(engine, why) by capability, else by the probe; cached per process and thread count."""
    ext = _ext()
    if dtype == torch.float32:
        if unavailable("mkl", dtype) is None:
            return "mkl", "fp32: MKL sgemm"
        return "atmm", "fp32: at::mm"
    if ext.has_amx(dtype):
        if unavailable("amx", dtype) is None:
            return "amx", "AMX: our AMX kernel on VNNI-packed operands (measured faster than ATen's plain brgemm on the logits tiles)"
        return "brgemm", "AMX: ATen brgemm on plain operands (measured faster than VNNI-packed)"
    rates = probe(dtype)
    return pick(rates), "probe: " + ", ".join(f"{e} {r:.0f} GFLOP/s" for e, r in rates.items())


def pick(rates: dict[str, float]) -> str:
    """The probe's winner among ``rates`` (engine -> GFLOP/s): the fastest 16-bit engine, unless
    ``mkl-upcast`` beats it by ``WIDEN_MARGIN``."""
    native = {e: r for e, r in rates.items() if e != "mkl-upcast"}
    best = max(native, key=native.get)
    widened = rates.get("mkl-upcast")
    return "mkl-upcast" if widened is not None and widened > WIDEN_MARGIN * native[best] else best


def engine_for(dtype: torch.dtype) -> str:
    """The engine the kernels run for ``dtype``: the user's choice, else capability, else the probe."""
    return _forced(dtype) or _chosen(dtype, torch.get_num_threads())[0]


def selection(dtype: torch.dtype) -> tuple[str, str]:
    """(engine, why it was chosen) for ``dtype``, e.g. ``("brgemm", "AMX: ...")``."""
    forced = _forced(dtype)
    if forced is not None:
        return forced, f"forced by {ENV_VAR}"
    return _chosen(dtype, torch.get_num_threads())


def gemm_path(dtype: torch.dtype, d: int, engine: Optional[str] = None) -> str:
    """What the tile GEMMs run on for ``dtype`` and hidden size ``d``: ``"<engine>/amx-vnni"`` when they
    take VNNI-packed operands on AMX, ``"avx512-bf16/vnni"`` on our AVX-512-BF16 kernel, else
    ``"<engine>/plain"``."""
    return _ext().gemm_path(dtype, d, engine or engine_for(dtype))
