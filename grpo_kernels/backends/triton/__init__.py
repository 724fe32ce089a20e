"""Triton backend: the streamed log-prob op on CUDA tensors (CPU tensors under TRITON_INTERPRET=1).

Satisfies :class:`grpo_kernels.backends.Backend` with the kernels of ``logprobs_kernels.py``
launched by ``logprobs_launch.py``; the fused GRPO loss runs the shared two-pass schedule of
``grpo_kernels.backends`` (forward, coefficients, recomputing backward). No [N, V] buffer is ever
allocated: the forward writes [N] vectors (logp, entropy, lse as [N, 2]); the backward recomputes logit tiles
from the saved lse and writes only dH [N, D], dW [V, D], dbias [V].

dtypes: hidden / weight / bias in float32, bfloat16 or float16 (one dtype); logits, softmax
statistics and every accumulation in float32; gradients returned in the inputs' dtypes. float64
is refused by the public functions, which name backend='torch' (the portable backend, for gradcheck).

Cost on GPU, in GEMMs of N x V x D: forward 1; backward 4 (the dH kernel and the dW kernel each
recompute their logit tiles, then multiply), 6 with ``LaunchConfig(split_dz=True)``, which feeds
the bf16 / fp16 gradient GEMMs dz as two parts for fp32-accumulation accuracy; half of that when
only one of dH / dW is needed. Neither gradient kernel uses atomics: results are deterministic run
to run. Tile sizes and grid splitting: ``logprobs_launch.LaunchConfig`` / ``default_config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from .. import Grads, LogprobsParams, Needs, TwoPassBackend
from . import logprobs_launch as _launch
from .logprobs_launch import LaunchConfig, default_config

__all__ = ["LaunchConfig", "TritonBackend", "default_config"]


@dataclass(frozen=True)
class TritonBackend(TwoPassBackend):
    """The Triton kernels; ``config`` None picks ``default_config(device, dtype)`` per call."""

    config: Optional[LaunchConfig] = None
    name: str = "triton"

    def forward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, params: LogprobsParams):
        """-> (logp [N] f32, entropy [N] f32 | None, lse [N, 2] f32: max, log-sum)."""
        return _launch.forward(hidden, weight, bias, targets, params, self.config)

    def backward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                 entropy: Optional[Tensor], grad_logp: Tensor, grad_entropy: Optional[Tensor], params: LogprobsParams,
                 needs: Needs) -> Grads:
        """-> (dhidden | None, dweight | None, dbias | None); ``needs`` = (dhidden, dweight, dbias) flags."""
        return _launch.backward(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, params, needs,
                                self.config)
