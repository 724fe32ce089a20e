"""Triton kernels for group_advantages: one program per group, the reward columns combined in-kernel.

Each program walks its group's members four times (count / min / max, then the sum, then the squared
deviations around the mean, then the output), recombining the reward columns on every pass instead
of keeping a scratch copy: R is a handful of columns, so re-reading them is cheaper than a second
buffer and a second launch. scale="batch" needs the std of the whole batch before any group can be
normalized, so it runs one extra single-program kernel first.

The statistics run in float64 (the dtype of ``weights``) on the combined rewards divided by the
group's largest |R| (the batch's for the batch std): fp32 statistics overflowed (1e20 squared, 3e38
+ 3e38) and float64 ones would near float64's maximum; scaled, nothing can. ``(R - mean) / (std +
eps)`` is then ``(y - mean_y) / (std_y + eps / s)`` with ``y = R / s``; the output is cast to the
dtype of ``adv`` (float32, or float64 for float64 rewards).

Members of a group need not be consecutive: ``order`` lists the samples sorted by group and
``offsets`` [G + 1] delimits each group in it. Equal consecutive groups skip ``order`` (SORTED).

Inputs arrive validated (``grpo_kernels.advantages``). ``eps`` is a runtime scalar, so on a GPU it
enters as a float32 value and is widened to float64 in the kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from grpo_kernels import backends

from .launch_plan import Launch, run

SCALES = {"none": 0, "group": 1, "batch": 2}
MAX_BLOCK_N = 1024
MAX_BLOCK_R = 16


@triton.jit
def _combined_reward(rewards_ptr, weights_ptr, rows, row_mask, n_cols, stride_b, stride_r,
                     BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per row: sum_k w_k r_k over the columns that are not NaN, and whether any column was."""
    total = tl.zeros([BLOCK_N], dtype=weights_ptr.dtype.element_ty)
    scored = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, n_cols, BLOCK_R):
        cols = k0 + tl.arange(0, BLOCK_R)
        col_mask = cols < n_cols
        r = tl.load(rewards_ptr + rows[:, None] * stride_b + cols[None, :] * stride_r,
                    mask=row_mask[:, None] & col_mask[None, :], other=float("nan")).to(total.dtype)
        w = tl.load(weights_ptr + cols, mask=col_mask, other=0.0)
        # NaN marks "this reward function did not score the sample" (and the masked lanes)
        ok = r == r
        total += tl.sum(tl.where(ok, r * w[None, :], 0.0), axis=1)
        scored += tl.sum(ok.to(tl.int32), axis=1)
    return total, scored > 0


