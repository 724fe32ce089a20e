"""Hostile inputs of the sampling corrections and the trainer: refused by name, or the right answer.

The companion of tests/test_bad_inputs.py for ``grpo_kernels.sampling`` (importance_sampling_ratio,
off_policy_sequence_mask) and ``grpo_kernels.trainer`` (TrainerConfig, GRPOTrainer's reward_weights,
compute_rewards). Each case asserts an error whose message starts with the function's (or class's)
name and names the argument, or agreement with the definition. Shapes are tiny.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import grpo_kernels as gk
from grpo_kernels.trainer import GRPOTrainer, TrainerConfig, compute_rewards
from oracle import refused

pytestmark = pytest.mark.usefixtures("seed")

NAN, INF = float("nan"), float("inf")
SAMPLING_FNS = {
    "importance_sampling_ratio": lambda logp, sampler, mask: gk.importance_sampling_ratio(logp, sampler, mask),
    "off_policy_sequence_mask": lambda logp, sampler, mask: gk.off_policy_sequence_mask(
        torch.randn(logp.shape[0]), logp, sampler, mask, 0.1),
}


def logps(B: int = 3, T: int = 3):
    """Trainer and sampler log-probs [B, T] and an all-ones mask."""
    logp = -torch.rand(B, T) * 2
    return logp, logp + 0.3 * torch.randn(B, T), torch.ones(B, T)


# ------------------------------------------------------------------ A6: off_policy_sequence_mask's shape
@pytest.mark.parametrize("layout", ["[B]", "[B, 1]", "[B, T]"])
def test_off_policy_mask_has_the_advantages_shape(layout):
    """advantages * keep is elementwise: the result has the advantages' shape, not [B, 1] for [B]."""
    B, T = 3, 4
    logp, sampler, mask = logps(B, T)
    adv = {"[B]": torch.randn(B), "[B, 1]": torch.randn(B, 1), "[B, T]": torch.randn(B, T)}[layout]
    keep = gk.off_policy_sequence_mask(adv, logp, sampler, mask, 0.05)
    assert keep.shape == adv.shape and keep.dtype == torch.float32
    assert (adv * keep).shape == adv.shape


def test_off_policy_mask_times_advantages_gives_the_masked_loss_when_b_equals_t():
    """B == T: [B] advantages times a [B, 1] result used to broadcast to [B, B], which grpo_loss took for
    per-token advantages (audit: loss 0.0568 instead of -0.3427). Now the product drops exactly the
    sequences the definition drops."""
    B = T = 3
    logp, sampler, mask = logps(B, T)
    old = logp + 0.1 * torch.randn(B, T)
    adv = torch.tensor([1.0, -1.0, -0.5])
    sampler[1] = logp[1] + 1.0  # sequence 1: negative advantage and a mean KL of 1 > 0.5: dropped
    sampler[2] = logp[2]        # sequence 2: negative advantage, KL 0: kept
    keep = gk.off_policy_sequence_mask(adv, logp, sampler, mask, threshold=0.5)
    torch.testing.assert_close(keep, torch.tensor([1.0, 0.0, 1.0]))
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.0)
    got = gk.grpo_loss(logp, adv * keep, mask, cfg, old_logp=old).loss
    want = gk.grpo_loss(logp, torch.tensor([1.0, 0.0, -0.5]), mask, cfg, old_logp=old).loss
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ A7: mask and logp validation
BAD_MASKS = {
    "negative": (ValueError, lambda m: -m),
    "complex": (TypeError, lambda m: m.to(torch.complex64)),
    "nan": (ValueError, lambda m: torch.where(torch.arange(m.numel()).reshape(m.shape) == 1, NAN, m)),
    "inf": (ValueError, lambda m: torch.where(torch.arange(m.numel()).reshape(m.shape) == 1, INF, m)),
}


