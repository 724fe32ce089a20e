"""Portable backend: the streamed log-prob op in plain PyTorch, a chunk of tokens at a time.

Runs on any device and dtype (float64 too: the gradcheck path). Memory is bounded by one chunk's
logits (about ``TorchTuning.chunk_elements`` floats) instead of [N, V]. The logits GEMM accumulates
and returns fp32 (float64 for float64 inputs): a 16-bit weight is upcast once per call, since a
logit rounded to bf16 at magnitude 1000 is off by 4 nats. The gradient GEMMs take dz rounded to
the inputs' dtype, as the materializing path does. The softmax is a separate pass, so it is
slower than the fused kernels. It is the fallback when neither the C++ extension nor Triton is
available, and the model of what the kernels compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import CoefFn, FusedResult, Grads, LogprobsParams, Needs, TwoPassBackend, empty, scale_in_place


@dataclass(frozen=True)
class TorchTuning:
    """chunk_elements: logits of one chunk (rows x V); each chunk holds a few buffers of this size."""

    chunk_elements: int = 1 << 23

    def __post_init__(self) -> None:
        if self.chunk_elements < 1:
            raise ValueError(f"TorchTuning: chunk_elements must be >= 1; got {self.chunk_elements}")


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _stats(z: Tensor, t: Tensor, want_entropy: bool) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """(logp, entropy | None, lse [n, 2]) of a chunk's logits; lse is the pair (row max, log-sum) of
    :class:`grpo_kernels.backends.Backend`, and logp / entropy are formed relative to the max."""
    # a row whose max is +-inf keeps it out of the shift (0 instead), as torch.logsumexp does
    m = z.amax(-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=z.dtype, device=z.device))
    y = z - m.unsqueeze(-1)
    ls = torch.logsumexp(y, dim=-1)
    logp = y.gather(-1, t.unsqueeze(-1)).squeeze(-1) - ls
    ent = ls - (torch.softmax(y, dim=-1) * y).sum(-1) if want_entropy else None
    return logp, ent, torch.stack([m, ls], dim=-1)


def _grad_logits(z: Tensor, t: Tensor, lse: Tensor, ent: Optional[Tensor], g_logp: Tensor,
                 g_ent: Optional[Tensor], p: LogprobsParams) -> Tensor:
    """dLoss/d(raw logits) of one chunk: chain rule through log_softmax, entropy, softcap, temperature."""
    y = z - lse[:, :1]  # relative to the row max: exact near it, so p of the top logits keeps its bits
    prob = torch.exp(y - lse[:, 1:])
    d = prob * (-g_logp.to(z.dtype)).unsqueeze(-1)
    d.scatter_add_(-1, t.unsqueeze(-1), g_logp.to(z.dtype).unsqueeze(-1))
    if g_ent is not None:
        # dH/dz_j = -p_j (z_j - sum_k p_k z_k), and sum_k p_k z_k - max = log-sum - H
        d -= g_ent.to(z.dtype).unsqueeze(-1) * prob * (y - (lse[:, 1] - ent).unsqueeze(-1))
    if p.softcap:
        d *= 1.0 - (z / p.softcap) ** 2
    return d / p.temperature


@dataclass(frozen=True)
class TorchBackend(TwoPassBackend):
    """Chunked PyTorch; ``tuning`` is fixed for the instance (see :func:`grpo_kernels.backends.use`)."""

    tuning: TorchTuning = field(default_factory=TorchTuning)
    name: str = "torch"

    def _rows_per_chunk(self, n: int, v: int) -> int:
        return max(1, min(n, self.tuning.chunk_elements // max(v, 1)))

    @staticmethod
    def _head(w: Tensor, b: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """The LM head in the accumulation dtype, converted once per call (``w`` made contiguous by the caller)."""
        acc = _acc_dtype(w)
        return w.to(acc), None if b is None else b.to(acc)

    @staticmethod
    def _logits(h: Tensor, head: tuple[Tensor, Optional[Tensor]], p: LogprobsParams) -> Tensor:
        w_acc, b_acc = head
        z = F.linear(h.to(w_acc.dtype), w_acc, b_acc) / p.temperature
        if p.softcap:
            z = p.softcap * torch.tanh(z / p.softcap)
        return z

    def forward(self, h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, p: LogprobsParams):
        n = h.shape[0]
        acc = _acc_dtype(h)
        logp = empty((n,), acc, h.device)
        lse = empty((n, 2), acc, h.device)
        ent = empty((n,), acc, h.device) if p.return_entropy else None
        head = self._head(_dense(w), b)
        rows = self._rows_per_chunk(n, w.shape[0])
        for s in range(0, n, rows):
            e = min(n, s + rows)
            lp, en, ls = _stats(self._logits(h[s:e], head, p), t[s:e], p.return_entropy)
            logp[s:e], lse[s:e] = lp, ls
            if ent is not None:
                ent[s:e] = en
        return logp, ent, lse

    def _backward_chunks(self, h, w, b, needs: Needs, chunk_grad, dh_weight: Tensor) -> Grads:
        """dh [n, D] in dh_weight's dtype (h's, or the accumulation dtype when dh_weight is the head's
        accumulation copy); dw [V, D] and db [V] in the accumulation dtype (fp32 / fp64)."""
        n, (v, d) = h.shape[0], w.shape
        acc = _acc_dtype(h)
        dh = empty(tuple(h.shape), dh_weight.dtype, h.device) if needs[0] else None
        dw = torch.zeros(v, d, dtype=acc, device=h.device) if needs[1] else None
        db = torch.zeros(v, dtype=acc, device=h.device) if needs[2] and b is not None else None
        rows = self._rows_per_chunk(n, v)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            g = chunk_grad(s, e)
            g_lo = g.to(h.dtype)
            if dh is not None:
                dh[s:e] = g_lo.to(dh_weight.dtype) @ dh_weight
            if dw is not None:
                dw += (g_lo.t() @ h[s:e]).to(acc)
            if db is not None:
                db += g.sum(0)
        return dh, dw, db

    def backward(self, h, w, b, t, lse, ent, g_logp, g_ent, p: LogprobsParams, needs: Needs) -> Grads:
        w = _dense(w)
        head = self._head(w, b)

        def chunk_grad(s, e):
            z = self._logits(h[s:e], head, p)
            return _grad_logits(z, t[s:e], lse[s:e], None if ent is None else ent[s:e], g_logp[s:e],
                                None if g_ent is None else g_ent[s:e], p)

        # grad_output is in the coefficients already: dH in h's dtype, rounded once by its GEMM
        return _round(self._backward_chunks(h, w, b, needs, chunk_grad, w), w, b)

    def one_pass(self, dtype: torch.dtype, d: int) -> bool:
        return True  # the chunk's logits are at hand: recomputing them would only cost

    def forward_backward(self, h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, p: LogprobsParams,
                         coef_fn: CoefFn, needs: Needs) -> FusedResult:
        n = h.shape[0]
        acc = _acc_dtype(h)
        logp = empty((n,), acc, h.device)
        ent = empty((n,), acc, h.device) if p.return_entropy else None
        w = _dense(w)
        head = self._head(w, b)

        def chunk_grad(s, e):
            z = self._logits(h[s:e], head, p)
            lp, en, ls = _stats(z, t[s:e], p.return_entropy)
            logp[s:e] = lp
            if ent is not None:
                ent[s:e] = en
            g_logp, g_ent = coef_fn(s, e, lp, en)
            return _grad_logits(z, t[s:e], ls, en, g_logp, g_ent, p)

        # grad_output comes later (_Formed.finish): dH in the accumulation dtype too, so that scaling it
        # rounds a 16-bit dH once (the head's accumulation copy is at hand: no second conversion of W)
        return logp, ent, _Formed(self._backward_chunks(h, w, b, needs, chunk_grad, head[0]), h.dtype, w.dtype,
                                  None if b is None else b.dtype)


def _dense(w: Tensor) -> Tensor:
    """The head as a contiguous tensor, once per call (a no-op for the usual weight): a transposed view
    sends torch's GEMMs down another layout whose rounding differs (MKL on AMD Zen 3), and a view must
    give the bits of the contiguous weight."""
    return w.contiguous()


def _round(grads: Grads, w: Tensor, b: Optional[Tensor]) -> Grads:
    dh, dw, db = grads
    return dh, None if dw is None else dw.to(w.dtype), None if db is None else db.to(b.dtype)


class _Formed:
    """The one pass's gradients until grad_output is known: dH, dW and db stay in the accumulation dtype,
    so ``finish`` scales them in place and rounds a 16-bit dH and dW once. (Between the forward and the
    backward that is an fp32 [V, D] instead of the 16-bit dW: 2 V D bytes more, and likewise 2 N D bytes
    for dH; the peak, the fp32 accumulator beside the rounded dW, is the one the forward had before.)"""

    def __init__(self, grads: Grads, h_dtype: torch.dtype, w_dtype: torch.dtype, b_dtype: Optional[torch.dtype]) -> None:
        self._grads: Optional[Grads] = grads
        self._dtypes = (h_dtype, w_dtype, b_dtype)

    def finish(self, scale: Optional[Tensor]) -> Grads:
        assert self._grads is not None, "Formed.finish runs once"
        grads, self._grads = self._grads, None
        dh, dw, db = (scale_in_place(g, scale) for g in grads)
        del grads
        h_dtype, w_dtype, b_dtype = self._dtypes
        # .to() of an fp32 accumulator into fp32 returns it: no copy
        return (None if dh is None else dh.to(h_dtype), None if dw is None else dw.to(w_dtype),
                None if db is None else db.to(b_dtype))
