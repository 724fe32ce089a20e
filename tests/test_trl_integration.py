"""grpo_kernels.integrations.trl.GRPOTrainer against trl.GRPOTrainer: same step, same numbers.

Tiny Qwen2 (tied head) and Llama (untied) models are built from a config and saved to a temporary
directory (TRL loads the reference model from the model's path); nothing is downloaded. Completions
come from a deterministic ``rollout_func``, so both trainers train on identical data; it also returns
sampler log-probs (the model's own plus noise), which is how the vLLM importance-sampling modes are
exercised without vLLM. Each case runs the same steps with both trainers from the same seed, with
plain SGD (so a gradient difference shows in the parameters) and no gradient clipping, and compares
every logged number, the gradient norm and every parameter after the steps.

The grid covers every value of every axis (loss_type, beta, importance_sampling_level,
num_iterations, gradient accumulation, top_entropy_quantile, temperature, scale_rewards, tied /
untied head, the four IS modes, off-policy mask, delta, entropy bonus, head transforms) without the
full product.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import grpo_kernels as gk
from grpo_kernels.trainer.model import ASSETS
from grpo_kernels.trainer.parallel import exit_rank

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

try:  # the TRL tests need the optional extra: pip install 'grpo_kernels[trl]'
    import datasets
    import trl

    from grpo_kernels.integrations.trl import GRPOTrainer as KernelTrainer
    TRL_MISSING = None
except ImportError as exc:
    TRL_MISSING = f"trl integration unavailable ({exc}); pip install 'grpo_kernels[trl]'"
needs_trl = pytest.mark.skipif(TRL_MISSING is not None, reason=TRL_MISSING or "")


# ------------------------------------------------------------------ grpo_kernels.sampling (no trl needed)
def _fresh(B: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    sampler = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return logp, sampler, mask


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("bounds", [(None, 3.0), (0.5, 2.0), (0.8, None)], ids=["max3", "0.5-2", "min0.8"])
def test_importance_sampling_ratio_matches_definition(mode, bounds):
    lo, hi = bounds
    logp, sampler, mask = _fresh(6, 9, seed=hash((mode, bounds)) % 1000)
    sampler[0, 0] = float("nan")  # a token the sampler could not score: no correction
    got = gk.importance_sampling_ratio(logp.float(), sampler.float(), mask, mode=mode, clip_min=lo, clip_max=hi)
    d = torch.where(mask.bool() & ~sampler.isnan(), logp - sampler, torch.zeros_like(logp))
    d = d.sum(-1, keepdim=True) if mode.startswith("sequence") else d
    r = d.exp()
    lo_, hi_ = (-math.inf if lo is None else lo), (math.inf if hi is None else hi)
    want = r.clamp(lo_, hi_) if mode.endswith("truncate") else torch.where((r < lo_) | (r > hi_), 0.0, r)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_off_policy_sequence_mask_matches_definition():
    logp, sampler, mask = _fresh(8, 7, seed=5)
    adv = torch.randn(8, dtype=torch.float64)
    got = gk.off_policy_sequence_mask(adv.float(), logp.float(), sampler.float(), mask, 0.05)
    m = mask.double()
    kl = ((sampler - logp) * m).sum(-1) / m.sum(-1).clamp(min=1)
    want = ((adv >= 0) | (kl <= 0.05)).double()
    assert got.shape == (8,)  # the advantages' shape, so advantages * got stays [B]
    torch.testing.assert_close(got.double(), want)


@pytest.mark.parametrize("call, match", [
    (lambda l, s, m: gk.importance_sampling_ratio(l, s, m, mode="token"), "mode must be one of"),
    (lambda l, s, m: gk.importance_sampling_ratio(l, s, m, mode="token_truncate", clip_max=None), "clip_min or clip_max"),
    (lambda l, s, m: gk.importance_sampling_ratio(l, s, m, clip_min=2.0, clip_max=1.0), "clip_min must be < clip_max"),
    (lambda l, s, m: gk.importance_sampling_ratio(l, s[:, :-1], m), "sampler_logp must have the shape"),
    (lambda l, s, m: gk.importance_sampling_ratio(l.long(), s, m), "logp must have a floating dtype"),
    (lambda l, s, m: gk.off_policy_sequence_mask(torch.zeros(3), l, s, m, 0.1), "advantages must be"),
    (lambda l, s, m: gk.off_policy_sequence_mask(torch.zeros(4), l, s, m, float("nan")), "threshold must be"),
], ids=["mode", "no-bounds", "bounds-order", "shape", "dtype", "adv-shape", "threshold"])
def test_sampling_validation(call, match):
    logp, sampler, mask = _fresh(4, 5, seed=1)
    with pytest.raises((ValueError, TypeError), match=match):
        call(logp.float(), sampler.float(), mask)

VOCAB = 40  # the model's vocabulary; the character tokenizer uses ids 0..17
MAX_COMPLETION = 8
PROMPTS = ["12+3=", "7*8=", "40-9=", "3+3=", "99-1=", "5*5=", "1+0=", "6-4="]


def _config(arch: str):
    from transformers import (CohereConfig, Gemma2Config, LlamaConfig, PhiConfig, Qwen2Config)

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":  # tied embeddings
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "llama":  # untied head
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "gemma2":  # final-logit soft-capping (and a tied head)
        return Gemma2Config(**common, head_dim=16, final_logit_softcapping=3.0, tie_word_embeddings=True)
    if arch == "cohere":  # logit_scale
        return CohereConfig(**common, logit_scale=0.5, tie_word_embeddings=True)
    if arch == "phi":  # LM-head bias
        return PhiConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"}, tie_word_embeddings=False)
    raise ValueError(arch)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            path = tmp_path_factory.mktemp(arch)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_config(arch), dtype=torch.float32)
            if arch == "phi":  # a visible bias
                with torch.no_grad():
                    model.lm_head.bias.normal_(0, 0.5)
            model.save_pretrained(path)
            tok = AutoTokenizer.from_pretrained(ASSETS)
            tok.pad_token = "<pad>"
            tok.eos_token = "<eos>"
            tok.save_pretrained(path)
            cache[arch] = str(path)
        return cache[arch]

    return get


def rollout(prompts: list[str], trainer) -> dict[str, Any]:
    """Deterministic completions (ids 4..17, some ending in <eos>) and noisy sampler log-probs."""
    tok = trainer.processing_class
    prompt_ids, completion_ids, logprobs = [], [], []
    model = trainer.model
    seen: dict[str, int] = {}
    for p in prompts:
        # seeded by the prompt and its repeat index, so a rank of a DDP run sees what one process sees
        i = seen[p] = seen.get(p, -1) + 1
        g = torch.Generator().manual_seed(1000 * len(p) + sum(map(ord, p)) * 7 + i)
        ids = tok(p)["input_ids"]
        n = int(torch.randint(2, MAX_COMPLETION + 1, (1,), generator=g))
        comp = torch.randint(4, 18, (n,), generator=g).tolist()
        if torch.rand((), generator=g) < 0.5:
            comp[-1] = 2
        with torch.no_grad():
            x = torch.tensor([ids + comp])
            logits = model(input_ids=x).logits[0, len(ids) - 1 : -1].float() / trainer.temperature
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(comp)[:, None])[:, 0]
        lp = lp + 0.3 * torch.randn(n, generator=g)
        prompt_ids.append(ids)
        completion_ids.append(comp)
        logprobs.append(lp.tolist())
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}


def reward_digits(prompts, completions, **_):
    return [float(sum(c.isdigit() for c in s)) - 0.3 * len(s) for s in completions]


def reward_len(prompts, completions, **_):
    return [1.0 / (1 + len(s)) for s in completions]


@dataclass(frozen=True)
class Case:
    id: str
    arch: str = "qwen2"
    loss_type: str = "grpo"
    beta: float = 0.0
    level: str = "token"
    iters: int = 1
    ga: int = 1
    extra: dict = field(default_factory=dict)
    is_mode: Optional[str] = None  # feed sampler log-probs as vLLM would
    steps: Optional[int] = None
    lora: bool = False  # train a LoRA adapter (peft_config); the reference is the adapter-free model

    def __hash__(self):
        return hash(self.id)


CASES = [
    Case("grpo-b0-tok-it1-ga1-tied", "qwen2", "grpo", 0.0, "token", 1, 1),
    Case("grpo-b.1-seq-it2-ga2-untied-T0.7", "llama", "grpo", 0.1, "sequence", 2, 2, {"temperature": 0.7}),
    Case("bnpo-b.1-tok-it2-ga1-untied-topH0.5", "llama", "bnpo", 0.1, "token", 2, 1, {"top_entropy_quantile": 0.5}),
    Case("bnpo-b0-seq-it1-ga2-tied-scale_none", "qwen2", "bnpo", 0.0, "sequence", 1, 2, {"scale_rewards": "none"}),
    Case("dr_grpo-b.1-tok-it1-ga2-untied-T1.3", "llama", "dr_grpo", 0.1, "token", 1, 2, {"temperature": 1.3}),
    Case("dr_grpo-b0-seq-it2-ga1-tied", "qwen2", "dr_grpo", 0.0, "sequence", 2, 1),
    Case("dapo-b0-tok-it2-ga2-tied-scale_batch", "qwen2", "dapo", 0.0, "token", 2, 2, {"scale_rewards": "batch"}),
    Case("dapo-b.1-seq-it1-ga1-untied-topH0.3", "llama", "dapo", 0.1, "sequence", 1, 1, {"top_entropy_quantile": 0.3}),
    Case("cispo-b.1-tok-it2-ga1-untied-cap1.05", "llama", "cispo", 0.1, "token", 2, 1, {"epsilon_high": 1.05}),
    Case("cispo-b0-tok-it1-ga2-tied-entropy", "qwen2", "cispo", 0.0, "token", 1, 2, {"epsilon_high": 5.0, "entropy_coef": 0.05}),
    Case("sapo-b.1-tok-it1-ga1-tied-T0.7", "qwen2", "sapo", 0.1, "token", 1, 1, {"temperature": 0.7}),
    Case("sapo-b0-tok-it2-ga2-untied", "llama", "sapo", 0.0, "token", 2, 2),
    Case("luspo-b0-seq-it2-ga1-untied", "llama", "luspo", 0.0, "sequence", 2, 1),
    Case("luspo-b.1-tok-it1-ga2-tied", "qwen2", "luspo", 0.1, "token", 1, 2),
    Case("vespo-b0-tok-it2-ga1-tied", "qwen2", "vespo", 0.0, "token", 2, 1),
    Case("vespo-b.1-tok-it1-ga2-untied-IS_token_truncate", "llama", "vespo", 0.1, "token", 1, 2, is_mode="token_truncate"),
    Case("grpo-IS_token_truncate-it2", "qwen2", "grpo", 0.1, "token", 2, 1, {"vllm_importance_sampling_clip_max": 1.5}, "token_truncate"),
    Case("dapo-IS_token_mask", "llama", "dapo", 0.0, "token", 1, 1,
         {"vllm_importance_sampling_clip_min": 0.7, "vllm_importance_sampling_clip_max": 1.4}, "token_mask"),
    Case("grpo-IS_sequence_truncate-seq", "qwen2", "grpo", 0.0, "sequence", 1, 2, {"vllm_importance_sampling_clip_max": 2.0}, "sequence_truncate"),
    Case("bnpo-IS_sequence_mask", "llama", "bnpo", 0.1, "token", 2, 1, {"vllm_importance_sampling_clip_min": 0.3}, "sequence_mask"),
    Case("grpo-off_policy_mask-it2", "qwen2", "grpo", 0.1, "token", 2, 1, {"off_policy_mask_threshold": 0.02}),
    Case("vespo-off_policy_mask-IS_token_mask", "llama", "vespo", 0.0, "token", 1, 1,
         {"off_policy_mask_threshold": 0.05, "vllm_importance_sampling_clip_max": 1.5}, "token_mask"),
    Case("grpo-delta-it2-no_bias_corr", "llama", "grpo", 0.1, "token", 2, 1, {"delta": 1.5, "use_bias_correction_kl": False}),
    Case("dapo-adaptive_entropy", "qwen2", "dapo", 0.0, "token", 1, 2,
         {"entropy_coef": 0.02, "use_adaptive_entropy": True, "entropy_target": 10.0}, steps=2),
    Case("grpo-steps_per_generation2", "llama", "grpo", 0.1, "token", 1, 1, {"steps_per_generation": 2}, steps=2),
    Case("grpo-cast_lm_head_fp32", "qwen2", "grpo", 0.1, "token", 2, 1, {"cast_lm_head_to_fp32": True}),
    Case("grpo-softcap-gemma2", "gemma2", "grpo", 0.1, "token", 2, 1, {"temperature": 0.8}),
    Case("dapo-logit_scale-cohere", "cohere", "dapo", 0.1, "token", 1, 1, {"temperature": 1.2}),
    Case("bnpo-bias-phi", "phi", "bnpo", 0.1, "token", 2, 1),
    Case("grpo-lora-b.1-it2", "llama", "grpo", 0.1, "token", 2, 1, lora=True),
]


def _args(case: Case, out: str, batch: int = 4):
    kw = dict(
        output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=3, data_seed=3,
        per_device_train_batch_size=batch, num_generations=4, gradient_accumulation_steps=case.ga,
        num_iterations=case.iters, max_steps=case.steps or max(case.iters, 1), logging_steps=1,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", max_grad_norm=1e9, weight_decay=0.0,
        loss_type=case.loss_type, beta=case.beta, importance_sampling_level=case.level,
        max_completion_length=MAX_COMPLETION, dataloader_num_workers=0, disable_tqdm=True,
    )
    kw.update(case.extra)
    if case.is_mode is not None:
        kw["vllm_importance_sampling_mode"] = case.is_mode
    return trl.GRPOConfig(**kw)


def _train(cls, case: Case, path: str, out: str, batch: int = 4):
    torch.manual_seed(0)
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    peft_config = None
    if case.lora:
        import peft

        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = cls(model=path, reward_funcs=[reward_digits, reward_len], args=_args(case, out, batch), train_dataset=ds,
                  rollout_func=rollout, peft_config=peft_config)
    if case.is_mode is not None:
        # what use_vllm=True would set up, minus the engine: the rollout's log-probs are the sampler's
        trainer.use_vllm = True
        trainer.vllm_importance_sampling_correction = True
        trainer._last_loaded_step = -1
        trainer.vllm_generation = type("NoEngine", (), {"sync_weights": lambda self: None})()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [{k: v for k, v in h.items() if isinstance(v, (int, float)) and "time" not in k and "runtime" not in k
             and "per_second" not in k and k != "total_flos"} for h in trainer.state.log_history]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    moved = max((params[n] - p).abs().max().item() for n, p in before.items())
    return logs, params, moved


def _close(a: float, b: float, rtol: float = 2e-4, atol: float = 2e-6) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= atol + rtol * abs(b)


@needs_trl
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_one_step_matches_trl(case: Case, model_dir, tmp_path, monkeypatch):
    path = model_dir(case.arch)
    ref_logs, ref_params, moved = _train(trl.GRPOTrainer, case, path, str(tmp_path / "trl"))

    class NoTRLHead:  # ours must never reach TRL's chunked head
        @staticmethod
        def apply(*args, **kwargs):
            raise AssertionError("trl's ChunkedLogProbFunction ran under the grpo_kernels trainer")

    monkeypatch.setattr(trl.trainer.utils, "_ChunkedLogProbFunction", NoTRLHead)
    calls = []
    fused_forward = gk.FusedLinearGRPOLoss.forward

    def spy(self, *args, **kwargs):
        calls.append(self.config.loss_type)
        return fused_forward(self, *args, **kwargs)

    monkeypatch.setattr(gk.FusedLinearGRPOLoss, "forward", spy)
    our_logs, our_params, _ = _train(KernelTrainer, case, path, str(tmp_path / "gk"))
    assert calls and set(calls) == {case.loss_type}  # the training loss is the fused one
    _compare(ref_logs, ref_params, our_logs, our_params)
    assert all("grad_norm" in r for r in ref_logs if "loss" in r) and any("loss" in r for r in ref_logs)
    # the step actually moved the parameters (SGD, lr 0.5), so the comparison above is not vacuous
    assert moved > 1e-4


@needs_trl
def test_unsupported_options_raise(model_dir, tmp_path):
    path = model_dir("qwen2")
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    refused = [
        ({"loss_type": "cispo", "importance_sampling_level": "sequence"}, "importance_sampling_level"),
        ({"top_entropy_quantile": 0.5, "entropy_coef": 0.1}, "top_entropy_quantile"),
        ({"epsilon": 1.5}, "epsilon"),
    ]
    for extra, option in refused:
        case = Case("refused", extra=extra)
        with pytest.raises(ValueError, match=option):
            KernelTrainer(model=path, reward_funcs=reward_len, args=_args(case, str(tmp_path)), train_dataset=ds,
                          rollout_func=rollout)


DDP_CASES = [Case("ddp-dapo-b.1-it2", "llama", "dapo", 0.1, "token", 2, 1), Case("ddp-grpo-seq-tied", "qwen2", "grpo", 0.1, "sequence", 1, 1)]


def _compare(ref_logs, ref_params, our_logs, our_params) -> None:
    assert len(ref_logs) == len(our_logs)
    for step, (r, o) in enumerate(zip(ref_logs, our_logs)):
        assert set(r) == set(o), f"step {step}: logged keys differ: {sorted(set(r) ^ set(o))}"
        bad = {k: (o[k], r[k]) for k in r if not _close(o[k], r[k])}
        assert not bad, f"step {step}: (ours, TRL) differ: {bad}"
    for name, p in ref_params.items():
        err = (our_params[name] - p).abs().max().item()
        assert err <= 1e-5 + 1e-4 * p.abs().max().item(), f"{name}: max |ours - TRL| = {err:.3g}"


@needs_trl
@pytest.mark.slow
def test_ddp_two_processes_match_one(model_dir, tmp_path):
    """Two gloo processes (4 completions each) through accelerate = trl.GRPOTrainer in one process (8)."""
    import subprocess
    import sys

    for case in DDP_CASES:
        path = model_dir(case.arch)
        out = tmp_path / case.id
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--ddp-worker", case.id, path, str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        our_logs, our_params = torch.load(out / "result.pt")
        ref_logs, ref_params, _ = _train(trl.GRPOTrainer, case, path, str(tmp_path / "trl"), batch=8)
        _compare(ref_logs, ref_params, our_logs, our_params)


def _ddp_worker(case_id: str, path: str, out: str) -> None:
    case = next(c for c in DDP_CASES if c.id == case_id)
    logs, params, _ = _train(KernelTrainer, case, path, out, batch=4)
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save((logs, params), os.path.join(out, "result.pt"))
    # accelerate's gloo group outlives the run; a rank that finalizes can then abort (SIGABRT) at exit
    torch.distributed.barrier()
    exit_rank(0)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 5 and sys.argv[1] == "--ddp-worker":
        _ddp_worker(*sys.argv[2:])