@pytest.mark.parametrize("case", list(BAD_MASKS))
@pytest.mark.parametrize("fn", list(SAMPLING_FNS))
def test_sampling_refuses_a_bad_mask(fn, case):
    """grpo_loss's mask rules (real, finite, >= 0): a negative mask used to flip the log-ratio's sign."""
    exc, make = BAD_MASKS[case]
    logp, sampler, mask = logps()
    refused(exc, fn, "mask", lambda: SAMPLING_FNS[fn](logp, sampler, make(mask)))


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fn", list(SAMPLING_FNS))
def test_sampling_refuses_non_finite_logp_at_a_kept_token(fn, value):
    """Only the sampler may leave a token unscored: a NaN trainer logp used to become ratio 1 (no correction)."""
    logp, sampler, mask = logps()
    logp[1, 2] = value
    refused(ValueError, fn, "logp", lambda: SAMPLING_FNS[fn](logp, sampler, mask))


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_non_finite_logp_on_padding_is_ignored(mode):
    """Padding is never read: NaN there gives the result of any finite value there."""
    logp, sampler, mask = logps()
    mask[1, 2] = 0
    clean = gk.importance_sampling_ratio(logp, sampler, mask, mode=mode)
    logp[1, 2] = NAN
    torch.testing.assert_close(gk.importance_sampling_ratio(logp, sampler, mask, mode=mode), clean)
    adv = torch.randn(3)
    gk.off_policy_sequence_mask(adv, logp, sampler, mask, 0.1)  # accepted


@pytest.mark.parametrize("layout", ["[B]", "[B, T]"])
def test_off_policy_mask_refuses_non_finite_advantages(layout):
    """A NaN advantage compares False with 0 and would silently be decided by the KL alone."""
    logp, sampler, mask = logps()
    adv = torch.randn(3) if layout == "[B]" else torch.randn(3, 3)
    adv.view(-1)[1] = NAN
    refused(ValueError, "off_policy_sequence_mask", "advantages",
            lambda: gk.off_policy_sequence_mask(adv, logp, sampler, mask, 0.1))


# ------------------------------------------------------------------ B5: numpy scalars are numbers
def test_sampling_accepts_numpy_scalars():
    logp, sampler, mask = logps()
    want = gk.importance_sampling_ratio(logp, sampler, mask, mode="token_truncate", clip_min=0.5, clip_max=3.0)
    got = gk.importance_sampling_ratio(logp, sampler, mask, mode="token_truncate",
                                       clip_min=np.float64(0.5), clip_max=np.float32(3.0))
    torch.testing.assert_close(got, want)
    adv = torch.randn(3)
    threshold = float(np.float32(0.1))
    torch.testing.assert_close(gk.off_policy_sequence_mask(adv, logp, sampler, mask, np.float32(0.1)),
                               gk.off_policy_sequence_mask(adv, logp, sampler, mask, threshold))
    torch.testing.assert_close(gk.off_policy_sequence_mask(adv, logp, sampler, mask, np.int64(0)),
                               gk.off_policy_sequence_mask(adv, logp, sampler, mask, 0))


NUMPY_FIELDS = dict(temperature=np.float32(0.7), top_p=np.float64(0.9), learning_rate=np.float32(1e-3),
                    weight_decay=np.float32(0.01), max_grad_norm=np.float16(1.0), beta=np.float32(0.05),
                    epsilon_low=np.float32(0.2), epsilon_high=np.float64(0.28), entropy_coef=np.float32(0.01),
                    ref_sync_alpha=np.float32(0.5), reward_timeout=np.float64(5.0),
                    seed=np.int32(3), steps=np.int64(10), prompts_per_step=np.int64(2), num_generations=np.int16(2),
                    max_new_tokens=np.int64(2), warmup_steps=np.int64(1), gradient_accumulation_steps=np.int8(1),
                    num_iterations=np.int64(1), ref_sync_steps=np.int64(4), save_steps=np.int64(0),
                    keep_checkpoints=np.int64(2), eval_steps=np.int64(0))


