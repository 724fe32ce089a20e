"""FusedLinearGRPOLoss: hidden states -> GRPO loss, metrics and gradients in one pass.

dLoss/dlogp is one scalar per token, so the loss and its gradient w.r.t. the hidden states and
the LM head can be formed while the logits are streamed: per chunk of completion tokens the
backend computes logp and entropy, asks :func:`grpo_kernels.policy_loss.token_objective` (the
same code grpo_loss runs) for that chunk's dLoss/dlogp and dLoss/dentropy, and turns them into
dH and dW right away. The forward therefore produces the gradients; the autograd backward only
scales them by grad_output.

Objectives that need per-sequence or batch-wide quantities of the *current* log-probs before
any token's gradient is known take two passes (a forward-only pass for logp / entropy, then a
gradient pass): GSPO's sequence-level ratio, vespo with old_logp (its gamma weight uses the
sequence's summed log-ratio) and top_entropy_quantile < 1 (the entropy threshold is a batch
quantile). The two passes cost four GEMMs per token (the gradient pass recomputes the logits before
the dH and dW GEMMs) instead of three.

The C++ backend runs the one pass on its plain GEMM path (AVX2/AVX-512 CPUs, and fp32 anywhere) in
chunks of at most 256 tokens, keeping exp(logit - running max) of each chunk (83 MB in bf16 for a
151936-token vocab; a 16-bit dW spanning several chunks also carries an int8 residual [V, D]); for
16-bit inputs on AMX it takes the two passes (backends/cpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import backends, distributed
from ._checks import check_tensor
from .backends import LogprobsParams
from .config import GRPOConfig
from .logprobs import scatter_rows, validate_linear_inputs
from .policy_loss import (
    GRPOLossOutput,
    TokenContext,
    _grpo_loss,
    build_context,
    token_objective,
    validate_loss_inputs,
    vespo_weights,
)

Number = Union[int, float, Tensor]


@dataclass(frozen=True)
class FusedLossInputs:
    """Everything besides (hidden, weight, bias): non-differentiable tensors and the options."""

    completion_ids: Tensor
    mask: Tensor
    advantages: Tensor
    old_logp: Optional[Tensor]
    ref_logp: Optional[Tensor]
    is_ratio: Optional[Tensor]
    num_items_in_batch: Optional[Number]
    config: GRPOConfig
    params: LogprobsParams

    def metric_names(self) -> list[str]:
        """The metrics this call reports, in the order of the stacked metrics tensor."""
        names = ["clip_ratio/high_mean", "clip_ratio/low_mean", "clip_ratio/region_mean", "entropy"]
        return (["kl"] if self.ref_logp is not None else []) + names

    def needs_two_passes(self) -> bool:
        cfg = self.config
        return (
            cfg.importance_sampling_level == "sequence"
            or cfg.top_entropy_quantile < 1.0
            or (cfg.loss_type == "vespo" and self.old_logp is not None)
        )

    def context(self) -> TokenContext:
        """Per-token context of the one-pass path (everything it needs is known before logp)."""
        B, T = self.mask.shape
        phi = None
        if self.config.loss_type == "vespo":  # on-policy: the token log-ratios are exactly 0
            adv = self.advantages.reshape(B, 1) if self.advantages.dim() == 1 else self.advantages
            isr = None if self.is_ratio is None else (self.is_ratio.reshape(B, 1) if self.is_ratio.dim() == 1 else self.is_ratio)
            phi = vespo_weights(adv, torch.zeros(B, T, device=self.mask.device), self.mask, isr, self.config)
        return build_context(self.mask, self.advantages, self.config, old_logp=self.old_logp, ref_logp=self.ref_logp,
                             is_ratio=self.is_ratio, num_items_in_batch=self.num_items_in_batch, phi=phi)


def _select(ctx: TokenContext, rows: Optional[Tensor]) -> TokenContext:
    """The context of the active tokens only, flattened in row order."""
    def pick(x: Optional[Tensor]) -> Optional[Tensor]:
        if x is None:
            return None
        flat = x.reshape(-1)
        return flat if rows is None else flat[rows]

    return TokenContext(**{f: pick(getattr(ctx, f)) for f in ctx.__dataclass_fields__})


class FusedLinearGRPOFunction(torch.autograd.Function):
    """Forward computes loss, metrics and the gradients; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], inputs: FusedLossInputs):
        needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        loss, metrics, grads = _run(hidden, weight, bias, inputs, needs)
        ctx.save_for_backward(*grads)
        ctx.has = tuple(g is not None for g in grads)
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_metrics: Optional[Tensor]):
        it = iter(ctx.saved_tensors)
        grads = [next(it) if has else None for has in ctx.has]
        scale = None if grad_loss is None or bool(grad_loss == 1) else grad_loss
        out = [g if g is None or scale is None else g * scale.to(g.dtype) for g in grads]
        return out[0], out[1], out[2], None


