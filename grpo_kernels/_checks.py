"""Argument validation shared by the public functions.

Every public entry point validates before any kernel runs, once, and names itself: messages follow
one shape, ``"<function>: <argument> <what was expected>; got <what arrived>"``, so a user can fix
the call without reading our source. Backends only assert.

Two kinds of checks:
- metadata (types, shapes, dtypes, devices, options) raise at once;
- data-dependent ones (ids in range, finite values, signs) are collected in a :class:`DataChecks`
  and read back to the host together: one synchronization per call on a GPU. Their messages are
  built (with more reads) only when a check fails.

Where the rules live: the LM-head checks shared by linear_logprobs and the fused loss are here
(:func:`check_lm_head`); the loss inputs' checks are in ``policy_loss.validate_loss_inputs``;
group_advantages' are in ``advantages``. The backend name, device and dtype are decided by
``backends.resolve``. The sequence each entry point runs (single-process and DTensor alike) is
written once, in ``grpo_kernels._entry``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(fn: str, name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor; got {type(x).__name__}")
    return x


def check_float(fn: str, name: str, x: Tensor, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    check_tensor(fn, name, x)
    if x.dtype not in dtypes:
        allowed = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{fn}: {name} must have a floating dtype ({allowed}); got {dtype_name(x.dtype)}")


def check_integer(fn: str, name: str, x: Tensor) -> None:
    check_tensor(fn, name, x)
    if x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: {name} must be an int64 (or int32) tensor of token ids; got {dtype_name(x.dtype)}")


def check_shape(fn: str, name: str, x: Tensor, shape: Sequence[int], like: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have the shape of {like} {tuple(shape)}; got {tuple(x.shape)}")


def check_same_device(fn: str, **tensors: Optional[Tensor]) -> None:
    """Every given tensor on one device; a non-tensor is refused by name first (a numpy array has a
    ``.device`` too, the string 'cpu', which would otherwise read as a device mismatch)."""
    present = {k: check_tensor(fn, k, v) for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"{fn}: all tensors must be on one device; got {listing}")


def is_real_number(value: object) -> bool:
    """A finite real scalar: Python int / float or a numpy scalar; not bool, not a tensor."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, torch.Tensor)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int (or Fraction) beyond float64, 10**400: isfinite converts it and raises
        return False


def check_positive(fn: str, name: str, value: object, *, allow_none: bool = False,
                   compute_dtype: Optional[torch.dtype] = None) -> None:
    """A finite number > 0 (inf is refused: a softcap or temperature of inf turns the logits into NaN).

    ``compute_dtype``: the kernels use the value in that dtype, so it must be a normal number there:
    in float32 a softcap of 1e-50 rounds to 0, the encoding of "no softcap", and one above 3.4e38 to
    inf (inf * tanh(z / inf) = NaN); a temperature below the smallest normal divides the logits into inf.
    """
    if value is None and allow_none:
        return
    if not is_real_number(value) or not value > 0:
        raise ValueError(f"{fn}: {name} must be a finite number > 0; got {value!r}")
    if compute_dtype is not None:
        info = torch.finfo(compute_dtype)
        if not info.tiny <= value <= info.max:
            raise ValueError(f"{fn}: {name} must be in [{info.tiny:.4g}, {info.max:.4g}], the normal numbers of the "
                             f"kernels' {dtype_name(compute_dtype)}; got {value!r}")


def check_index(fn: str, name: str, value: object) -> None:
    """An int64-range integer (numpy integers too): the token-id sentinel compared against the ids."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be an int; got {type(value).__name__}")
    if not -2**63 <= int(value) < 2**63:
        raise ValueError(f"{fn}: {name} must fit in int64; got {value}")


def check_real_mask(fn: str, mask: Tensor) -> None:
    """mask: bool, integer or real floating (complex has no order, so no "mask != 0 and >= 0" rule)."""
    if mask.is_complex():
        raise TypeError(f"{fn}: mask must be a bool, integer or real floating tensor; got {dtype_name(mask.dtype)}")


def check_mask_values(fn: str, mask: Tensor, checks: "DataChecks") -> None:
    """A completion mask's rules (grpo_loss and the sampling helpers): real (:func:`check_real_mask`),
    finite and >= 0 everywhere (data checks, joining ``checks``); a negative weight flips a token's sign."""
    check_real_mask(fn, mask)
    if mask.is_floating_point():
        checks.require(torch.isfinite(mask).all(), lambda: f"{fn}: mask must be finite (0/1 or non-negative weights); "
                                                           f"got {int((~torch.isfinite(mask)).sum())} NaN/inf value(s)")
    if mask.dtype != torch.bool:
        checks.require(~(mask < 0).any(), lambda: f"{fn}: mask must be non-negative (0 for padding, 1 for completion "
                                                  f"tokens); got {int((mask < 0).sum())} negative value(s)")


