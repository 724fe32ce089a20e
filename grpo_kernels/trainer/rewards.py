"""Calling reward functions: one column of rewards per function, None (unscorable) as NaN.

A reward function is ``fn(prompts=list[str], completions=list[str], **columns) -> list[float | None]``
(TRL's convention): ``columns`` are the task rows' other fields, one list entry per completion.
Whatever goes wrong inside a reward function is reported with that function's name, because a
traceback from deep inside a training step rarely says which of several functions failed.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

RewardFn = Callable[..., Sequence[Optional[float]]]


def reward_name(fn: RewardFn) -> str:
    """A readable name for metrics and errors: the function's ``__name__``, else its class name."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def compute_rewards(
    reward_fns: Sequence[RewardFn], prompts: list[str], completions: list[str], columns: dict[str, list[Any]]
) -> Tensor:
    """Rewards [B, R] float32 for B completions and R functions; NaN where a function returned None or NaN.

    Raises:
        RuntimeError: a reward function raised (the message names it; the original is chained).
        ValueError / TypeError: a function returned the wrong number of values, a non-number, or ±inf.
    """
    B = len(completions)
    out = torch.empty(B, len(reward_fns), dtype=torch.float32)
    for j, fn in enumerate(reward_fns):
        name = reward_name(fn)
        try:
            values = list(fn(prompts=prompts, completions=completions, **columns))
        except Exception as exc:
            raise RuntimeError(f"reward function {name!r} raised {type(exc).__name__}: {exc}") from exc
        if len(values) != B:
            raise ValueError(f"reward function {name!r} returned {len(values)} values for {B} completions")
        for i, v in enumerate(values):
            if v is None:
                out[i, j] = math.nan
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"reward function {name!r} returned {type(v).__name__} at index {i}; expected float or None")
            if math.isinf(float(v)):
                raise ValueError(f"reward function {name!r} returned {v} at index {i}; rewards must be finite (None: unscorable)")
            out[i, j] = float(v)
    return out


def combine(rewards: Tensor, weights: Tensor) -> Tensor:
    """The weighted total per completion [B] from rewards [B, R]: missing terms are skipped, all missing is NaN.

    This is for logging; the advantages come from ``group_advantages`` on the columns themselves.
    """
    present = ~torch.isnan(rewards)
    total = torch.where(present, rewards * weights, torch.zeros_like(rewards)).sum(-1)
    return torch.where(present.any(-1), total, torch.full_like(total, math.nan))
