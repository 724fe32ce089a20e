"""GRPO-family policy loss on per-token log-probs: the math, written once, and the plan of a call.

Every loss_type is a per-token surrogate ``l`` followed by a reduction. Every reduction of
docs/design.md ("The math") is *linear* in ``l`` with weights that depend only on the mask (and on
num_items_in_batch), so it is written once as a weight tensor ``w`` (:func:`reduction_weights`)
and the loss is ``sum(w * l)``. The fused loss reuses exactly these functions on slices of tokens
to get dLoss/dlogp chunk by chunk; :func:`grpo_loss` applies them to whole tensors.

The file reads top-down: types, math, the loss plan (:class:`LossPlan`: which objectives are
token-separable, the on-policy context, the metric list), the objective, validation, and the
public functions (:func:`grpo_loss`, and :func:`grpo_loss_unchecked` for callers that validated).

Shapes: B sequences, T completion positions. ``logp``, ``mask``, ``old_logp``, ``ref_logp`` are
``[B, T]``; advantages are ``[B]`` (per sequence) or ``[B, T]`` (per token); ``is_ratio`` is
``[B, T]``, ``[B]`` or ``[B, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ._checks import (DataChecks, check_config, check_float, check_mask_values, check_not_meta, check_num_items,
                      check_same_device, check_shape, check_tensor)
from .config import CLIPPED_SURROGATE, GRPOConfig

Number = Union[int, float, Tensor]
# The data-parallel group of the token normalizer: None (default group), a ProcessGroup, or False
# (this process alone); see active_token_count.
DPGroup = Union[None, bool, "torch.distributed.ProcessGroup"]

# ---------------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------------

# Every metric a call can report, in the order of the fused loss's stacked metrics.
METRIC_NAMES = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy")


def metric_names(has_ref: bool, has_entropy: bool) -> tuple[str, ...]:
    """The metrics of a call: kl only with ref_logp, entropy only when the entropy is known."""
    return tuple(k for k in METRIC_NAMES if (k != "kl" or has_ref) and (k != "entropy" or has_entropy))


@dataclass
class GRPOLossOutput:
    """The scalar loss (differentiable) and a dict of detached 0-dim float metrics."""

    loss: Tensor
    metrics: dict[str, Tensor]


@dataclass
class TokenContext:
    """Everything the per-token objective needs besides logp and entropy, aligned with them.

    Tensors are either the full ``[B, T]`` grid or a flat slice of it (the fused kernels
    pass slices of tokens). Per-sequence quantities are already broadcast.
    """

    active: Tensor  # bool: mask != 0
    old: Optional[Tensor]  # None: on-policy (old = logp.detach())
    ref: Optional[Tensor]
    adv: Tensor
    is_ratio: Optional[Tensor]
    phi: Optional[Tensor]  # vespo gamma weights, detached
    entropy_mask: Optional[Tensor]  # top-entropy selection of the policy-gradient term
    loss_w: Tensor  # reduction weights of the per-token loss
    metric_w: Tensor  # m / max(sum m, 1): weights of the token-mean metrics
    entropy_w: Optional[Tensor]  # weights of the entropy bonus (None: no bonus)

    def flat_slice(self, start: int, end: int) -> "TokenContext":
        def s(x: Optional[Tensor]) -> Optional[Tensor]:
            return None if x is None else x.reshape(-1)[start:end]

        return TokenContext(**{f: s(getattr(self, f)) for f in self.__dataclass_fields__})


# ---------------------------------------------------------------------------------------------------
# Math
# ---------------------------------------------------------------------------------------------------

# Loss types whose reduction divides by the token count of the whole (accumulated) batch.
TOKEN_COUNT_NORMALIZED = ("dapo", "cispo", "vespo")


def normalized_by_token_count(loss_type: str) -> bool:
    """Whether ``loss_type`` divides by the whole batch's token count (``num_items_in_batch``).

    Such losses add up over micro-batches (each already carries its share of the normalizer); the
    others are per-micro-batch means that gradient accumulation averages.
    """
    return loss_type in TOKEN_COUNT_NORMALIZED


def kl_divergence(logp: Tensor, ref: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of the sampled token."""
    d = ref - logp
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    if estimator == "k2":
        return 0.5 * d * d
    return -d