def test_trainer_config_accepts_numpy_scalars():
    """Every numeric field takes a numpy scalar (as GRPOConfig does), stored as a Python number (JSON-able)."""
    assert set(NUMPY_FIELDS) == {f.name for f in dataclasses.fields(TrainerConfig)
                                 if f.type in ("int", "float", "Optional[float]")}
    cfg = TrainerConfig(**NUMPY_FIELDS)
    for name, value in NUMPY_FIELDS.items():
        got = getattr(cfg, name)
        assert type(got) is (int if isinstance(value, np.integer) else float), (name, type(got))
        assert got == value.item()
    json.dumps(cfg.to_dict())
    assert cfg.grpo_config(cfg.temperature, None).beta == cfg.beta


@pytest.mark.parametrize("name, value", [("steps", np.float32(10.0)), ("seed", np.float64(1.0)),
                                         ("temperature", np.float32(NAN)), ("warmup_from_zero", np.bool_(True))])
def test_trainer_config_still_refuses_wrong_numpy_scalars(name, value):
    refused(ValueError, "TrainerConfig", name, lambda: TrainerConfig(**{name: value}))


@pytest.mark.parametrize("name, value", [("temperature", 10**400), ("learning_rate", 10**400), ("beta", -10**400),
                                         ("temperature", 1e-320)],
                         ids=["temperature-int-beyond-f64", "learning_rate-int-beyond-f64", "beta-int-beyond-f64",
                              "temperature-subnormal-f64"])
def test_trainer_config_refuses_numbers_no_dtype_holds(name, value):
    """An int beyond float64 used to be a raw OverflowError from math.isfinite; a temperature subnormal in
    float64 is normal in no dtype the kernels compute in (GRPOConfig's rule, re-addressed to TrainerConfig)."""
    refused(ValueError, "TrainerConfig", name, lambda: TrainerConfig(**{name: value}))


def test_compute_rewards_accepts_a_numpy_timeout():
    def one(prompts, completions, **_):
        return [1.0] * len(completions)

    assert compute_rewards([one], ["p"], ["a"], {}, timeout=np.float32(5.0)).tolist() == [[1.0]]


# ------------------------------------------------------------------ B6: rewards beyond float32
def big_reward(prompts, completions, **_):
    return [0.0, 1e39]


def huge_int_reward(prompts, completions, **_):
    return [0, 10**400]


def negative_big_reward(prompts, completions, **_):
    return [0.0, -3.5e38]


def float64_array_reward(prompts, completions, **_):
    return np.array([0.0, 1e39])


@pytest.mark.parametrize("fn", [big_reward, huge_int_reward, negative_big_reward, float64_array_reward],
                         ids=lambda f: f.__name__)
def test_compute_rewards_names_a_reward_beyond_float32(fn):
    """Used to be a raw RuntimeError (1e39) or OverflowError (10**400) naming nothing."""
    with pytest.raises(ValueError) as info:
        compute_rewards([fn], ["p", "q"], ["a", "b"], {})
    msg = str(info.value)
    assert f"reward function {fn.__name__!r}" in msg and "index 1" in msg and "float32" in msg, msg


def test_compute_rewards_keeps_the_float32_range():
    """The bound is float32's own: its largest values, None and NaN still pass."""
    def edge(prompts, completions, **_):
        return [3.4e38, -3.4e38, None, NAN]

    got = compute_rewards([edge], ["p"] * 4, ["a"] * 4, {})[:, 0]
    assert got[:2].tolist() == [float(np.float32(3.4e38)), float(np.float32(-3.4e38))]
    assert got[2:].isnan().all()


# ------------------------------------------------------------------ A8 / B7: GRPOTrainer's reward_weights
def _two_rewards():
    def first(prompts, completions, **_):
        return [1.0] * len(completions)

    def second(prompts, completions, **_):
        return [0.0] * len(completions)

    return [first, second]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A 1-layer Llama over the built-in tokenizer: construction only, nothing is trained."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(cfg), tokenizer


