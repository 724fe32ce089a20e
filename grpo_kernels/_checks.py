"""Argument validation shared by the public functions.

Every public entry point validates before any kernel runs. The messages follow one shape:
``"<function>: <argument> <what was expected>; got <what arrived>"`` so a user can fix the
call without reading our source.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(fn: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(x).__name__}")
    return x


def check_float(fn: str, name: str, x: torch.Tensor, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    check_tensor(fn, name, x)
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{fn}: {name} must have a floating dtype ({allowed}); got {str(x.dtype).replace('torch.', '')}")


def check_integer(fn: str, name: str, x: torch.Tensor) -> None:
    check_tensor(fn, name, x)
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: {name} must be an int64 (or int32) tensor of token ids; got {str(x.dtype).replace('torch.', '')}")


def check_shape(fn: str, name: str, x: torch.Tensor, shape: Sequence[int], like: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have the shape of {like} {tuple(shape)}; got {tuple(x.shape)}")


def check_same_device(fn: str, **tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"{fn}: all tensors must be on one device; got {listing}")


def check_finite(fn: str, name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{fn}: {name} must be finite; got {bad} NaN/inf value(s)")


def check_positive(fn: str, name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{fn}: {name} must be a number > 0; got {value!r}")
