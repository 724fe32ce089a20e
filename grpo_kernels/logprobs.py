"""linear_logprobs: per-token log-probs (and entropy) straight from hidden states and the LM head.

Row selection first, then the autograd Function, then the public function that validates and
dispatches. The backends (``grpo_kernels.backends``) never see ignore_index tokens: they are
removed here, so they cost no vocabulary work and get log-prob 0, entropy 0 and zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from . import _entry, backends, distributed
from .backends import Backend, LogprobsParams


def select_rows(keep: Tensor) -> Optional[Tensor]:
    """Indices of the rows to compute ([n] int64), or None when all are kept (no copy needed)."""
    rows = keep.reshape(-1).nonzero().squeeze(-1)
    return None if rows.numel() == keep.numel() else rows


def gather_rows(x: Tensor, rows: Optional[Tensor]) -> Tensor:
    """The kept rows of x ([n, ...]); x itself when all are kept."""
    return x if rows is None else x[rows]


def scatter_rows(values: Tensor, rows: Optional[Tensor], n: int) -> Tensor:
    """Place per-kept-row values back into an [n, ...] tensor of zeros."""
    if rows is None:
        return values
    out = values.new_zeros((n,) + tuple(values.shape[1:]))
    out[rows] = values
    return out


def differentiable_once(fn: str) -> None:
    """Raise when a backward runs with create_graph=True: these gradients have no graph of their own."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{fn}: create_graph must be False (the op is differentiable once: its gradient is formed "
                           "by kernels, not by autograd ops); got a backward with create_graph=True")


@dataclass(frozen=True)
class LogprobsCall:
    """The non-differentiable part of one call: the targets ([N] int64), the kept rows ([n] int64, or None
    when every row is kept), the kernel options and the backend."""

    targets: Tensor
    rows: Optional[Tensor]
    params: LogprobsParams
    impl: Backend


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: forward keeps only [N] vectors, backward recomputes the logits."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], call: LogprobsCall):
        n, rows = hidden.shape[0], call.rows
        logp, ent, lse = call.impl.forward(gather_rows(hidden, rows), weight, bias, gather_rows(call.targets, rows),
                                           call.params)
        ctx.set_materialize_grads(False)
        ctx.call = call
        # targets is saved, not only held in call, so an in-place change before backward raises as in torch
        ctx.save_for_backward(hidden, weight, bias, call.targets, lse, ent)
        logp = scatter_rows(logp, rows, n)
        if ent is None:
            return logp
        return logp, scatter_rows(ent, rows, n)

    @staticmethod
    def backward(ctx, g_logp: Optional[Tensor], g_ent: Optional[Tensor] = None):
        differentiable_once("linear_logprobs")
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        call: LogprobsCall = ctx.call
        dh = dw = db = None
        if g_logp is not None or g_ent is not None:  # neither output reached the loss: no gradient, no work
            n, rows = hidden.shape[0], call.rows
            if g_logp is None:
                g_logp = torch.zeros(n, dtype=lse.dtype, device=lse.device)
            g_ent = None if g_ent is None else gather_rows(g_ent, rows).to(lse.dtype)
            dh, dw, db = call.impl.backward(gather_rows(hidden, rows), weight, bias, gather_rows(targets, rows),
                                            lse, ent, gather_rows(g_logp, rows).to(lse.dtype), g_ent, call.params,
                                            ctx.needs_input_grad[:3])
            if dh is not None:
                dh = scatter_rows(dh, rows, n)
        return dh, dw, db, None


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Log-probs of ``targets`` under ``softmax(softcap((hidden @ weight.T + bias) / temperature))``.

    The [N, V] logits are never materialized: they are formed block by block and reduced on the
    fly (forward), then recomputed for the gradient (backward). Differentiable once (a backward
    with create_graph=True raises).

    Args:
        hidden: [..., D] float32 / bfloat16 / float16 hidden states (float64 on backend "torch").
        weight: [V, D] LM-head weight, same dtype as hidden.
        targets: [...] int64 token ids in [0, V), or ignore_index.
        bias: optional [V] LM-head bias, finite (a -inf entry to ban a token is refused: its entropy
            term would be NaN).
        temperature: logits are divided by it (a finite number > 0; numpy scalars are fine).
        softcap: optional final-logit soft-capping ``softcap * tanh(z / softcap)`` after the temperature
            (a finite number > 0).
        ignore_index: targets equal to it get log-prob 0 (and entropy 0) and no gradient.
        return_entropy: also return the entropy of each token's distribution (differentiable).
        backend: "auto" (C++ on CPU, Triton on CUDA), "cpu", "triton" or "torch";
            ``grpo_kernels.last_backend()`` tells which one ran.

    weight (and bias) may be a DTensor, replicated or sharded along the vocabulary, with hidden a
    plain per-rank tensor or a Replicate DTensor: see :mod:`grpo_kernels.distributed` for the
    layouts, the collectives and the bytes they move.

    Returns:
        logp [...] float32 (float64 for float64 inputs), and entropy [...] likewise when return_entropy.

    Bad input is refused by name before any kernel runs (shapes, dtypes, devices, meta tensors,
    V = 0 or D = 0, ids outside [0, V) other than ignore_index, non-finite options or bias). hidden
    and weight are not scanned for NaN / inf: a non-finite value gives NaN exactly where the
    materializing oracle has NaN (the tokens, or with a NaN weight row every token). The logits
    ``hidden @ weight.T / temperature`` must fit in float32 (|z| < 3.4e38), as for any fp32 softmax.
    """
    if distributed.is_dtensor(hidden, weight, bias, targets):  # a DTensor LM head: grpo_kernels/distributed.py
        return distributed.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                                           ignore_index=ignore_index, return_entropy=return_entropy, backend=backend)
    name = _entry.logprobs_call(hidden, weight, targets, bias, temperature, softcap, ignore_index, return_entropy, backend)
    params = LogprobsParams.make(temperature, softcap, return_entropy)
    lead = hidden.shape[:-1]
    t = targets.reshape(-1).long()
    call = LogprobsCall(t, select_rows(t != ignore_index), params, backends.get(name))
    out = LinearLogprobsFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, call)
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)
