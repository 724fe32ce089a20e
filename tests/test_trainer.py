"""The GRPO trainer: one step against the materializing reference, resume, rewards, checkpoints, the CLI.

Models here are tiny (2 layers, hidden 32) so the whole file runs in well under a minute on CPU.
"""

import copy
import json
import math
import random

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    GraniteConfig,
    LlamaConfig,
)

import grpo_kernels as gk
from grpo_kernels.trainer import (
    ArithmeticTask,
    GRPOTrainer,
    HeadSpec,
    TrainerConfig,
    build_tokenizer,
    digit_match,
    exact_match,
    latest_checkpoint,
    lm_head,
    load_model_and_tokenizer,
)
from grpo_kernels.trainer.checkpoint import write_checkpoint
from grpo_kernels.trainer.cli import main
from grpo_kernels.trainer.model import ASSETS

TASK = ArithmeticTask(max_operand=9, num_eval=10, pad_answer=False)


def tiny_model(tokenizer, seed: int = 0, **config):
    """A 2-layer Llama with tied embeddings over the built-in tokenizer (``config`` overrides LlamaConfig fields)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id), **config})
    return AutoModelForCausalLM.from_config(cfg)


def spread_reward(prompts, completions, **_):
    """A reward that differs between almost any two completions, so every group has advantages."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def small_config(out_dir, **changes) -> TrainerConfig:
    base = dict(out_dir=str(out_dir), steps=4, prompts_per_step=4, num_generations=4, max_new_tokens=3,
                learning_rate=1e-2, warmup_steps=1, warmup_from_zero=False, save_steps=0, eval_steps=0)
    return TrainerConfig(**{**base, **changes})


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_one_step_matches_reference_path(tmp_path, tokenizer):
    """Fused kernels (no logits) vs the materializing oracle: same batch, same start, same parameters after."""
    cfg = small_config(tmp_path, num_iterations=2, gradient_accumulation_steps=2, beta=0.1, temperature=0.8,
                       lr_scheduler="constant", warmup_steps=0)
    model = tiny_model(tokenizer)
    train_rows, _ = TASK.split()
    fused = GRPOTrainer(cfg, copy.deepcopy(model), tokenizer, train_rows, [spread_reward])
    oracle = GRPOTrainer(cfg.replace(backend="reference"), copy.deepcopy(model), tokenizer, train_rows, [spread_reward])
    batch = fused.sample()
    advantages = fused.advantages(fused.rewards(batch))
    assert bool((advantages != 0).any())
    start = params(fused.model)
    m_fused = fused.update(batch, advantages)
    m_oracle = oracle.update(batch, advantages)
    moved = 0.0
    for p0, pf, po in zip(start, fused.model.parameters(), oracle.model.parameters()):
        # Adam divides by |grad|, so a rounding-level gradient difference on a near-zero gradient can move
        # a weight by a small fraction of one step (lr = 1e-2): 1e-4 is 1% of a step.
        torch.testing.assert_close(pf.detach(), po.detach(), rtol=1e-4, atol=1e-4)
        moved = max(moved, float((pf.detach() - p0).abs().max()))
    assert moved > 1e-3  # the step really changed the model
    for key in ("loss", "kl", "clip_ratio/region_mean"):
        assert math.isclose(m_fused[key], m_oracle[key], rel_tol=1e-4, abs_tol=1e-6), key


