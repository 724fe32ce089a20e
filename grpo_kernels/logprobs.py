"""linear_logprobs: per-token log-probs (and entropy) straight from hidden states and the LM head.

The autograd Function first, then the public function that validates and dispatches. The
backends (``grpo_kernels.backends``) never see ignore_index tokens: they are removed here, so
they cost no vocabulary work and get log-prob 0, entropy 0 and zero gradient.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import backends, distributed
from ._checks import check_float, check_integer, check_positive, check_same_device, check_tensor
from .backends import LogprobsParams


def valid_rows(targets: Tensor, ignore_index: int) -> Optional[Tensor]:
    """Indices of the tokens that are not ignore_index, or None when all are valid (no copy needed)."""
    valid = targets != ignore_index
    if bool(valid.all()):
        return None
    return valid.nonzero().squeeze(-1)


def scatter_rows(values: Tensor, rows: Optional[Tensor], n: int) -> Tensor:
    """Place per-valid-token values back into an [n, ...] tensor of zeros."""
    if rows is None:
        return values
    out = values.new_zeros((n,) + tuple(values.shape[1:]))
    out[rows] = values
    return out


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd wrapper: forward keeps only [N] vectors, backward recomputes the logits."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, params: LogprobsParams):
        n = hidden.shape[0]
        impl = backends.module(params.backend)
        rows = valid_rows(targets, params.ignore_index)
        h = hidden if rows is None else hidden[rows]
        t = targets if rows is None else targets[rows]
        logp, ent, lse = impl.forward(h, weight, bias, t, params)
        ctx.set_materialize_grads(False)
        ctx.params = params
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent, rows)
        logp = scatter_rows(logp, rows, n)
        if ent is None:
            return logp
        ent = scatter_rows(ent, rows, n)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Optional[Tensor], g_ent: Optional[Tensor] = None):
        hidden, weight, bias, targets, lse, ent, rows = ctx.saved_tensors
        params: LogprobsParams = ctx.params
        needs = ctx.needs_input_grad[:3]
        if g_logp is None and g_ent is None:
            return None, None, None, None, None
        n = hidden.shape[0]
        if g_logp is None:
            g_logp = torch.zeros(n, dtype=lse.dtype, device=lse.device)
        pick = (lambda x: x) if rows is None else (lambda x: None if x is None else x[rows])
        h, t = pick(hidden), pick(targets)
        dh, dw, db = backends.module(params.backend).backward(
            h, weight, bias, t, lse, ent, pick(g_logp).to(lse.dtype), None if g_ent is None else pick(g_ent).to(lse.dtype),
            params, needs,
        )
        if dh is not None:
            dh = scatter_rows(dh, rows, n)
        return dh, dw, db, None, None


def validate_linear_inputs(fn: str, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                           temperature: float, softcap: Optional[float], ignore_index: int, backend: str) -> None:
    """Checks shared by linear_logprobs and the fused loss: shapes, dtypes, devices, ids, options."""
    tname = "targets" if fn == "linear_logprobs" else "completion_ids"
    check_float(fn, "hidden", hidden)
    check_float(fn, "weight", weight)
    check_integer(fn, tname, targets)
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be [V, D]; got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: hidden must be [..., D] with D = weight.shape[1] = {weight.shape[1]}; got shape {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{fn}: hidden and weight must share a dtype; got hidden {hidden.dtype} and weight {weight.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{fn}: {tname} must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}; got {tuple(targets.shape)}")
    if bias is not None:
        check_tensor(fn, "bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must be [V] = ({weight.shape[0]},); got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{fn}: bias must have weight's dtype {weight.dtype}; got {bias.dtype}")
    check_same_device(fn, hidden=hidden, weight=weight, **{tname: targets}, bias=bias)
    check_positive(fn, "temperature", temperature)
    check_positive(fn, "softcap", softcap, allow_none=True)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"{fn}: ignore_index must be an int; got {type(ignore_index).__name__}")
    if targets.numel():
        v = weight.shape[0]
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            first = int(targets[bad].reshape(-1)[0])
            raise ValueError(f"{fn}: {tname} must be in [0, V) = [0, {v}) or equal ignore_index={ignore_index}; got {first}")
    if backend not in backends.BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {', '.join(backends.BACKENDS)}; got {backend!r}")


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
    fly (forward), then recomputed for the gradient (backward).

    Args:
        hidden: [..., D] float32 / bfloat16 / float16 hidden states.
        weight: [V, D] LM-head weight, same dtype as hidden.
        targets: [...] int64 token ids in [0, V), or ignore_index.
        bias: optional [V] LM-head bias.
        temperature: logits are divided by it (> 0).
        softcap: optional final-logit soft-capping ``softcap * tanh(z / softcap)`` after the temperature.
        ignore_index: targets equal to it get log-prob 0 (and entropy 0) and no gradient.
        return_entropy: also return the entropy of each token's distribution (differentiable).
        backend: "auto" (C++ on CPU, Triton on CUDA), "cpu", "triton" or "torch";
            ``grpo_kernels.last_backend()`` tells which one ran.

    weight (and bias) may be a DTensor, replicated or sharded along the vocabulary, with hidden a
    plain per-rank tensor or a Replicate DTensor: see :mod:`grpo_kernels.distributed` for the
    layouts, the collectives and the bytes they move.

    Returns:
        logp [...] float32, and entropy [...] float32 when return_entropy.
    """
    if distributed.is_dtensor(hidden, weight, bias, targets):  # a DTensor LM head: grpo_kernels/distributed.py
        return distributed.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                                           ignore_index=ignore_index, return_entropy=return_entropy, backend=backend)
    fn = "linear_logprobs"
    validate_linear_inputs(fn, hidden, weight, targets, bias, temperature, softcap, ignore_index, backend)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"{fn}: return_entropy must be a bool; got {type(return_entropy).__name__}")
    name = backends.resolve(backend, hidden.device, hidden.dtype)
    backends.record(fn, name)
    params = LogprobsParams(float(temperature), None if softcap is None else float(softcap), ignore_index, return_entropy, name)
    lead = hidden.shape[:-1]
    out = LinearLogprobsFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1).long(), params
    )
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)
