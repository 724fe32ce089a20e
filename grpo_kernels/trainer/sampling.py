"""Sampling completions: each prompt runs through the model once, and its KV cache is shared by its group.

GRPO samples G completions of every prompt. ``transformers`` ``generate`` is given the prompts
repeated G times, so it runs every prompt G times and pays its per-call setup (logits processors,
stopping criteria, cache and mask preparation) on top. :func:`sample_completions` runs the N
distinct prompts once (the prefill), repeats their KV cache G times, and then draws one token per
row per step with a forward of the model on the cached sequence, as ``generate`` does: the same
logits (the model's own forward, soft-capping and logit scaling included), temperature then top-p
filtering, pad after the first EOS, stop when every row has ended or at ``max_new_tokens``.
Greedy decoding returns exactly what ``generate`` returns. Sampling draws from the same
distribution with one uniform per row (inverse CDF) where ``generate``'s ``torch.multinomial``
draws one exponential per vocabulary entry, so for a seed the draws differ from ``generate``'s.

Split over data-parallel ranks (:class:`RowShare`), each rank samples its rows of the batch and
the ranks together draw exactly what one process draws on the whole batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from .model import cache_kwargs


def _keeps_last_logits(model: PreTrainedModel) -> bool:
    """Whether the model's forward can compute the logits of the last position only (``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@dataclass(frozen=True)
class RowShare:
    """This rank's rows ``offset .. offset + B - 1`` of a batch of ``total`` rows split over the default process group.

    Sampling then draws the uniforms of all ``total`` rows and keeps this rank's, so the ranks
    together draw what one process draws on the whole batch for the same generator state (which
    every rank keeps identical); and every rank runs the same number of decoding steps, until no
    row on any rank is unfinished (one all-reduce of a flag per step). FSDP2 needs the latter in any
    case: each forward gathers the layers' parameters collectively.
    """

    offset: int
    total: int


def next_tokens(logits: Tensor, *, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0,
                share: Optional[RowShare] = None) -> Tensor:
    """One token per row [B] from last-position logits [B, V] float32.

    Greedy: argmax, as ``generate``. Sampling: logits / temperature, top-p (the smallest set of most
    likely tokens whose probability exceeds top_p, at least one; the others get probability 0), as
    ``generate`` filters them; then one uniform draw per row is looked up in the row's cumulative
    distribution (inverse-CDF sampling). ``generate`` calls ``torch.multinomial``, which draws one
    exponential per vocabulary entry: the same distribution, but at a 151,936-token head 4x the
    cost of the rest of the step's sampling. Tokens of probability 0 are never drawn. With
    ``share`` the uniforms of all ``share.total`` rows are drawn and rows ``share.offset ..`` kept.
    """
    if not do_sample:
        return logits.argmax(-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1:] = False  # keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    cdf = (logits - logits.amax(-1, keepdim=True)).exp_().cumsum_(-1)  # unnormalized; -inf -> weight 0
    total = cdf[:, -1:].contiguous()
    if share is None:
        u = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device) * total
    else:
        u = torch.rand((share.total, 1), dtype=cdf.dtype, device=cdf.device)[share.offset: share.offset + len(total)] * total
    # The first token whose cumulative weight exceeds u; capped at the last token with weight > 0,
    # should rounding make u reach the total.
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(torch.searchsorted(cdf, u, right=True), last).squeeze(1)


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    group_size: int,
    max_new_tokens: int,
    eos_ids: Tensor,
    pad_id: int,
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    share: Optional[RowShare] = None,
) -> Tensor:
    """G = ``group_size`` completions of each of N left-padded prompts.

    Args:
        prompt_ids: [N, P] left-padded prompt token ids.
        prompt_mask: [N, P], 0 on padding.
        eos_ids: [E] token ids that end a completion.
        pad_id: the token written after a row's first EOS.
        share: these N * G rows are a data-parallel rank's share of a larger batch (:class:`RowShare`).

    Returns:
        [N * G, P + T] token ids, T <= max_new_tokens: rows ``i*G .. i*G+G-1`` are prompt i followed
        by its completions (prompt-major, as ``generate`` returns repeated prompts).
    """
    G = group_size
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    extra = {"logits_to_keep": 1} if _keeps_last_logits(model) else {}
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, **cache_kwargs(model, cache),
                **extra)
    logits = out.logits[:, -1].float().repeat_interleave(G, dim=0)
    cache.batch_repeat_interleave(G)
    mask = prompt_mask.repeat_interleave(G, dim=0)
    position = positions[:, -1:].repeat_interleave(G, dim=0)
    unfinished = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    tokens: list[Tensor] = []
    for t in range(max_new_tokens):
        token = next_tokens(logits, do_sample=do_sample, temperature=temperature, top_p=top_p, share=share)
        token = torch.where(unfinished, token, torch.full_like(token, pad_id))
        tokens.append(token)
        unfinished &= ~torch.isin(token, eos_ids)
        if t == max_new_tokens - 1 or not _any_unfinished(unfinished, share):
            break  # no forward for a token nobody will draw
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, **cache_kwargs(model, cache))
        logits = out.logits[:, -1].float()
    return torch.cat([prompt_ids.repeat_interleave(G, dim=0), torch.stack(tokens, dim=1)], dim=1)



def _any_unfinished(unfinished: Tensor, share: Optional[RowShare]) -> bool:
    """Whether any row (of any rank, under a RowShare) still draws tokens."""
    flag = unfinished.any()
    if share is not None:
        flag = flag.to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)
