"""Calling reward functions: one column of rewards per function, None (unscorable) as NaN.

A reward function is ``fn(prompts=list[str], completions=list[str], **columns) -> list[float | None]``
(TRL's convention): ``columns`` are the task rows' other fields, one list entry per completion.
Whatever goes wrong inside a reward function is reported with that function's name, because a
traceback from deep inside a training step rarely says which of several functions failed: an
exception, a return that is not a sequence (a dict would otherwise have its keys taken as
rewards), the wrong length, a non-number, and, with a timeout, a call that does not return.
"""

from __future__ import annotations

import math
import numbers
import signal
import threading
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .._checks import is_real_number

RewardFn = Callable[..., Sequence[Optional[float]]]


def reward_name(fn: RewardFn) -> str:
    """A readable name for metrics and errors: the function's ``__name__``, else its class name."""
    return getattr(fn, "__name__", None) or type(fn).__name__


class _Timeout(BaseException):
    """Raised inside a reward function whose time is up. A BaseException, like KeyboardInterrupt, so
    that a broad ``except Exception`` in the function cannot swallow it and return a reward."""


def _call(fn: RewardFn, kwargs: dict[str, Any], timeout: Optional[float]) -> Any:
    """``fn(**kwargs)``, raising :class:`_Timeout` if it runs longer than ``timeout`` seconds.

    On the main thread (where Python delivers signals) a SIGALRM timer interrupts the function
    itself, even in a busy loop, and nothing keeps running afterwards. Elsewhere the call runs in
    a daemon thread that is abandoned when the time is up: Python cannot stop a thread, but
    training stops waiting for it.
    """
    if timeout is None:
        return fn(**kwargs)
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        def on_alarm(signum: int, frame: Any) -> None:
            raise _Timeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        start = time.monotonic()
        outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            try:
                return fn(**kwargs)
            finally:
                # The one-shot alarm may still fire just before this disarms it; then the outer
                # finally below runs with the timer spent, so it cannot be interrupted.
                signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
            if outer_delay:  # someone else's timer was running: give it back what is left of it
                left = outer_delay - (time.monotonic() - start)
                signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), outer_interval)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn(**kwargs)
        except BaseException as exc:  # handed to the caller's thread below
            result["error"] = exc

    worker = threading.Thread(target=run, name=f"reward:{reward_name(fn)}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _Timeout
    if "error" in result:
        raise result["error"]
    return result["value"]


F32_MAX = torch.finfo(torch.float32).max


def _short(v: Any) -> str:
    """A reward for an error message: an int of hundreds of digits is shown by its start and its length."""
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:12]}... ({len(text)} characters)"


def _as_list(values: Any, name: str, B: int) -> list[Any]:
    """A reward function's return as a list: a list or tuple, or a 1-d tensor or array; nothing else."""
    if isinstance(values, (Tensor, np.ndarray)):
        if values.ndim != 1:
            raise TypeError(f"reward function {name!r} returned a {values.ndim}-d {type(values).__name__}; "
                            f"expected {B} rewards (a list, tuple, or 1-d tensor or array)")
        return values.tolist()
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"reward function {name!r} returned {type(values).__name__}; expected a list (or tuple, or "
                        f"1-d tensor or array) of {B} floats or None")
    return list(values)


def compute_rewards(
    reward_fns: Sequence[RewardFn], prompts: list[str], completions: list[str], columns: dict[str, list[Any]],
    timeout: Optional[float] = None,
) -> Tensor:
    """Rewards [B, R] float32 for B completions and R functions; NaN where a function returned None or NaN.

    Args:
        timeout: seconds each call may take (None: no limit).

    Raises:
        RuntimeError: a reward function raised (the message names it; the original is chained).
        TimeoutError: a call took longer than ``timeout`` (the message names the function).
        ValueError / TypeError: a function returned something other than a list (or tuple, or 1-d
            tensor or array), the wrong number of values, a non-number, or a value that is not
            finite in float32 (±inf, 1e39, 10**400); the message names the function and the index.
    """
    if timeout is not None and (not is_real_number(timeout) or not timeout > 0):  # numpy scalars are numbers
        raise ValueError(f"compute_rewards: timeout must be None or a finite number > 0; got {timeout!r}")
    timeout = None if timeout is None else float(timeout)  # a numpy scalar would reach setitimer
    B = len(completions)
    out = torch.empty(B, len(reward_fns), dtype=torch.float32)
    for j, fn in enumerate(reward_fns):
        name = reward_name(fn)
        try:
            returned = _call(fn, dict(prompts=prompts, completions=completions, **columns), timeout)
        except _Timeout:
            raise TimeoutError(f"reward function {name!r} did not return within reward_timeout = {timeout:g} s") from None
        except Exception as exc:
            raise RuntimeError(f"reward function {name!r} raised {type(exc).__name__}: {exc}") from exc
        values = _as_list(returned, name, B)
        if len(values) != B:
            raise ValueError(f"reward function {name!r} returned {len(values)} values for {B} completions")
        for i, v in enumerate(values):
            if v is None:
                out[i, j] = math.nan
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"reward function {name!r} returned {type(v).__name__} at index {i}; expected float or None")
            # the rewards are float32: a value beyond its range (1e39, or an int like 10**400 that no
            # float holds) would otherwise surface as a raw torch RuntimeError / OverflowError
            try:
                r = float(v)
            except OverflowError:
                r = math.inf
            if abs(r) > F32_MAX:  # NaN compares False: it means unscored
                raise ValueError(f"reward function {name!r} returned {_short(v)} at index {i}; rewards must be finite "
                                 f"in float32 (|r| <= {F32_MAX:.4g}; None: unscorable)")
            out[i, j] = r
    return out


def combine(rewards: Tensor, weights: Tensor) -> Tensor:
    """The weighted total per completion [B] from rewards [B, R]: missing terms are skipped, all missing is NaN.

    This is for logging; the advantages come from ``group_advantages`` on the columns themselves.
    """
    present = ~torch.isnan(rewards)
    total = torch.where(present, rewards * weights, torch.zeros_like(rewards)).sum(-1)
    return torch.where(present.any(-1), total, torch.full_like(total, math.nan))
