"""Corrections for completions sampled by another engine (vLLM, SGLang, ...) or by an older policy.

The trainer scores completions with its own log-probs ``logp`` (the old policy, computed by the
trainer's kernels) while the sampler drew them from its own, slightly different, distribution
``sampler_logp``. Two corrections turn that mismatch into inputs of the GRPO loss:

- :func:`importance_sampling_ratio`: the truncated (TIS) or masked (MIS) importance-sampling ratio
  ``pi_trainer / pi_sampler``, per token or per sequence, TRL's four ``vllm_importance_sampling_mode``
  values. Its output is the loss's ``is_ratio`` argument (``grpo_loss`` / ``FusedLinearGRPOLoss``),
  which multiplies the policy-gradient term (vespo folds it into its gamma weight instead).
- :func:`off_policy_sequence_mask`: DeepSeek-V3.2's off-policy sequence mask, which drops a sequence
  with a negative advantage whose sampled tokens are, on average, too unlikely under the current
  policy. Multiply the advantages by it (it has their shape, so the product is elementwise): the
  policy-gradient term of a dropped sequence becomes 0 for every loss_type, while the KL term, the
  normalizers and the clip statistics are untouched (as in TRL, which multiplies the per-token
  policy loss). It is not an ``is_ratio``, since vespo reads ``is_ratio`` inside its gamma weight,
  and not a mask, which would change the normalizers and the KL.

Both work on [B, T] float tensors and never see the vocabulary. Both validate like ``grpo_loss``:
the mask must be real, finite and non-negative, and the trainer's ``logp`` finite at every token the
mask keeps (only the sampler may fail to score a token: a NaN in ``logp`` would otherwise pass as
"no correction").
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from ._checks import DataChecks, check_float, check_mask_values, check_not_meta, check_shape, check_tensor, is_real_number

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _check_bound(fn: str, name: str, value: Optional[float]) -> Optional[float]:
    """A clip bound: None (open) or a real number, numpy scalars included, returned as a Python float."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{fn}: {name} must be None or a number; got {value!r}")
    return float(value)