@triton.jit
def _group_block(rewards_ptr, weights_ptr, order_ptr, p, end, n_cols, stride_b, stride_r,
                 SORTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Positions [p, p + BLOCK_N) of a group ending at ``end``: (rows, in_group, combined reward, scored)."""
    pos = p + tl.arange(0, BLOCK_N)
    in_group = pos < end
    if SORTED:
        rows = pos
    else:
        rows = tl.load(order_ptr + pos, mask=in_group, other=0)
    x, valid = _combined_reward(rewards_ptr, weights_ptr, rows, in_group, n_cols, stride_b, stride_r,
                                BLOCK_N, BLOCK_R)
    return rows, in_group, x, valid


@triton.jit
def _batch_std_kernel(rewards_ptr, weights_ptr, std_ptr, n_rows, n_cols, stride_b, stride_r,
                      BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """Writes (std of y = R / s, s) for s the largest |R| of every scored sample of the batch (one program).

    std is the unbiased std over every scored sample; three passes: s, the mean, the squared deviations.
    """
    dt = weights_ptr.dtype.element_ty
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    big = tl.zeros([BLOCK_N], dtype=dt)
    for p in range(0, n_rows, BLOCK_N):
        rows = p + tl.arange(0, BLOCK_N)
        x, valid = _combined_reward(rewards_ptr, weights_ptr, rows, rows < n_rows, n_cols, stride_b, stride_r,
                                    BLOCK_N, BLOCK_R)
        count += valid.to(tl.int32)
        big = tl.maximum(big, tl.where(valid, tl.abs(x), 0.0))
    n = tl.sum(count)
    s = tl.max(big, axis=0)
    s = tl.where(s > 0, s, 1.0)
    acc = tl.zeros([BLOCK_N], dtype=dt)
    for p in range(0, n_rows, BLOCK_N):
        rows = p + tl.arange(0, BLOCK_N)
        x, valid = _combined_reward(rewards_ptr, weights_ptr, rows, rows < n_rows, n_cols, stride_b, stride_r,
                                    BLOCK_N, BLOCK_R)
        acc += tl.where(valid, x / s, 0.0)
    mean = tl.sum(acc) / tl.maximum(n, 1).to(dt)
    # two passes (mean first, then squared deviations): one pass of sum(x^2) cancels catastrophically
    acc = tl.zeros([BLOCK_N], dtype=dt)
    for p in range(0, n_rows, BLOCK_N):
        rows = p + tl.arange(0, BLOCK_N)
        x, valid = _combined_reward(rewards_ptr, weights_ptr, rows, rows < n_rows, n_cols, stride_b, stride_r,
                                    BLOCK_N, BLOCK_R)
        d = x / s - mean
        acc += tl.where(valid, d * d, 0.0)
    # fewer than two scored samples: every group has at most one, so its advantages are 0 anyway
    tl.store(std_ptr, tl.sqrt(tl.sum(acc) / tl.maximum(n - 1, 1).to(dt)))
    tl.store(std_ptr + 1, s)


@triton.jit
def _group_advantages_kernel(rewards_ptr, weights_ptr, order_ptr, offsets_ptr, batch_std_ptr, adv_ptr,
                             n_cols, stride_b, stride_r, eps,
                             SCALE: tl.constexpr, RLOO: tl.constexpr, SORTED: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    dt = weights_ptr.dtype.element_ty
    g = tl.program_id(0)
    start = tl.load(offsets_ptr + g)
    end = tl.load(offsets_ptr + g + 1)

    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    lo = tl.full([BLOCK_N], float("inf"), dtype=dt)
    hi = tl.full([BLOCK_N], float("-inf"), dtype=dt)
    for p in range(start, end, BLOCK_N):
        _, _, x, valid = _group_block(rewards_ptr, weights_ptr, order_ptr, p, end, n_cols, stride_b, stride_r,
                                      SORTED, BLOCK_N, BLOCK_R)
        count += valid.to(tl.int32)
        lo = tl.minimum(lo, tl.where(valid, x, float("inf")))
        hi = tl.maximum(hi, tl.where(valid, x, float("-inf")))
    n = tl.sum(count)
    lo_g = tl.min(lo, axis=0)
    hi_g = tl.max(hi, axis=0)
    # min == max detects a zero-variance group exactly; y - mean need not be exactly 0 there, since
    # the mean of equal values is rounded. n > 1 too: a group with no scored member has inf != -inf.
    keep = (n > 1) & (lo_g != hi_g)
    eps_d = tl.zeros([], dtype=dt) + eps  # a float32 runtime scalar on a GPU: widened here
    # the group's largest |R| (1 for an all-zero or unscored group): y = R / s is in [-1, 1]
    s = tl.maximum(tl.abs(lo_g), tl.abs(hi_g))
    s = tl.where(keep & (s > 0), s, 1.0)

    acc = tl.zeros([BLOCK_N], dtype=dt)
    for p in range(start, end, BLOCK_N):
        _, _, x, valid = _group_block(rewards_ptr, weights_ptr, order_ptr, p, end, n_cols, stride_b, stride_r,
                                      SORTED, BLOCK_N, BLOCK_R)
        acc += tl.where(valid, x / s, 0.0)
    mean = tl.sum(acc) / tl.maximum(n, 1).to(dt)

    if SCALE == 1:
        acc = tl.zeros([BLOCK_N], dtype=dt)
        for p in range(start, end, BLOCK_N):
            _, _, x, valid = _group_block(rewards_ptr, weights_ptr, order_ptr, p, end, n_cols, stride_b, stride_r,
                                          SORTED, BLOCK_N, BLOCK_R)
            d = x / s - mean
            acc += tl.where(valid, d * d, 0.0)
        factor = 1.0 / (tl.sqrt(tl.sum(acc) / tl.maximum(n - 1, 1).to(dt)) + eps_d / s)
    elif SCALE == 2:
        # (R - mean) / (std_R + eps) with R - mean = s * (y - mean_y) and std_R = sb * std_yb; s <= sb
        sb = tl.load(batch_std_ptr + 1)
        factor = (s / sb) / (tl.load(batch_std_ptr) + eps_d / sb)
    else:
        factor = s
    # groups that output 0 may have a zero denominator (eps = 0) or n - 1 = 0: keep their factor finite
    factor = tl.where(keep, factor, 0.0)
    if RLOO:
        # R_i - mean_{j != i} R_j = n / (n - 1) * (R_i - mean), without the cancellation of (S - R_i);
        # applied to y - mean_y before the scale: s * n / (n - 1) alone may overflow
        loo = n.to(dt) / tl.maximum(n - 1, 1).to(dt)
    else:
        loo = tl.full([], 1.0, dtype=dt)

    for p in range(start, end, BLOCK_N):
        rows, in_group, x, valid = _group_block(rewards_ptr, weights_ptr, order_ptr, p, end, n_cols, stride_b,
                                                stride_r, SORTED, BLOCK_N, BLOCK_R)
        adv = tl.where(valid & keep, ((x / s - mean) * loo) * factor, 0.0)
        tl.store(adv_ptr + rows, adv.to(adv_ptr.dtype.element_ty), mask=in_group)


def group_advantages(rewards: Tensor, weights: Tensor, group_size: Optional[int], group_ids: Optional[Tensor],
                     scale: str, rloo: bool, eps: float, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Advantages [B] in out_dtype (default weights.dtype) from rewards [B, R] (any strides, NaN = unscored).

    The statistics run in float64 whatever the dtypes of rewards and weights [R].

    Groups are consecutive runs of ``group_size`` samples, or the samples sharing a label of
    ``group_ids`` [B] (exactly one of the two is given).
    """
    adv, launches = group_advantages_plan(rewards, weights, group_size, group_ids, scale, rloo, eps, out_dtype)
    run(launches)
    return adv


def group_advantages_plan(rewards: Tensor, weights: Tensor, group_size: Optional[int], group_ids: Optional[Tensor],
                          scale: str, rloo: bool, eps: float,
                          out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, list[Launch]]:
    """The output adv [B], allocated, and the launches that fill it (arguments as in :func:`group_advantages`)."""
    n_rows, n_cols = rewards.shape
    out_dtype = out_dtype or weights.dtype
    weights = weights.to(torch.float64)
    adv = backends.empty((n_rows,), out_dtype, rewards.device)
    if n_rows == 0:
        return adv, []
    if group_ids is None:
        offsets = torch.arange(0, n_rows + 1, group_size, device=rewards.device)
        order = offsets  # not read when SORTED
        largest = group_size
    else:
        _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
        order = torch.argsort(inverse, stable=True)  # a fixed summation order: reproducible results
        offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
        largest = int(counts.max())
    block_n = min(max(triton.next_power_of_2(largest), 16), MAX_BLOCK_N)
    block_r = min(triton.next_power_of_2(n_cols), MAX_BLOCK_R)
    # Without a register cap ptxas squeezes these kernels to 32-40 registers and spills fp64 values;
    # 1024-row blocks need more warps than 4 not to spill (ahead-of-time sm_80 / sm_90 compiles).
    opts = dict(num_warps=min(16, max(4, block_n // 64)), maxnreg=128)

    launches = []
    batch_std = adv  # not read unless scale == "batch"
    if scale == "batch":
        batch_std = backends.empty((2,), torch.float64, rewards.device)  # (std of R / s, s)
        block_b = min(max(triton.next_power_of_2(n_rows), 16), MAX_BLOCK_N)
        launches.append(Launch(
            _batch_std_kernel, (1,),
            (rewards, weights, batch_std, n_rows, n_cols, rewards.stride(0), rewards.stride(1)),
            dict(BLOCK_N=block_b, BLOCK_R=block_r, num_warps=min(16, max(4, block_b // 64)), maxnreg=128),
        ))
    launches.append(Launch(
        _group_advantages_kernel, (offsets.numel() - 1,),
        (rewards, weights, order, offsets, batch_std, adv, n_cols, rewards.stride(0), rewards.stride(1), eps),
        dict(SCALE=SCALES[scale], RLOO=rloo, SORTED=group_ids is None, BLOCK_N=block_n, BLOCK_R=block_r, **opts),
    ))
    return adv, launches