def test_resume_continues_exactly(tmp_path, tokenizer):
    """Train 4 steps straight vs 2 steps, checkpoint, a fresh process-like restart, 2 more: same parameters."""
    train_rows, _ = TASK.split()
    cfg = small_config(tmp_path / "straight", beta=0.05, num_iterations=2, save_steps=2)
    straight = GRPOTrainer(cfg, tiny_model(tokenizer), tokenizer, train_rows, [spread_reward])
    straight.train(progress=False)

    cfg_b = cfg.replace(out_dir=str(tmp_path / "interrupted"))
    first = GRPOTrainer(cfg_b, tiny_model(tokenizer), tokenizer, train_rows, [spread_reward])
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    torch.manual_seed(1234)  # scramble every RNG: resume must restore them
    random.seed(1234)
    resumed = GRPOTrainer(cfg_b, tiny_model(tokenizer, seed=7), tokenizer, train_rows, [spread_reward])
    ckpt = resumed.load_checkpoint(tmp_path / "interrupted")
    assert ckpt.name.endswith("00000002") and resumed.step == 2
    resumed.train(progress=False)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.ref_model.parameters(), resumed.ref_model.parameters()):
        assert torch.equal(a, b)


def test_raising_reward_function_is_named(tmp_path, tokenizer):
    def broken_reward(prompts, completions, **_):
        raise KeyError("no such column")

    trainer = GRPOTrainer(small_config(tmp_path), tiny_model(tokenizer), tokenizer, TASK.split()[0],
                          [exact_match, broken_reward])
    with pytest.raises(RuntimeError, match="reward function 'broken_reward' raised KeyError"):
        trainer.train_step()


def test_bad_reward_values_are_named(tmp_path, tokenizer):
    def short_reward(prompts, completions, **_):
        return [1.0]

    def text_reward(prompts, completions, **_):
        return ["yes"] * len(completions)

    for fn, error in ((short_reward, ValueError), (text_reward, TypeError)):
        trainer = GRPOTrainer(small_config(tmp_path), tiny_model(tokenizer), tokenizer, TASK.split()[0], [fn])
        with pytest.raises(error, match=fn.__name__):
            trainer.train_step()


def test_unscorable_rewards_count_as_missing(tmp_path, tokenizer):
    """None from one function leaves the others' rewards in charge; all None gives zero advantage."""
    def sometimes(prompts, completions, **_):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    def never(prompts, completions, **_):
        return [None] * len(completions)

    trainer = GRPOTrainer(small_config(tmp_path), tiny_model(tokenizer), tokenizer, TASK.split()[0], [sometimes, never])
    rewards = trainer.rewards(trainer.sample())
    assert torch.isnan(rewards[1::2, 0]).all() and (rewards[0::2, 0] == 1).all() and torch.isnan(rewards[:, 1]).all()
    assert (trainer.advantages(rewards) == 0).all()


def test_short_run_raises_reward(tmp_path, tokenizer):
    """A few dozen steps on single-digit addition with the partial-credit reward: the reward goes up."""
    cfg = small_config(tmp_path, steps=60, prompts_per_step=8, num_generations=8, learning_rate=3e-3, warmup_steps=2,
                       lr_scheduler="constant", beta=0.0)
    trainer = GRPOTrainer(cfg, tiny_model(tokenizer), tokenizer, TASK.split()[0], [exact_match, digit_match])
    rewards = [trainer.train_step()["reward"] for _ in range(cfg.steps)]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    # Seeds 0-4 all end above 0.18 from about 0.05; the margin leaves room for other backends' rounding.
    assert last > first + 0.08 and last > 2 * first, rewards


