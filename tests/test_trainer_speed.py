"""The trainer's faster paths and TRL-matching options: shared-prompt sampling and forwards, prompt
passes, the warm-up start, the thread default, and the vs_trl.py harness's arguments.

Models are tiny (2 layers, hidden 32); the file runs in seconds on CPU.
"""

import math

import pytest
import torch
from transformers import GenerationConfig

from grpo_kernels.trainer import GRPOTrainer, TrainerConfig, cli, completion_hidden
from grpo_kernels.trainer.sampling import sample_completions
from grpo_kernels.trainer.trainer import lr_factor, pass_order

import test_trainer as trainer_tests



def tiny_model(tokenizer, seed: int = 0):
    """test_trainer's tiny Llama in eval mode, with room for longer prompts and larger initial logits."""
    return trainer_tests.tiny_model(tokenizer, seed, max_position_embeddings=64, initializer_range=0.1).eval()


# Prompts of different lengths, so the batch is left-padded.
PROMPTS = ["1+2=", "07+45=", "3*3=", "12-9=", "0+0=", "49+49=", "5-7=", "8*1="]


def encode(tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("max_new_tokens", [1, 2, 6])
def test_shared_prompt_greedy_decoding_is_generate(tokenizer, max_new_tokens):
    """Greedy: exactly transformers' generate on the prompts repeated G times (left padding, EOS, pad after it)."""
    model = tiny_model(tokenizer)
    G, eos = 3, tokenizer.eos_token_id
    ids, mask = encode(tokenizer, PROMPTS)
    ours = sample_completions(model, ids, mask, group_size=G, max_new_tokens=max_new_tokens, eos_ids=torch.tensor([eos]),
                              pad_id=tokenizer.pad_token_id, do_sample=False)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id)
    theirs = model.generate(input_ids=ids.repeat_interleave(G, 0), attention_mask=mask.repeat_interleave(G, 0),
                            generation_config=config)
    assert torch.equal(ours, theirs)


def _warped_probs(logits, temperature, top_p):
    """The distribution generate samples from: transformers' own temperature and top-p warpers, then softmax."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone()) if temperature != 1.0 else logits
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


def _assert_frequencies(draws, probs):
    """Empirical frequencies of ``draws`` against exact ``probs``: within 5 sigma each; impossible ones never."""
    n = draws.shape[0]
    freq = torch.bincount(draws, minlength=probs.shape[0]).double() / n
    p = probs.double()
    assert (freq[p == 0] == 0).all(), "a token of probability 0 was drawn"
    sigma = (p * (1 - p) / n).sqrt()
    worst = ((freq - p).abs() / (sigma + 1e-12))[p > 0].max()
    assert worst < 5, f"frequency off by {worst:.1f} sigma"


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (1.3, 0.8), (0.5, 0.6)],
                         ids=["plain", "temp1.3-top_p0.8", "temp0.5-top_p0.6"])
def test_next_token_draws_from_generates_distribution(seed, temperature, top_p):
    """Inverse-CDF draws follow the distribution of transformers' warpers + softmax; filtered tokens never come up."""
    from grpo_kernels.trainer.sampling import next_tokens

    logits = torch.randn(3, 11) * 2
    logits[0, 4] = -float("inf")
    probs = _warped_probs(logits, temperature, top_p)
    n = 40_000
    draws = next_tokens(logits.repeat_interleave(n, 0), do_sample=True, temperature=temperature, top_p=top_p)
    for row in range(3):
        _assert_frequencies(draws[row * n:(row + 1) * n], probs[row])


