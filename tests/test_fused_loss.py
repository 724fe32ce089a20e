"""FusedLinearGRPOLoss / fused_linear_grpo_loss against grpo_loss over the materializing oracle."""

from __future__ import annotations

import itertools

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference
from grpo_kernels.config import CLIPPED_SURROGATE, LOSS_TYPES, TOKEN_LEVEL_ONLY

from oracle import HAS_CPU_EXT, assert_close_to_oracle, available_backends

BACKENDS = available_backends()


def make_problem(B=3, T=5, D=24, V=97, *, dtype=torch.float32, bias=False, per_token_adv=False):
    hidden = torch.randn(B, T, D, dtype=dtype)
    weight = (torch.randn(V, D) / D**0.5).to(dtype)
    b = (0.1 * torch.randn(V)).to(dtype) if bias else None
    ids = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.25).long()
    mask[0, 0] = 1
    mask[-1] = 0  # a fully masked row
    with torch.no_grad():
        lp = reference.linear_logprobs(hidden.double(), weight.double(), ids, bias=None if b is None else b.double())
    old = (lp + 0.2 * torch.randn(B, T, dtype=torch.float64)).float()
    ref = (lp + 0.2 * torch.randn(B, T, dtype=torch.float64)).float()
    adv = torch.randn(B, T) if per_token_adv else torch.randn(B)
    return hidden, weight, b, ids, mask, adv, old, ref