def check_not_meta(fn: str, **tensors: Optional[Tensor]) -> None:
    """Meta tensors hold no values, and every public function validates values (ids, finiteness)."""
    for name, x in tensors.items():
        if isinstance(x, Tensor) and x.is_meta:
            raise ValueError(f"{fn}: {name} must be a tensor with data (on cpu or cuda); got a tensor on meta")


def check_config(fn: str, config: object) -> None:
    from .config import GRPOConfig  # config.py imports nothing of ours; the import is local to keep _checks a leaf

    if not isinstance(config, GRPOConfig):
        raise TypeError(f"{fn}: config must be a grpo_kernels.GRPOConfig; got {type(config).__name__}")


class DataChecks:
    """Data-dependent checks of one call, read back to the host at once by :meth:`run`.

    ``require(ok, message)``: ``ok`` is a 0-dim bool tensor (True: fine); ``message`` a callable that
    builds the error text, called only on failure. Plain tensors only: the DTensor path
    (``distributed.MeshChecks``) makes its verdicts whole before they arrive here.
    """

    def __init__(self, fn: str) -> None:
        self.fn = fn
        self._items: list[tuple[Tensor, Callable[[], str], type]] = []

    def require(self, ok: Tensor, message: Callable[[], str], error: type = ValueError) -> None:
        self._items.append((ok.reshape(()), message, error))

    def none(self, bad: Tensor, message: Callable[[list[int]], str]) -> None:
        """No element of ``bad`` may be True; ``message(first)`` gets the index of the first one that is."""
        self.require(~bad.any(), lambda: message([int(i) for i in bad.nonzero()[0]]))

    def finite(self, name: str, x: Tensor) -> None:
        self.require(torch.isfinite(x).all(),
                     lambda: f"{self.fn}: {name} must be finite; got {int((~torch.isfinite(x)).sum())} NaN/inf value(s)")

    def finite_where(self, name: str, x: Tensor, keep: Tensor) -> None:
        """x (broadcast against keep) must be finite where keep is True: masked tokens are never read."""
        bad = keep & ~torch.isfinite(x)
        self.none(bad, lambda first: f"{self.fn}: {name} must be finite at every token the mask keeps (mask != 0); "
                                     f"got {int(bad.sum())} NaN/inf value(s), the first "
                                     f"{x.expand_as(bad)[tuple(first)].item()} at {first}")

    def run(self) -> None:
        if not self._items:
            return
        flags = torch.stack([ok.to(device=self._items[0][0].device) for ok, _, _ in self._items]).tolist()
        for good, (_, message, error) in zip(flags, self._items):
            if not good:
                raise error(message())


