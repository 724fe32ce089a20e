"""group_advantages: group-normalized advantages (GRPO, Dr. GRPO, RLOO) from per-sample rewards.

The public function validates and dispatches; the PyTorch implementation below is the one CPU
tensors use (the op is O(B), too small to deserve a C++ kernel) and is vectorized over groups with
index_add / scatter_reduce, so any grouping costs the same few kernels. The Triton kernel lives in
``grpo_kernels.backends.triton.advantages``.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from . import backends
from ._checks import check_float, check_no_inf, check_not_meta, check_tensor, check_weighted_sums, dtype_name, is_real_number

FN = "group_advantages"
SCALES = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")


def torch_group_advantages(rewards: Tensor, weights: Tensor, group_size: Optional[int], group_ids: Optional[Tensor],
                           scale: str, rloo: bool, eps: float, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Advantages [B] in out_dtype (default weights.dtype) from rewards [B, R] (NaN = unscored) and weights [R].

    No loop over groups.
    The statistics run in float64 on rewards divided by their group's largest |R| (the batch's for
    the batch std), so they can neither overflow nor cancel: fp32 rewards of 1e20 squared, or 3e38
    summed, would overflow in fp32; a float64 reward near its own maximum would overflow the sum.
    The result is scaled back exactly as the formula asks: ``(R - mean) / (std + eps)`` equals
    ``(y - mean_y) / (std_y + eps / s)`` for ``y = R / s``.
    """
    n_rows = rewards.shape[0]
    out_dtype, dt, device = out_dtype or weights.dtype, torch.float64, rewards.device
    r = rewards.to(dt)
    unscored = r.isnan()
    valid = ~unscored.all(1)
    x = torch.where(unscored, 0.0, r * weights.to(dt)).sum(1)
    if group_ids is None:
        index = torch.arange(n_rows, device=device) // group_size
        n_groups = n_rows // group_size
    else:
        labels, index = torch.unique(group_ids, return_inverse=True)
        n_groups = labels.numel()

    def per_group(values: Tensor) -> Tensor:
        return torch.zeros(n_groups, dtype=dt, device=device).index_add_(0, index, values)

    def largest(values: Tensor) -> Tensor:
        """max |x| per group over the scored samples; 1 where that is 0 (or nothing is scored)."""
        s = torch.zeros(n_groups, dtype=dt, device=device)
        s.scatter_reduce_(0, index, torch.where(valid, values.abs(), 0.0), "amax")
        return torch.where(s > 0, s, 1.0)

    count = per_group(valid.to(dt))
    s = largest(x)
    y = x / s[index]
    mean = per_group(torch.where(valid, y, 0.0)) / count.clamp_min(1)
    deviation = torch.where(valid, y - mean[index], 0.0)  # of y = x / s: |deviation| <= 2
    # min == max detects a zero-variance group exactly; deviation need not be exactly 0 there,
    # since the mean of equal values is rounded
    lo = torch.full((n_groups,), math.inf, dtype=dt, device=device)
    lo.scatter_reduce_(0, index, torch.where(valid, x, math.inf), "amin")
    hi = torch.full((n_groups,), -math.inf, dtype=dt, device=device)
    hi.scatter_reduce_(0, index, torch.where(valid, x, -math.inf), "amax")
    keep = (count > 1) & (lo != hi)  # count > 1 too: a group with no scored member has inf != -inf

    centered = deviation
    if rloo:
        # R_i - mean_{j != i} R_j = n / (n - 1) * (R_i - mean), without the cancellation of (S - R_i)
        centered = centered * (count / (count - 1).clamp_min(1))[index]
    if scale == "group":
        std = (per_group(deviation * deviation) / (count - 1).clamp_min(1)).sqrt()
        adv = centered / (std + eps / s)[index]
    elif scale == "batch":
        n_valid = valid.sum().to(dt)
        sb = torch.where(valid, x.abs(), 0.0).max() if n_rows else torch.ones((), dtype=dt, device=device)
        sb = torch.where(sb > 0, sb, 1.0)
        yb = x / sb
        batch_deviation = torch.where(valid, yb - torch.where(valid, yb, 0.0).sum() / n_valid.clamp_min(1), 0.0)
        std_b = ((batch_deviation * batch_deviation).sum() / (n_valid - 1).clamp_min(1)).sqrt()
        # (x - mean) / (std_x + eps) with x - mean = s * deviation and std_x = sb * std_b; s <= sb
        adv = centered * (s / sb)[index] / (std_b + eps / sb)
    else:
        adv = centered * s[index]
    # groups that output 0 may divide 0 by 0 (eps = 0); where() discards those lanes
    return torch.where(valid & keep[index], adv, 0.0).to(out_dtype)


