"""The comparison rule of docs/design.md, in one place, and the error-message rule of the bad-input tests.

A kernel's error against the float64 oracle may be at most ``factor`` (2) times the error of the
materializing PyTorch path run in the same dtype, plus a small floor. NaN/inf never passes.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional

import pytest

import torch

import grpo_kernels as gk

try:
    from grpo_kernels.backends import cpu_extension

    HAS_CPU_EXT = cpu_extension() is not None
except Exception:  # pragma: no cover - import problems surface in other tests
    HAS_CPU_EXT = False


def available_backends() -> list[str]:
    """Backends that can run on CPU tensors here (triton through TRITON_INTERPRET=1)."""
    names = ["torch"]
    if HAS_CPU_EXT:
        names.append("cpu")
    if gk.backends.triton_available():
        names.append("triton")
    return names


def describe_worst(name: str, ours: torch.Tensor, oracle: torch.Tensor) -> str:
    diff = (ours.double() - oracle.double()).abs()
    flat = diff.reshape(-1)
    i = int(torch.nan_to_num(flat, nan=float("inf")).argmax())
    idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), diff.shape)) if diff.dim() else ()
    return (f"{name}: worst element {idx}: ours={ours.reshape(-1)[i].item()!r} "
            f"oracle={oracle.reshape(-1)[i].item()!r} |diff|={flat[i].item():.3e}")


def assert_close_to_oracle(
    name: str,
    ours: torch.Tensor,
    oracle: torch.Tensor,
    same_dtype: Optional[torch.Tensor] = None,
    *,
    rounded: Optional[torch.Tensor] = None,
    factor: float = 2.0,
    floor: Optional[float] = None,
    ulp_dtype: Optional[torch.dtype] = None,
) -> None:
    """``max|ours - oracle| <= factor * max|ref - oracle| + floor``; NaN/inf disagreement fails.

    ``ref`` is ``same_dtype`` (the materializing PyTorch path in the inputs' dtype), or the worse of it
    and ``rounded`` when that is given.

    With ``same_dtype=None`` the bound is the floor alone (for fp32/fp64 exactness checks).
    The default floor is the larger of 1e-5 * (1 + max|oracle|) and one unit in the last place of
    ``ours``' dtype at max|oracle|: no implementation that rounds its result to bf16 can do better
    than that, and a max-error statistic of two correctly rounded results can differ by one ulp.
    ``ulp_dtype`` names that dtype when ``ours`` was widened after rounding (a bf16 gradient handed
    over as float64, say): the floor is then that dtype's ulp, not the wider one's.

    ``rounded``, the oracle on correctly rounded fp32 logits (``reference`` with
    ``round_logits_to=torch.float32``), raises the reference error to the larger of the two. Where the
    answer is ill-conditioned in the logits (logits in the thousands, two of them within ~1 of each
    other) one rounding of a logit moves a gradient more than the floor, and the same-dtype path's
    error is one draw of that rounding: on AMD Zen 4, 1 of 1,000 seeds of the C++ backend's
    ``huge-logits`` dW came out 2.7x the same-dtype path's error (0.456 against 0.169) and 1.65x
    the correctly rounded logits' error (0.276), which no fp32-logit kernel can beat.
    """
    ours, oracle = ours.detach(), oracle.detach()
    same_dtype = None if same_dtype is None else same_dtype.detach()
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != oracle {tuple(oracle.shape)}"
    o_fin, r_fin = torch.isfinite(ours), torch.isfinite(oracle)
    if not bool((o_fin == r_fin).all()):
        bad = (o_fin != r_fin).nonzero()[0].tolist()
        raise AssertionError(f"{name}: NaN/inf disagreement at {bad}: ours={ours[tuple(bad)].item()!r} oracle={oracle[tuple(bad)].item()!r}")
    if not bool((ours[~o_fin].double() == oracle[~r_fin].double()).all() if (~o_fin).any() else True):
        raise AssertionError(f"{name}: non-finite values differ")
    ours_f, ora_f = ours[o_fin].double(), oracle[r_fin].double()
    scale = float(ora_f.abs().max()) if ora_f.numel() else 0.0
    ulp_dt = ulp_dtype or ours.dtype
    ulp = torch.finfo(ulp_dt).eps * scale if ulp_dt.is_floating_point else 0.0
    fl = max(1e-5 * (1.0 + scale), ulp) if floor is None else floor
    err = float((ours_f - ora_f).abs().max()) if ora_f.numel() else 0.0
    ref_err = 0.0
    for ref in (same_dtype, None if rounded is None else rounded.detach()):
        if ref is not None and ora_f.numel():
            e = float((ref[r_fin].double() - ora_f).abs().max())
            # a reference that overflowed where the oracle is finite is no reference there
            ref_err = max(ref_err, e) if math.isfinite(e) else ref_err
    bound = factor * ref_err + fl
    if not err <= bound:
        raise AssertionError(
            f"{name}: max error {err:.3e} > bound {bound:.3e} (= {factor} x reference error {ref_err:.3e} + floor {fl:.1e}); "
            + describe_worst(name, ours, oracle)
        )


def refused(exc: type, fn: str, arg: str, call: Callable[[], object]) -> None:
    """``call()`` raises ``exc`` with a message that starts with ``fn: `` and names ``arg``."""
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(f"{fn}: "), f"error does not name the function {fn}: {msg!r}"
    assert re.search(rf"(?<![\w.]){re.escape(arg)}(?!\w)", msg), f"error does not name {arg}: {msg!r}"
