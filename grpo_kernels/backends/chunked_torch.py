"""Portable backend: the streamed log-prob op in plain PyTorch, a chunk of tokens at a time.

Runs on any device. Memory is bounded by one chunk's logits (about CHUNK_ELEMENTS floats) instead of
[N, V], but the GEMMs run in the inputs' dtype and the softmax is a separate pass, so it is
neither as fast nor as accurate in bf16 as the fused kernels. It is the fallback when neither
the C++ extension nor Triton is available, and the model of what the kernels compute.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import LogprobsParams, empty

# Elements of one chunk's logits; each chunk holds a few buffers of this size.
CHUNK_ELEMENTS = 1 << 23

CoefFn = Callable[[int, int, Tensor, Optional[Tensor]], tuple[Tensor, Optional[Tensor]]]


def _rows_per_chunk(n: int, v: int) -> int:
    return max(1, min(n, CHUNK_ELEMENTS // max(v, 1)))


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _logits(h: Tensor, w: Tensor, b: Optional[Tensor], p: LogprobsParams) -> Tensor:
    z = F.linear(h, w, b).to(_acc_dtype(h)) / p.temperature
    if p.softcap is not None:
        z = p.softcap * torch.tanh(z / p.softcap)
    return z


def _stats(z: Tensor, t: Tensor, want_entropy: bool) -> tuple[Tensor, Optional[Tensor], Tensor]:
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, t.unsqueeze(-1)).squeeze(-1) - lse
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1) if want_entropy else None
    return logp, ent, lse


def _grad_logits(z: Tensor, t: Tensor, lse: Tensor, ent: Optional[Tensor], g_logp: Tensor,
                 g_ent: Optional[Tensor], p: LogprobsParams) -> Tensor:
    """dLoss/d(raw logits) of one chunk: chain rule through log_softmax, entropy, softcap, temperature."""
    prob = torch.exp(z - lse.unsqueeze(-1))
    d = prob * (-g_logp.to(z.dtype)).unsqueeze(-1)
    d.scatter_add_(-1, t.unsqueeze(-1), g_logp.to(z.dtype).unsqueeze(-1))
    if g_ent is not None:
        # dH/dz_j = -p_j (z_j - sum_k p_k z_k) and sum_k p_k z_k = lse - H
        d -= g_ent.to(z.dtype).unsqueeze(-1) * prob * (z - (lse - ent).unsqueeze(-1))
    if p.softcap is not None:
        d *= 1.0 - (z / p.softcap) ** 2
    return d / p.temperature


def forward(h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, p: LogprobsParams):
    n = h.shape[0]
    acc = _acc_dtype(h)
    logp = empty((n,), acc, h.device)
    lse = empty((n,), acc, h.device)
    ent = empty((n,), acc, h.device) if p.return_entropy else None
    rows = _rows_per_chunk(n, w.shape[0])
    for s in range(0, n, rows):
        e = min(n, s + rows)
        lp, en, ls = _stats(_logits(h[s:e], w, b, p), t[s:e], p.return_entropy)
        logp[s:e], lse[s:e] = lp, ls
        if ent is not None:
            ent[s:e] = en
    return logp, ent, lse


def _backward_chunks(h, w, b, t, p, needs, chunk_grad):
    n, (v, d) = h.shape[0], w.shape
    acc = _acc_dtype(h)
    dh = empty(tuple(h.shape), h.dtype, h.device) if needs[0] else None
    dw = torch.zeros(v, d, dtype=acc, device=h.device) if needs[1] else None
    db = torch.zeros(v, dtype=acc, device=h.device) if needs[2] and b is not None else None
    rows = _rows_per_chunk(n, v)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        g = chunk_grad(s, e)
        g_lo = g.to(h.dtype)
        if dh is not None:
            dh[s:e] = g_lo @ w
        if dw is not None:
            dw += (g_lo.t() @ h[s:e]).to(acc)
        if db is not None:
            db += g.sum(0)
    return (dh, None if dw is None else dw.to(w.dtype), None if db is None else db.to(b.dtype))


def backward(h, w, b, t, lse, ent, g_logp, g_ent, p: LogprobsParams, needs):
    def chunk_grad(s, e):
        z = _logits(h[s:e], w, b, p)
        return _grad_logits(z, t[s:e], lse[s:e], None if ent is None else ent[s:e], g_logp[s:e],
                            None if g_ent is None else g_ent[s:e], p)

    return _backward_chunks(h, w, b, t, p, needs, chunk_grad)


def forward_backward(h, w, b, t, p: LogprobsParams, coef_fn: CoefFn, needs):
    n = h.shape[0]
    acc = _acc_dtype(h)
    logp = empty((n,), acc, h.device)
    ent = empty((n,), acc, h.device) if p.return_entropy else None

    def chunk_grad(s, e):
        z = _logits(h[s:e], w, b, p)
        lp, en, ls = _stats(z, t[s:e], p.return_entropy)
        logp[s:e] = lp
        if ent is not None:
            ent[s:e] = en
        g_logp, g_ent = coef_fn(s, e, lp, en)
        return _grad_logits(z, t[s:e], ls, en, g_logp, g_ent, p)

    dh, dw, db = _backward_chunks(h, w, b, t, p, needs, chunk_grad)
    return logp, ent, dh, dw, db
