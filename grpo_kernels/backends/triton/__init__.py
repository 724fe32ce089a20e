"""Triton backend: the streamed log-prob op on CUDA tensors (CPU tensors under TRITON_INTERPRET=1).

Implements the backend interface of :mod:`grpo_kernels.backends` (``forward``, ``backward``,
``forward_backward``) with the kernels of ``logprobs_kernels.py`` launched by ``logprobs_launch.py``.
No [N, V] buffer is ever allocated: the forward writes [N] vectors (logp, lse, entropy); the
backward recomputes logit tiles from the saved lse and writes only dH [N, D], dW [V, D], dbias [V].

dtypes: hidden / weight / bias in float32, bfloat16 or float16 (one dtype); logits, softmax
statistics and every accumulation in float32; gradients returned in the inputs' dtypes. float64
is rejected with a TypeError naming backend='torch' (the portable backend handles it, for gradcheck).

Cost on GPU, in GEMMs of N x V x D: forward 1; backward 4 (the dH kernel and the dW kernel each
recompute their logit tiles, then multiply), 6 with ``LaunchConfig(split_dz=True)``, which feeds
the bf16 / fp16 gradient GEMMs dz as two parts for fp32-accumulation accuracy; half of that when
only one of dH / dW is needed. Neither gradient
kernel uses atomics: results are deterministic run to run. Tile sizes and grid splitting:
``logprobs_launch.LaunchConfig`` / ``default_config``.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from .. import LogprobsParams
from . import logprobs_launch as _launch
from .logprobs_launch import LaunchConfig, default_config

CoefFn = Callable[[int, int, Tensor, Optional[Tensor]], tuple[Tensor, Optional[Tensor]]]

__all__ = ["LaunchConfig", "backward", "default_config", "forward", "forward_backward"]


def forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, params: LogprobsParams):
    """-> (logp [N] f32, entropy [N] f32 | None, lse [N] f32)."""
    return _launch.forward(hidden, weight, bias, targets, params)


def backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
             entropy: Optional[Tensor], grad_logp: Tensor, grad_entropy: Optional[Tensor], params: LogprobsParams,
             needs):
    """-> (dhidden | None, dweight | None, dbias | None); ``needs`` = (dhidden, dweight, dbias) flags."""
    return _launch.backward(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, params, needs)


def forward_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, params: LogprobsParams,
                     coef_fn: CoefFn, needs):
    """The single pass of the fused GRPO loss: forward, dLoss/dlogp, backward.

    Runs the forward kernel over all N tokens, calls ``coef_fn(0, N, logp, entropy)`` once (one
    chunk covering every token, which the interface allows: chunks in order), then the backward
    kernels with the returned per-token coefficients. On GPU this costs exactly forward + backward
    (1 + 4 or 1 + 6 GEMMs of N x V x D, see the module docstring), not less: the logits are
    recomputed by the backward kernels. The per-token math between the passes touches only [N]
    vectors; nothing of size N x V is kept (the lse is).

    -> (logp, entropy | None, dhidden | None, dweight | None, dbias | None)
    """
    logp, ent, lse = forward(hidden, weight, bias, targets, params)
    n = hidden.shape[0]
    g_logp, g_ent = coef_fn(0, n, logp, ent)
    dh, dw, db = backward(hidden, weight, bias, targets, lse, ent, g_logp, g_ent, params, needs)
    return logp, ent, dh, dw, db
