"""TRL drop-in: ``from grpo_kernels.integrations.trl import GRPOTrainer`` instead of ``from trl import GRPOTrainer``.

:class:`GRPOTrainer` is ``trl.GRPOTrainer`` with the same constructor and behaviour; only the LM
head and the loss run on grpo_kernels:

- The model's forward is patched (on top of TRL's ``add_fused_lm_head`` patch, for the policy and
  the reference model). ``model(..., labels=..., fused_lm_head=True)``, which TRL calls for the old,
  reference and evaluation log-probs, runs the backbone and :func:`grpo_kernels.linear_logprobs` on
  the positions whose label is not -100 (forward-only under ``no_grad``, no [N, V] logits).
- The training loss (``_compute_loss``) calls the model once with a ``grpo_kernels_loss`` request:
  inside the (DDP / FSDP / DeepSpeed-wrapped) forward, the backbone's final hidden states at the
  completion positions go with the LM head straight into :class:`grpo_kernels.FusedLinearGRPOLoss`.
- The head's own transform is the one TRL applies: ``z = (h @ W.T + b) * logit_scale``, then
  ``softcap * tanh(z / softcap)``, then ``/ temperature``. The kernels compute ``softcap'(z / T')``,
  so ``T' = temperature / logit_scale`` and ``softcap' = softcap / temperature`` (exact). Tied
  embeddings need nothing: the head's weight is the embedding Parameter. ``cast_lm_head_to_fp32``
  runs the head in float32 outside autocast, as TRL does; otherwise the head runs in the autocast
  dtype when autocast is on, else in the hidden states' dtype.
- A DTensor head (FSDP2) is gathered with ``full_tensor()`` (as TRL does; a sharded-vocabulary
  path is future work), a DeepSpeed ZeRO-3 head with TRL's ``maybe_gather_lm_head_ctx``.

Every loss-shaping ``trl.GRPOConfig`` option maps to :class:`grpo_kernels.GRPOConfig` with TRL's
semantics (see :func:`loss_config`); an option the drop-in cannot reproduce exactly raises at
construction, naming it. The vLLM importance-sampling ratio and the off-policy sequence mask come
from :mod:`grpo_kernels.sampling`. Metrics are logged under TRL's names with TRL's values. When the
step is off-policy (old log-probs exist), TRL's per-sequence clip statistics and the off-policy mask
need the current log-probs, which the fused loss keeps inside: they are taken by one extra
forward-only pass over the head (no gradient, no logits).
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass
from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch
import trl
from accelerate.utils import is_peft_model
from torch import Tensor
from transformers.utils import ModelOutput

import grpo_kernels as gk

try:  # TRL's helpers for sharded heads and its output type (trl >= 1.16)
    from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx, nanmax, nanmin
except ImportError as exc:  # pragma: no cover - exercised only with an old trl
    raise ImportError("grpo_kernels.integrations.trl needs trl >= 1.16 (pip install 'grpo_kernels[trl]')") from exc

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment]

__all__ = ["GRPOTrainer", "head_transform", "loss_config", "patch_lm_head"]

# Loss types whose loss TRL divides by the gradient-accumulation steps; the others are normalized by
# the token count of the accumulation window (num_items_in_batch).
_PER_STEP_NORMALIZED = ("grpo", "bnpo", "dr_grpo", "sapo", "luspo")
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_images", "num_tiles")


@dataclass
class _LossOutput(ModelOutput):
    """What the patched forward returns for a loss request (a ModelOutput, so wrappers pass it through)."""

    loss: Optional[Tensor] = None


def _refuse(option: str, why: str) -> ValueError:
    return ValueError(f"grpo_kernels.integrations.trl.GRPOTrainer: {option} {why}")


def head_transform(config: Any, temperature: float) -> tuple[float, Optional[float]]:
    """(kernel temperature, kernel softcap) that reproduce TRL's LM-head transform for a model config.

    TRL reads the pre-softcap multiplier from ``logit_scale``, else ``output_multiplier``, else
    ``lm_head_multiplier``, else ``1 / logits_scaling`` (HyperCLOVA X: ``logits_scaling``), and the
    soft-cap from ``final_logit_softcapping``. ``c tanh(s z / c) / T == (c / T) tanh((z / (T / s)) / (c / T))``.

    Raises:
        ValueError: a multiplier <= 0 (the kernels' temperature must be positive).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scaling = text.logits_scaling
        scale = scaling if getattr(text, "model_type", None) == "hyperclovax" else 1 / scaling
    scale = 1.0 if scale is None else float(scale)
    if not scale > 0:
        raise _refuse("model", f"logit scale must be > 0 for the fused head; got {scale}")
    softcap = getattr(text, "final_logit_softcapping", None)
    return temperature / scale, (None if softcap is None else float(softcap) / temperature)


class _HeadCall:
    """The LM head as the kernels see it: weight, bias, compute dtype and the transform."""

    def __init__(self, model: Any, hidden: Tensor, temperature: float, softcap: Optional[float], cast_fp32: bool):
        head = model.get_output_embeddings()
        self.head = head
        weight, bias = head.weight, getattr(head, "bias", None)
        if DTensor and isinstance(weight, DTensor):
            # FSDP2: gather the head (as TRL does); the gradient flows back through full_tensor()
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        self.raw = (head.weight, getattr(head, "bias", None))
        self.weight, self.bias = weight, bias
        self.temperature, self.softcap = temperature, softcap
        device = weight.device
        if cast_fp32:
            self.dtype = torch.float32
            self.autocast = torch.autocast(device.type, enabled=False)
        else:
            on = torch.is_autocast_enabled(device.type)
            self.dtype = torch.get_autocast_dtype(device.type) if on else hidden.dtype
            self.autocast = nullcontext()
        self.device = device

    def cast(self, hidden: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """hidden, weight, bias in the compute dtype (no copy when they already are)."""
        w = self.weight if self.weight.dtype == self.dtype else self.weight.to(self.dtype)
        b = None if self.bias is None else (self.bias if self.bias.dtype == self.dtype else self.bias.to(self.dtype))
        return hidden.to(self.device, self.dtype), w, b

    def gather_ctx(self):
        return maybe_gather_lm_head_ctx(*self.raw)


def patch_lm_head(model: Any, temperature: float, cast_lm_head_to_fp32: bool) -> None:
    """Route ``model(..., fused_lm_head=True)`` and ``model(..., grpo_kernels_loss=fn)`` to grpo_kernels.

    ``fused_lm_head=True`` (with ``labels`` or ``shift_labels``) returns TRL's ``FusedCausalLMOutput``
    with per-token ``log_probs`` and ``entropy`` from :func:`grpo_kernels.linear_logprobs` (0 where the
    label is -100). ``grpo_kernels_loss=fn`` with ``completion_length=C`` calls
    ``fn(hidden [B, C, D], weight, bias, temperature, softcap)`` on the hidden states that predict the
    last C tokens, inside the forward (so DDP / FSDP / ZeRO-3 hooks see it), and returns its loss.
    Anything else is the model's original forward (generation is unchanged). Call after TRL's
    ``add_fused_lm_head`` (the trainer's constructor does).
    """
    original = model.forward
    kernel_t, kernel_softcap = head_transform(model.config, temperature)
    backbone_attr = "base_model"

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                grpo_kernels_loss: Optional[Callable[..., Tensor]] = None, completion_length: Optional[int] = None,
                **kwargs):
        if grpo_kernels_loss is None and not fused_lm_head:
            return original(*args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone_attr)(*args, **kwargs).last_hidden_state
        if grpo_kernels_loss is not None:
            C = int(completion_length)
            hidden = hidden[:, -C - 1 : -1]
            head = _HeadCall(self, hidden, kernel_t, kernel_softcap, cast_lm_head_to_fp32)
            with head.autocast, head.gather_ctx():
                h, w, b = head.cast(hidden)
                loss = grpo_kernels_loss(h, w, b, head.temperature, head.softcap)
            return _LossOutput(loss=loss)
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = _HeadCall(self, hidden, kernel_t, kernel_softcap, cast_lm_head_to_fp32)
        labels = labels.to(head.device)
        mask = labels != -100
        with head.autocast, head.gather_ctx():
            h, w, b = head.cast(hidden)
            logp, entropy = gk.linear_logprobs(h, w, labels, bias=b, temperature=head.temperature, softcap=head.softcap,
                                               ignore_index=-100, return_entropy=True)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-logp.sum() / count, log_probs=logp, entropy=entropy, label_mask=mask)

    model.forward = types.MethodType(forward, model)


