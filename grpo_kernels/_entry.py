"""The entry validation of linear_logprobs and of the fused loss, written once for every path.

The single-process functions (``logprobs.linear_logprobs``, ``fused.fused_linear_grpo_loss``) and
their DTensor counterparts (``distributed``) run the same sequence: the metadata checks, the
backend decision, the data-dependent checks read back together, the record of what ran. Each
sequence is here once; the DTensor path passes its own :class:`~grpo_kernels._checks.DataChecks`
(whose verdicts it makes whole over the mesh) and its extra layout checks.

Import graph: below logprobs.py, fused.py and distributed.py; above _checks, backends and policy_loss.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from . import backends
from ._checks import DataChecks, check_config, check_index, check_kept_ids, check_lm_head, check_tensor
from .policy_loss import Number, validate_loss_inputs

LOGPROBS = "linear_logprobs"
FUSED = "fused_linear_grpo_loss"


def logprobs_call(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], temperature: object,
                  softcap: object, ignore_index: object, return_entropy: object, backend: object,
                  checks: Optional[DataChecks] = None) -> str:
    """Validate a ``linear_logprobs`` call (hidden [..., D], weight [V, D], targets [...]) -> the backend that runs it."""
    fn = LOGPROBS
    checks = DataChecks(fn) if checks is None else checks
    check_index(fn, "ignore_index", ignore_index)  # an int here (None is the fused loss's "no sentinel")
    check_lm_head(fn, hidden, weight, targets, "targets", bias, temperature, softcap, ignore_index, checks)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"{fn}: return_entropy must be a bool; got {type(return_entropy).__name__}")
    name = backends.resolve(fn, backend, hidden.device, hidden.dtype)
    checks.run()
    backends.record(fn, name)
    return name


def fused_call(hidden: Tensor, weight: Tensor, completion_ids: Tensor, mask: Tensor, advantages: Tensor, config: object,
               old_logp: Optional[Tensor], ref_logp: Optional[Tensor], bias: Optional[Tensor], is_ratio: Optional[Tensor],
               num_items_in_batch: Optional[Number], backend: object, checks: Optional[DataChecks] = None,
               more: Optional[Callable[[], None]] = None) -> str:
    """Validate a ``fused_linear_grpo_loss`` call (hidden [B, T, D], weight [V, D], the [B, T] loss inputs)
    -> the backend that runs it. ``more``: the caller's further metadata checks, run before resolve."""
    fn = FUSED
    check_config(fn, config)
    check_tensor(fn, "hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"{fn}: hidden must be [B, T, D]; got shape {tuple(hidden.shape)}")
    checks = DataChecks(fn) if checks is None else checks
    check_lm_head(fn, hidden, weight, completion_ids, "completion_ids", bias, config.temperature, config.logit_softcap,
                  -100, checks)
    validate_loss_inputs(fn, tuple(completion_ids.shape), hidden.device, advantages, mask, config, old_logp, ref_logp,
                         is_ratio, num_items_in_batch, checks)
    if more is not None:
        more()
    name = backends.resolve(fn, backend, hidden.device, hidden.dtype)
    check_kept_ids(fn, "completion_ids", completion_ids, mask, weight.shape[0], checks)
    checks.run()
    backends.record(fn, name)
    return name
