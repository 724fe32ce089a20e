"""Launchers of the C++ CPU kernels (grpo_kernels._C, built from csrc/).

The kernels write into outputs allocated here (``backends.empty``: NaN in test poison mode).

The tile-GEMM engine of every call is ``cpu_engines.engine_for(dtype)`` (the user's choice through
GRPO_KERNELS_CPU_ENGINE, else capability, else a measured probe); ``gemm_path`` names it.

``forward_backward`` (the fused GRPO loss) picks its schedule by the engine's GEMM path:
- one pass, three GEMMs per token, on every engine's plain path (any engine but AMX's packed brgemm,
  and fp32 everywhere). Chunks of at most 256 tokens keep exp(logit - running max) per logit (bf16
  for 16-bit inputs: 83 MB for 256 tokens at V = 151936; fp32 for fp32 inputs), get their loss
  coefficients, then form dH and add into dW; a 16-bit dW crosses chunks through an int8 residual
  [V, D] (136 MB at D = 896), so it is rounded as if accumulated in fp32. It runs on AMX too
  (GRPO_KERNELS_CPU_ENGINE=mkl, or brgemm on unpacked operands), but is not the default there:
- two passes, four GEMMs per token, on brgemm/amx-vnni (16-bit on AMX). Measured on an Intel Xeon with
  AMX, 2 vCPU, bf16, 8 x 512 tokens: one pass 2.57x its three-GEMM floor against two passes'
  2.16-2.40x, as at AMX GEMM speed the one pass's per-chunk costs (all of W streamed and all of dW,
  with its residual, re-read and re-written once per 256 tokens) outweigh the saved GEMM.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import LogprobsParams, cpu_engines, cpu_extension, empty

# Tokens per super-chunk (a multiple of 256); 0 lets the kernel size it from its memory budget.
# Tests set it small to exercise dW accumulation across super-chunks on small inputs.
SUPER_CHUNK_TOKENS = 0
# Tokens per one-pass chunk (at most 256); 0 lets the kernel size it from its memory budget. Tests set
# it small to run several chunks on small inputs.
FUSED_CHUNK_TOKENS = 0


def _ext():
    ext = cpu_extension()
    assert ext is not None, "backend 'cpu' resolved without grpo_kernels._C"
    return ext


def gemm_path(dtype: torch.dtype, d: int) -> str:
    """The engine and operand layout the tile GEMMs take here, e.g. 'brgemm/amx-vnni' or 'mkl/plain'."""
    return cpu_engines.gemm_path(dtype, d)


def _inputs(h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor):
    """The inputs as the kernels take them: contiguous, in a dtype they support."""
    if h.dtype == torch.float64:
        raise TypeError("backend 'cpu' supports float32, bfloat16 and float16; use backend='torch' for float64")
    return h.contiguous(), w.contiguous(), None if b is None else b.contiguous(), t.contiguous()


def forward(h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, p: LogprobsParams):
    h, w, b, t = _inputs(h, w, b, t)
    n = h.shape[0]
    logp = empty((n,), torch.float32, h.device)
    lse = empty((n,), torch.float32, h.device)
    ent = empty((n,), torch.float32, h.device) if p.return_entropy else None
    _ext().forward(h, w, b, t, p.temperature, p.softcap, SUPER_CHUNK_TOKENS, cpu_engines.engine_for(h.dtype), logp,
                   lse, ent)
    return logp, ent, lse


def backward(h, w, b, t, lse, ent, g_logp, g_ent, p: LogprobsParams, needs):
    h, w, t = h.contiguous(), w.contiguous(), t.contiguous()
    b = None if b is None else b.contiguous()
    dh = empty(tuple(h.shape), h.dtype, h.device) if needs[0] else None
    dw = empty(tuple(w.shape), w.dtype, w.device) if needs[1] else None
    db = empty(tuple(b.shape), b.dtype, b.device) if needs[2] and b is not None else None
    _ext().backward(h, w, b, t, lse.float().contiguous(), None if ent is None else ent.float().contiguous(),
                    g_logp.float().contiguous(), None if g_ent is None else g_ent.float().contiguous(),
                    p.temperature, p.softcap, SUPER_CHUNK_TOKENS, cpu_engines.engine_for(h.dtype), dh, dw, db)
    return dh, dw, db


def one_pass(dtype: torch.dtype, d: int) -> bool:
    """Whether forward_backward runs the one-pass, three-GEMM schedule for this dtype and hidden size:
    everywhere but on AMX's packed brgemm path (see the module docstring)."""
    return not gemm_path(dtype, d).endswith("/amx-vnni")


def forward_backward(h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, p: LogprobsParams, coef_fn, needs):
    h, w, b, t = _inputs(h, w, b, t)
    run = _one_pass_schedule if one_pass(h.dtype, w.shape[1]) else _two_pass_schedule
    return run(h, w, b, t, p, coef_fn, needs)


def _two_pass_schedule(h, w, b, t, p: LogprobsParams, coef_fn, needs):
    logp, ent, lse = forward(h, w, b, t, p)
    g_logp, g_ent = coef_fn(0, h.shape[0], logp, ent)
    dh, dw, db = backward(h, w, b, t, lse, ent, g_logp, g_ent, p, needs)
    return logp, ent, dh, dw, db


def _one_pass_schedule(h, w, b, t, p: LogprobsParams, coef_fn, needs):
    ext = _ext()
    engine = cpu_engines.engine_for(h.dtype)
    n, (v, d) = h.shape[0], w.shape
    chunk = FUSED_CHUNK_TOKENS or ext.fused_chunk_tokens(n, v, d, h.dtype)
    kept = torch.empty(ext.kept_bytes(min(chunk, n), v, h.dtype), dtype=torch.uint8)
    logp = empty((n,), torch.float32, h.device)
    lse = empty((n,), torch.float32, h.device)
    ent = empty((n,), torch.float32, h.device) if p.return_entropy else None
    dh = empty(tuple(h.shape), h.dtype, h.device) if needs[0] else None
    dw = empty(tuple(w.shape), w.dtype, w.device) if needs[1] else None
    multi_chunk_16bit = dw is not None and w.dtype != torch.float32 and n > chunk
    dw_lo = torch.empty(tuple(w.shape), dtype=torch.int8) if multi_chunk_16bit else None
    db_acc = torch.zeros(v, dtype=torch.float32) if needs[2] and b is not None else None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        en = None if ent is None else ent[s:e]
        ext.chunk_forward(h[s:e], w, b, t[s:e], p.temperature, p.softcap, engine, kept, logp[s:e], lse[s:e], en)
        g_logp, g_ent = coef_fn(s, e, logp[s:e], en)
        ext.chunk_backward(h[s:e], w, b, t[s:e], kept, lse[s:e], en, g_logp.float().contiguous(),
                           None if g_ent is None else g_ent.float().contiguous(), p.temperature, p.softcap, engine,
                           None if dh is None else dh[s:e], dw, dw_lo, db_acc, s > 0)
    db = None if db_acc is None else db_acc.to(b.dtype)
    return logp, ent, dh, dw, db