def test_non_finite_loss_skips_the_update(tmp_path, tokenizer, capsys):
    trainer = GRPOTrainer(small_config(tmp_path), tiny_model(tokenizer), tokenizer, TASK.split()[0], [spread_reward])
    loss_fn = trainer.loss_fn
    calls = []

    def nan_first(*args, **kwargs):
        out = loss_fn(*args, **kwargs)
        if not calls:
            out.loss = out.loss * float("nan")
        calls.append(1)
        return out

    trainer.loss_fn = nan_first
    before = params(trainer.model)
    record = trainer.train_step()
    assert record["skipped_updates"] == 1 and not math.isfinite(record["loss"])
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert "update skipped" in capsys.readouterr().out
    record = trainer.train_step()
    assert record["skipped_updates"] == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_interrupted_checkpoint_write_keeps_the_last_good_one(tmp_path):
    root = tmp_path / "checkpoints"

    def good(d):
        (d / "state.json").write_text(json.dumps({"format": 1}))

    def killed(d):
        (d / "state.json").write_text("{\"form")
        raise KeyboardInterrupt

    first = write_checkpoint(root, 1, good, keep=2)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(root, 2, killed, keep=2)
    assert latest_checkpoint(tmp_path) == first
    write_checkpoint(root, 3, good, keep=2)
    write_checkpoint(root, 4, good, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize("kind", ["llama_tied", "gemma2_softcap", "cohere_logit_scale", "granite_logits_scaling"])
def test_head_spec_reproduces_the_model_logits(kind):
    """Kernel temperature / soft-cap from HeadSpec give exactly log_softmax(model logits / T)."""
    small = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=16)
    cfg = {
        "llama_tied": lambda: LlamaConfig(**small, tie_word_embeddings=True),
        "gemma2_softcap": lambda: Gemma2Config(**small, head_dim=16, final_logit_softcapping=2.0),
        "cohere_logit_scale": lambda: CohereConfig(**small, logit_scale=0.25),
        "granite_logits_scaling": lambda: GraniteConfig(**small, logits_scaling=3.0),
    }[kind]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # make the head's logits large enough for the soft-cap and scales to matter
        lm_head(model)[0].mul_(20.0)
    ids = torch.randint(0, 40, (3, 9))
    T = 0.7
    with torch.no_grad():
        logits = model(ids).logits.float() / T
        want = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        hidden = model.base_model(ids).last_hidden_state[:, :-1]
        weight, bias = lm_head(model)
        temperature, softcap = HeadSpec.of(model).kernel_options(T)
        got = gk.linear_logprobs(hidden, weight, ids[:, 1:], bias=bias, temperature=temperature, softcap=softcap)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_shipped_tokenizer_is_the_built_one():
    shipped = json.loads((ASSETS / "tokenizer.json").read_text())
    assert shipped == json.loads(build_tokenizer().to_str())


def test_untrained_model_scores_under_five_percent():
    """The main job's starting point: the built-in model at random init, greedy on the held-out prompts."""
    model, tokenizer = load_model_and_tokenizer(None, seed=0)
    train_rows, eval_rows = ArithmeticTask().split()
    trainer = GRPOTrainer(TrainerConfig(), model, tokenizer, train_rows, [exact_match], eval_rows=eval_rows,
                          eval_fn=exact_match)
    assert trainer.evaluate() < 0.05


def test_task_split_is_disjoint_and_answers_are_right():
    task = ArithmeticTask()
    train_rows, eval_rows = task.split()
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows}
    assert len(eval_rows) == task.num_eval
    for row in eval_rows[:50]:
        a, b = row["prompt"].rstrip("=").split("+")
        assert int(row["answer"]) == int(a) + int(b)
    assert exact_match([], [" 52", "52", "5"], answer=["52", "052", "5"]) == [1.0, 0.0, 1.0]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_generations"):
        TrainerConfig(num_generations=1)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        TrainerConfig(prompts_per_step=3, num_generations=3, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="dtype"):
        TrainerConfig(dtype="fp8")
    with pytest.raises(ValueError, match="epsilon_high"):
        TrainerConfig(loss_type="cispo")


def test_cli_trains_checkpoints_plots_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--out", str(out), "--prompts-per-step", "2", "--num-generations", "2", "--num-eval", "8",
             "--eval-steps", "1", "--no-progress"]
    assert main(["train", "--steps", "2", *flags]) == 0
    text = capsys.readouterr().out
    assert "held-out greedy accuracy" in text and str(out / "metrics.png") in text
    assert (out / "metrics.png").stat().st_size > 0
    assert latest_checkpoint(out).name == "step_00000002"
    assert main(["train", "--resume", str(out), "--steps", "3", "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward" in r] == [1, 2, 3]
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", "--steps", "1", *flags])