def test_shared_prompt_sampler_draws_from_the_model(tokenizer, seed):
    """Whole completions (2 tokens, EOS and padding included) follow the model's exact sequence distribution,
    computed with full forwards and transformers' warpers: the shared cache, positions and padding are right."""
    model = tiny_model(tokenizer, seed=seed % 1000)
    V, eos, pad = len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id
    with torch.no_grad():
        model.get_output_embeddings().weight[eos] += 0.5  # EOS often enough to test the padding after it
    temperature, top_p, G = 1.2, 0.9, 30_000
    ids, mask = encode(tokenizer, ["1+2=", "07+45="])  # different lengths: the short one is left-padded
    out = sample_completions(model, ids, mask, group_size=G, max_new_tokens=2, eos_ids=torch.tensor([eos]), pad_id=pad,
                             do_sample=True, temperature=temperature, top_p=top_p)
    P = ids.shape[1]
    for i in range(ids.shape[0]):
        prompt = ids[i][mask[i].bool()]
        with torch.no_grad():
            p1 = _warped_probs(model(prompt[None]).logits[:, -1].float(), temperature, top_p)[0]
            seconds = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)
            p2 = _warped_probs(model(seconds).logits[:, -1].float(), temperature, top_p)
        exact = (p1[:, None] * p2).flatten()  # outcome t1 * V + t2
        exact.view(V, V)[eos] = 0
        exact.view(V, V)[eos, pad] = p1[eos]  # after EOS the row is padded
        rows = out[i * G:(i + 1) * G, P:]
        _assert_frequencies(rows[:, 0] * V + rows[:, 1], exact)


def _completion_batch(tokenizer, G, shuffle=False):
    ids, mask = encode(tokenizer, PROMPTS[:4])
    ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    completions = torch.randint(4, len(tokenizer), (ids.shape[0], 3))
    ids, mask = torch.cat([ids, completions], 1), torch.cat([mask, torch.ones_like(completions)], 1)
    if shuffle:
        order = torch.randperm(ids.shape[0])
        ids, mask = ids[order], mask[order]
    return ids, mask, ids.shape[1] - 3


@pytest.mark.parametrize("shuffle", [False, True], ids=["grouped", "not-grouped-falls-back"])
def test_shared_prompt_forward_matches_full_forward(tokenizer, seed, shuffle):
    """completion_hidden with group_size: the same hidden states and parameter gradients as the full forward.

    The shared path sums each prompt's gradient over its G copies in another order (and transformers'
    RMSNorm runs in float32 whatever the model's dtype), so gradients agree to float32 round-off:
    checked norm-wise per tensor; a wrong position, mask or repeat is an O(1) error."""
    model = tiny_model(tokenizer, seed=seed % 1000)
    G = 4
    ids, mask, P = _completion_batch(tokenizer, G, shuffle)
    weights = torch.randn(ids.shape[0], ids.shape[1] - P, model.config.hidden_size)
    out = {}
    for g in (1, G):
        model.zero_grad(set_to_none=True)
        h = completion_hidden(model, ids, mask, P, group_size=g)
        (h * weights).sum().backward()
        out[g] = (h.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(out[G][0], out[1][0], rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), out[G][1], out[1][1]):
        rel = float((a - b).norm() / b.norm().clamp(min=1e-30))
        assert rel < 2e-5, f"{name}: gradient differs by {rel:.1e} (norm-wise)"


