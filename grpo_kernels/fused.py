"""FusedLinearGRPOLoss: hidden states -> GRPO loss, metrics and gradients without [N, V] logits.

dLoss/dlogp is one scalar per token, so the loss and its gradient w.r.t. the hidden states and the
LM head can be formed while the logits are streamed. One driver (:func:`_run`) serves every call:

1. the kept tokens (mask != 0) are selected; padding costs no vocabulary work;
2. a coefficient function is picked by the loss plan (``policy_loss.LossPlan``): token-separable
   objectives get per-chunk coefficients from :func:`policy_loss.token_objective` (the same code
   grpo_loss runs); the others get whole-batch coefficients from the whole loss, after a
   forward-only pass;
3. the schedule: the backend's one pass (``Backend.forward_backward``: forward, coefficients,
   dH / dW per chunk; three GEMMs per token) when the coefficients are token-separable, gradients
   are needed and the backend has a one pass that pays for this dtype; otherwise the shared two-pass
   schedule of ``grpo_kernels.backends``: the forward-only pass here, and the gradient pass (the
   backend's recomputing backward, four GEMMs per token in all) in the autograd backward, with the
   coefficients scaled by grad_output.

Either way the backward multiplies by grad_output without a host sync, without a second [V, D]
tensor, and rounds a 16-bit dW once: the one pass's gradients are ``backends.Formed``, scaled in
place from the state the backend kept for it (``Formed.finish``).

No-grad calls and calls without a kept token go through the same steps with need-flags
(nothing needed: no gradient pass; no token: zero-sized passes, zero gradients). This file names
no loss_type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import _entry, backends, distributed
from ._checks import check_config
from .backends import Backend, FirstPass, Formed, LogprobsParams, Needs, first_pass, gradient_pass
from .config import GRPOConfig
from .logprobs import differentiable_once, gather_rows, scatter_rows, select_rows
from .policy_loss import GRPOLossOutput, LossPlan, Number, TokenContext, token_objective

FN = _entry.FUSED


@dataclass(frozen=True)
class FusedCall:
    """The non-differentiable part of one call: ids, the loss plan, the kernel options and the backend."""

    completion_ids: Tensor
    plan: LossPlan
    params: LogprobsParams
    impl: Backend

    def inputs(self) -> dict[str, Optional[Tensor]]:
        """The caller's tensors a later pass reads again, by argument name (the plan's are detached views)."""
        p = self.plan
        return {"completion_ids": self.completion_ids, "mask": p.mask, "advantages": p.advantages,
                "old_logp": p.old_logp, "ref_logp": p.ref_logp, "is_ratio": p.is_ratio}


def check_unchanged(call: FusedCall, versions: dict[str, int], names: tuple[str, ...]) -> None:
    """Raise when a tensor a backward reads again was modified in place after the forward (as torch does for
    the tensors its ops save): the gradient would silently belong to other inputs than the loss."""
    tensors = call.inputs()
    for name in names:
        t = tensors[name]
        if t is not None and t._version != versions[name]:
            raise RuntimeError(f"{FN}: {name} was modified in place between the forward and the backward "
                               f"(version {versions[name]} -> {t._version}); the gradient pass reads it again")


# ---------------------------------------------------------------------------------------------------
# Coefficients: dLoss/dlogp and dLoss/dentropy of the kept tokens, and the loss and metrics they sum to
# ---------------------------------------------------------------------------------------------------

Objective = Callable[[int, int, Tensor, Optional[Tensor]], tuple[Tensor, dict[str, Tensor]]]


class Coefficients:
    """A ``CoefFn`` for the backends that also adds up the loss and the metric sums of the chunks it sees."""

    def __init__(self, objective: Objective, plan: LossPlan, device: torch.device, want_grad: bool) -> None:
        self.objective = objective
        self.want_grad = want_grad
        self.entropy_grad = plan.config.entropy_coef != 0.0
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.sums = {k: torch.zeros((), device=device) for k in plan.metric_names()}

    def __call__(self, start: int, end: int, logp: Tensor, entropy: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        with torch.enable_grad():
            lp = logp.detach().requires_grad_(self.want_grad)
            en = None if entropy is None else entropy.detach().requires_grad_(self.want_grad and self.entropy_grad)
            loss, sums = self.objective(start, end, lp, en)
            wrt = [x for x in (lp, en) if x is not None and x.requires_grad]
            grads = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt and loss.requires_grad else [None] * len(wrt)
        self.loss += loss.detach().double()
        for k, v in sums.items():
            self.sums[k] = self.sums[k] + v
        g_logp = grads[0] if grads and grads[0] is not None else torch.zeros_like(lp)
        g_ent = grads[1] if len(grads) > 1 else None
        return g_logp.detach(), None if g_ent is None else g_ent.detach()


def _select(ctx: TokenContext, rows: Optional[Tensor]) -> TokenContext:
    """The context of the kept tokens only, flattened in row order."""
    def pick(x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else gather_rows(x.reshape(-1), rows)

    return TokenContext(**{f: pick(getattr(ctx, f)) for f in ctx.__dataclass_fields__})


def coefficients(plan: LossPlan, rows: Optional[Tensor], dtype: torch.dtype, want_grad: bool) -> Coefficients:
    """Token-separable plans: per-chunk coefficients; the others: whole-batch ones (one call, all tokens)."""
    cfg, (B, T) = plan.config, plan.mask.shape
    device = plan.mask.device
    if plan.token_separable:
        ctx = _select(plan.token_context(dtype), rows)

        def objective(start: int, end: int, lp: Tensor, en: Optional[Tensor]):
            return token_objective(lp, en, ctx.flat_slice(start, end), cfg)
    else:
        def objective(start: int, end: int, lp: Tensor, en: Optional[Tensor]):
            assert start == 0 and end == lp.shape[0], "whole-batch coefficients take every token at once"
            full = lambda x: None if x is None else scatter_rows(x, rows, B * T).reshape(B, T)  # noqa: E731
            out = plan.loss(full(lp), full(en))
            return out.loss, out.metrics

    return Coefficients(objective, plan, device, want_grad)


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    """The gradients a backward hands out: formed by the one pass (handed out by the first backward,
    which drops them, so no reference outlives it), or the gradient pass still to run."""

    rows: Optional[Tensor]
    formed: Optional[Formed] = None
    first: Optional[FirstPass] = None


def _run(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], call: FusedCall, needs: Needs):
    """-> loss [], metrics [len(plan.metric_names())], pending gradients."""
    plan, impl, params = call.plan, call.impl, call.params
    D = weight.shape[1]
    rows = select_rows(plan.mask != 0)
    h = gather_rows(hidden.reshape(-1, D), rows)
    t = gather_rows(call.completion_ids.reshape(-1).long(), rows)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    want_grad = any(needs)
    coef = coefficients(plan, rows, acc, want_grad)
    pending = _Pending(rows)
    if want_grad and plan.token_separable and impl.one_pass(h.dtype, D):
        _, _, pending.formed = impl.forward_backward(h, weight, bias, t, params, coef, needs)
    else:
        pending.first = first_pass(impl, h, weight, bias, t, params, coef)
    metrics = torch.stack([coef.sums[k].float() for k in plan.metric_names()])
    return coef.loss.to(acc), metrics, pending


class FusedLinearGRPOFunction(torch.autograd.Function):
    """Forward: loss, metrics and (one pass) the gradients; backward: grad_output times them, or the gradient pass."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], call: FusedCall):
        needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        loss, metrics, pending = _run(hidden, weight, bias, call, needs)
        ctx.call, ctx.needs, ctx.pending = call, needs, pending
        ctx.versions = {k: t._version for k, t in call.inputs().items() if t is not None}
        ctx.hidden_shape = hidden.shape
        ctx.save_for_backward(hidden, weight, bias)
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_metrics: Optional[Tensor]):
        differentiable_once(FN)
        pending: _Pending = ctx.pending
        hidden, weight, bias = ctx.saved_tensors
        if pending.formed is not None:
            # one pass: the gradients exist; scaled in place and handed out, and dropped here, so autograd
            # can take them as they are (a reference kept in ctx would make it copy dW into .grad)
            formed, pending.formed = pending.formed, None
            dh, dw, db = formed.finish(grad_loss)
        else:
            call = ctx.call
            # the gradient pass reads the ids again; a second backward after the one pass, the whole plan
            check_unchanged(call, ctx.versions, ("completion_ids",) if pending.first is not None else tuple(ctx.versions))
            D = weight.shape[1]
            h = gather_rows(hidden.reshape(-1, D), pending.rows)
            t = gather_rows(call.completion_ids.reshape(-1).long(), pending.rows)
            if pending.first is None:
                # a second backward through a retained graph after the one pass: the two-pass schedule
                coef = coefficients(call.plan, pending.rows, torch.float64 if h.dtype == torch.float64 else torch.float32,
                                    True)
                pending.first = first_pass(call.impl, h, weight, bias, t, call.params, coef)
            dh, dw, db = gradient_pass(call.impl, h, weight, bias, t, call.params, pending.first, ctx.needs,
                                       scale=grad_loss)
        if dh is not None:
            dh = scatter_rows(dh, pending.rows, math.prod(ctx.hidden_shape[:-1])).reshape(ctx.hidden_shape)
        return dh, dw, db, None


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


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
    Differentiable once (a backward with create_graph=True raises).

    Args:
        hidden: [B, T, D] final hidden states at the positions that predict completion_ids.
        weight: [V, D] LM-head weight (tied embeddings: pass the embedding matrix).
        completion_ids: [B, T] int64 sampled token ids, in [0, V) at every token the mask keeps;
            where mask == 0 they are never read and may be -100 (ignore_index) as well. -100 at a
            kept token is refused by name on every backend: "ignore" and "keep" contradict each
            other, so the mask alone says which tokens count.
        mask: [B, T] completion mask (0 = padding; those tokens cost no vocabulary work).
        advantages: [B] or [B, T].
        config: the loss options.
        old_logp, ref_logp: [B, T] log-probs of the sampling policy (None: on-policy) and of the
            reference model (needed when beta != 0). No gradient flows into them.
        bias: optional [V] LM-head bias.
        is_ratio: sampler importance-sampling correction, [B, T], [B] or [B, 1].
        num_items_in_batch: token count of the whole accumulated batch over ranks (the losses normalized by
            it: ``policy_loss.normalized_by_token_count``): a finite number >= 1 or a one-element tensor.
        backend: "auto", "cpu", "triton" or "torch" (``grpo_kernels.last_backend("fused_linear_grpo_loss")``).
        dp_group: the data-parallel group of the dapo/cispo/vespo token normalizer (None: the default
            group; with a Replicate DTensor hidden, the mesh decides). weight (and bias) may be a
            DTensor, replicated or sharded along the vocabulary: :mod:`grpo_kernels.distributed` runs
            those calls (two passes) and documents the collectives and their bytes.

    The per-token inputs follow :func:`grpo_kernels.grpo_loss`'s finiteness rule (finite wherever
    mask != 0, anything where mask == 0).

    Returns:
        GRPOLossOutput: ``loss`` (scalar float32, float64 for float64 inputs; differentiable w.r.t.
        hidden, weight, bias) and ``metrics`` (kl when ref_logp is given, clip ratios, entropy).
    """
    if dp_group is not None or distributed.is_dtensor(hidden, weight, bias, completion_ids, mask, advantages, old_logp,
                                                      ref_logp, is_ratio):  # grpo_kernels/distributed.py
        return distributed.fused_linear_grpo_loss(hidden, weight, completion_ids, mask, advantages, config,
                                                  old_logp=old_logp, ref_logp=ref_logp, bias=bias, is_ratio=is_ratio,
                                                  num_items_in_batch=num_items_in_batch, backend=backend, dp_group=dp_group)
    name = _entry.fused_call(hidden, weight, completion_ids, mask, advantages, config, old_logp, ref_logp, bias, is_ratio,
                             num_items_in_batch, backend)
    detach = lambda x: None if x is None else x.detach()  # noqa: E731
    plan = LossPlan(mask.detach(), advantages.detach(), config, detach(old_logp), detach(ref_logp), detach(is_ratio),
                    num_items_in_batch)
    call = FusedCall(completion_ids, plan, LogprobsParams.make(config.temperature, config.logit_softcap, True),
                     backends.get(name))
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        loss, metrics = FusedLinearGRPOFunction.apply(hidden, weight, bias, call)
    else:
        loss, metrics, _ = _run(hidden, weight, bias, call, (False, False, False))
    return GRPOLossOutput(loss=loss, metrics={k: metrics[i] for i, k in enumerate(plan.metric_names())})


class FusedLinearGRPOLoss(nn.Module):
    """Drop-in GRPO loss module: ``crit(hidden, weight, completion_ids, mask, advantages, ...)``.

    Wraps :func:`fused_linear_grpo_loss` with a fixed config and backend; see it for shapes.
    """

    def __init__(self, config: GRPOConfig, *, backend: str = "auto") -> None:
        super().__init__()
        fn = "FusedLinearGRPOLoss"
        check_config(fn, config)
        backends.check_name(fn, backend)
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