def check_lm_head(fn: str, hidden: Tensor, weight: Tensor, ids: Tensor, ids_name: str, bias: Optional[Tensor],
                  temperature: object, softcap: object, ignore_index: Optional[int], checks: DataChecks) -> None:
    """hidden [..., D], weight [V, D] (V, D >= 1), ids [...] (named ``ids_name``), bias [V], the logit options.

    ``ignore_index`` None: every id must be in [0, V). The id range and bias finiteness checks join
    ``checks``. D = 0 used to crash the C++ kernels; V = 0 has no softmax.
    """
    check_float(fn, "hidden", hidden)
    check_float(fn, "weight", weight)
    check_integer(fn, ids_name, ids)
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"{fn}: weight must be [V, D] with V >= 1 and D >= 1; got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: hidden must be [..., D] with D = weight.shape[1] = {weight.shape[1]}; got shape {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{fn}: hidden and weight must share a dtype; got hidden {hidden.dtype} and weight {weight.dtype}")
    if tuple(ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{fn}: {ids_name} must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}; got {tuple(ids.shape)}")
    if bias is not None:
        check_tensor(fn, "bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{fn}: bias must be [V] = ({weight.shape[0]},); got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{fn}: bias must have weight's dtype {weight.dtype}; got {bias.dtype}")
    check_same_device(fn, hidden=hidden, weight=weight, **{ids_name: ids}, bias=bias)
    check_not_meta(fn, hidden=hidden, weight=weight, **{ids_name: ids}, bias=bias)
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    check_positive(fn, "temperature", temperature, compute_dtype=compute)
    check_positive(fn, "softcap", softcap, allow_none=True, compute_dtype=compute)
    if ignore_index is not None:
        check_index(fn, "ignore_index", ignore_index)
    if bias is not None:
        # a -inf entry ("never sample this token") would make the entropy 0 * inf = NaN
        checks.require(torch.isfinite(bias).all(),
                       lambda: f"{fn}: bias must be finite (a -inf entry to ban a token is not supported: its entropy "
                               f"term would be NaN); got {int((~torch.isfinite(bias)).sum())} NaN/inf value(s)")
    if ids.numel():
        v = weight.shape[0]
        out = (ids < 0) | (ids >= v)
        # compared in int64, as linear_logprobs selects its rows: int32 ids would wrap 2**32 - 100 to -100
        bad = out if ignore_index is None else out & (ids.long() != int(ignore_index))
        allowed = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
        checks.require(~bad.any(), lambda: f"{fn}: {ids_name} must be in [0, V) = [0, {v}){allowed}; "
                                           f"got {int(ids[bad].reshape(-1)[0])}")


def check_kept_ids(fn: str, name: str, ids: Tensor, mask: Tensor, vocab: int, checks: DataChecks) -> None:
    """Token ids at kept tokens must be real tokens: ignore_index (-100) there has no meaning in a loss."""
    bad = (mask != 0) & ((ids < 0) | (ids >= vocab))
    checks.none(bad, lambda first: f"{fn}: {name} must be in [0, V) = [0, {vocab}) at every token the mask keeps "
                                   f"(mask != 0; ignore_index is allowed only where mask == 0); got "
                                   f"{int(ids[tuple(first)])} at {first}")


def check_num_items(fn: str, value: Union[int, float, Tensor, None], checks: DataChecks) -> None:
    """num_items_in_batch: None, or a finite token count >= 1 (a number or a one-element tensor)."""
    if value is None:
        return
    if isinstance(value, Tensor):
        if value.is_meta or value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{fn}: num_items_in_batch must be a number or a one-element real tensor with data; "
                             f"got a {dtype_name(value.dtype)} tensor of shape {tuple(value.shape)} on {value.device}")
        n = value.detach().reshape(())
        checks.require(torch.isfinite(n) & (n >= 1),
                       lambda: f"{fn}: num_items_in_batch must be a finite token count >= 1; got {n.item()!r}")
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{fn}: num_items_in_batch must be a number or a one-element tensor; got {type(value).__name__}")
    if not (is_real_number(value) and value >= 1):  # 10**400: refused, not an OverflowError
        raise ValueError(f"{fn}: num_items_in_batch must be a finite token count >= 1; got {value!r}")


def check_no_inf(fn: str, name: str, x: Tensor, nan_means: str) -> None:
    """x may hold NaN (which means ``nan_means``) but no +-inf."""
    bad = torch.isinf(x)
    if bool(bad.any()):
        raise ValueError(f"{fn}: {name} must be finite or NaN (NaN: {nan_means}); got {int(bad.sum())} +-inf value(s)")


def check_weighted_sums(fn: str, rewards: Tensor, weights: Tensor) -> None:
    """sum_k |w_k r_k| (NaN entries left out) must be finite in float64, or the combined reward overflows."""
    total = torch.where(rewards.isnan(), 0.0, rewards.to(torch.float64).abs() * weights.to(torch.float64).abs()).sum(-1)
    if bool(torch.isinf(total).any()):
        first = int(torch.isinf(total).nonzero()[0, 0])
        raise ValueError(f"{fn}: rewards weighted by reward_weights must sum to a finite float64 per sample; "
                         f"got an overflow at sample {first}")