def test_shared_prompt_forward_with_one_completion_token(tokenizer):
    """T = 1: only the prompt runs (its last position predicts the one token)."""
    model = tiny_model(tokenizer)
    ids, mask = encode(tokenizer, PROMPTS[:3])
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    tok = torch.randint(4, len(tokenizer), (ids.shape[0], 1))
    ids, mask, P = torch.cat([ids, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1), ids.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(completion_hidden(model, ids, mask, P, group_size=2),
                                   completion_hidden(model, ids, mask, P), rtol=1e-5, atol=1e-5)


def spread_reward(prompts, completions, **_):
    return [float(sum(map(ord, c)) % 7) for c in completions]


def _trainer(tokenizer, tmp_path, **changes):
    base = dict(out_dir=str(tmp_path), steps=6, prompts_per_step=4, num_generations=4, max_new_tokens=3,
                learning_rate=1e-2, warmup_steps=2, save_steps=0, eval_steps=0, seed=5)
    rows = [{"prompt": p} for p in PROMPTS]
    return GRPOTrainer(TrainerConfig(**{**base, **changes}), tiny_model(tokenizer), tokenizer, rows, [spread_reward])


def test_share_prompts_trains_like_the_repeated_path(tmp_path, tokenizer):
    """One batch, two updates with share_prompts on and off: the same parameters after (to round-off)."""
    trainers = {share: _trainer(tokenizer, tmp_path / str(share), share_prompts=share) for share in (True, False)}
    batch = trainers[False].sample()
    advantages = trainers[False].advantages(trainers[False].rewards(batch))
    assert advantages.abs().sum() > 0
    for trainer in trainers.values():
        for _ in range(2):
            trainer.update(batch, advantages)
    for a, b in zip(trainers[True].model.parameters(), trainers[False].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.equal(next(trainers[True].model.parameters()), next(tiny_model(tokenizer).parameters()))


def test_prompt_passes_cover_every_row_once_per_pass(tmp_path, tokenizer):
    """prompt_sampling="passes": consecutive slots walk shuffled passes; each pass is a permutation of the rows."""
    trainer = _trainer(tokenizer, tmp_path, prompt_sampling="passes", prompts_per_step=3, steps=40)
    n = len(trainer.train_rows)
    slots = []
    for step in range(16):  # 48 slots: 6 passes of 8 rows, and steps that straddle two passes
        trainer.step = step
        slots += trainer._prompt_indices()
    for k in range(len(slots) // n):
        assert sorted(slots[k * n:(k + 1) * n]) == list(range(n)), f"pass {k} is not a permutation"
        assert slots[k * n:(k + 1) * n] == pass_order(5, k, n)
    assert len({tuple(slots[k * n:(k + 1) * n]) for k in range(len(slots) // n)}) > 1, "passes should be reshuffled"
    trainer.step = 7  # a function of the step alone: a resumed run draws what the uninterrupted one did
    assert trainer._prompt_indices() == slots[21:24]


def test_prompt_sampling_with_replacement_is_unchanged(tmp_path, tokenizer):
    """"replacement" (the default before passes) draws prompts_per_step uniform indices from the trainer's generator."""
    trainer = _trainer(tokenizer, tmp_path, prompt_sampling="replacement")
    want = torch.randint(len(PROMPTS), (4,), generator=torch.Generator().manual_seed(5)).tolist()
    assert trainer._prompt_indices() == want


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_warmup_schedule_starts_at_zero_as_transformers(tmp_path, tokenizer):
    """warmup_from_zero: the rate of every update is transformers' cosine-with-warm-up (TRL's); default starts at 1/warmup."""
    from transformers import get_cosine_schedule_with_warmup

    assert [lr_factor(u, 4, 20, "cosine") for u in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [lr_factor(u, 4, 20, "cosine", from_zero=True) for u in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    steps, warmup, lr = 12, 3, 1e-2
    trainer = _trainer(tokenizer, tmp_path, warmup_from_zero=True, steps=steps, warmup_steps=warmup, learning_rate=lr)
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    ref = get_cosine_schedule_with_warmup(ref_opt, warmup, steps)
    for _ in range(steps):
        assert math.isclose(trainer.optimizer.param_groups[0]["lr"], ref_opt.param_groups[0]["lr"], rel_tol=1e-12,
                            abs_tol=1e-15)
        trainer.scheduler.step()
        ref.step()


def test_default_threads_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert cli.default_threads() == 3

    def unavailable(pid):
        raise OSError("no affinity")
    monkeypatch.setattr(cli.os, "sched_getaffinity", unavailable, raising=False)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 7)
    assert cli.default_threads() == 7


class _Stop(Exception):
    pass


@pytest.mark.parametrize("flag,want", [([], 3), (["--threads", "1"], 1)], ids=["default-all-cores", "explicit"])
def test_train_command_sets_the_thread_count(tmp_path, monkeypatch, flag, want):
    """The main job runs on every available core unless --threads says otherwise (the built-in model too)."""
    seen = {}
    monkeypatch.setattr(cli, "default_threads", lambda: 3)
    monkeypatch.setattr(cli.torch, "set_num_threads", lambda n: seen.setdefault("threads", n))

    def stop(*a, **k):
        raise _Stop
    monkeypatch.setattr(cli, "load_model_and_tokenizer", stop)
    with pytest.raises(_Stop):
        cli.main(["train", "--out", str(tmp_path / "run"), *flag])
    assert seen["threads"] == want


def test_train_command_refuses_zero_threads(tmp_path):
    with pytest.raises(SystemExit, match="--threads must be an int >= 1; got 0"):
        cli.main(["train", "--out", str(tmp_path / "run"), "--threads", "0"])


def test_boolean_options_are_on_off_flags():
    parse = cli.build_parser().parse_args
    assert parse(["train", "--no-share-prompts"]).share_prompts is False
    assert parse(["train", "--warmup-from-zero"]).warmup_from_zero is True
    assert "share_prompts" not in vars(parse(["train"]))  # not given: the config's default (or the resumed run's)
    with pytest.raises(ValueError, match="TrainerConfig: share_prompts must be True or False; got 1"):
        TrainerConfig(share_prompts=1)
    with pytest.raises(ValueError, match="TrainerConfig: prompt_sampling must be one of replacement, passes"):
        TrainerConfig(prompt_sampling="shuffle")


# ------------------------------------------------------------------ benchmarks/vs_trl.py


def test_vs_trl_defaults_and_ours_config(vs_trl):
    args = vs_trl.parse_args([])
    assert (args.seeds, args.steps, args.threads, args.trainers) == ([0, 1, 2, 3, 4], 2000, 2, list(vs_trl.TRAINERS))
    args = vs_trl.parse_args(["--seeds", "3", "--steps", "30", "--trainers", "ours", "trl",
                              "--ours-flags", "--prompt-sampling passes --warmup-from-zero"])
    assert (args.seeds, args.steps, args.trainers) == ([3], 30, ["ours", "trl"])
    config = vs_trl.ours_config(args.ours_flags, seed=3, steps=30)
    for name, value in vs_trl.SHARED.items():
        assert getattr(config, name) == value, name
    assert (config.seed, config.steps, config.prompt_sampling, config.warmup_from_zero) == (3, 30, "passes", True)
    assert config.eval_steps == 0 and config.save_steps == 0  # evaluation is the harness's, for both trainers


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps must be an int >= 1; got 0"),
    (["--threads", "0"], "--threads must be an int >= 1; got 0"),
    (["--seeds", "1", "1"], "--seeds must be distinct ints >= 0"),
    (["--eval-every", "-5"], "--eval-every must be an int >= 0"),
    (["--trainers", "liger"], "invalid choice: 'liger'"),
    (["--ours-flags", "--prompt-sampling nope"], "--ours-flags '--prompt-sampling nope'"),
], ids=["steps", "threads", "seeds", "eval-every", "trainer", "ours-flags"])
def test_vs_trl_rejects_bad_arguments(vs_trl, capsys, argv, message):
    with pytest.raises(SystemExit):
        vs_trl.parse_args(argv)
    assert message in capsys.readouterr().err


def test_vs_trl_table(vs_trl):
    def run(trainer, seed, acc, wall):
        return {"trainer": trainer, "seed": seed, "accuracy": acc, "wall_s": wall, "median_step_s": wall / 100,
                "peak_rss_mb": 500.0}
    results = [run("ours", 0, 0.9, 100), run("trl", 0, 0.8, 200), run("ours", 1, 0.7, 110),
               {"trainer": "trl", "seed": 1, "error": "boom"}]
    text = vs_trl.table(results, ["ours", "trl"], [0, 1])
    lines = text.splitlines()
    assert lines[2] == "| 0 | 0.900, 100 s (1000 ms/step, 500 MB) | 0.800, 200 s (2000 ms/step, 500 MB) |"
    assert lines[3].endswith("| failed |")
    assert lines[4] == "| mean | 0.800, 105 s | 0.800, 200 s |"
    assert lines[5] == "| ours' wall time / column's | 1.00x | 0.53x |"


def test_vs_trl_large_head_model(vs_trl):
    model, tokenizer = vs_trl.build_model(0, large_head=True)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.shape == embed.shape == (vs_trl.LARGE_VOCAB, model.config.hidden_size)
    assert head.data_ptr() != embed.data_ptr() and torch.equal(head, embed)  # untied, same start
    assert model.config.tie_word_embeddings is False
    small, _ = vs_trl.build_model(0, large_head=False)
    torch.testing.assert_close(embed[: len(tokenizer)], small.get_input_embeddings().weight)