def _reward_weights(reward_weights: Union[Tensor, Sequence[float]], n_cols: int, rewards: Tensor, dt: torch.dtype,
                    fn: str = FN) -> Tensor:
    """reward_weights validated and converted to a [R] tensor of the compute dtype on rewards' device; errors
    name ``fn`` (the trainer checks its weights by this rule at construction)."""
    if isinstance(reward_weights, Tensor):
        if reward_weights.dtype == torch.bool or reward_weights.is_complex():
            raise TypeError(f"{fn}: reward_weights must be a real-valued tensor; got {dtype_name(reward_weights.dtype)}")
        if reward_weights.device != rewards.device:
            raise ValueError(f"{fn}: reward_weights must be on rewards' device {rewards.device}; got {reward_weights.device}")
        w = reward_weights.detach()
    else:
        numbers_only = isinstance(reward_weights, Sequence) and not isinstance(reward_weights, str) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in reward_weights)
        if not numbers_only:
            raise TypeError(f"{fn}: reward_weights must be a tensor or a sequence of numbers; got {reward_weights!r}")
        values = []
        for i, v in enumerate(reward_weights):
            try:
                values.append(float(v))
            except OverflowError:  # an int or Fraction beyond float64 (10**400): float() raises instead of giving inf
                raise ValueError(f"{fn}: reward_weights must be finite in float64 (|w| <= "
                                 f"{torch.finfo(torch.float64).max:.4g}); got a value of type {type(v).__name__} "
                                 f"beyond that at index {i}") from None
        w = torch.tensor(values, dtype=torch.float64, device=rewards.device)
    if tuple(w.shape) != (n_cols,):
        raise ValueError(f"{fn}: reward_weights must have shape [R] = ({n_cols},), one weight per reward column; "
                         f"got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        first = int((~torch.isfinite(w)).nonzero()[0, 0])
        raise ValueError(f"{fn}: reward_weights must be finite; got {w.tolist()} (index {first} is {w[first].item()})")
    return w.to(dt)


def _validate(rewards: Tensor, group_size: Optional[int], group_ids: Optional[Tensor], scale: str, estimator: str,
              eps: float, backend: str) -> None:
    check_float(FN, "rewards", rewards)
    if rewards.dim() not in (1, 2) or (rewards.dim() == 2 and rewards.shape[1] == 0):
        raise ValueError(f"{FN}: rewards must be [B] or [B, R] with R >= 1; got shape {tuple(rewards.shape)}")
    n_rows = rewards.shape[0]
    if (group_size is None) == (group_ids is None):
        got = "neither" if group_size is None else "both"
        raise ValueError(f"{FN}: exactly one of group_size and group_ids must be given; got {got}")
    if group_size is not None:
        if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool) or group_size <= 0:
            raise ValueError(f"{FN}: group_size must be a positive int; got {group_size!r}")
        if n_rows % group_size:
            raise ValueError(f"{FN}: group_size must divide the batch size B = {n_rows}; got {group_size}")
    else:
        check_tensor(FN, "group_ids", group_ids)
        if group_ids.dtype.is_floating_point or group_ids.is_complex() or group_ids.dtype == torch.bool:
            raise TypeError(f"{FN}: group_ids must be an integer tensor of group labels; got {dtype_name(group_ids.dtype)}")
        if tuple(group_ids.shape) != (n_rows,):
            raise ValueError(f"{FN}: group_ids must have shape [B] = ({n_rows},); got {tuple(group_ids.shape)}")
        if group_ids.device != rewards.device:
            raise ValueError(f"{FN}: group_ids must be on rewards' device {rewards.device}; got {group_ids.device}")
    if scale not in SCALES:
        raise ValueError(f"{FN}: scale must be one of {', '.join(SCALES)}; got {scale!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"{FN}: estimator must be one of {', '.join(ESTIMATORS)}; got {estimator!r}")
    if not is_real_number(eps) or eps < 0:  # numpy scalars are numbers too
        raise ValueError(f"{FN}: eps must be a finite number >= 0; got {eps!r}")


def group_advantages(
    rewards: Tensor,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    *,
    scale: str = "group",
    estimator: str = "grpo",
    reward_weights: Optional[Union[Tensor, Sequence[float]]] = None,
    eps: float = 1e-4,
    backend: str = "auto",
) -> Tensor:
    """Group-normalized advantages of a batch of sampled completions.

    With ``R_i = sum_k w_k r_ik`` the combined reward of sample i and ``n`` the size of its group:

    - estimator "grpo": ``A_i = (R_i - mean_group R) / (std + eps)``
    - estimator "rloo": ``A_i = (R_i - mean_{j in group, j != i} R_j) / (std + eps)`` (leave-one-out baseline)

    where std is the unbiased std of the sample's group (scale "group"), of every scored reward of
    the batch (scale "batch"; the mean stays per group), or no division at all (scale "none",
    Dr. GRPO). A group with fewer than two scored members, or whose members all have the same
    reward, gets exactly 0.

    The statistics are computed in float64 on the rewards divided by their group's largest |R|
    (the batch's for the batch std), on every backend, so any finite rewards give the advantages
    the formula defines: nothing overflows or cancels (fp32 statistics turned [1e20, -1e20, 1e20,
    -1e20] into zeros and [3e38, 3e38, 0, 0] into NaN; the right answers are +-0.866 and +-0.866).
    Only an advantage that itself exceeds the output dtype (possible with scale="none") is +-inf.

    A NaN reward entry means that reward function could not score the sample: it is left out of
    the weighted sum. A sample none of whose rewards is scored is missing: it is left out of its
    group's statistics (and the batch std) and gets advantage 0.

    Args:
        rewards: [B] or [B, R] float rewards (R reward functions); NaN marks an unscored entry;
            +-inf is refused (it has no group mean).
        group_size: groups are consecutive runs of group_size samples (B % group_size == 0) ...
        group_ids: ... or the samples sharing a label of this [B] integer tensor (any values, any
            order, groups of any size). Exactly one of group_size and group_ids must be given.
        scale: "group", "batch" or "none".
        estimator: "grpo" or "rloo".
        reward_weights: [R] finite weights of the reward columns (tensor or sequence); default all ones.
        eps: added to the std before dividing (>= 0).
        backend: "auto" (Triton for CUDA tensors, PyTorch otherwise), "triton", "torch", or "cpu"
            (CPU tensors; runs the PyTorch code, this op has no C++ kernel);
            ``grpo_kernels.last_backend("group_advantages")`` tells which one ran.

    Returns:
        advantages [B], float32 (float64 when rewards are float64), on rewards' device. They are
        constants of the loss: computed without autograd, whatever rewards.requires_grad.
    """
    _validate(rewards, group_size, group_ids, scale, estimator, eps, backend)
    name = backends.resolve(FN, backend, rewards.device, rewards.dtype, has_cpu_kernel=False)
    check_not_meta(FN, rewards=rewards, group_ids=group_ids)  # reward_weights: its device must be rewards'

    check_no_inf(FN, "rewards", rewards, "that reward function did not score the sample")
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.detach()
    if r.dim() == 1:
        r = r.unsqueeze(1)
    # the weights, like the statistics, are float64 whatever the rewards' dtype (see torch_group_advantages)
    weights = (torch.ones(r.shape[1], dtype=torch.float64, device=r.device) if reward_weights is None
               else _reward_weights(reward_weights, r.shape[1], rewards, torch.float64))
    check_weighted_sums(FN, r, weights)
    backends.record(FN, name)
    if name == "triton":
        impl = importlib.import_module("grpo_kernels.backends.triton.advantages").group_advantages
    else:
        impl = torch_group_advantages
    return impl(r, weights, None if group_size is None else int(group_size), group_ids, scale, estimator == "rloo",
                float(eps), out_dtype=out_dtype)