def reduction_weights(mask: Tensor, config: GRPOConfig, num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
                      dtype: torch.dtype = torch.float32, dp_group: DPGroup = None) -> Tensor:
    """Weights ``w`` such that the loss is ``sum(w * l)`` for per-token losses ``l`` ([B, T] -> [B, T]).

    ``dp_group`` is the data-parallel group of the dapo/cispo/vespo normalizer (:func:`active_token_count`).
    """
    m = mask.to(dtype)
    B = m.shape[0]
    lt = config.loss_type
    if lt in ("grpo", "sapo"):
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * B)
    if lt == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if lt == "dr_grpo":
        return m / float(B * config.max_completion_length)
    if lt == "luspo":
        return m / float(B)
    assert normalized_by_token_count(lt), lt
    return m / active_token_count(m, num_items_in_batch, dp_group).to(dtype)


def active_token_count(mask: Tensor, num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
                       dp_group: DPGroup = None) -> Tensor:
    """The dapo/cispo/vespo normalizer: tokens per data-parallel rank of the whole (accumulated) batch.

    ``num_items_in_batch / dp_size`` when given (TRL passes the token count of all gradient
    accumulation steps and ranks); otherwise this batch's mask sum, all-reduced over the
    data-parallel group, divided by ``dp_size``. Each rank's loss is then its share of the global
    token mean, so the mean of the ranks' gradients (what DDP and FSDP compute) is the gradient of
    one process on the concatenated batch.

    The data-parallel group (``dp_group``) is the set of ranks that hold *different* tokens:

    - ``None``: the default process group when torch.distributed is initialized (every rank holds
      its own tokens), else this process alone.
    - a ``ProcessGroup``: that group (e.g. ``mesh["dp"].get_group()`` when tensor-parallel ranks
      hold the same tokens: they must not count them twice).
    - ``False``: this process alone (no all-reduce, ``dp_size = 1``); what the DTensor path uses
      for a Replicate (tensor-parallel) hidden state on a mesh that spans every rank.
    """
    dist = torch.distributed
    group = None
    world = 1
    if dp_group is not False and dist.is_available() and dist.is_initialized():
        group = dp_group
        world = dist.get_world_size(group)
    if num_items_in_batch is not None:
        n = torch.as_tensor(num_items_in_batch, dtype=torch.float64, device=mask.device)
        return (n / world).clamp(min=1.0)
    total = mask.to(torch.float64).sum()
    if world > 1:
        total = total.clone()
        dist.all_reduce(total, group=group)
    return (total / world).clamp(min=1.0)


