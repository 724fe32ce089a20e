"""The C++ CPU backend: launchers of the kernels of grpo_kernels._C (built from csrc/).

The kernels write into outputs allocated here (``backends.empty``: NaN in test poison mode).

The tile-GEMM engine of every call is ``cpu_engines.engine_for(dtype)`` (the user's choice through
GRPO_KERNELS_CPU_ENGINE, else capability, else a measured probe); ``gemm_path`` names it.

``forward_backward`` (the fused GRPO loss) picks its schedule by the engine's GEMM path:
- one pass, three GEMMs per token, everywhere but for 16-bit inputs on AMX (fp32 everywhere). Chunks of at most 256 tokens keep exp(logit - running max) per logit (bf16
  for 16-bit inputs: 83 MB for 256 tokens at V = 151936; fp32 for fp32 inputs), get their loss
  coefficients, then form dH and add into dW; a 16-bit dW crosses chunks through an int8 residual
  [V, D] (136 MB at D = 896), so it is rounded as if accumulated in fp32, and keeps it until the
  backward, which scales it by grad_output and rounds it once (``_Formed``). It runs on AMX too
  (``CpuTuning(schedule="one-pass")``), but is not the default there:
- the shared two-pass schedule of ``grpo_kernels.backends``, four GEMMs per token, for 16-bit inputs on
  AMX (even D). Measured on an Intel Xeon with AMX, 2 vCPU, bf16, 8 x 512 tokens: one pass 2.57x its
  three-GEMM floor against two passes' 2.16-2.40x (both before the two-pass backward's GEMMs moved to
  whole-group calls on plain operands), and again on the `amx` engine (2026-12-02, in-process A/B):
  one pass 1.99-2.11x (with VNNI gradient GEMMs and a 16-lane dW flush; 2.22-2.32x before) against two
  passes' 1.37-1.47x, as at AMX GEMM speed the one pass's per-chunk costs (all of W streamed and all
  of dW, with its residual, re-read and re-written once per 256 tokens) outweigh the saved GEMM.
  With the kernels' scratch on cache lines (2026-12-07) two passes ran 1.07-1.16x and the one pass,
  forced, 1.42-1.62x: its dW traffic is memory-bound on 2 vCPUs.

Off AMX the one pass wins at full bf16 GEMM speed too: on AMD Zen 5 (avx512-bf16 engine, ~950 GFLOP/s per
tile, 2 vCPU, bf16, 8 x 512, fresh processes alternating) one pass 0.95-1.03x its three-GEMM floor against two
passes' 1.23-1.32x (docs/bench/2026-12-06-amd-zen5/ab_schedule.log).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import Tensor

from . import CoefFn, FusedResult, Grads, LogprobsParams, Needs, TwoPassBackend, cpu_engines, cpu_extension, empty


@dataclass(frozen=True)
class CpuTuning:
    """Knobs of the C++ backend (0: the kernel sizes it from its memory budget).

    super_chunk_tokens: tokens per super-chunk of forward / backward (a multiple of 256); tests set it
        small to exercise dW accumulation across super-chunks on small inputs.
    fused_chunk_tokens: tokens per one-pass chunk (at most 256); tests set it small to run several chunks.
    schedule: "auto" (one pass on the plain GEMM path, two passes on AMX), "one-pass" or "two-pass".
    """

    super_chunk_tokens: int = 0
    fused_chunk_tokens: int = 0
    schedule: Literal["auto", "one-pass", "two-pass"] = "auto"

    def __post_init__(self) -> None:
        if self.super_chunk_tokens < 0 or self.super_chunk_tokens % 256:
            raise ValueError(f"CpuTuning: super_chunk_tokens must be 0 or a positive multiple of 256; got {self.super_chunk_tokens}")
        if not 0 <= self.fused_chunk_tokens <= 256:
            raise ValueError(f"CpuTuning: fused_chunk_tokens must be in [0, 256]; got {self.fused_chunk_tokens}")
        if self.schedule not in ("auto", "one-pass", "two-pass"):
            raise ValueError(f"CpuTuning: schedule must be auto, one-pass or two-pass; got {self.schedule!r}")


def _ext():
    ext = cpu_extension()
    assert ext is not None, "backend 'cpu' resolved without grpo_kernels._C"
    return ext


def gemm_path(dtype: torch.dtype, d: int) -> str:
    """The engine and operand layout the tile GEMMs take here, e.g. 'brgemm/plain', 'amx/amx-vnni', 'avx512-bf16/vnni' or 'mkl/plain'."""
    return cpu_engines.gemm_path(dtype, d)


def one_pass(dtype: torch.dtype, d: int) -> bool:
    """Whether forward_backward runs the one-pass, three-GEMM schedule for this dtype and hidden size:
    everywhere but for 16-bit tiles on AMX at an even hidden size, the case measured faster with two
    passes (see the module docstring; an odd D on AMX is unmeasured and keeps the one pass)."""
    return dtype == torch.float32 or d % 2 == 1 or not _ext().has_amx(dtype)


def _vec(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.float().contiguous()


@dataclass(frozen=True)
class CpuBackend(TwoPassBackend):
    """The C++ kernels; ``tuning`` is fixed for the instance (see :func:`grpo_kernels.backends.use`)."""

    tuning: CpuTuning = field(default_factory=CpuTuning)
    name: str = "cpu"

    def forward(self, h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, p: LogprobsParams):
        assert h.dtype == w.dtype and h.dtype != torch.float64, h.dtype
        h, w, t = h.contiguous(), w.contiguous(), t.contiguous()
        b = None if b is None else b.contiguous()
        n = h.shape[0]
        logp = empty((n,), torch.float32, h.device)
        lse = empty((n, 2), torch.float32, h.device)
        ent = empty((n,), torch.float32, h.device) if p.return_entropy else None
        _ext().forward(h, w, b, t, p.temperature, p.softcap, self.tuning.super_chunk_tokens,
                       cpu_engines.engine_for(h.dtype), logp, lse, ent)
        return logp, ent, lse

    def backward(self, h, w, b, t, lse, ent, g_logp, g_ent, p: LogprobsParams, needs: Needs) -> Grads:
        h, w, t = h.contiguous(), w.contiguous(), t.contiguous()
        b = None if b is None else b.contiguous()
        dh = empty(tuple(h.shape), h.dtype, h.device) if needs[0] else None
        dw = empty(tuple(w.shape), w.dtype, w.device) if needs[1] else None
        db = empty(tuple(b.shape), b.dtype, b.device) if needs[2] and b is not None else None
        _ext().backward(h, w, b, t, lse.float().contiguous(), _vec(ent), _vec(g_logp), _vec(g_ent),
                        p.temperature, p.softcap, self.tuning.super_chunk_tokens, cpu_engines.engine_for(h.dtype), dh, dw, db)
        return dh, dw, db

    def one_pass(self, dtype: torch.dtype, d: int) -> bool:
        if self.tuning.schedule != "auto":
            return self.tuning.schedule == "one-pass"
        return one_pass(dtype, d)

    def forward_backward(self, h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, p: LogprobsParams,
                         coef_fn: CoefFn, needs: Needs) -> FusedResult:
        if not self.one_pass(h.dtype, w.shape[1]) or h.shape[0] == 0:
            return super().forward_backward(h, w, b, t, p, coef_fn, needs)
        return self._one_pass_schedule(h, w, b, t, p, coef_fn, needs)

    def _one_pass_schedule(self, h, w, b, t, p: LogprobsParams, coef_fn: CoefFn, needs: Needs) -> FusedResult:
        ext = _ext()
        engine = cpu_engines.engine_for(h.dtype)
        h, w, t = h.contiguous(), w.contiguous(), t.contiguous()
        b = None if b is None else b.contiguous()
        n, (v, d) = h.shape[0], w.shape
        chunk = self.tuning.fused_chunk_tokens or ext.fused_chunk_tokens(n, v, d, h.dtype)
        kept = torch.empty(ext.kept_bytes(min(chunk, n), v, h.dtype), dtype=torch.uint8)
        logp = empty((n,), torch.float32, h.device)
        lse = empty((n, 2), torch.float32, h.device)
        ent = empty((n,), torch.float32, h.device) if p.return_entropy else None
        dh = empty(tuple(h.shape), h.dtype, h.device) if needs[0] else None
        dw = empty(tuple(w.shape), w.dtype, w.device) if needs[1] else None
        # a 16-bit dW keeps its int8 residual [V, D] (which carries it across chunks) until grad_output is
        # known, so that scaling it by grad_output rounds it once (_Formed.finish); a 16-bit dH its residual
        # [N, D] likewise (half dH's own bytes: 3.7 MB at N = 4096, D = 896)
        sixteen = h.dtype != torch.float32
        dh_lo = torch.empty(tuple(h.shape), dtype=torch.int8) if dh is not None and sixteen else None
        dw_lo = torch.empty(tuple(w.shape), dtype=torch.int8) if dw is not None and sixteen else None
        db_acc = torch.zeros(v, dtype=torch.float32) if needs[2] and b is not None else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            en = None if ent is None else ent[s:e]
            ext.chunk_forward(h[s:e], w, b, t[s:e], p.temperature, p.softcap, engine, kept, logp[s:e], lse[s:e], en)
            g_logp, g_ent = coef_fn(s, e, logp[s:e], en)
            ext.chunk_backward(h[s:e], w, b, t[s:e], kept, lse[s:e], en, _vec(g_logp), _vec(g_ent),
                               p.temperature, p.softcap, engine, None if dh is None else dh[s:e],
                               None if dh_lo is None else dh_lo[s:e], dw, dw_lo, db_acc, s > 0)
        return logp, ent, _Formed(dh, dh_lo, dw, dw_lo, db_acc, None if b is None else b.dtype)


class _Formed:
    """The one pass's gradients until grad_output is known. ``finish(scale)`` scales them in place, in C++
    (``_C.scale_rounded_once`` reads the CPU scale; 1 costs nothing): fp32 ones and db (kept in fp32)
    multiplied; a 16-bit dW and dH each rounded once from its value plus residual, which is released then
    (before, dH kept no residual and was rounded a second time: its mean error at grad_output 1/3 and
    1/7 was 1.3x and 1.6x the materializing path's, bf16 8 x 64 tokens, D = 128, V = 2000).

    Memory: the dW residual (V D bytes, 136 MB at the Qwen head) lives from the forward to the backward
    instead of for the forward only; the forward's peak is unchanged when dW spans two chunks or more
    (it had the residual already), and a dW formed in one chunk (n <= 256) now has it too. The dH
    residual is N D bytes, half of dH itself.
    """

    def __init__(self, dh, dh_lo, dw, dw_lo, db_acc, b_dtype) -> None:
        self._state: Optional[tuple] = (dh, dh_lo, dw, dw_lo, db_acc)
        self._b_dtype = b_dtype

    def finish(self, scale: Optional[Tensor]) -> Grads:
        assert self._state is not None, "Formed.finish runs once"
        (dh, dh_lo, dw, dw_lo, db_acc), self._state = self._state, None
        if scale is not None:
            ext = _ext()
            for g, lo in ((dh, dh_lo), (dw, dw_lo), (db_acc, None)):
                if g is not None:
                    ext.scale_rounded_once(g, lo, scale)
        del dh_lo, dw_lo
        return dh, dw, None if db_acc is None else db_acc.to(self._b_dtype)
