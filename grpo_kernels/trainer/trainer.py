"""GRPOTrainer: one GRPO step is sample -> reward -> advantages -> log-probs -> updates.

1. ``sample``: ``prompts_per_step`` task rows (uniform draws, or shuffled passes without
   replacement), G = ``num_generations`` completions of each (temperature, top_p,
   max_new_tokens, stopping at EOS). Each prompt runs through the model once and its KV cache
   is shared by its G completions (:func:`sample_completions`: the draws ``generate`` makes on
   the repeated prompts); ``share_prompts = False`` calls ``generate`` itself. The batch is
   prompt-major: rows ``i*G .. i*G+G-1`` share a prompt.
2. ``advantages``: each reward function scores every completion (None -> NaN, unscorable), and
   :func:`grpo_kernels.group_advantages` turns the weighted reward columns into one advantage per
   completion, normalized within its group.
3. ``update``: old-policy log-probs (only when ``num_iterations > 1``; with one update per batch
   the policy that sampled *is* the current one, so ``old = logp.detach()`` exactly, as in TRL)
   and reference log-probs (only when ``beta > 0``) with the forward-only fused kernel; then
   ``num_iterations`` optimizer updates, each accumulating ``gradient_accumulation_steps``
   micro-batches through :class:`grpo_kernels.FusedLinearGRPOLoss` on the model's final hidden
   states and LM-head weight, clipping the gradient norm and stepping the LR schedule.

Under torchrun the trainer is data-parallel (:mod:`.parallel`): every rank draws the same prompt
order and takes its contiguous share of the step's prompts, each with all G of its completions,
so every group lives on one rank; the ranks' rewards are all-gathered so that the advantages
(group-normalized, or batch-normalized with ``scale_rewards = "batch"``) and the logged reward
metrics are those of the whole batch. Sampling draws the uniforms of the whole batch on every rank
and keeps its rows (:class:`RowShare`), so the global batch is the one a single process samples
for the seed. The policy is wrapped with DDP, or sharded with FSDP2 (``fsdp``); the loss runs
inside the wrapper's forward, the dapo/cispo/vespo normalizer is the global token count
(``num_items_in_batch``), the gradient norm clipped is the global one, and logs, metrics, plots and
the checkpoint metadata come from rank 0. Checkpoints are DCP (format 3, :mod:`.checkpoint`).

Every forward of the body shares the prompts the same way (:func:`completion_hidden` with the
group size): with the main job's 7-token prompts and 2-token answers that is most of the work.
The logits are never materialized: neither for the loss nor for the old/reference log-probs.
Dropout is off throughout (the model stays in eval mode): the importance ratio compares the
policy with itself, and dropout noise would make it differ from 1 even on-policy.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from safetensors.torch import save_model
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from .. import reference
from ..advantages import _reward_weights as _checked_weights
from ..advantages import group_advantages
from ..fused import FusedLinearGRPOLoss
from ..logprobs import linear_logprobs
from ..policy_loss import GRPOLossOutput, normalized_by_token_count
from . import parallel
from .checkpoint import (
    DCP_FORMAT_VERSION,
    FORMAT_VERSION,
    STATE_FILE,
    CheckpointError,
    _unb64,
    check_scheduler,
    latest_checkpoint,
    load_state_dicts,
    read_optimizer,
    read_state,
    read_weights,
    rng_state,
    save_dcp,
    save_optimizer,
    set_rng_state,
    state_dicts,
    step_dir_name,
    write_checkpoint,
    write_state,
)
from .config import TrainerConfig
from .metrics import JsonlLog, plot_metrics
from .model import HeadSpec, completion_hidden, lm_head
from .rewards import RewardFn, combine, compute_rewards, reward_name
from .sampling import RowShare, sample_completions

Row = dict[str, Any]


@dataclass
class Batch:
    """One generation round: B = prompts_per_step * G completions, prompt-major.

    ``input_ids`` / ``attention_mask`` are [B, P + T]: left-padded prompts (P tokens) then the
    completions (T tokens, padded after the first EOS). The completion mask covers every
    completion token up to and including the first EOS.
    """

    rows: list[Row]
    prompts: list[str]
    completions: list[str]
    input_ids: Tensor
    attention_mask: Tensor
    prompt_len: int

    @property
    def completion_ids(self) -> Tensor:
        """[B, T] sampled token ids."""
        return self.input_ids[:, self.prompt_len:]

    @property
    def completion_mask(self) -> Tensor:
        """[B, T] 1 on completion tokens up to and including the first EOS."""
        return self.attention_mask[:, self.prompt_len:]

    def __len__(self) -> int:
        return len(self.rows)


def lr_factor(update: int, warmup: int, total: int, schedule: str, from_zero: bool = False) -> float:
    """Multiplier of the peak learning rate at optimizer update ``update`` (0-based) of ``total``.

    Warm-up rises linearly over ``warmup`` updates: from 1/warmup at update 0, or with
    ``from_zero`` from 0 (as ``transformers``' schedules, hence TRL: the first update then only
    moves the AdamW moments).
    """
    if update < warmup:
        return (update + (0 if from_zero else 1)) / warmup
    progress = min(1.0, (update - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


def pass_order(seed: int, k: int, n: int) -> list[int]:
    """The order of pass ``k`` over ``n`` training rows under ``prompt_sampling = "passes"``: a permutation.

    Each pass is shuffled by its own generator, seeded from the run's seed and the pass number.
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + k)).tolist()