def _run(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], inputs: FusedLossInputs, needs: tuple[bool, bool, bool]):
    """Loss [], metrics [len(names)], (dhidden, dweight, dbias) with None where not needed."""
    cfg, params = inputs.config, inputs.params
    B, T = inputs.mask.shape
    D = weight.shape[1]
    impl = backends.module(params.backend)
    h2 = hidden.reshape(B * T, D)
    active = inputs.mask.reshape(-1) != 0
    rows = None if bool(active.all()) else active.nonzero().squeeze(-1)
    h = h2 if rows is None else h2[rows]
    t = inputs.completion_ids.reshape(-1).long()
    t = t if rows is None else t[rows]
    n = h.shape[0]
    want_grad = any(needs)

    def full(values: Optional[Tensor]) -> Optional[Tensor]:
        return None if values is None else scatter_rows(values.float(), rows, B * T).reshape(B, T)

    def finish(loss: Tensor, sums: dict[str, Tensor], dh, dw, db):
        metrics = torch.stack([torch.as_tensor(sums[k], device=hidden.device).float() for k in inputs.metric_names()])
        dh = None if dh is None else scatter_rows(dh, rows, B * T).reshape(hidden.shape)
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        return loss.detach().to(out_dtype), metrics, (dh, dw, db)

    if n == 0:
        zero = torch.zeros((), device=hidden.device)
        out = _grpo_loss(torch.zeros(B, T, device=hidden.device), inputs.advantages.float(), inputs.mask, cfg,
                         old_logp=inputs.old_logp, ref_logp=inputs.ref_logp, is_ratio=inputs.is_ratio,
                         num_items_in_batch=inputs.num_items_in_batch, entropy=torch.zeros(B, T, device=hidden.device))
        grads = (h.new_zeros(h.shape) if needs[0] else None, torch.zeros_like(weight) if needs[1] else None,
                 torch.zeros_like(bias) if needs[2] else None)
        return finish(zero + out.loss.detach(), out.metrics, *grads)

    if not want_grad:
        logp, ent, _ = impl.forward(h, weight, bias, t, params)
        out = _grpo_loss(full(logp), inputs.advantages, inputs.mask, cfg, old_logp=inputs.old_logp, ref_logp=inputs.ref_logp,
                         is_ratio=inputs.is_ratio, num_items_in_batch=inputs.num_items_in_batch, entropy=full(ent))
        return finish(out.loss, out.metrics, None, None, None)

    if inputs.needs_two_passes() or not hasattr(impl, "forward_backward"):
        logp, ent, lse = impl.forward(h, weight, bias, t, params)
        lp_full = full(logp).requires_grad_(True)
        en_full = full(ent).requires_grad_(cfg.entropy_coef != 0.0)
        with torch.enable_grad():
            out = _grpo_loss(lp_full, inputs.advantages, inputs.mask, cfg, old_logp=inputs.old_logp, ref_logp=inputs.ref_logp,
                             is_ratio=inputs.is_ratio, num_items_in_batch=inputs.num_items_in_batch, entropy=en_full)
            wrt = [lp_full] + ([en_full] if en_full.requires_grad else [])
            g = torch.autograd.grad(out.loss, wrt, allow_unused=True)
        pick = (lambda x: x.reshape(-1)) if rows is None else (lambda x: x.reshape(-1)[rows])
        g_logp = pick(g[0]) if g[0] is not None else torch.zeros_like(logp)
        g_ent = pick(g[1]) if len(g) > 1 and g[1] is not None else None
        dh, dw, db = impl.backward(h, weight, bias, t, lse, ent, g_logp.to(lse.dtype), None if g_ent is None else g_ent.to(lse.dtype),
                                   params, needs)
        return finish(out.loss, out.metrics, dh, dw, db)

    ctx = _select(inputs.context(), rows)
    acc = {"loss": torch.zeros((), dtype=torch.float64, device=hidden.device)}
    entropy_grad = cfg.entropy_coef != 0.0

    def coef_fn(start: int, end: int, lp: Tensor, en: Optional[Tensor]):
        c = ctx.flat_slice(start, end)
        with torch.enable_grad():
            lp = lp.detach().requires_grad_(True)
            en = None if en is None else en.detach().requires_grad_(entropy_grad)
            loss, sums = token_objective(lp, en, c, cfg)
            wrt = [lp] + ([en] if entropy_grad else [])
            g = torch.autograd.grad(loss, wrt, allow_unused=True)
        acc["loss"] += loss.detach().double()
        for k, v in sums.items():
            acc[k] = acc.get(k, 0) + v
        g_logp = torch.zeros_like(lp) if g[0] is None else g[0]
        return g_logp.detach(), (g[1].detach() if entropy_grad and g[1] is not None else None)

    _, _, dh, dw, db = impl.forward_backward(h, weight, bias, t, params, coef_fn, needs)
    loss = acc.pop("loss")
    return finish(loss, acc, dh, dw, db)


