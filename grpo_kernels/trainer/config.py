"""TrainerConfig: every option of the GRPO trainer, validated once, frozen.

The loss options that GRPOConfig owns (loss_type, beta, clipping) are repeated here under TRL's
names and passed through; the trainer derives the rest of the GRPOConfig (temperature, soft-cap)
from the sampler and the model, so the loss always scores the distribution that was sampled.
The defaults are the main job's: the built-in tiny model learning two-digit addition on a
2-core CPU. There ``beta = 0.1`` matters: the reference is the untrained, near-uniform model, so
the KL term keeps the policy exploring until the rewards have shown it what to do; without it
GRPO commits each prompt to an answer (usually a wrong one) within ~100 steps and stops
learning. Each field's ``help`` metadata doubles as the command-line help.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

from .._checks import is_real_number
from ..config import KL_ESTIMATORS, LOSS_TYPES, GRPOConfig

SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16")
TRAINER_BACKENDS = ("auto", "cpu", "triton", "torch", "reference")
SCALES = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")
PROMPT_SAMPLINGS = ("replacement", "passes")


def _help(text: str) -> Any:
    return {"help": text}


@dataclass(frozen=True)
class TrainerConfig:
    """Options of :class:`grpo_kernels.trainer.GRPOTrainer` (see each field's help)."""

    model: Optional[str] = field(default=None, metadata=_help("local Hugging Face causal-LM directory; default: the built-in tiny model"))
    out_dir: str = field(default="grpo_run", metadata=_help("where metrics.jsonl, checkpoints/ and the plot go"))
    seed: int = field(default=0, metadata=_help("seeds model init (built-in model), prompt order and sampling"))
    steps: int = field(default=2000, metadata=_help("generation rounds; each does num_iterations optimizer updates"))
    prompts_per_step: int = field(default=32, metadata=_help("distinct prompts per generation round"))
    prompt_sampling: str = field(default="passes", metadata=_help(
        "how each step's prompts are drawn: replacement (uniform, independent draws) | passes (shuffled passes over "
        "the training rows without replacement, as TRL's sampler)"))
    num_generations: int = field(default=8, metadata=_help("completions sampled per prompt (the group size G)"))
    max_new_tokens: int = field(default=2, metadata=_help("completion length limit; generation also stops at EOS"))
    temperature: float = field(default=1.0, metadata=_help("sampling temperature (the loss uses the same one)"))
    top_p: float = field(default=1.0, metadata=_help("nucleus sampling threshold (1.0: off)"))
    learning_rate: float = field(default=1e-3, metadata=_help("peak AdamW learning rate"))
    lr_scheduler: str = field(default="cosine", metadata=_help("after warmup: constant | linear | cosine decay to 0"))
    warmup_steps: int = field(default=20, metadata=_help("optimizer updates of linear warm-up"))
    warmup_from_zero: bool = field(default=True, metadata=_help(
        "warm-up starts at rate 0 (as transformers/TRL: update u gets u/warmup); off: at 1/warmup ((u+1)/warmup)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW decoupled weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=_help("clip the global gradient norm to this"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("micro-batches per update (must divide prompts_per_step * num_generations)"))
    num_iterations: int = field(default=1, metadata=_help("optimizer updates per generated batch (mu); >1 uses old-policy log-probs"))
    loss_type: str = field(default="grpo", metadata=_help("GRPO loss variant: " + " | ".join(LOSS_TYPES)))
    beta: float = field(default=0.1, metadata=_help("KL coefficient to the reference (the initial model); 0: no reference model"))
    kl_estimator: str = field(default="k3", metadata=_help("k1 | k2 | k3"))
    epsilon_low: float = field(default=0.2, metadata=_help("lower clip of the importance ratio"))
    epsilon_high: Optional[float] = field(default=None, metadata=_help("upper clip (default: epsilon_low)"))
    entropy_coef: float = field(default=0.0, metadata=_help("entropy bonus: the loss gets - entropy_coef * mean token entropy"))
    scale_rewards: str = field(default="group", metadata=_help("advantage scale: group | batch | none"))
    advantage_estimator: str = field(default="grpo", metadata=_help("grpo | rloo"))
    ref_sync_steps: int = field(default=0, metadata=_help("every this many steps mix the policy into the reference model (0: never)"))
    ref_sync_alpha: float = field(default=1.0, metadata=_help("reference <- alpha * policy + (1 - alpha) * reference at a sync"))
    share_prompts: bool = field(default=True, metadata=_help(
        "run each prompt once per group and share its KV cache with the group's completions, in sampling and in every "
        "forward (off: transformers generate and full forwards on the prompts repeated G times: the same distribution, "
        "other draws for a seed, slower)"))
    dtype: str = field(default="float32", metadata=_help("float32, or bfloat16 (autocast, fp32 master weights)"))
    backend: str = field(default="auto", metadata=_help("kernel backend: auto | cpu | triton | torch | reference (materializes logits)"))
    save_steps: int = field(default=500, metadata=_help("checkpoint every this many steps (0: only at the end)"))
    keep_checkpoints: int = field(default=2, metadata=_help("most recent checkpoints kept on disk"))
    eval_steps: int = field(default=50, metadata=_help("held-out greedy accuracy every this many steps (0: never during training)"))
    reward_timeout: float = field(default=0.0, metadata=_help(
        "seconds one reward-function call may take; past it training stops with an error naming the function (0: no limit)"))

    def __post_init__(self) -> None:
        # numpy scalars are numbers (as in GRPOConfig): stored as Python ints / floats, so that to_dict()
        # stays JSON-able for the checkpoints and nothing numpy reaches tensor arithmetic. A float in an
        # int field becomes a Python float, still refused below.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or type(value) in (int, float) or not isinstance(value, numbers.Real):
                continue
            object.__setattr__(self, f.name, int(value) if isinstance(value, numbers.Integral) else float(value))

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"TrainerConfig: {name} must be {expected}; got {getattr(self, name)!r}")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        is_num = is_real_number  # finite, not bool

        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise bad("model", "None or a directory path")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise bad("out_dir", "a non-empty path")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "gradient_accumulation_steps", "num_iterations",
                     "keep_checkpoints"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "an int >= 1")
        if not is_int(self.num_generations) or self.num_generations < 2:
            raise bad("num_generations", "an int >= 2 (GRPO compares completions within a group)")
        for name in ("seed", "warmup_steps", "ref_sync_steps", "save_steps", "eval_steps"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "an int >= 0")
        for name in ("warmup_from_zero", "share_prompts"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if not is_num(self.temperature) or self.temperature <= 0:
            raise bad("temperature", "a number > 0")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if not is_num(self.learning_rate) or self.learning_rate <= 0:
            raise bad("learning_rate", "a number > 0")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a number >= 0")
        if not is_num(self.max_grad_norm) or self.max_grad_norm <= 0:
            raise bad("max_grad_norm", "a number > 0")
        if not is_num(self.reward_timeout) or self.reward_timeout < 0:
            raise bad("reward_timeout", "a number >= 0 (seconds; 0: no limit)")
        if not is_num(self.ref_sync_alpha) or not 0 < self.ref_sync_alpha <= 1:
            raise bad("ref_sync_alpha", "a number in (0, 1]")
        choices = {"lr_scheduler": SCHEDULES, "dtype": DTYPES, "backend": TRAINER_BACKENDS, "loss_type": LOSS_TYPES,
                   "kl_estimator": KL_ESTIMATORS, "scale_rewards": SCALES, "advantage_estimator": ESTIMATORS,
                   "prompt_sampling": PROMPT_SAMPLINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, "one of " + ", ".join(allowed))
        batch = self.prompts_per_step * self.num_generations
        if batch % self.gradient_accumulation_steps:
            raise bad("gradient_accumulation_steps", f"a divisor of prompts_per_step * num_generations = {batch}")
        if self.ref_sync_steps and self.beta == 0:
            raise bad("ref_sync_steps", "0 when beta = 0 (there is no reference model to sync)")
        # beta, epsilon_*, loss_type combinations: GRPOConfig validates them and names the field, which has
        # the same name here except max_completion_length (our max_new_tokens); the message is re-addressed
        # to TrainerConfig, the class the user built.
        try:
            self.grpo_config(temperature=self.temperature, logit_softcap=None)
        except ValueError as exc:
            message = str(exc).replace("max_completion_length", "max_new_tokens")
            if message.startswith("GRPOConfig: "):
                message = "TrainerConfig: " + message[len("GRPOConfig: "):]
            raise ValueError(message) from None

    def grpo_config(self, temperature: float, logit_softcap: Optional[float]) -> GRPOConfig:
        """The loss options, with the kernel temperature and soft-cap the model's head calls for."""
        return GRPOConfig(loss_type=self.loss_type, beta=self.beta, kl_estimator=self.kl_estimator,
                          epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                          max_completion_length=self.max_new_tokens, temperature=temperature, logit_softcap=logit_softcap,
                          entropy_coef=self.entropy_coef)

    @property
    def batch_size(self) -> int:
        """Completions per generation round: prompts_per_step * num_generations."""
        return self.prompts_per_step * self.num_generations

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainerConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