class GRPOTrainer:
    """A thin GRPO trainer for Hugging Face causal LMs on top of the fused kernels.

    Args:
        config: the options.
        model: a causal LM (its ``generation_config`` is replaced: sampling is the trainer's).
        tokenizer: its tokenizer (prompts are left-padded).
        train_rows: task rows, each a dict with a ``"prompt"`` string; the other fields are passed to
            the reward functions as keyword columns.
        reward_fns: ``fn(prompts=..., completions=..., **columns) -> list[float | None]``.
        reward_weights: one weight per reward function (default all 1): a sequence of real numbers
            (not bools, not a str) or a real [R] CPU tensor, finite in float32.
        eval_rows: held-out rows for greedy evaluation (every ``config.eval_steps`` steps and on demand).
        eval_fn: scores a greedy completion like a reward function; :meth:`evaluate` reports its mean
            (with an exact-match verifier, the held-out accuracy).
        metadata: JSON-able data saved with every checkpoint (e.g. the task's settings).
        fsdp: under an initialized torch.distributed process group, shard the policy and the
            reference with FSDP2 ``fully_shard`` (every decoder layer, then the root) instead of
            DDP around the policy and a plain replica of the reference. Without a process group
            the trainer is one process and ``fsdp`` must be False.

    Under a process group each rank must construct the trainer with the same arguments (the
    same model weights: the same seed), and call every method the others call: sampling,
    updates, evaluation and checkpoints are collective.
    """

    def __init__(
        self,
        config: TrainerConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        train_rows: Sequence[Row],
        reward_fns: Sequence[RewardFn],
        *,
        reward_weights: Optional[Union[Tensor, Sequence[float]]] = None,
        eval_rows: Optional[Sequence[Row]] = None,
        eval_fn: Optional[RewardFn] = None,
        metadata: Optional[dict[str, Any]] = None,
        fsdp: bool = False,
    ) -> None:
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"GRPOTrainer: config must be a TrainerConfig; got {type(config).__name__}")
        if not train_rows or not all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in train_rows):
            raise ValueError("GRPOTrainer: train_rows must be a non-empty sequence of dicts with a 'prompt' string")
        if not reward_fns or not all(callable(f) for f in reward_fns):
            raise ValueError("GRPOTrainer: reward_fns must be a non-empty sequence of callables")
        weights = _reward_weights(reward_weights, len(reward_fns))
        if (eval_rows is None) != (eval_fn is None):
            raise ValueError("GRPOTrainer: eval_rows and eval_fn must be given together")
        self.dp = parallel.current(fsdp)  # None: one process, the code path of before
        if self.dp is not None:
            _check_split(config, self.dp.world_size)
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.train_rows = list(train_rows)
        self.reward_fns = list(reward_fns)
        self.reward_weights = weights
        self.reward_names = _unique([reward_name(f) for f in reward_fns])
        self.eval_rows = None if eval_rows is None else list(eval_rows)
        self.eval_fn = eval_fn
        self.reward_timeout = config.reward_timeout or None  # 0: no limit
        self.metadata = metadata or {}
        self.device = next(model.parameters()).device
        self.bf16 = config.dtype == "bfloat16"
        self.step = 0

        # The loss must score exactly the distribution generate() samples from: the model's own
        # generation defaults (top_k, repetition penalty, ...) would change it, so they are dropped.
        eos = model.generation_config.eos_token_id
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=self.device)
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                                   bos_token_id=tokenizer.bos_token_id)
        common = dict(max_new_tokens=config.max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        self.sampling = GenerationConfig(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0, **common)
        self.greedy = GenerationConfig(do_sample=False, **common)

        self.head = HeadSpec.of(model)
        self.kernel_temperature, self.kernel_softcap = self.head.kernel_options(config.temperature)
        self.loss_config = config.grpo_config(self.kernel_temperature, self.kernel_softcap)
        if config.backend == "reference":
            self.loss_fn: Callable[..., GRPOLossOutput] = partial(reference.fused_linear_grpo_loss, config=self.loss_config)
            self.logprob_fn: Callable[..., Tensor] = reference.linear_logprobs
        else:
            self.loss_fn = FusedLinearGRPOLoss(self.loss_config, backend=config.backend)
            self.logprob_fn = partial(linear_logprobs, backend=config.backend)

        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)  # generate() samples from the global generator
        self.generator = torch.Generator().manual_seed(config.seed)  # prompt order

        model.eval()
        self.ref_model = None
        if config.beta > 0:
            self.ref_model = copy.deepcopy(model).requires_grad_(False)
        # Every call of a model goes through its wrapper's forward (parallel.ModelCall): DDP and FSDP2
        # act there. One process: the plain ModelCall, which just calls the function on the model.
        self.policy = parallel.wrap(model, self.dp, trainable=True)
        self.reference = None if self.ref_model is None else parallel.wrap(self.ref_model, self.dp, trainable=False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Fused AdamW (one kernel over all parameters, as TRL's default adamw_torch_fused) where torch has one;
        # on the built-in model the per-parameter loop of the plain one costs 3x more.
        fused = self.device.type in ("cpu", "cuda") or None
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                           fused=fused)
        total = config.steps * config.num_iterations
        warmup, schedule, from_zero = config.warmup_steps, config.lr_scheduler, config.warmup_from_zero
        # A closure (not a bound method or partial): LambdaLR's state_dict then stores nothing for it.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda u: lr_factor(u, warmup, total, schedule, from_zero))

    # ---------------------------------------------------------------- sampling and rewards

    def _autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _completion_mask(self, completion_ids: Tensor) -> Tensor:
        """[B, T] 1 up to and including the first EOS (pad may equal EOS, so padding is not the signal)."""
        is_eos = torch.isin(completion_ids, self.eos_ids)
        return ((is_eos.long().cumsum(-1) - is_eos.long()) == 0).long()

    def _decode(self, completion_ids: Tensor, mask: Tensor) -> list[str]:
        keep = mask.bool() & ~torch.isin(completion_ids, self.eos_ids)
        return self.tokenizer.batch_decode([ids[k].tolist() for ids, k in zip(completion_ids, keep)],
                                           skip_special_tokens=True)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the logs, metrics, plots and checkpoint metadata (rank 0, or the only one)."""
        return self.dp is None or self.dp.is_main

    def _call(self, model: PreTrainedModel, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(model, *args)`` inside the forward of ``model``'s wrapper (the policy's or the reference's)."""
        return (self.policy if model is self.model else self.reference)(fn, *args)

    def _share(self, rows: int) -> Optional[RowShare]:
        """This rank's place among the step's ``rows`` completions (None: one process)."""
        if self.dp is None:
            return None
        return RowShare(offset=self.dp.rank * rows, total=self.dp.world_size * rows)

    @torch.no_grad()
    def _generate(self, prompts: list[str], do_sample: bool, group_size: int = 1) -> tuple[Tensor, Tensor, int]:
        """(input_ids [B, P + T], attention_mask [B, P + T], P) of ``group_size`` completions of each prompt.

        B = len(prompts) * group_size, prompt-major. With ``share_prompts`` each prompt runs once and
        its KV cache is shared by its group (:func:`sample_completions`); otherwise ``generate``
        runs on the prompts repeated ``group_size`` times.
        """
        ids, mask = self._encode(prompts)
        cfg = self.config
        with self._autocast():
            if cfg.share_prompts:
                out = self._call(self.model, partial(
                    sample_completions, prompt_ids=ids, prompt_mask=mask, group_size=group_size,
                    max_new_tokens=cfg.max_new_tokens, eos_ids=self.eos_ids, pad_id=self.tokenizer.pad_token_id,
                    do_sample=do_sample, temperature=cfg.temperature, top_p=cfg.top_p,
                    share=self._share(len(prompts) * group_size)))
            else:
                ids, mask = ids.repeat_interleave(group_size, dim=0), mask.repeat_interleave(group_size, dim=0)
                out = self.model.generate(input_ids=ids, attention_mask=mask,
                                          generation_config=self.sampling if do_sample else self.greedy)
        P = ids.shape[1]
        mask = mask.repeat_interleave(out.shape[0] // mask.shape[0], dim=0)
        return out, torch.cat([mask, self._completion_mask(out[:, P:])], dim=1), P

    def _prompt_indices(self) -> list[int]:
        """Indices into train_rows of this step's prompts (``prompt_sampling``).

        "passes": the step's slots ``step*M .. step*M+M-1`` of an endless sequence of shuffled passes
        over the rows, pass k shuffled by a generator seeded from (seed, k): a function of the step
        alone, so a resumed run draws what the uninterrupted one would. "replacement": M uniform
        draws from the trainer's generator.
        """
        cfg, n, M = self.config, len(self.train_rows), self.config.prompts_per_step
        if cfg.prompt_sampling == "replacement":
            return torch.randint(n, (M,), generator=self.generator).tolist()
        out, slot = [], self.step * M
        while len(out) < M:
            k, at = divmod(slot, n)
            order = pass_order(cfg.seed, k, n)
            take = order[at: at + M - len(out)]
            out += take
            slot += len(take)
        return out

    def sample(self) -> Batch:
        """Draw prompts_per_step training rows and G completions of each (data-parallel: this rank's share of them)."""
        G = self.config.num_generations
        indices = self._prompt_indices()  # the same on every rank
        if self.dp is not None:
            indices = indices[self.dp.rows(len(indices))]
        unique = [self.train_rows[i] for i in indices]
        rows = [r for r in unique for _ in range(G)]
        ids, mask, P = self._generate([r["prompt"] for r in unique], do_sample=True, group_size=G)
        return Batch(rows, [r["prompt"] for r in rows], self._decode(ids[:, P:], mask[:, P:]), ids, mask, P)

    def rewards(self, batch: Batch) -> Tensor:
        """Rewards [B, R] of a batch, one column per reward function, NaN for unscorable."""
        columns = {k: [r.get(k) for r in batch.rows] for k in batch.rows[0] if k != "prompt"}
        return compute_rewards(self.reward_fns, batch.prompts, batch.completions, columns, timeout=self.reward_timeout)

    def advantages(self, rewards: Tensor) -> Tensor:
        """Advantages [B] from rewards [B, R]: weighted, normalized within each prompt's group."""
        cfg = self.config
        return group_advantages(rewards, group_size=cfg.num_generations, scale=cfg.scale_rewards,
                                estimator=cfg.advantage_estimator, reward_weights=self.reward_weights).to(self.device)

    # ---------------------------------------------------------------- log-probs and updates

    def _head(self, model: PreTrainedModel, hidden: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(hidden, weight, bias) in the dtype the head GEMM runs in (bf16 under bf16 training)."""
        weight, bias = lm_head(model)
        dt = torch.bfloat16 if self.bf16 else weight.dtype
        return hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)

    def _hidden(self, model: PreTrainedModel, batch: Batch, sl: slice) -> Tensor:
        """Final hidden states [b, T, D] predicting the completion tokens of rows ``sl``."""
        G = self.config.num_generations if self.config.share_prompts else 1
        return completion_hidden(model, batch.input_ids[sl], batch.attention_mask[sl], batch.prompt_len, group_size=G)

    def _micro_batches(self, n: int) -> list[slice]:
        size = n // self.config.gradient_accumulation_steps
        return [slice(s, s + size) for s in range(0, n, size)]

    def _logprobs_of(self, model: PreTrainedModel, batch: Batch, sl: slice, targets: Tensor) -> Tensor:
        with self._autocast():
            hidden = self._hidden(model, batch, sl)
        h, w, b = self._head(model, hidden)
        return self.logprob_fn(h, w, targets, bias=b, temperature=self.kernel_temperature, softcap=self.kernel_softcap)

    @torch.no_grad()
    def logprobs(self, model: PreTrainedModel, batch: Batch) -> Tensor:
        """Per-token log-probs [B, T] of the batch's completions under ``model`` (0 on padding), forward only."""
        out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=self.device)
        targets = batch.completion_ids.masked_fill(batch.completion_mask == 0, -100)
        for sl in self._micro_batches(len(batch)):
            out[sl] = self._call(model, self._logprobs_of, batch, sl, targets[sl]).float()
        return out

    def _loss_of(self, model: PreTrainedModel, batch: Batch, sl: slice, advantages: Tensor, n_items: Optional[Tensor],
                 old_logp: Optional[Tensor], ref_logp: Optional[Tensor]) -> GRPOLossOutput:
        with self._autocast():
            hidden = self._hidden(model, batch, sl)
        h, w, b = self._head(model, hidden)
        return self.loss_fn(h, w, batch.completion_ids[sl], batch.completion_mask[sl], advantages[sl], bias=b,
                            num_items_in_batch=n_items, old_logp=None if old_logp is None else old_logp[sl],
                            ref_logp=None if ref_logp is None else ref_logp[sl])

    def update(self, batch: Batch, advantages: Tensor) -> dict[str, float]:
        """``num_iterations`` optimizer updates on one batch; returns the loss metrics averaged over them."""
        cfg = self.config
        old_logp = self.logprobs(self.model, batch) if cfg.num_iterations > 1 else None
        ref_logp = None if self.ref_model is None else self.logprobs(self.ref_model, batch)
        mask = batch.completion_mask
        token_normalized = normalized_by_token_count(cfg.loss_type)
        n_items = mask.sum() if token_normalized else None
        if n_items is not None and self.dp is not None:
            # The whole batch's token count: the loss divides it by the world size (policy_loss.active_token_count),
            # so the ranks' averaged gradients are those of one process on the whole batch.
            n_items = parallel.sum_over_ranks(n_items, self.dp)
        # Mean-per-micro-batch losses are averaged over micro-batches; token-normalized ones already
        # divide by the whole batch's token count, so their micro-batch losses simply add up.
        scale = 1.0 if token_normalized else 1.0 / cfg.gradient_accumulation_steps
        slices = self._micro_batches(len(batch))
        sums: dict[str, float] = {}
        skipped = 0
        for _ in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            for i, sl in enumerate(slices):
                # Data-parallel: gradients are reduced over the ranks after the last micro-batch only.
                sync = contextlib.nullcontext() if self.dp is None else parallel.gradient_sync(self.policy, i == len(slices) - 1)
                with sync:
                    out = self._call(self.model, self._loss_of, batch, sl, advantages, n_items, old_logp, ref_logp)
                    (out.loss * scale).backward()
                loss += float(out.loss.detach()) * scale
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / len(slices)
            if self.dp is not None:  # the global loss: the mean of the ranks' (DDP and FSDP average gradients alike)
                loss = parallel.mean_over_ranks({"loss": loss}, self.dp)["loss"]
            # Data-parallel: DDP's gradients are the same on every rank, FSDP2's are DTensor shards whose
            # norm clip_grad_norm_ reduces over the ranks: either way the global gradient norm.
            grad_norm = parallel.to_float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
            sums["loss"] = sums.get("loss", 0.0) + loss
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
            sums["lr"] = sums.get("lr", 0.0) + self.scheduler.get_last_lr()[0]
            if math.isfinite(loss) and math.isfinite(grad_norm):
                self.optimizer.step()
                self.scheduler.step()
            else:  # the whole update is dropped: weights, optimizer moments and schedule stay as they were
                skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                if self.is_main:
                    tqdm.write(f"grpo: step {self.step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                               "update skipped, training goes on")
        metrics = {k: v / cfg.num_iterations for k, v in sums.items()}
        if self.dp is not None:  # this rank's loss metrics (token means of its rows): averaged over the ranks
            metrics.update(parallel.mean_over_ranks({k: v for k, v in metrics.items()
                                                     if k not in ("loss", "grad_norm", "lr")}, self.dp))
        metrics["skipped_updates"] = float(skipped)
        return metrics

    @torch.no_grad()
    def _sync_reference(self) -> None:
        """reference <- alpha * policy + (1 - alpha) * reference (TRL's ref-model mixup)."""
        a = self.config.ref_sync_alpha
        for r, p in zip(self.ref_model.parameters(), self.model.parameters()):
            r.mul_(1.0 - a).add_(p.detach(), alpha=a)

    def train_step(self) -> dict[str, float]:
        """One generation round and its updates; returns the step's metrics (also the JSONL record)."""
        cfg = self.config
        t0 = time.perf_counter()
        batch = self.sample()
        rewards = self.rewards(batch)
        if self.dp is not None:  # every rank's rewards, in rank (= prompt) order: the whole batch's
            rewards = parallel.all_gather_rows(rewards, self.dp)
        advantages = self.advantages(rewards)
        if self.dp is not None:
            advantages = advantages[self.dp.rows(len(advantages))]
        t1 = time.perf_counter()
        metrics = self.update(batch, advantages)
        self.step += 1
        if self.ref_model is not None and cfg.ref_sync_steps and self.step % cfg.ref_sync_steps == 0:
            self._sync_reference()
        total = combine(rewards, self.reward_weights)
        groups = total.view(-1, cfg.num_generations)
        record = {"step": self.step, "reward": _nanmean(total), "reward_std": _nanstd(total)}
        for j, name in enumerate(self.reward_names):
            record[f"rewards/{name}"] = _nanmean(rewards[:, j])
        record["frac_reward_zero_std"] = float(((groups.max(-1).values - groups.min(-1).values) == 0).float().mean())
        record["completion_length"] = float(batch.completion_mask.float().sum(-1).mean())
        if self.dp is not None:  # every rank holds as many completions
            record.update(parallel.mean_over_ranks({"completion_length": record["completion_length"]}, self.dp))
        record.update(metrics)
        record["sample_s"] = t1 - t0
        record["update_s"] = time.perf_counter() - t1
        return record

    # ---------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, rows: Optional[Sequence[Row]] = None, batch_size: int = 512) -> float:
        """Mean of ``eval_fn`` over greedy completions of ``rows`` (default: the held-out rows).

        Data-parallel: each rank scores every world_size-th row (padded to equal counts with
        repeats of the first row, which are not counted) and the sums are all-reduced, so every rank
        returns the mean over all rows; FSDP2 needs every rank in every forward anyway.
        """
        rows = self.eval_rows if rows is None else list(rows)
        if not rows or self.eval_fn is None:
            raise ValueError("GRPOTrainer.evaluate: needs eval rows and an eval_fn")
        if self.dp is not None:
            W, n = self.dp.world_size, len(rows)
            mine = rows[self.dp.rank::W]
            counted = torch.zeros(-(-n // W), dtype=torch.bool)
            counted[:len(mine)] = True
            rows = mine + [rows[0]] * (len(counted) - len(mine))
        scores = []
        for s in range(0, len(rows), batch_size):
            chunk = rows[s: s + batch_size]
            prompts = [r["prompt"] for r in chunk]
            ids, mask, P = self._generate(prompts, do_sample=False)  # data-parallel: every rank as many rows
            columns = {k: [r.get(k) for r in chunk] for k in chunk[0] if k != "prompt"}
            completions = self._decode(ids[:, P:], mask[:, P:])
            scores.append(compute_rewards([self.eval_fn], prompts, completions, columns, timeout=self.reward_timeout)[:, 0])
        if self.dp is None:
            return _nanmean(torch.cat(scores))
        scores = torch.cat(scores).double()
        scored = counted & ~torch.isnan(scores)
        total = parallel.sum_over_ranks(torch.stack([scores[scored].sum(), scored.sum().double()]), self.dp)
        return float(total[0] / total[1]) if total[1] > 0 else math.nan

    # ---------------------------------------------------------------- the loop

    def train(self, progress: bool = True) -> list[dict[str, float]]:
        """Run steps until ``config.steps``: log, evaluate, checkpoint, and plot at the end.

        Returns the records written to ``out_dir/metrics.jsonl`` by this call.
        """
        cfg = self.config
        out = Path(cfg.out_dir)
        # Data-parallel: every rank computes the same records; rank 0 writes them.
        log = JsonlLog(out / "metrics.jsonl", resume_step=self.step if self.step else None) if self.is_main else None
        records = []
        evaluating = cfg.eval_steps > 0 and self.eval_rows is not None
        if evaluating and self.step == 0:
            records.append({"step": 0, "eval/accuracy": self.evaluate()})
            if log is not None:
                log.write(records[-1])
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress or not self.is_main, desc="GRPO",
                   dynamic_ncols=True)
        last_eval = None
        while self.step < cfg.steps:
            record = self.train_step()
            if evaluating and (self.step % cfg.eval_steps == 0 or self.step == cfg.steps):
                last_eval = record["eval/accuracy"] = self.evaluate()
            if log is not None:
                log.write(record)
            records.append(record)
            bar.set_postfix(_postfix(record, last_eval), refresh=False)
            bar.update(1)
            if (cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == cfg.steps:
                self.save_checkpoint()
        bar.close()
        if log is not None:
            plot_metrics(log.path, out / "metrics.png")
        return records

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/step_<N>`` atomically; returns its path (data-parallel: collective, format 3)."""
        cfg = self.config
        if self.dp is not None:
            return self._save_sharded()

        def write(d: Path) -> None:
            save_model(self.model, str(d / "model.safetensors"))
            if self.ref_model is not None:
                save_model(self.ref_model, str(d / "ref_model.safetensors"))
            optimizer = save_optimizer(self.optimizer, d / "optimizer.safetensors")
            # Last: state.json records the checksum of each tensor file written above.
            write_state(d, {
                "format": FORMAT_VERSION, "step": self.step, "config": cfg.to_dict(), "metadata": self.metadata,
                "scheduler": self.scheduler.state_dict(), "optimizer": optimizer, "rng": rng_state(self.generator),
            })

        return write_checkpoint(Path(cfg.out_dir) / "checkpoints", self.step, write, cfg.keep_checkpoints)

    def _save_sharded(self) -> Path:
        """Format 3: every rank writes its DCP shards into rank 0's temporary directory, then rank 0
        writes state.json (with every file's checksum) and renames the directory into place."""
        cfg, dp = self.config, self.dp
        state = state_dicts(self.model, self.optimizer, self.ref_model)

        def write(d: Path) -> None:
            parallel.broadcast(str(d), dp)  # the other ranks write their shards there too
            save_dcp(d, state)  # collective; returns when every rank's files and the index are written
            write_state(d, {
                "format": DCP_FORMAT_VERSION, "step": self.step, "config": cfg.to_dict(), "metadata": self.metadata,
                "scheduler": self.scheduler.state_dict(), "optimizer": {"param_groups": state["optimizer"]["param_groups"]},
                "rng": rng_state(self.generator), "world_size": dp.world_size,
            })

        root = Path(cfg.out_dir) / "checkpoints"
        if dp.is_main:
            final = write_checkpoint(root, self.step, write, cfg.keep_checkpoints)
        else:
            save_dcp(Path(parallel.broadcast(None, dp)), state)
            final = root / step_dir_name(self.step)
        torch.distributed.barrier()  # rank 0 has renamed it: the checkpoint is complete for every rank
        return final

    def load_checkpoint(self, path: str | Path) -> Path:
        """Restore model, reference model, optimizer, scheduler, RNGs and step from a checkpoint.

        ``path`` is a checkpoint directory, or a run directory (its newest complete checkpoint is
        used). Only safetensors and JSON are read (and DCP's files, format 3, see :mod:`.checkpoint`).
        Everything is checked before anything is loaded (every state.json field, each tensor file's
        checksum, names and shapes against this trainer's model and optimizer: for format 3, DCP
        plans the whole load before it reads a tensor), so on error the trainer is unchanged.
        Either format loads into one process or a data-parallel run of any size (collective there).
        Returns the checkpoint's path.

        Raises:
            FileNotFoundError: no complete checkpoint at ``path``.
            CheckpointError: a field or file that fails a check (the message names it), or a
                checkpoint past this run's ``config.steps``.
        """
        ckpt = latest_checkpoint(Path(path))
        if ckpt is None:
            raise FileNotFoundError(f"GRPOTrainer.load_checkpoint: no checkpoint in {path}")
        state = read_state(ckpt)  # every field checked, every file's checksum verified
        state_path = ckpt / STATE_FILE
        if state["step"] > self.config.steps:
            raise CheckpointError(f"{state_path}: step is {state['step']}, past this run's steps = {self.config.steps}; "
                                  f"resume with steps >= {state['step']} (--steps) to continue it")
        check_scheduler(state_path, state["scheduler"], self.scheduler)
        if state["format"] == FORMAT_VERSION and self.dp is None:
            optimizer = read_optimizer(state_path, ckpt / "optimizer.safetensors", self.optimizer, state["optimizer"])
            weights = read_weights(ckpt / "model.safetensors", self.model)
            ref_weights = None
            if self.ref_model is not None:
                if "ref_model.safetensors" not in state["files"]:
                    raise CheckpointError(f"{ckpt}: has no reference model (saved with beta = 0) but this run has beta = "
                                          f"{self.config.beta}")
                ref_weights = read_weights(ckpt / "ref_model.safetensors", self.ref_model)
            # Every check passed: now load.
            self.model.load_state_dict(weights, strict=False)
            if ref_weights is not None:
                self.ref_model.load_state_dict(ref_weights, strict=False)
            self.optimizer.load_state_dict(optimizer)
        else:
            load_state_dicts(ckpt, state, self.model, self.optimizer, self.ref_model)
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], self.generator)
        if self.dp is not None and self.dp.device.type == "cuda" and "cuda" in state["rng"]:
            # Rank 0 sampled on cuda:0, each rank r on its own cuda:LOCAL_RANK, all from one state: continue from
            # rank 0's (untested: no GPU run has been made).
            torch.cuda.set_rng_state(_unb64(state["rng"]["cuda"][0]), self.dp.device)
        self._apply_config_to_optimizer()
        self.step = state["step"]
        return ckpt

    def _apply_config_to_optimizer(self) -> None:
        """Make this run's learning rate, schedule and weight decay the ones in force after a resume.

        The loaded optimizer and scheduler states carry the values of the run that saved them, so
        without this ``--resume RUN --lr X`` would record X in the config and keep training at the
        old rate. The rate is recomputed with the scheduler's own formula (``base * factor(update)``),
        so with unchanged settings it is bitwise the one that was saved.
        """
        cfg, sched = self.config, self.scheduler
        sched.base_lrs = [cfg.learning_rate for _ in self.optimizer.param_groups]
        for group, factor in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group["initial_lr"] = cfg.learning_rate
            group["lr"] = cfg.learning_rate * factor(sched.last_epoch)
            group["weight_decay"] = cfg.weight_decay
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # what get_last_lr() reports


def _reward_weights(reward_weights: Optional[Union[Tensor, Sequence[float]]], n_fns: int) -> Tensor:
    """reward_weights as the float32 [R] CPU tensor the rewards are weighted with, refused by name at construction.

    group_advantages receives these weights at every step, so its rule is the rule here (a sequence of
    real non-bool numbers, not a str, or a real tensor; one per reward column; finite); it is applied
    now, its messages naming GRPOTrainer, rather than at the first step. The rewards are
    float32 on the CPU (compute_rewards), so the weights must be finite in float32 too: 1e39 would
    pass the float64 check and become inf here.
    """
    if reward_weights is None:
        return torch.ones(n_fns)
    anchor = torch.empty(0)  # the rewards' device and layout: compute_rewards builds them on the CPU
    w = _checked_weights(reward_weights, n_fns, anchor, torch.float64, fn="GRPOTrainer")
    if not bool(torch.isfinite(w.float()).all()):
        raise ValueError(f"GRPOTrainer: reward_weights must be finite in float32 (|w| <= "
                         f"{torch.finfo(torch.float32).max:.4g}), the rewards' dtype; got {w.tolist()}")
    return w.float()


def _check_split(config: TrainerConfig, world_size: int) -> None:
    """The step's prompts split evenly over the ranks, each share into whole micro-batches."""
    M, G, ga = config.prompts_per_step, config.num_generations, config.gradient_accumulation_steps
    if M % world_size:
        raise ValueError(f"GRPOTrainer: config.prompts_per_step must be divisible by the world size {world_size} (each "
                         f"rank samples a whole share of the step's prompts); got {M}")
    if (M // world_size * G) % ga:
        raise ValueError(f"GRPOTrainer: config.gradient_accumulation_steps must divide each rank's "
                         f"{M // world_size * G} completions (prompts_per_step / world size * num_generations); got {ga}")
    if not config.share_prompts:
        raise ValueError("GRPOTrainer: config.share_prompts must be True under torch.distributed (transformers generate's "
                         "draws cannot be split over ranks); got False")


def _unique(names: list[str]) -> list[str]:
    """Names made distinct by suffixing repeats with their position."""
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def _nanmean(x: Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


def _nanstd(x: Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.std()) if x.numel() > 1 else math.nan


def _postfix(record: dict[str, float], last_eval: Optional[float]) -> dict[str, str]:
    out = {"reward": f"{record['reward']:.3f}"}
    if "kl" in record:
        out["kl"] = f"{record['kl']:.4f}"
    out["clip"] = f"{record.get('clip_ratio/region_mean', 0.0):.3f}"
    if last_eval is not None:
        out["eval"] = f"{last_eval:.3f}"
    return out