def fused_linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    mask: Tensor,
    advantages: Tensor,
    config: GRPOConfig,
    *,
    old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    is_ratio: Optional[Tensor] = None,
    num_items_in_batch: Optional[Number] = None,
    backend: str = "auto",
    dp_group: Optional["torch.distributed.ProcessGroup"] = None,
) -> GRPOLossOutput:
    """GRPO loss from hidden states and the LM head, without materializing the logits.

    Same semantics as ``grpo_loss(linear_logprobs(hidden, weight, completion_ids), ...)`` for every
    loss_type and option of ``config`` (temperature and logit_softcap come from the config).

    Args:
        hidden: [B, T, D] final hidden states at the positions that predict completion_ids.
        weight: [V, D] LM-head weight (tied embeddings: pass the embedding matrix).
        completion_ids: [B, T] int64 sampled token ids.
        mask: [B, T] completion mask (0 = padding; those tokens cost no vocabulary work).
        advantages: [B] or [B, T].
        config: the loss options.
        old_logp, ref_logp: [B, T] log-probs of the sampling policy (None: on-policy) and of the
            reference model (needed when beta != 0). No gradient flows into them.
        bias: optional [V] LM-head bias.
        is_ratio: sampler importance-sampling correction, [B, T], [B] or [B, 1].
        num_items_in_batch: token count of the whole accumulated batch over ranks (dapo/cispo/vespo).
        backend: "auto", "cpu", "triton" or "torch" (``grpo_kernels.last_backend("fused_linear_grpo_loss")``).
        dp_group: the data-parallel group of the dapo/cispo/vespo token normalizer (None: the default
            group; with a Replicate DTensor hidden, the mesh decides). weight (and bias) may be a
            DTensor, replicated or sharded along the vocabulary: :mod:`grpo_kernels.distributed` runs
            those calls (two passes) and documents the collectives and their bytes.

    Returns:
        GRPOLossOutput: ``loss`` (scalar, differentiable w.r.t. hidden, weight, bias) and ``metrics``
        (kl when ref_logp is given, clip ratios, entropy).
    """
    if dp_group is not None or distributed.is_dtensor(hidden, weight, bias, completion_ids, mask, advantages, old_logp,
                                                      ref_logp, is_ratio):  # grpo_kernels/distributed.py
        return distributed.fused_linear_grpo_loss(hidden, weight, completion_ids, mask, advantages, config,
                                                  old_logp=old_logp, ref_logp=ref_logp, bias=bias, is_ratio=is_ratio,
                                                  num_items_in_batch=num_items_in_batch, backend=backend, dp_group=dp_group)
    fn = "fused_linear_grpo_loss"
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"{fn}: config must be a grpo_kernels.GRPOConfig; got {type(config).__name__}")
    check_tensor(fn, "hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"{fn}: hidden must be [B, T, D]; got shape {tuple(hidden.shape)}")
    validate_linear_inputs(fn, hidden, weight, completion_ids, bias, config.temperature, config.logit_softcap, -100, backend)
    validate_loss_inputs(fn, tuple(completion_ids.shape), hidden.device, advantages, mask, config, old_logp, ref_logp,
                         is_ratio, num_items_in_batch)
    name = backends.resolve(backend, hidden.device, hidden.dtype)
    backends.record(fn, name)
    params = LogprobsParams(config.temperature, config.logit_softcap, -100, True, name)
    detach = lambda x: None if x is None else x.detach()  # noqa: E731
    inputs = FusedLossInputs(completion_ids, mask.detach(), advantages.detach(), detach(old_logp), detach(ref_logp),
                             detach(is_ratio), num_items_in_batch, config, params)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        loss, metrics = FusedLinearGRPOFunction.apply(hidden, weight, bias, inputs)
    else:
        loss, metrics, _ = _run(hidden, weight, bias, inputs, (False, False, False))
    return GRPOLossOutput(loss=loss, metrics={k: metrics[i] for i, k in enumerate(inputs.metric_names())})


class FusedLinearGRPOLoss(nn.Module):
    """Drop-in GRPO loss module: ``crit(hidden, weight, completion_ids, mask, advantages, ...)``.

    Wraps :func:`fused_linear_grpo_loss` with a fixed config and backend; see it for shapes.
    """

    def __init__(self, config: GRPOConfig, *, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, GRPOConfig):
            raise TypeError(f"FusedLinearGRPOLoss: config must be a grpo_kernels.GRPOConfig; got {type(config).__name__}")
        if backend not in backends.BACKENDS:
            raise ValueError(f"FusedLinearGRPOLoss: backend must be one of {', '.join(backends.BACKENDS)}; got {backend!r}")
        self.config = config
        self.backend = backend

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        completion_ids: Tensor,
        mask: Tensor,
        advantages: Tensor,
        *,
        old_logp: Optional[Tensor] = None,
        ref_logp: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        is_ratio: Optional[Tensor] = None,
        num_items_in_batch: Optional[Number] = None,
        dp_group: Optional["torch.distributed.ProcessGroup"] = None,
    ) -> GRPOLossOutput:
        return fused_linear_grpo_loss(hidden, weight, completion_ids, mask, advantages, self.config, old_logp=old_logp,
                                      ref_logp=ref_logp, bias=bias, is_ratio=is_ratio,
                                      num_items_in_batch=num_items_in_batch, backend=self.backend, dp_group=dp_group)

    def extra_repr(self) -> str:
        return f"loss_type={self.config.loss_type!r}, beta={self.config.beta}, backend={self.backend!r}"
