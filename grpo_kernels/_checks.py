"""Argument validation shared by the public functions.

Every public entry point validates before any kernel runs. The messages follow one shape:
``"<function>: <argument> <what was expected>; got <what arrived>"`` so a user can fix the
call without reading our source.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Optional, Union

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


def is_real_number(value: object) -> bool:
    """A finite real scalar: Python int / float or a numpy scalar; not bool, not a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, torch.Tensor)) and math.isfinite(value)


def check_positive(fn: str, name: str, value: float | None, *, allow_none: bool = False) -> None:
    """A finite number > 0 (inf is refused: a softcap or temperature of inf turns the logits into NaN)."""
    if value is None and allow_none:
        return
    if not is_real_number(value) or not value > 0:
        raise ValueError(f"{fn}: {name} must be a finite number > 0; got {value!r}")


def check_index(fn: str, name: str, value: object) -> None:
    """An int64-range integer (numpy integers too): the token-id sentinel compared against the ids."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be an int; got {type(value).__name__}")
    if not -2**63 <= int(value) < 2**63:
        raise ValueError(f"{fn}: {name} must fit in int64; got {value}")


def check_real_mask(fn: str, mask: torch.Tensor) -> None:
    """mask: bool, integer or real floating (complex has no order, so no "mask != 0 and >= 0" rule)."""
    if mask.is_complex():
        raise TypeError(f"{fn}: mask must be a bool, integer or real floating tensor; got {str(mask.dtype).replace('torch.', '')}")


def check_lm_head(fn: str, weight: torch.Tensor) -> None:
    """weight [V, D] with V >= 1 and D >= 1 (D = 0 used to crash the C++ kernels; V = 0 has no softmax)."""
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"{fn}: weight must be [V, D] with V >= 1 and D >= 1; got shape {tuple(weight.shape)}")


def check_backend_dtype(fn: str, backend: str, dtype: torch.dtype) -> None:
    """The C++ and Triton kernels stop at fp32; float64 (gradcheck, oracles) runs on backend='torch'."""
    if backend in ("cpu", "triton") and dtype == torch.float64:
        raise TypeError(f"{fn}: hidden and weight must be float32, bfloat16 or float16 for backend={backend!r}; got float64 "
                        "(use backend='torch' for float64, e.g. for gradcheck; backend='auto' picks it)")


def check_finite_bias(fn: str, bias: Optional[torch.Tensor]) -> None:
    """A -inf bias entry ("never sample this token") would make the entropy 0 * inf = NaN: refused."""
    if bias is not None and not bool(torch.isfinite(bias).all()):
        bad = int((~torch.isfinite(bias)).sum())
        raise ValueError(f"{fn}: bias must be finite (a -inf entry to ban a token is not supported: its entropy term "
                         f"would be NaN); got {bad} NaN/inf value(s)")


def check_not_meta(fn: str, **tensors: Optional[torch.Tensor]) -> None:
    """Meta tensors hold no values, and every public function validates values (ids, finiteness)."""
    for name, x in tensors.items():
        if isinstance(x, torch.Tensor) and x.is_meta:
            raise ValueError(f"{fn}: {name} must be a tensor with data (on cpu or cuda); got a tensor on meta")


def check_finite_where(fn: str, name: str, x: torch.Tensor, keep: torch.Tensor) -> None:
    """x (broadcast against keep) must be finite where keep is True: masked tokens are never read."""
    bad = keep & ~torch.isfinite(x)
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(f"{fn}: {name} must be finite at every token the mask keeps (mask != 0); "
                         f"got {int(bad.sum())} NaN/inf value(s), the first {x[tuple(first)].item()} at {first}")


def check_no_inf(fn: str, name: str, x: torch.Tensor, nan_means: str) -> None:
    """x may hold NaN (which means ``nan_means``) but no +-inf."""
    bad = torch.isinf(x)
    if bool(bad.any()):
        raise ValueError(f"{fn}: {name} must be finite or NaN (NaN: {nan_means}); got {int(bad.sum())} +-inf value(s)")


def check_weighted_sums(fn: str, rewards: torch.Tensor, weights: torch.Tensor) -> None:
    """sum_k |w_k r_k| (NaN entries left out) must be finite in float64, or the combined reward overflows."""
    total = torch.where(rewards.isnan(), 0.0, rewards.to(torch.float64).abs() * weights.to(torch.float64).abs()).sum(-1)
    if bool(torch.isinf(total).any()):
        first = int(torch.isinf(total).nonzero()[0, 0])
        raise ValueError(f"{fn}: rewards weighted by reward_weights must sum to a finite float64 per sample; "
                         f"got an overflow at sample {first}")


def check_kept_ids(fn: str, name: str, ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> None:
    """Token ids at kept tokens must be real tokens: ignore_index (-100) there has no meaning in a loss."""
    bad = (mask != 0) & ((ids < 0) | (ids >= vocab))
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(f"{fn}: {name} must be in [0, V) = [0, {vocab}) at every token the mask keeps "
                         f"(mask != 0; ignore_index is allowed only where mask == 0); got {int(ids[tuple(first)])} at {first}")


def check_num_items(fn: str, value: Union[int, float, torch.Tensor, None]) -> None:
    """num_items_in_batch: None, or a finite token count >= 1 (a number or a one-element tensor)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.is_meta or value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{fn}: num_items_in_batch must be a number or a one-element real tensor with data; "
                             f"got a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)} "
                             f"on {value.device}")
        n = value.item()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        n = value
    else:
        raise TypeError(f"{fn}: num_items_in_batch must be a number or a one-element tensor; got {type(value).__name__}")
    if not (math.isfinite(n) and n >= 1):
        raise ValueError(f"{fn}: num_items_in_batch must be a finite token count >= 1; got {n!r}")
