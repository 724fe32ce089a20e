"""Launchers of the C++ CPU kernels (grpo_kernels._C, built from csrc/).

The kernels write into outputs allocated here (``backends.empty``: NaN in test poison mode). Only
forward and backward exist: the fused GRPO loss runs them as two passes (four GEMMs per token,
every one of them at bf16 tile speed with fp32 accumulators in cache) because a one-pass,
three-GEMM schedule has to re-read and re-write all of dW once per token chunk (see csrc/).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import LogprobsParams, cpu_extension, empty

# Tokens per super-chunk (a multiple of 256); 0 lets the kernel size it from its memory budget.
# Tests set it small to exercise dW accumulation across super-chunks on small inputs.
SUPER_CHUNK_TOKENS = 0


def _ext():
    ext = cpu_extension()
    assert ext is not None, "backend 'cpu' resolved without grpo_kernels._C"
    return ext


def gemm_path(dtype: torch.dtype, d: int) -> str:
    """'amx-vnni' when bf16/fp16 tiles run on AMX with packed operands here, else 'plain'."""
    return _ext().gemm_path(dtype, d)


def forward(h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, p: LogprobsParams):
    if h.dtype == torch.float64:
        raise TypeError("backend 'cpu' supports float32, bfloat16 and float16; use backend='torch' for float64")
    h, w, t = h.contiguous(), w.contiguous(), t.contiguous()
    b = None if b is None else b.contiguous()
    n = h.shape[0]
    logp = empty((n,), torch.float32, h.device)
    lse = empty((n,), torch.float32, h.device)
    ent = empty((n,), torch.float32, h.device) if p.return_entropy else None
    _ext().forward(h, w, b, t, p.temperature, p.softcap, SUPER_CHUNK_TOKENS, logp, lse, ent)
    return logp, ent, lse


def backward(h, w, b, t, lse, ent, g_logp, g_ent, p: LogprobsParams, needs):
    h, w, t = h.contiguous(), w.contiguous(), t.contiguous()
    b = None if b is None else b.contiguous()
    dh = empty(tuple(h.shape), h.dtype, h.device) if needs[0] else None
    dw = empty(tuple(w.shape), w.dtype, w.device) if needs[1] else None
    db = empty(tuple(b.shape), b.dtype, b.device) if needs[2] and b is not None else None
    _ext().backward(h, w, b, t, lse.float().contiguous(), None if ent is None else ent.float().contiguous(),
                    g_logp.float().contiguous(), None if g_ent is None else g_ent.float().contiguous(),
                    p.temperature, p.softcap, SUPER_CHUNK_TOKENS, dh, dw, db)
    return dh, dw, db