def make_trainer(tiny, tmp_path, reward_weights, config: TrainerConfig = None) -> GRPOTrainer:
    model, tokenizer = tiny
    config = config or TrainerConfig(out_dir=str(tmp_path), prompts_per_step=2, num_generations=2, beta=0.0)
    return GRPOTrainer(config, model, tokenizer, [{"prompt": "1+1="}], _two_rewards(), reward_weights=reward_weights)


BAD_WEIGHTS = {
    "str": (TypeError, "12"),                 # used to become [1, 2]
    "bools": (TypeError, [True, False]),      # used to become [1, 0]
    "strings": (TypeError, ["a", "b"]),       # used to be a raw ValueError from float()
    "scalar": (TypeError, 5.0),               # used to be "'float' object is not iterable"
    "ndarray": (TypeError, np.array([1.0, 2.0])),  # used to pass; group_advantages refuses it
    "beyond-float32": (ValueError, [1e39, 1.0]),  # used to pass, then fail at the first step
    "bool-tensor": (TypeError, torch.tensor([True, False])),  # used to become [1, 0]
    "int-beyond-float64": (ValueError, [1, 10**400]),  # used to be a raw OverflowError from float()
    # refused before too; kept so the shared rule does not lose them
    "too-few": (ValueError, [1.0]),
    "nan": (ValueError, [1.0, NAN]),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_trainer_refuses_bad_reward_weights_at_construction(case, tiny, tmp_path):
    exc, weights = BAD_WEIGHTS[case]
    refused(exc, "GRPOTrainer", "reward_weights", lambda: make_trainer(tiny, tmp_path, weights))


@pytest.mark.parametrize("weights", [[1, np.float32(0.5)], (2.0, -1.0), torch.tensor([1.0, 0.5], dtype=torch.float64)],
                         ids=["numpy", "tuple", "tensor"])
def test_trainer_accepts_real_reward_weights(weights, tiny, tmp_path):
    """What group_advantages accepts, the trainer accepts (as float32 on the CPU, the rewards' layout)."""
    trainer = make_trainer(tiny, tmp_path, weights)
    want = [float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    assert trainer.reward_weights.dtype == torch.float32 and trainer.reward_weights.tolist() == want
    assert make_trainer(tiny, tmp_path, None).reward_weights.tolist() == [1.0, 1.0]


def test_trainer_takes_a_numpy_config(tiny, tmp_path):
    """B5 end to end: a TrainerConfig of numpy scalars builds a trainer whose loss config holds floats."""
    cfg = TrainerConfig(out_dir=str(tmp_path), prompts_per_step=np.int64(2), num_generations=np.int64(2),
                        temperature=np.float32(0.5), beta=np.float32(0.0), steps=np.int64(3))
    trainer = make_trainer(tiny, tmp_path, None, cfg)
    assert trainer.loss_config.temperature == pytest.approx(0.5) and trainer.config.batch_size == 4
    assert math.isfinite(trainer.scheduler.get_last_lr()[0])


# ------------------------------------------------------------------ B8: loss options are TrainerConfig's
@pytest.mark.parametrize("field, kwargs", [
    ("epsilon_high", dict(loss_type="cispo")),
    ("beta", dict(beta=-1)),
    ("epsilon_low", dict(epsilon_low=2.0)),
    ("epsilon_high", dict(epsilon_high=-0.5)),
    ("entropy_coef", dict(entropy_coef=INF)),
], ids=["cispo", "beta", "epsilon_low", "epsilon_high", "entropy_coef"])
def test_trainer_config_loss_errors_name_trainer_config(field, kwargs):
    """These options are validated by GRPOConfig, but the user built a TrainerConfig: the message says so."""
    refused(ValueError, "TrainerConfig", field, lambda: TrainerConfig(**kwargs))