def run_loss(fn, hidden, weight, b, ids, mask, adv, cfg, old, ref, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    bb = None if b is None else b.detach().clone().requires_grad_(True)
    out = fn(h, w, ids, mask, adv, cfg, old_logp=old, ref_logp=ref, bias=bb, **kw)
    grads = torch.autograd.grad(out.loss, [h, w] + ([bb] if bb is not None else []))
    return out, grads


def oracle64(hidden, weight, b, ids, mask, adv, cfg, old, ref, **kw):
    return run_loss(reference.fused_linear_grpo_loss, hidden, weight, b, ids, mask, adv, cfg, old, ref,
                    compute_dtype=torch.float64, **kw)


def config_for(loss_type, level, beta, delta, **kw):
    extra = {"epsilon_high": 3.0} if loss_type == "cispo" else {}
    if loss_type == "dr_grpo":
        extra["max_completion_length"] = 5
    if delta:
        extra["delta"] = 1.5 + extra.get("epsilon_high", 0.2)
    extra.update(kw)
    return gk.GRPOConfig(loss_type=loss_type, beta=beta, importance_sampling_level=level, **extra)


MATRIX = [
    (lt, level, beta, delta, bias)
    for lt, level, beta, delta, bias in itertools.product(LOSS_TYPES, ("token", "sequence"), (0.0, 0.04), (False, True), (False, True))
    if not (level == "sequence" and lt in TOKEN_LEVEL_ONLY) and not (delta and lt not in CLIPPED_SURROGATE)
]


def _ids(case):
    lt, level, beta, delta, bias = case
    return f"{lt}-{level}-beta{beta}-{'delta' if delta else 'nodelta'}-{'bias' if bias else 'nobias'}"


def same_dtype(hidden, weight, b, ids, mask, adv, cfg, old, ref, **kw):
    """The materializing PyTorch path in the inputs' dtype: the error bar of docs/design.md's 2x rule."""
    return run_loss(reference.fused_linear_grpo_loss, hidden, weight, b, ids, mask, adv, cfg, old, ref, **kw)


def check(out, grads, want, same):
    """Loss, metrics and gradients within 2x the same-dtype materializing path's error of the fp64 oracle."""
    (want_out, want_grads), (same_out, same_grads) = want, same
    assert_close_to_oracle("loss", out.loss.reshape(1), want_out.loss.reshape(1), same_out.loss.reshape(1))
    assert set(out.metrics) == set(want_out.metrics)
    for k, v in want_out.metrics.items():
        assert_close_to_oracle(k, out.metrics[k].reshape(1), v.reshape(1), same_out.metrics[k].reshape(1))
    for n, g, w, sg in zip(["dhidden", "dweight", "dbias"], grads, want_grads, same_grads):
        assert_close_to_oracle(n, g, w, sg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MATRIX, ids=[_ids(c) for c in MATRIX])
def test_matches_oracle_fp32(case, backend, seed):
    lt, level, beta, delta, bias = case
    cfg = config_for(lt, level, beta, delta)
    prob = make_problem(bias=bias)
    hidden, weight, b, ids, mask, adv, old, ref = prob
    ref_arg = ref if beta else None
    out, grads = run_loss(gk.fused_linear_grpo_loss, hidden, weight, b, ids, mask, adv, cfg, old, ref_arg, backend=backend)
    assert gk.last_backend("fused_linear_grpo_loss") == backend
    check(out, grads, oracle64(*prob[:6], cfg, old, ref_arg), same_dtype(*prob[:6], cfg, old, ref_arg))


BF16_CASES = [("grpo", "token"), ("dapo", "token"), ("cispo", "token"), ("sapo", "token"), ("vespo", "token"),
              ("grpo", "sequence"), ("luspo", "sequence")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,level", BF16_CASES, ids=[f"{a}-{b}" for a, b in BF16_CASES])
def test_bf16_within_twice_the_materializing_error(loss_type, level, backend, seed):
    cfg = config_for(loss_type, level, 0.04, False)
    hidden, weight, b, ids, mask, adv, old, ref = make_problem(B=4, T=16, D=64, V=301, dtype=torch.bfloat16, bias=True)
    out, grads = run_loss(gk.fused_linear_grpo_loss, hidden, weight, b, ids, mask, adv, cfg, old, ref, backend=backend)
    args = (hidden, weight, b, ids, mask, adv, cfg, old, ref)
    check(out, grads, oracle64(*args), same_dtype(*args))


OPTIONS = {
    "entropy-bonus": dict(cfg=dict(entropy_coef=0.05)),
    "top-entropy-quantile": dict(cfg=dict(top_entropy_quantile=0.3)),
    "temperature-softcap": dict(cfg=dict(temperature=0.7, logit_softcap=3.0)),
    "per-token-advantages": dict(problem=dict(per_token_adv=True)),
    "is-ratio-token": dict(is_ratio="token"),
    "is-ratio-sequence": dict(is_ratio="sequence"),
    "vespo-is-ratio": dict(cfg=dict(loss_type="vespo"), is_ratio="token"),
    "num-items-dapo": dict(cfg=dict(loss_type="dapo"), num_items=23),
    "bias-corrected-kl": dict(cfg=dict(use_bias_correction_kl=True)),
    "kl-k2": dict(cfg=dict(kl_estimator="k2")),
    "on-policy": dict(on_policy=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(OPTIONS), ids=list(OPTIONS))
def test_options_match_oracle(case, backend, seed):
    spec = OPTIONS[case]
    cfg = gk.GRPOConfig(**{"beta": 0.04, **spec.get("cfg", {})})
    hidden, weight, b, ids, mask, adv, old, ref = make_problem(bias=True, **spec.get("problem", {}))
    if spec.get("on_policy"):
        old = None
    B, T = mask.shape
    kw = {}
    if spec.get("is_ratio") == "token":
        kw["is_ratio"] = torch.rand(B, T) + 0.5
    elif spec.get("is_ratio") == "sequence":
        kw["is_ratio"] = torch.rand(B) + 0.5
    if "num_items" in spec:
        kw["num_items_in_batch"] = spec["num_items"]
    out, grads = run_loss(gk.fused_linear_grpo_loss, hidden, weight, b, ids, mask, adv, cfg, old, ref, backend=backend, **kw)
    args = (hidden, weight, b, ids, mask, adv, cfg, old, ref)
    check(out, grads, oracle64(*args, **kw), same_dtype(*args, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_computes_loss_and_metrics_only(backend):
    cfg = gk.GRPOConfig(beta=0.04)
    hidden, weight, b, ids, mask, adv, old, ref = make_problem()
    hidden.requires_grad_(True)
    with torch.no_grad():
        out = gk.fused_linear_grpo_loss(hidden, weight, ids, mask, adv, cfg, old_logp=old, ref_logp=ref, backend=backend)
    assert out.loss.grad_fn is None
    want, _ = oracle64(hidden.detach(), weight, b, ids, mask, adv, cfg, old, ref)
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-5, abs=1e-6)
    assert set(out.metrics) == {"kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_through_a_sum_of_two_losses(backend, seed):
    cfg = gk.GRPOConfig(beta=0.0, loss_type="dapo")
    hidden, weight, b, ids, mask, adv, old, _ = make_problem()
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    crit = gk.FusedLinearGRPOLoss(cfg, backend=backend)
    total = 2.0 * crit(h, w, ids, mask, adv, old_logp=old).loss + crit(h, w, ids, mask, -adv, old_logp=old).loss
    total.backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    want = (2.0 * reference.fused_linear_grpo_loss(h64, w64, ids, mask, adv.double(), cfg, old_logp=old.double()).loss
            + reference.fused_linear_grpo_loss(h64, w64, ids, mask, -adv.double(), cfg, old_logp=old.double()).loss)
    want.backward()
    assert_close_to_oracle("dhidden", h.grad, h64.grad)
    assert_close_to_oracle("dweight", w.grad, w64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_masked(backend):
    hidden, weight, b, ids, mask, adv, old, ref = make_problem()
    out, grads = run_loss(gk.fused_linear_grpo_loss, hidden, weight, b, ids, torch.zeros_like(mask), adv,
                          gk.GRPOConfig(beta=0.04), old, ref, backend=backend)
    assert out.loss.item() == 0.0
    assert all((g == 0).all() for g in grads)


# ---------------------------------------------------------------------------------------------------
# C++ backend: the one-pass schedule over several token chunks, and the two-pass one AMX machines take
# ---------------------------------------------------------------------------------------------------

needs_cpu_ext = pytest.mark.skipif(not HAS_CPU_EXT, reason="the C++ extension grpo_kernels._C is not built")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHUNK_OPTIONS = {
    "dapo-kl-entropy-bonus": dict(loss_type="dapo", beta=0.04, entropy_coef=0.05),
    "grpo-temperature-softcap": dict(loss_type="grpo", beta=0.04, temperature=0.7, logit_softcap=3.0),
    "cispo": dict(loss_type="cispo", epsilon_high=3.0),
}


def _forbid(monkeypatch, module, *names):
    def fail(*args, **kwargs):
        raise AssertionError("this schedule must not call " + ", ".join(names))

    for name in names:
        monkeypatch.setattr(module, name, fail)


@needs_cpu_ext
@pytest.mark.parametrize("options", list(CHUNK_OPTIONS), ids=list(CHUNK_OPTIONS))
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("chunk", [16, 48], ids=["chunk16", "chunk48"])
def test_cpu_one_pass_over_several_chunks(chunk, dtype, options, seed, monkeypatch):
    """Token chunks of the one-pass schedule: logits kept per chunk, dW and dbias added across chunks.

    D = 33 is odd, so the plain GEMM path (and with it the one-pass schedule) runs on every machine, and
    dW rows end in a tail the vectorized residual update does not cover.
    """
    from grpo_kernels.backends import cpu

    assert cpu.one_pass(DTYPES[dtype], 33)
    _forbid(monkeypatch, cpu.CpuBackend, "forward", "backward")
    cfg = gk.GRPOConfig(**CHUNK_OPTIONS[options])
    hidden, weight, b, ids, mask, adv, old, ref = make_problem(B=4, T=40, D=33, V=301, dtype=DTYPES[dtype], bias=True)
    ref = ref if cfg.beta else None
    with gk.backends.use(cpu.CpuBackend(cpu.CpuTuning(fused_chunk_tokens=chunk))):
        out, grads = run_loss(gk.fused_linear_grpo_loss, hidden, weight, b, ids, mask, adv, cfg, old, ref, backend="cpu")
    args = (hidden, weight, b, ids, mask, adv, cfg, old, ref)
    check(out, grads, oracle64(*args), same_dtype(*args))


@needs_cpu_ext
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cpu_one_pass_dweight_across_chunks_is_rounded_once(dtype, seed):
    """16 chunks add into a 16-bit dW through its int8 residual and give the dW of one chunk within an ulp."""
    from grpo_kernels.backends import LogprobsParams, cpu

    n, v, d = 4096, 64, 35  # odd D: the one-pass schedule on every machine, and row tails
    dt = DTYPES[dtype]
    assert cpu.one_pass(dt, d)
    h = torch.randn(n, d).to(dt)
    w = (torch.randn(v, d) / d**0.5).to(dt)
    t = torch.randint(0, v, (n,))
    g = torch.randn(n)
    params = LogprobsParams.make(1.0, None, False)

    def coef(start, end, logp, ent):
        return g[start:end], None

    once, chunked = cpu.CpuBackend(), cpu.CpuBackend(cpu.CpuTuning(fused_chunk_tokens=256))
    _, dw_split, _ = chunked.forward_backward(h, w, None, t, params, coef, (False, True, False))[2].finish(None)
    _, _, lse = once.forward(h, w, None, t, params)
    _, dw_once, _ = once.backward(h, w, None, t, lse, None, g, None, params, (False, True, False))
    ulp = torch.finfo(dt).eps * dw_once.float().abs().max()
    assert (dw_split.float() - dw_once.float()).abs().max() <= ulp


@needs_cpu_ext
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cpu_two_pass_schedule_where_one_pass_does_not_pay(dtype, seed, monkeypatch):
    """AMX machines run forward, then the recomputing backward: the same loss and gradients."""
    from grpo_kernels.backends import cpu

    _forbid(monkeypatch, cpu.CpuBackend, "_one_pass_schedule")
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.04, entropy_coef=0.05)
    hidden, weight, b, ids, mask, adv, old, ref = make_problem(B=4, T=40, D=32, V=301, dtype=DTYPES[dtype], bias=True)
    with gk.backends.use(cpu.CpuBackend(cpu.CpuTuning(schedule="two-pass"))):
        out, grads = run_loss(gk.fused_linear_grpo_loss, hidden, weight, b, ids, mask, adv, cfg, old, ref, backend="cpu")
    args = (hidden, weight, b, ids, mask, adv, cfg, old, ref)
    check(out, grads, oracle64(*args), same_dtype(*args))


def _tiny_lm(tie: bool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float()


class PolicyWithFusedLoss(torch.nn.Module):
    """What a user writes: the model body, then the fused loss on its hidden states and LM head."""

    def __init__(self, lm, config, backend):
        super().__init__()
        self.lm = lm
        self.crit = gk.FusedLinearGRPOLoss(config, backend=backend)

    def forward(self, input_ids, completion_ids, mask, adv, old, ref):
        hidden = self.lm.model(input_ids=input_ids).last_hidden_state
        T = completion_ids.shape[1]
        h = hidden[:, -T - 1:-1]  # positions that predict the completion tokens
        head = self.lm.get_output_embeddings()
        return self.crit(h, head.weight, completion_ids, mask, adv, old_logp=old, ref_logp=ref, bias=head.bias)


def _reference_step(lm, config, input_ids, completion_ids, mask, adv, old, ref):
    hidden = lm.model(input_ids=input_ids).last_hidden_state
    T = completion_ids.shape[1]
    head = lm.get_output_embeddings()
    return reference.fused_linear_grpo_loss(hidden[:, -T - 1:-1], head.weight, completion_ids, mask, adv, config,
                                            old_logp=old, ref_logp=ref, bias=head.bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_inside_a_transformers_model_the_optimizer_step_matches(tie, backend):
    config = gk.GRPOConfig(loss_type="dapo", beta=0.04)
    fused_lm, ref_lm = _tiny_lm(tie), _tiny_lm(tie)
    ref_lm.load_state_dict(fused_lm.state_dict())
    torch.manual_seed(1)
    B, P, T = 4, 3, 6
    prompt = torch.randint(0, 97, (B, P))
    completion = torch.randint(0, 97, (B, T))
    input_ids = torch.cat([prompt, completion], 1)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    adv = torch.randn(B)
    with torch.no_grad():
        hid = ref_lm.model(input_ids=input_ids).last_hidden_state[:, -T - 1:-1]
        lp = reference.linear_logprobs(hid, ref_lm.get_output_embeddings().weight, completion)
    old, refp = lp + 0.1 * torch.randn(B, T), lp + 0.1 * torch.randn(B, T)
    policy = PolicyWithFusedLoss(fused_lm, config, backend)
    # SGD: Adam's first step is sign(grad) and would amplify round-off on near-zero gradients
    opt_f = torch.optim.SGD(fused_lm.parameters(), lr=0.5, momentum=0.9)
    opt_r = torch.optim.SGD(ref_lm.parameters(), lr=0.5, momentum=0.9)
    out = policy(input_ids, completion, mask, adv, old, refp)
    out.loss.backward()
    want = _reference_step(ref_lm, config, input_ids, completion, mask, adv, old, refp)
    want.loss.backward()
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-5, abs=1e-6)
    for (name, p), q in zip(fused_lm.named_parameters(), ref_lm.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    before = {k: v.clone() for k, v in fused_lm.state_dict().items()}
    opt_f.step()
    opt_r.step()
    for (name, p), q in zip(fused_lm.named_parameters(), ref_lm.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    head = "lm_head.weight" if not tie else "model.embed_tokens.weight"
    assert not torch.equal(fused_lm.state_dict()[head], before[head])


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(hidden=torch.randn(15, 24)), ValueError, r"hidden must be \[B, T, D\]"),
        (dict(hidden=torch.randn(3, 5, 23)), ValueError, "hidden must be"),
        (dict(completion_ids=torch.randint(0, 97, (3, 4))), ValueError, "completion_ids must have shape"),
        (dict(completion_ids=torch.full((3, 5), 97)), ValueError, r"completion_ids must be in \[0, V\)"),
        (dict(completion_ids=torch.zeros(3, 5)), TypeError, "completion_ids must be an int64"),
        (dict(mask=torch.ones(3, 4)), ValueError, "mask must have the shape"),
        (dict(advantages=torch.zeros(2)), ValueError, r"advantages must be \[B\]"),
        (dict(ref_logp=None), ValueError, "ref_logp is required"),
        (dict(weight=torch.randn(97, 24, dtype=torch.float64)), TypeError, "hidden and weight must share a dtype"),
        (dict(bias=torch.zeros(96)), ValueError, r"bias must be \[V\]"),
        (dict(config=None), TypeError, "config must be a grpo_kernels.GRPOConfig"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
    ids=["hidden-rank", "hidden-dim", "ids-shape", "ids-range", "ids-dtype", "mask-shape", "adv-shape", "missing-ref",
         "dtype-mismatch", "bias-shape", "config", "backend"],
)
def test_bad_inputs(over, exc, match):
    hidden, weight, b, ids, mask, adv, old, ref = make_problem()
    kw = dict(hidden=hidden, weight=weight, completion_ids=ids, mask=mask, advantages=adv,
              config=gk.GRPOConfig(beta=0.04), old_logp=old, ref_logp=ref, bias=None, backend="torch")
    kw.update(over)
    with pytest.raises(exc, match=match):
        gk.fused_linear_grpo_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("completion_ids"), kw.pop("mask"),
                                  kw.pop("advantages"), kw.pop("config"), **kw)


def test_module_rejects_bad_construction():
    with pytest.raises(TypeError, match="config must be a grpo_kernels.GRPOConfig"):
        gk.FusedLinearGRPOLoss({"beta": 0.0})
    with pytest.raises(ValueError, match="backend must be one of"):
        gk.FusedLinearGRPOLoss(gk.GRPOConfig(), backend="gpu")


@needs_cpu_ext
def test_cpu_backend_rejects_float64_and_names_the_fallback():
    """float64 has no C++ kernels: both public entry points say which backend to use instead."""
    hidden, weight, _, ids, mask, adv, old, _ = make_problem(dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='torch' for float64"):
        gk.linear_logprobs(hidden, weight, ids, backend="cpu")
    with pytest.raises(TypeError, match="backend='torch' for float64"):
        gk.fused_linear_grpo_loss(hidden.requires_grad_(True), weight, ids, mask, adv, gk.GRPOConfig(beta=0.0),
                                  old_logp=old, backend="cpu")
