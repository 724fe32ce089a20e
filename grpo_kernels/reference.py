"""The oracle: plain PyTorch that materializes the [N, V] logits.

Run it on float64-upcast inputs (``compute_dtype=torch.float64``) for the gold values tests
compare against; run it in the inputs' own dtype for "the materializing PyTorch path" whose
error sets the bar for every kernel (docs/design.md: a kernel may err at most 2x as much). Nothing
here is fast or memory-efficient on purpose.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import GRPOConfig
from .policy_loss import GRPOLossOutput, grpo_loss


def logits(
    hidden: Tensor,
    weight: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    compute_dtype: Optional[torch.dtype] = None,
    round_logits_to: Optional[torch.dtype] = None,
) -> Tensor:
    """``softcap(hidden @ weight.T + bias) / temperature`` as a materialized tensor [..., V].

    The GEMM runs in ``compute_dtype`` (default: the inputs' dtype, as a training framework
    would); everything after it runs in float32, or float64 when computing in float64.
    ``round_logits_to`` rounds the finished logits to that dtype once (and goes on in the compute
    dtype; the gradient passes the rounding unchanged): computed in float64, the exact answer on
    correctly rounded logits, the error no kernel that holds its logits in that dtype can avoid.
    """
    if compute_dtype is not None:
        hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
    z = F.linear(hidden, weight, bias)
    z = z.to(torch.float64 if z.dtype == torch.float64 else torch.float32)
    z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if round_logits_to is not None:
        z = z.to(round_logits_to).to(z.dtype)
    return z


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    compute_dtype: Optional[torch.dtype] = None,
    round_logits_to: Optional[torch.dtype] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Per-token log-probs (and entropy) by materializing the logits; differentiable.

    hidden [..., D], weight [V, D], targets [...] -> logp [...] (and entropy [...]) in float32
    (float64 when ``compute_dtype=torch.float64``). Tokens equal to ignore_index get 0.
    ``round_logits_to``: see :func:`logits`.
    """
    z = logits(hidden, weight, bias=bias, temperature=temperature, softcap=softcap, compute_dtype=compute_dtype,
               round_logits_to=round_logits_to)
    valid = targets.long() != ignore_index  # in int64: int32 ids would wrap a sentinel outside int32
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lse = torch.logsumexp(z, dim=-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    logp = torch.where(valid, z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse, zero)
    if not return_entropy:
        return logp
    p = torch.softmax(z, dim=-1)
    entropy = torch.where(valid, lse - (p * z).sum(-1), zero)
    return logp, entropy


def fused_linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    completion_ids: Tensor,
    mask: Tensor,
    advantages: Tensor,
    config: GRPOConfig,
    *,
    old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    is_ratio: Optional[Tensor] = None,
    num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
    compute_dtype: Optional[torch.dtype] = None,
    round_logits_to: Optional[torch.dtype] = None,
) -> GRPOLossOutput:
    """The GRPO loss the textbook way: materialized logits -> log_softmax -> gather -> grpo_loss.

    hidden [B, T, D], weight [V, D], completion_ids [B, T], mask [B, T], advantages [B] or [B, T].
    ``round_logits_to``: see :func:`logits`.
    """
    logp, entropy = linear_logprobs(
        hidden, weight, completion_ids, bias=bias, temperature=config.temperature, softcap=config.logit_softcap,
        return_entropy=True, compute_dtype=compute_dtype, round_logits_to=round_logits_to,
    )
    cast = (lambda x: x) if compute_dtype is None else (lambda x: None if x is None else x.to(compute_dtype))
    return grpo_loss(
        logp, cast(advantages), mask, config, old_logp=cast(old_logp), ref_logp=cast(ref_logp),
        is_ratio=cast(is_ratio), num_items_in_batch=num_items_in_batch, entropy=entropy,
    )


# ---------------------------------------------------------------------------------------------------
# group_advantages: the float64 oracle, one group at a time
# ---------------------------------------------------------------------------------------------------


def group_advantages(
    rewards: Tensor,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    *,
    scale: str = "group",
    estimator: str = "grpo",
    reward_weights: Optional[Union[Tensor, list[float]]] = None,
    eps: float = 1e-4,
) -> Tensor:
    """Group-normalized advantages [B] in float64, the obvious way: a Python loop over groups.

    rewards [B] or [B, R] (NaN: that reward function did not score the sample); exactly one of
    group_size (consecutive groups) and group_ids [B] (any labels). The semantics are documented on
    ``grpo_kernels.group_advantages``; nothing is validated here.
    """
    r = rewards.detach().cpu().to(torch.float64)
    if r.dim() == 1:
        r = r.unsqueeze(1)
    n_rows, n_cols = r.shape
    w = torch.ones(n_cols, dtype=torch.float64) if reward_weights is None else (
        torch.as_tensor(reward_weights).detach().cpu().to(torch.float64))

    # the weighted sum over the reward functions that scored the sample; none did: it is missing
    total = torch.zeros(n_rows, dtype=torch.float64)
    present = []
    for i in range(n_rows):
        scored = ~torch.isnan(r[i])
        if scored.any():
            total[i] = (w[scored] * r[i, scored]).sum()
            present.append(i)

    labels = group_ids.tolist() if group_ids is not None else [i // group_size for i in range(n_rows)]
    groups: dict[int, list[int]] = {}
    for i in present:
        groups.setdefault(labels[i], []).append(i)
    batch_std = total[present].std() if len(present) > 1 else torch.tensor(0.0, dtype=torch.float64)

    adv = torch.zeros(n_rows, dtype=torch.float64)
    for members in groups.values():
        x = total[members]
        n = len(members)
        if n < 2 or bool((x == x[0]).all()):
            continue  # nothing to compare against, or nothing to tell apart: advantage 0
        if estimator == "rloo":
            centered = x - (x.sum() - x) / (n - 1)
        else:
            centered = x - x.mean()
        if scale == "none":
            adv[members] = centered
        else:
            std = x.std() if scale == "group" else batch_std
            adv[members] = centered / (std + eps)
    return adv.to(rewards.device)