def loss_config(args: "trl.GRPOConfig", temperature: float = 1.0, softcap: Optional[float] = None) -> gk.GRPOConfig:
    """The grpo_kernels loss options for a ``trl.GRPOConfig`` (TRL's semantics).

    epsilon -> epsilon_low; epsilon_high (None: epsilon, as TRL; for cispo the absolute ratio cap);
    delta, beta, importance_sampling_level, use_bias_correction_kl, top_entropy_quantile,
    sapo_temperature_*, vespo_*, max_completion_length (dr_grpo's normalizer) carry over; TRL's KL is
    k3. The entropy coefficient is set per step by the trainer (it depends on gradient accumulation
    and on the adaptive controller), so it is 0 here.

    Raises:
        ValueError: naming the TRL option whose value grpo_kernels rejects.
    """
    names = {"epsilon_low": "epsilon"}
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    fields = dict(
        loss_type=args.loss_type, beta=float(args.beta), kl_estimator="k3", epsilon_low=float(args.epsilon),
        epsilon_high=float(eps_high), delta=args.delta, importance_sampling_level=args.importance_sampling_level,
        sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
        vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg, use_bias_correction_kl=bool(args.use_bias_correction_kl),
        max_completion_length=args.max_completion_length, temperature=temperature, logit_softcap=softcap,
        entropy_coef=0.0, top_entropy_quantile=float(args.top_entropy_quantile),
    )
    try:
        return gk.GRPOConfig(**fields)
    except ValueError as exc:
        msg = str(exc)
        field = next((f for f in fields if f"GRPOConfig: {f} " in msg or f"={f!r}" in msg), None)
        option = names.get(field, field) if field else "an option"
        if "importance_sampling_level='sequence' is not defined" in msg:
            option = "importance_sampling_level"
        raise _refuse(f"trl.GRPOConfig.{option}", f"is not supported by grpo_kernels ({msg})") from exc


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` on grpo_kernels: same constructor, same training, no [N, V] logits.

    See the module docstring for what changes. Options the drop-in refuses (ValueError at
    construction): a MoE router auxiliary loss, vision-language models, ``top_entropy_quantile < 1``
    together with an entropy bonus (TRL averages the bonus over the selected tokens; ours over all) or
    with several processes (TRL's entropy quantile spans all ranks), loss_types that grpo_kernels
    does not define at sequence level (cispo, sapo, vespo with ``importance_sampling_level='sequence'``),
    and any value grpo_kernels.GRPOConfig rejects.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        a = self.args
        self._gk_config = loss_config(a)  # validates the loss options before any step
        if self.aux_loss_enabled:
            raise _refuse("router_aux_loss_coef", "(the MoE load-balancing loss) is not supported; set it to 0")
        if getattr(self, "_is_vlm", False):
            raise _refuse("model", "is a vision-language model; only text models are supported")
        if a.top_entropy_quantile < 1.0 and self._entropy_bonus_enabled:
            raise _refuse("top_entropy_quantile", "< 1 together with entropy_coef / use_adaptive_entropy is not supported")
        if a.top_entropy_quantile < 1.0 and self.accelerator.num_processes > 1:
            raise _refuse("top_entropy_quantile", "< 1 is not supported with several processes (TRL's quantile spans all ranks)")
        if a.loss_type == "vespo" and a.use_vllm and a.vllm_importance_sampling_correction:
            lo, hi = a.vllm_importance_sampling_clip_min, a.vllm_importance_sampling_clip_max
            if (lo is not None and lo > 1) or (hi is not None and hi < 1):
                raise _refuse("vllm_importance_sampling_clip_min/max", "must include 1 for loss_type='vespo'")
        target = self.model.get_base_model() if is_peft_model(self.model) else self.model
        patch_lm_head(target, self.temperature, a.cast_lm_head_to_fp32)
        if self.ref_model is not None:
            patch_lm_head(self.ref_model, self.temperature, a.cast_lm_head_to_fp32)

    # ---------------------------------------------------------------- the loss
    def _compute_loss(self, model, inputs):
        for key in _MULTIMODAL_KEYS:
            if inputs.get(key) is not None:
                raise _refuse("inputs", f"contain {key!r}: multimodal inputs are not supported")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        result: dict[str, Any] = {}

        def loss_fn(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float, softcap: Optional[float]) -> Tensor:
            return self._fused_loss(hidden, weight, bias, temperature, softcap, completion_ids, mask, inputs, result)

        out = model(input_ids=input_ids, attention_mask=attention_mask, grpo_kernels_loss=loss_fn,
                    completion_length=completion_ids.size(1))
        self._log_loss_metrics(result, mask, inputs)
        return out.loss

    def _fused_loss(self, hidden, weight, bias, temperature, softcap, completion_ids, mask, inputs, result) -> Tensor:
        mode = "train" if self.model.training else "eval"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        lt = self.loss_type
        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None

        # The current log-probs (no gradient) are needed only off-policy (TRL's clip statistics) and for
        # the off-policy mask; on-policy the log-ratio is exactly 0 and no extra pass runs.
        current = None
        if old is not None or self.off_policy_mask_threshold is not None:
            with torch.no_grad():
                targets = completion_ids.masked_fill(mask == 0, -100)
                current = gk.linear_logprobs(hidden.detach(), weight.detach(), targets,
                                             bias=None if bias is None else bias.detach(),
                                             temperature=temperature, softcap=softcap, ignore_index=-100)
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        log_ratio = zeros if old is None else (current - old.float()) * (mask != 0)

        is_ratio = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = gk.importance_sampling_ratio(
                old, inputs["sampling_per_token_logps"], mask, mode=self.vllm_importance_sampling_mode,
                clip_min=self.vllm_importance_sampling_clip_min, clip_max=self.vllm_importance_sampling_clip_max)
        loss_adv = advantages
        if self.off_policy_mask_threshold is not None:
            # TRL measures the drift against the sampler's log-probs when it has them, else the old policy's
            sampler = inputs.get("sampling_per_token_logps", old if old is not None else current)
            keep = gk.off_policy_sequence_mask(advantages, current, sampler, mask, self.off_policy_mask_threshold)
            loss_adv = advantages * keep  # keep has advantages' shape

        coef = 0.0
        if self._entropy_bonus_enabled:
            if self.use_adaptive_entropy:
                coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
            else:
                coef = self.entropy_coef
        # TRL: per-step-normalized types divide the whole loss by the accumulation steps; the others
        # divide only the entropy bonus (their token normalizer already spans the window).
        per_step = lt in _PER_STEP_NORMALIZED
        cfg = self._gk_config.replace(temperature=temperature, logit_softcap=softcap,
                                      entropy_coef=float(coef) if per_step else float(coef) / ga)
        num_items = None
        if not per_step:
            n = inputs["num_items_in_batch"]
            n = torch.as_tensor(n, dtype=torch.float64, device=mask.device).clamp(min=1.0)
            num_items = n * ga / self.args.steps_per_generation if mode == "train" else n
        out = gk.FusedLinearGRPOLoss(cfg)(hidden, weight, completion_ids, mask, loss_adv, old_logp=old, ref_logp=ref,
                                          bias=bias, is_ratio=is_ratio, num_items_in_batch=num_items)
        result.update(metrics=out.metrics, log_ratio=log_ratio, is_ratio=is_ratio, cfg=cfg,
                      loss=out.loss.detach(), mode=mode)
        return out.loss / ga if per_step else out.loss

    # ---------------------------------------------------------------- metrics (TRL's names and values)
    def _log_loss_metrics(self, result: dict[str, Any], mask: Tensor, inputs: dict[str, Any]) -> None:
        mode, metrics, cfg = result["mode"], result["metrics"], result["cfg"]
        m = mask.float()
        count = m.sum()
        adv = inputs["advantages"]
        adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
        acc = self.accelerator

        def global_mean(x: Tensor) -> float:
            if x.shape[1] == 1:  # one value per sequence (sequence-level ratios)
                s, c = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
            else:
                s, c = (x * m).sum(), count
            tot = acc.reduce(torch.stack([s.float(), c.float()]), reduction="sum")
            return (tot[0] / tot[1].clamp(min=1.0)).item()

        def from_token_mean(value: Tensor) -> float:  # a library token mean -> TRL's all-rank token mean
            tot = acc.reduce(torch.stack([value.float() * count, count]), reduction="sum")
            return (tot[0] / tot[1].clamp(min=1.0)).item()

        entropy = metrics["entropy"]
        if self._entropy_bonus_enabled:
            policy_loss = result["loss"] + cfg.entropy_coef * entropy  # the library's loss includes -coef * mean entropy
            self._metrics[mode]["policy_loss"].append(acc.gather(policy_loss.float()).nanmean().item())
            if self.use_adaptive_entropy and mode == "train":
                stats = torch.stack([entropy.float() * count, count]).detach()
                self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
                if acc.sync_gradients:
                    window = acc.reduce(self._entropy_window_stats, reduction="sum")
                    world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                    a = self.args
                    if world_entropy <= a.entropy_target:
                        self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
                    else:
                        self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
                    self._last_world_entropy = world_entropy
                    self._entropy_window_stats = None
            if mode == "train" and acc.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(from_token_mean(metrics["kl"]))
        self._metrics[mode]["entropy"].append(from_token_mean(entropy))

        lr = result["log_ratio"]
        if self.importance_sampling_level == "sequence":
            lw = (lr * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        else:
            lw = lr
        coef_1 = torch.exp(lw)
        lt = self.loss_type
        if lt in _CLIPPED:
            low = ((coef_1 < 1 - self.epsilon_low) & (adv < 0)).float()
            high = ((coef_1 > 1 + self.epsilon_high) & (adv > 0)).float()
            region = torch.maximum(low, high)

            def seq_mean(x: Tensor) -> Tensor:
                return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

            self._metrics[mode]["clip_ratio/low_mean"].append(global_mean(low))
            self._metrics[mode]["clip_ratio/high_mean"].append(global_mean(high))
            self._metrics[mode]["clip_ratio/region_mean"].append(global_mean(region))
            self._metrics[mode]["clip_ratio/low_min"].append(nanmin(acc.gather(seq_mean(low))).item())
            self._metrics[mode]["clip_ratio/high_max"].append(nanmax(acc.gather(seq_mean(high))).item())
        elif lt == "cispo":
            self._metrics[mode]["cispo_clip_ratio"].append(global_mean(((coef_1 > self.epsilon_high) & (adv > 0)).float()))
        elif lt == "vespo":
            self._metrics[mode]["vespo/phi_seq_mean"].append(global_mean(self._gamma_weights(adv, lr, m, result["is_ratio"])))

    def _gamma_weights(self, adv: Tensor, log_ratio: Tensor, m: Tensor, is_ratio: Optional[Tensor]) -> Tensor:
        """VESPO's gamma weight per sequence, for the ``vespo/phi_seq_mean`` metric only (the loss has its own)."""
        a = self.args
        lower = math.log(1e-8)
        seq = (log_ratio.clamp(-20.0, 20.0) * m).sum(-1, keepdim=True)
        if is_ratio is not None:
            seq = seq + torch.log(is_ratio).clamp(lower, 20.0).sum(-1, keepdim=True)
        log_w = seq.clamp(lower, 20.0)
        nonneg = adv >= 0
        k = torch.where(nonneg, a.vespo_k_pos, a.vespo_k_neg)
        lam = torch.where(nonneg, a.vespo_lambda_pos, a.vespo_lambda_neg).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