def _check_logps(fn: str, logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> DataChecks:
    """Metadata checks of the three [B, T] inputs; returns the data checks, for the caller to add to and run.

    The mask gets grpo_loss's rules (real, finite, >= 0): a negative mask would flip the sign of the
    log-ratio and a complex one has no order, and the result feeds the same loss. ``logp`` must be
    finite where the mask keeps a token: ``nan_to_num`` below is for the sampler's unscored tokens only.
    """
    check_float(fn, "logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"{fn}: logp must be [B, T]; got shape {tuple(logp.shape)}")
    check_float(fn, "sampler_logp", sampler_logp)
    check_shape(fn, "sampler_logp", sampler_logp, logp.shape, "logp")
    check_tensor(fn, "mask", mask)
    check_shape(fn, "mask", mask, logp.shape, "logp")
    for name, x in (("sampler_logp", sampler_logp), ("mask", mask)):
        if x.device != logp.device:
            raise ValueError(f"{fn}: {name} must be on logp's device {logp.device}; got {x.device}")
    check_not_meta(fn, logp=logp, sampler_logp=sampler_logp, mask=mask)
    checks = DataChecks(fn)
    check_mask_values(fn, mask, checks)
    checks.finite_where("logp", logp, mask != 0)
    return checks


@torch.no_grad()
def importance_sampling_ratio(
    logp: Tensor,
    sampler_logp: Tensor,
    mask: Tensor,
    *,
    mode: str = "sequence_mask",
    clip_min: Optional[float] = None,
    clip_max: Optional[float] = 3.0,
) -> Tensor:
    """Importance-sampling ratio ``pi_trainer / pi_sampler`` for the loss's ``is_ratio`` argument.

    ``d = (logp - sampler_logp) * mask`` per token (a NaN sampler log-prob, a token the sampler
    could not score, counts as ``d = 0``: no correction). The ratio is ``exp(d)`` per token
    (``token_*`` modes, [B, T]) or ``exp(sum_t d)`` per sequence (``sequence_*`` modes, [B, 1]).
    ``*_truncate`` clamps it to ``[clip_min, clip_max]`` (TIS); ``*_mask`` sets it to 0 outside
    that range (MIS). A None bound is open. TRL's ``vllm_importance_sampling_*`` semantics.

    Args:
        logp: [B, T] log-probs of the sampled tokens under the trainer's (old) policy; finite
            wherever mask != 0 (anything on padding).
        sampler_logp: [B, T] the sampler's log-probs of the same tokens (NaN where unknown).
        mask: [B, T] completion mask (0 on padding): bool, integer or real floating, finite, >= 0.
        mode: token_truncate | token_mask | sequence_truncate | sequence_mask.
        clip_min, clip_max: the bounds (None: open); a truncate mode needs at least one.

    Returns:
        float32 [B, T] (token modes) or [B, 1] (sequence modes), detached, >= 0.
    """
    fn = "importance_sampling_ratio"
    checks = _check_logps(fn, logp, sampler_logp, mask)
    if mode not in IS_MODES:
        raise ValueError(f"{fn}: mode must be one of {', '.join(IS_MODES)}; got {mode!r}")
    clip_min = _check_bound(fn, "clip_min", clip_min)
    clip_max = _check_bound(fn, "clip_max", clip_max)
    if clip_min is not None and clip_max is not None and not clip_min < clip_max:
        raise ValueError(f"{fn}: clip_min must be < clip_max; got clip_min={clip_min}, clip_max={clip_max}")
    if mode.endswith("truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"{fn}: clip_min or clip_max must be set for mode={mode!r}; got both None")
    checks.run()
    diff = torch.nan_to_num((logp.float() - sampler_logp.float()) * mask.float(), nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


@torch.no_grad()
def off_policy_sequence_mask(
    advantages: Tensor, logp: Tensor, sampler_logp: Tensor, mask: Tensor, threshold: float
) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask: 1 keeps a sequence, 0 drops it.

    A sequence is kept when its advantage is >= 0 or when the mean over its completion tokens
    of ``sampler_logp - logp`` (a per-token KL estimate, NaN sampler log-probs counting 0) is at
    most ``threshold``. The result has the shape of ``advantages``: pass ``advantages * result`` as
    the loss's advantages (see the module docstring). Not [B, 1] for [B] advantages: that product
    would broadcast to [B, B], which the loss reads as per-token advantages when B == T.

    Args:
        advantages: [B], [B, 1] or [B, T] (per-token advantages give a per-token result); finite
            wherever the mask keeps a token.
        logp: [B, T] log-probs under the current policy (no gradient is taken); finite wherever mask != 0.
        sampler_logp: [B, T] log-probs under the policy that sampled (the sampler's, or the old policy's).
        mask: [B, T] completion mask: bool, integer or real floating, finite, >= 0.
        threshold: the KL threshold (TRL's ``off_policy_mask_threshold``), a finite number.

    Returns:
        float32 0.0 / 1.0 of advantages' shape ([B], [B, 1] or [B, T]), on their device.
    """
    fn = "off_policy_sequence_mask"
    checks = _check_logps(fn, logp, sampler_logp, mask)
    check_float(fn, "advantages", advantages)
    B, T = logp.shape
    if tuple(advantages.shape) not in ((B,), (B, 1), (B, T)):
        raise ValueError(f"{fn}: advantages must be [B] = ({B},), [B, 1] or [B, T] = ({B}, {T}); got {tuple(advantages.shape)}")
    if advantages.device != logp.device:
        raise ValueError(f"{fn}: advantages must be on logp's device {logp.device}; got {advantages.device}")
    check_not_meta(fn, advantages=advantages)
    if not is_real_number(threshold):  # numpy scalars are numbers too
        raise ValueError(f"{fn}: threshold must be a finite number; got {threshold!r}")
    # a NaN advantage compares False with 0 and would silently decide by the KL alone
    adv = advantages.reshape(B, 1) if advantages.dim() == 1 else advantages
    checks.finite_where("advantages", adv, (mask != 0) if adv.shape == (B, T) else (mask != 0).any(-1, keepdim=True))
    checks.run()
    m = mask.float()
    kl = torch.nan_to_num(sampler_logp.float() - logp.detach().float(), nan=0.0)
    mean_kl = (kl * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    keep = ((adv >= 0) | (mean_kl <= float(threshold))).float()
    # advantages' own shape, so that ``advantages * keep`` is elementwise whatever their layout
    return keep.reshape(advantages.shape)
