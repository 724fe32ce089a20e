"""GRPOConfig: every option of the GRPO-family loss, validated once, frozen.

Field names follow TRL's ``GRPOConfig`` so a TRL user's settings carry over unchanged. The
kernels never see this object directly: the public functions read what they need from it, and
the float hyper-parameters reach the kernels as runtime scalars (a new beta never recompiles).
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
from dataclasses import dataclass
from typing import Literal, Optional

from ._checks import is_real_number as _is_number

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# Loss types whose objective is not written in terms of one shared sequence ratio.
TOKEN_LEVEL_ONLY = ("cispo", "sapo", "vespo")
# Loss types that use the PPO clipped surrogate min(r * A, clip(r) * A).
CLIPPED_SURROGATE = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


# Fields stored as Python floats / ints: numpy scalars (np.float32(0.04) read from an array) are valid
# values, but a numpy scalar times a tensor can turn into a numpy array, so they are converted once here.
FLOAT_FIELDS = ("beta", "epsilon_low", "epsilon_high", "delta", "sapo_temperature_pos", "sapo_temperature_neg",
                "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "temperature", "logit_softcap",
                "entropy_coef", "top_entropy_quantile")
INT_FIELDS = ("max_completion_length",)

# The smallest normal float64. The kernels compute in float64 for float64 inputs and in float32 otherwise,
# and need the temperature and soft-cap to be normal numbers there (_checks.check_positive): a value
# below this works for no input dtype, so GRPOConfig refuses it. float32's narrower range stays a check
# of the call, since float64 inputs can use a soft-cap of 1e39.
FLOAT64_TINY = sys.float_info.min


@dataclass(frozen=True)
class GRPOConfig:
    """Options of the GRPO loss (TRL-compatible names).

    Numbers must be finite; numpy scalars (e.g. ``np.float32(0.04)``) are accepted and stored as
    Python floats / ints, so the config never carries numpy types into tensor arithmetic.

    Attributes:
        loss_type: grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo. Chooses the per-token
            surrogate and the reduction (see docs/design.md, "The math").
        beta: KL coefficient; 0 disables the KL term and the reference log-probs are not needed.
        kl_estimator: k1 (log-ratio), k2 (half squared log-ratio) or k3 (Schulman's unbiased, default).
        epsilon_low: lower clip, the ratio is clipped at ``1 - epsilon_low``.
        epsilon_high: upper clip ``1 + epsilon_high`` (None: same as epsilon_low). For cispo it is the
            absolute cap on the ratio (TRL semantics) and must be given.
        delta: two-sided clipping (INTELLECT-2): the unclipped ratio is capped at delta. None: off.
        importance_sampling_level: "token" (PPO/GRPO) or "sequence" (GSPO, one ratio per sequence from
            the length-normalized sum of log-ratios).
        sapo_temperature_pos, sapo_temperature_neg: SAPO gate temperatures for A > 0 and A <= 0.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO gamma-weight shape and rate
            for A >= 0 and A < 0.
        use_bias_correction_kl: multiply the KL term by the (unclipped) importance ratio.
        max_completion_length: the dr_grpo normalizer ``B * max_completion_length``; required for dr_grpo.
        temperature: sampling temperature; logits are divided by it before the softmax. At least
            float64's smallest normal (2.2e-308); float32 inputs need a normal float32 (checked by the call).
        logit_softcap: final-logit soft-capping ``c * tanh(z / c)`` (Gemma-style), applied after the
            temperature. None: off. The same range as temperature.
        entropy_coef: entropy bonus; the loss gets ``- entropy_coef * mean(entropy)`` over completion tokens.
        top_entropy_quantile: keep the policy-gradient term only on tokens whose entropy is at or above
            this quantile from the top (1.0: all tokens; 0.2: the 20% highest-entropy tokens). TRL semantics.
    """

    loss_type: LossType = "grpo"
    beta: float = 0.04
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    epsilon_low: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    importance_sampling_level: Literal["token", "sequence"] = "token"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    use_bias_correction_kl: bool = False
    max_completion_length: Optional[int] = None
    temperature: float = 1.0
    logit_softcap: Optional[float] = None
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0

    def __post_init__(self) -> None:
        for name in FLOAT_FIELDS:  # finite real scalars of any type become floats; the rest is refused below
            if _is_number(getattr(self, name)):
                object.__setattr__(self, name, float(getattr(self, name)))
        for name in INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                object.__setattr__(self, name, int(value))

        def bad(field: str, expected: str) -> ValueError:
            return ValueError(f"GRPOConfig: {field} must be {expected}; got {getattr(self, field)!r}")

        if self.loss_type not in LOSS_TYPES:
            raise bad("loss_type", "one of " + ", ".join(LOSS_TYPES))
        if self.kl_estimator not in KL_ESTIMATORS:
            raise bad("kl_estimator", "one of " + ", ".join(KL_ESTIMATORS))
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise bad("importance_sampling_level", "'token' or 'sequence'")
        if not _is_number(self.beta) or self.beta < 0:
            raise bad("beta", "a finite number >= 0")
        if not _is_number(self.epsilon_low) or not 0 <= self.epsilon_low <= 1:
            raise bad("epsilon_low", "a number in [0, 1]")
        if self.epsilon_high is not None and (not _is_number(self.epsilon_high) or self.epsilon_high < 0):
            raise bad("epsilon_high", "None or a finite number >= 0")
        if self.loss_type == "cispo" and (self.epsilon_high is None or self.epsilon_high <= 0):
            raise bad("epsilon_high", "set for loss_type='cispo' (an absolute cap on the ratio > 0, e.g. 5.0)")
        if self.delta is not None:
            floor = 1.0 + self.eps_high
            if not _is_number(self.delta) or self.delta <= floor:
                raise bad("delta", f"None or a number > 1 + epsilon_high = {floor:g}")
            if self.loss_type not in CLIPPED_SURROGATE:
                raise bad("delta", f"None for loss_type={self.loss_type!r} (two-sided clipping needs the clipped surrogate)")
        if self.importance_sampling_level == "sequence" and self.loss_type in TOKEN_LEVEL_ONLY:
            raise ValueError(
                f"GRPOConfig: importance_sampling_level='sequence' is not defined for loss_type={self.loss_type!r}; "
                "use importance_sampling_level='token'"
            )
        if self.loss_type == "dr_grpo":
            m = self.max_completion_length
            if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
                raise bad("max_completion_length", "a positive int for loss_type='dr_grpo'")
        elif self.max_completion_length is not None and (
            not isinstance(self.max_completion_length, int) or isinstance(self.max_completion_length, bool)
            or self.max_completion_length <= 0
        ):
            raise bad("max_completion_length", "None or a positive int")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_lambda_pos", "vespo_lambda_neg", "temperature"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "a finite number > 0")
        for name in ("vespo_k_pos", "vespo_k_neg"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a finite number >= 0")
        if self.logit_softcap is not None and (not _is_number(self.logit_softcap) or self.logit_softcap <= 0):
            raise bad("logit_softcap", "None or a finite number > 0")
        for name, expected in (("temperature", ""), ("logit_softcap", "None or ")):
            if getattr(self, name) is not None and getattr(self, name) < FLOAT64_TINY:
                raise bad(name, f"{expected}at least {FLOAT64_TINY:.4g}, the smallest normal float64 (the kernels need a "
                                "normal number in the dtype they compute in, float64 at the widest)")
        if not _is_number(self.entropy_coef):
            raise bad("entropy_coef", "a finite number")
        if not _is_number(self.top_entropy_quantile) or not 0 < self.top_entropy_quantile <= 1:
            raise bad("top_entropy_quantile", "a number in (0, 1]")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise bad("use_bias_correction_kl", "a bool")

    @property
    def eps_high(self) -> float:
        """The upper clip (epsilon_high, or epsilon_low when epsilon_high is None)."""
        return self.epsilon_low if self.epsilon_high is None else float(self.epsilon_high)

    @property
    def needs_entropy(self) -> bool:
        """Whether the loss itself (not just the metrics) depends on the per-token entropy."""
        return self.entropy_coef != 0.0 or self.top_entropy_quantile < 1.0

    def replace(self, **changes: object) -> "GRPOConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