@torch.no_grad()
def vespo_weights(adv: Tensor, log_ratio: Tensor, mask: Tensor, is_ratio: Optional[Tensor], config: GRPOConfig) -> Tensor:
    """VESPO's detached gamma weight ``phi(w) = exp(lambda + k log w - lambda w)`` per sequence.

    ``w`` is the sequence ratio (sum of clamped token log-ratios, plus the sampler's log
    importance ratio when given), computed in log space and clamped as TRL does. [B, 1] (or
    [B, T] with per-token advantages, whose sign picks k and lambda per token).
    """
    dtype = torch.promote_types(log_ratio.dtype, torch.float32)
    m = mask.to(dtype)
    lower = math.log(1e-8)
    active = mask != 0
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    seq = (torch.where(active, log_ratio.to(dtype).clamp(-20.0, 20.0), zero) * m).sum(-1, keepdim=True)
    if is_ratio is not None:
        log_is = torch.log(is_ratio.to(dtype)).clamp(lower, 20.0)
        if log_is.shape[-1] == 1:
            seq = seq + log_is
        else:
            seq = seq + (torch.where(active, log_is, zero) * m).sum(-1, keepdim=True)
    log_w = seq.clamp(lower, 20.0)
    nonneg = adv >= 0
    full = lambda v: torch.full(nonneg.shape, v, dtype=dtype, device=nonneg.device)  # noqa: E731
    k = torch.where(nonneg, full(config.vespo_k_pos), full(config.vespo_k_neg))
    lam = torch.where(nonneg, full(config.vespo_lambda_pos), full(config.vespo_lambda_neg))
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def top_entropy_mask(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """Tokens whose entropy is at or above the ``1 - quantile`` quantile of the completion tokens.

    The quantile is taken over this process's completion tokens; TRL gathers them over ranks
    first, so under data parallelism the selected set can differ slightly from TRL's.
    """
    active = mask != 0
    if quantile >= 1.0 or not bool(active.any()):
        return active
    values = entropy[active]
    # TRL takes the quantile in fp32; float64 entropies keep theirs, or a token equal to the threshold
    # could fall below its fp32 rounding
    values = values if values.dtype == torch.float64 else values.float()
    threshold = torch.quantile(values, 1.0 - quantile)
    return (entropy >= threshold) & active


def sequence_log_weight(logp: Tensor, old: Tensor, mask: Tensor) -> Tensor:
    """GSPO's log sequence ratio: the length-normalized sum of token log-ratios, [B, 1]."""
    m = mask.to(logp.dtype)
    active = mask != 0
    lr = torch.where(active, logp - old.to(logp.dtype), torch.zeros((), dtype=logp.dtype, device=logp.device))
    return (lr * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)


def _expand_per_sequence(x: Tensor, B: int) -> Tensor:
    """[B] -> [B, 1]; [B, 1] and [B, T] broadcast as they are."""
    return x.reshape(B, 1) if x.dim() == 1 else x


# ---------------------------------------------------------------------------------------------------
# The loss plan: what follows from the options and the inputs of one call
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossPlan:
    """The non-logp inputs of one loss call (validated, detached) and the rules that follow from them."""

    mask: Tensor
    advantages: Tensor
    config: GRPOConfig
    old_logp: Optional[Tensor] = None
    ref_logp: Optional[Tensor] = None
    is_ratio: Optional[Tensor] = None
    num_items_in_batch: Optional[Number] = None
    dp_group: DPGroup = None  # the data-parallel group of the token normalizer (active_token_count)

    @property
    def token_separable(self) -> bool:
        """Whether a token's dLoss/dlogp is known from its own logp (and entropy) alone.

        Not so for GSPO's sequence ratio, vespo with old_logp (its gamma weight uses the sequence's
        summed log-ratio) and top_entropy_quantile < 1 (a batch quantile of the entropy): those need
        every token's logp first (the two-pass schedule).
        """
        cfg = self.config
        return not (cfg.importance_sampling_level == "sequence" or cfg.top_entropy_quantile < 1.0
                    or (cfg.loss_type == "vespo" and self.old_logp is not None))

    def metric_names(self, has_entropy: bool = True) -> tuple[str, ...]:
        return metric_names(self.ref_logp is not None, has_entropy)

    def token_context(self, dtype: torch.dtype = torch.float32) -> TokenContext:
        """The per-token context of a token-separable plan over the [B, T] grid, weights in ``dtype``."""
        assert self.token_separable
        B, T = self.mask.shape
        phi = None
        if self.config.loss_type == "vespo":  # on-policy: the token log-ratios are exactly 0
            isr = None if self.is_ratio is None else _expand_per_sequence(self.is_ratio, B)
            phi = vespo_weights(_expand_per_sequence(self.advantages, B), torch.zeros(B, T, dtype=dtype, device=self.mask.device),
                                self.mask, isr, self.config)
        return build_context(self.mask, self.advantages, self.config, old_logp=self.old_logp, ref_logp=self.ref_logp,
                             is_ratio=self.is_ratio, num_items_in_batch=self.num_items_in_batch, phi=phi, dtype=dtype,
                             dp_group=self.dp_group)

    def loss(self, logp: Tensor, entropy: Optional[Tensor]) -> GRPOLossOutput:
        """The whole loss from [B, T] log-probs (any plan): :func:`grpo_loss_unchecked`."""
        return grpo_loss_unchecked(logp, self.advantages, self.mask, self.config, old_logp=self.old_logp,
                                   ref_logp=self.ref_logp, is_ratio=self.is_ratio,
                                   num_items_in_batch=self.num_items_in_batch, entropy=entropy, dp_group=self.dp_group)


# ---------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------


def build_context(
    mask: Tensor,
    advantages: Tensor,
    config: GRPOConfig,
    *,
    old_logp: Optional[Tensor],
    ref_logp: Optional[Tensor],
    is_ratio: Optional[Tensor],
    num_items_in_batch: Optional[Union[int, float, Tensor]],
    phi: Optional[Tensor] = None,
    entropy_mask: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float32,
    dp_group: DPGroup = None,
) -> TokenContext:
    """The per-token context over the full [B, T] grid (per-sequence tensors broadcast); weights in dtype."""
    B, T = mask.shape
    active = mask != 0
    m = mask.to(dtype)
    adv = advantages.reshape(B, 1).expand(B, T) if advantages.dim() == 1 else advantages
    isr = None if is_ratio is None else _expand_per_sequence(is_ratio, B).expand(B, T)
    metric_w = m / m.sum().clamp(min=1.0)
    return TokenContext(
        active=active,
        old=old_logp,
        ref=ref_logp,
        adv=adv,
        is_ratio=isr,
        phi=None if phi is None else phi.expand(B, T),
        entropy_mask=entropy_mask,
        loss_w=reduction_weights(mask, config, num_items_in_batch, dtype, dp_group),
        metric_w=metric_w,
        entropy_w=metric_w if config.entropy_coef != 0.0 else None,
    )


def token_objective(
    logp: Tensor, entropy: Optional[Tensor], ctx: TokenContext, config: GRPOConfig, log_weight: Optional[Tensor] = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss contribution ``sum(w * l) - coef * sum(ew * H)`` of some tokens and their metric sums.

    ``log_weight`` is the log importance weight; None means token level (``logp - old``). Applied
    to all tokens it is the whole loss; applied to slices, the slice results add up to it.
    """
    active = ctx.active
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    logp = torch.where(active, logp, zero)
    old = logp.detach() if ctx.old is None else torch.where(active, ctx.old.to(logp.dtype), zero)
    adv = torch.where(active, ctx.adv.to(logp.dtype), zero)
    if log_weight is None:
        log_weight = logp - old
    r = torch.exp(log_weight)

    lt = config.loss_type
    low = high = None
    if lt == "cispo":
        cap = config.eps_high
        per_token = -torch.clamp(r, max=cap).detach() * adv * logp
        high = (r > cap) & (adv > 0)
    elif lt == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, config.sapo_temperature_pos), torch.full_like(adv, config.sapo_temperature_neg))
        per_token = -torch.sigmoid(tau * (r - 1.0)) * (4.0 / tau) * adv
    elif lt == "vespo":
        per_token = -ctx.phi.to(logp.dtype) * adv * logp
    else:
        assert lt in CLIPPED_SURROGATE
        lo_b, hi_b = 1.0 - config.epsilon_low, 1.0 + config.eps_high
        rc = torch.clamp(r, lo_b, hi_b)
        r1 = r if config.delta is None else torch.clamp(r, max=config.delta)
        per_token = -torch.minimum(r1 * adv, rc * adv)
        low = (r < lo_b) & (adv < 0)
        high = (r > hi_b) & (adv > 0)

    if ctx.entropy_mask is not None:
        per_token = per_token * ctx.entropy_mask.to(logp.dtype)
    if ctx.is_ratio is not None and lt != "vespo":
        per_token = per_token * torch.where(active, ctx.is_ratio.to(logp.dtype), zero)

    kl = None
    if ctx.ref is not None:
        ref = torch.where(active, ctx.ref.to(logp.dtype), zero)
        kl = kl_divergence(logp, ref, config.kl_estimator)
        if config.use_bias_correction_kl:
            kl = kl * r
        if config.beta != 0.0:
            per_token = per_token + config.beta * kl

    per_token = torch.where(active, per_token, zero)
    loss = (ctx.loss_w.to(logp.dtype) * per_token).sum()
    if ctx.entropy_w is not None:
        loss = loss - config.entropy_coef * (ctx.entropy_w.to(logp.dtype) * torch.where(active, entropy, zero)).sum()

    mw = ctx.metric_w
    sums: dict[str, Tensor] = {}
    with torch.no_grad():
        if kl is not None:
            sums["kl"] = (mw * torch.where(active, kl, zero).float()).sum()
        low_f = torch.zeros_like(mw) if low is None else (low & active).float()
        high_f = torch.zeros_like(mw) if high is None else (high & active).float()
        sums["clip_ratio/low_mean"] = (mw * low_f).sum()
        sums["clip_ratio/high_mean"] = (mw * high_f).sum()
        sums["clip_ratio/region_mean"] = (mw * torch.maximum(low_f, high_f)).sum()
        if entropy is not None:
            sums["entropy"] = (mw * torch.where(active, entropy.detach(), zero).float()).sum()
    return loss, sums


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


def validate_loss_inputs(
    fn: str,
    logp_shape: tuple[int, int],
    device: torch.device,
    advantages: Tensor,
    mask: Tensor,
    config: GRPOConfig,
    old_logp: Optional[Tensor],
    ref_logp: Optional[Tensor],
    is_ratio: Optional[Tensor],
    num_items_in_batch: Optional[Number],
    checks: DataChecks,
) -> None:
    """Checks shared by grpo_loss and the fused loss, before any work; data checks join ``checks``."""
    check_config(fn, config)
    B, T = logp_shape
    check_tensor(fn, "mask", mask)
    check_shape(fn, "mask", mask, (B, T), "the completion tokens")
    check_float(fn, "advantages", advantages)
    check_same_device(fn, mask=mask, advantages=advantages, old_logp=old_logp, ref_logp=ref_logp, is_ratio=is_ratio)
    if advantages.device != device:
        raise ValueError(f"{fn}: all tensors must be on one device; got logp on {device}, advantages on {advantages.device}")
    check_not_meta(fn, mask=mask, advantages=advantages, old_logp=old_logp, ref_logp=ref_logp, is_ratio=is_ratio)
    check_mask_values(fn, mask, checks)
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(f"{fn}: advantages must be [B] = ({B},) per sequence or [B, T] = ({B}, {T}) per token; got {tuple(advantages.shape)}")
    # only advantages that reach the loss must be finite: padding may hold anything
    live = (mask != 0) if advantages.dim() == 2 else (mask != 0).any(-1)
    checks.finite("advantages", torch.where(live, advantages, 0.0))
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if x is not None:
            check_float(fn, name, x)
            check_shape(fn, name, x, (B, T), "the completion tokens")
            checks.finite_where(name, x, mask != 0)
    if config.beta != 0.0 and ref_logp is None:
        raise ValueError(f"{fn}: ref_logp is required when config.beta != 0 (beta={config.beta}); pass the reference model's log-probs or set beta=0")
    if is_ratio is not None:
        check_float(fn, "is_ratio", is_ratio)
        if tuple(is_ratio.shape) not in ((B, T), (B,), (B, 1)):
            raise ValueError(f"{fn}: is_ratio must be [B, T] = ({B}, {T}), [B] or [B, 1]; got {tuple(is_ratio.shape)}")
        live_is = torch.where(mask != 0, is_ratio, 1.0) if is_ratio.shape == (B, T) else \
            torch.where((mask != 0).any(-1), is_ratio.reshape(B), 1.0)
        checks.finite("is_ratio", live_is)
        checks.require(~(live_is < 0).any(), lambda: f"{fn}: is_ratio must be >= 0 (an importance-sampling ratio)")
    check_num_items(fn, num_items_in_batch, checks)


# ---------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------


def grpo_loss(
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    config: GRPOConfig,
    *,
    old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    is_ratio: Optional[Tensor] = None,
    num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
    entropy: Optional[Tensor] = None,
    dp_group: Optional["torch.distributed.ProcessGroup"] = None,
) -> GRPOLossOutput:
    """GRPO-family loss from per-token log-probs, with TRL's semantics for every loss_type.

    Args:
        logp: [B, T] float log-probs of the completion tokens under the current policy (differentiable).
        advantages: [B] per-sequence or [B, T] per-token advantages.
        mask: [B, T] completion mask (0 for padding; non-zero entries are weights, normally 1).
        config: the loss options.
        old_logp: [B, T] log-probs under the sampling policy; None means on-policy (``logp.detach()``).
        ref_logp: [B, T] reference-model log-probs; required when ``config.beta != 0``.
        is_ratio: sampler importance-sampling correction, [B, T] per token or [B] / [B, 1] per sequence.
        num_items_in_batch: token count of the whole accumulated batch over all ranks (dapo/cispo/vespo).
        entropy: [B, T] per-token entropy; required when config.entropy_coef != 0 or
            config.top_entropy_quantile < 1, reported as the ``entropy`` metric when given.
        dp_group: the data-parallel process group of the dapo/cispo/vespo token normalizer (the
            ranks holding different tokens); None: the default group when torch.distributed is
            initialized. Pass it when tensor-parallel ranks hold the same tokens (see
            :func:`active_token_count`).

    Finiteness (one rule for every per-token input: logp, entropy, old_logp, ref_logp, advantages,
    is_ratio): each must be finite at every token the mask keeps (mask != 0), else a ValueError
    names it; a NaN or -inf old_logp would otherwise turn the loss into NaN or silently drop the
    token. Where mask == 0 (padding) nothing is read, so NaN / inf there changes nothing. A per-
    sequence input ([B]) counts as kept when its row has a kept token. The mask itself must be
    finite and >= 0 everywhere; num_items_in_batch a finite number >= 1.

    Returns:
        GRPOLossOutput with the scalar loss and metrics ``kl`` (when ref_logp is given),
        ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` and ``entropy``
        (when entropy is given): token means over the completion tokens. The loss is float32 (float64
        for float64 logp): 16-bit logp is widened first. Gradients flow into logp and entropy only;
        old_logp, ref_logp, advantages and is_ratio are taken as constants (detached).
    """
    fn = "grpo_loss"
    check_config(fn, config)
    check_float(fn, "logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"{fn}: logp must be [B, T]; got shape {tuple(logp.shape)}")
    check_not_meta(fn, logp=logp)
    checks = DataChecks(fn)
    validate_loss_inputs(fn, tuple(logp.shape), logp.device, advantages, mask, config, old_logp, ref_logp, is_ratio,
                         num_items_in_batch, checks)
    checks.finite_where("logp", logp.detach(), mask != 0)
    if entropy is not None:
        check_float(fn, "entropy", entropy)
        check_shape(fn, "entropy", entropy, logp.shape, "logp")
        check_same_device(fn, logp=logp, entropy=entropy)
        check_not_meta(fn, entropy=entropy)
        checks.finite_where("entropy", entropy.detach(), mask != 0)
    elif config.needs_entropy:
        raise ValueError(f"{fn}: entropy is required when config.entropy_coef != 0 or config.top_entropy_quantile < 1")
    check_dp_group(fn, dp_group)
    checks.run()
    return grpo_loss_unchecked(logp, advantages, mask, config, old_logp=old_logp, ref_logp=ref_logp, is_ratio=is_ratio,
                               num_items_in_batch=num_items_in_batch, entropy=entropy, dp_group=dp_group)


def check_dp_group(fn: str, dp_group: object) -> None:
    """dp_group is None or a ProcessGroup of an initialized torch.distributed."""
    if dp_group is None:
        return
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{fn}: dp_group needs an initialized torch.distributed; got {type(dp_group).__name__} before init_process_group")
    if not isinstance(dp_group, dist.ProcessGroup):
        raise TypeError(f"{fn}: dp_group must be None or a torch.distributed.ProcessGroup; got {type(dp_group).__name__}")


def grpo_loss_unchecked(logp: Tensor, advantages: Tensor, mask: Tensor, config: GRPOConfig, *,
                        old_logp: Optional[Tensor] = None, ref_logp: Optional[Tensor] = None,
                        is_ratio: Optional[Tensor] = None, num_items_in_batch: Optional[Number] = None,
                        entropy: Optional[Tensor] = None, dp_group: DPGroup = None) -> GRPOLossOutput:
    """:func:`grpo_loss` without validation, for callers that validated the same inputs already
    (the fused loss, the DTensor path, integrations). Same arguments, shapes and result; computed in float32
    (float64 for float64 logp), whatever logp's dtype."""
    B, T = logp.shape
    # float32 at least: the normalizers (mask sums, num_items_in_batch) overflow float16 past 65504 and
    # would zero the loss; autograd casts the gradient back to logp's dtype
    acc = torch.float64 if logp.dtype == torch.float64 else torch.float32
    logp = logp.to(acc)
    entropy = None if entropy is None else entropy.to(acc)
    # the sampling policy's and the reference's log-probs, the advantages and the IS ratio are constants
    # (TRL computes them without a graph): a graph-carrying old_logp=logp would cancel the policy gradient
    old_logp, ref_logp, advantages, is_ratio = (None if x is None else x.detach()
                                                for x in (old_logp, ref_logp, advantages, is_ratio))
    old = logp.detach() if old_logp is None else old_logp
    phi = None
    if config.loss_type == "vespo":
        isr = None if is_ratio is None else _expand_per_sequence(is_ratio, B)
        phi = vespo_weights(_expand_per_sequence(advantages, B), (logp - old.to(logp.dtype)).detach(), mask, isr, config)
    emask = None
    if config.top_entropy_quantile < 1.0:
        emask = top_entropy_mask(entropy.detach(), mask, config.top_entropy_quantile)
    ctx = build_context(mask, advantages, config, old_logp=old_logp, ref_logp=ref_logp, is_ratio=is_ratio,
                        num_items_in_batch=num_items_in_batch, phi=phi, entropy_mask=emask, dtype=logp.dtype,
                        dp_group=dp_group)
    log_weight = None
    if config.importance_sampling_level == "sequence":
        log_weight = sequence_log_weight(logp, old, mask)
    loss, sums = token_objective(logp, entropy, ctx, config, log_weight=log_weight)
    return GRPOLossOutput(loss=loss, metrics=sums)
