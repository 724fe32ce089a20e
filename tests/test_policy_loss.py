"""grpo_loss: every loss_type against an independent scalar implementation of docs/design.md's math.

The expected values are computed here token by token with Python floats (``math.exp`` ...), not
with the library's tensor code, so a shared mistake cannot cancel out.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels.config import CLIPPED_SURROGATE, LOSS_TYPES, TOKEN_LEVEL_ONLY
from oracle import refused

F64 = torch.float64


# ----------------------------------------------------------------------------- scalar oracle
def _kl(lp: float, ref: float, est: str) -> float:
    d = ref - lp
    return {"k3": math.exp(d) - d - 1.0, "k2": 0.5 * d * d, "k1": -d}[est]


def _phi(adv: float, seq_log: float, cfg: gk.GRPOConfig) -> float:
    lw = min(max(seq_log, math.log(1e-8)), 20.0)
    k, lam = (cfg.vespo_k_pos, cfg.vespo_lambda_pos) if adv >= 0 else (cfg.vespo_k_neg, cfg.vespo_lambda_neg)
    return math.exp(lam + k * lw - lam * math.exp(lw))


def scalar_loss(logp, adv, mask, cfg, old=None, ref=None, is_ratio=None, num_items=None, entropy=None):
    """(loss, metrics) of docs/design.md's formulas, one token at a time, in Python floats."""
    B, T = len(logp), len(logp[0])
    old = old or [[logp[i][t] for t in range(T)] for i in range(B)]
    A = [[adv[i][t] if isinstance(adv[i], list) else adv[i] for t in range(T)] for i in range(B)]
    seq_is = None
    if is_ratio is not None and not isinstance(is_ratio[0], list):
        seq_is = is_ratio  # one ratio per sequence: its log enters vespo's sequence ratio once
        is_ratio = [[is_ratio[i]] * T for i in range(B)]
    eh = cfg.eps_high
    n_i = [sum(mask[i]) for i in range(B)]
    n_all = sum(n_i)
    ent_mask = None
    if cfg.top_entropy_quantile < 1.0:
        vals = sorted(entropy[i][t] for i in range(B) for t in range(T) if mask[i][t])
        q = 1.0 - cfg.top_entropy_quantile
        pos = q * (len(vals) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        thr = vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)
        ent_mask = [[1.0 if mask[i][t] and entropy[i][t] >= thr else 0.0 for t in range(T)] for i in range(B)]
    per_tok = [[0.0] * T for _ in range(B)]
    kls, lows, highs = [], [], []
    for i in range(B):
        seq_lw = sum(mask[i][t] * (logp[i][t] - old[i][t]) for t in range(T)) / max(n_i[i], 1)
        seq_log = sum(mask[i][t] * min(max(logp[i][t] - old[i][t], -20.0), 20.0) for t in range(T))
        if seq_is is not None:
            seq_log += min(max(math.log(seq_is[i]), math.log(1e-8)), 20.0)
        elif is_ratio is not None:
            seq_log += sum(mask[i][t] * min(max(math.log(is_ratio[i][t]), math.log(1e-8)), 20.0) for t in range(T))
        for t in range(T):
            if not mask[i][t]:
                continue
            lw = seq_lw if cfg.importance_sampling_level == "sequence" else logp[i][t] - old[i][t]
            r, a, lp = math.exp(lw), A[i][t], logp[i][t]
            low = high = False
            if cfg.loss_type == "cispo":
                l = -min(r, eh) * a * lp
                high = r > eh and a > 0
            elif cfg.loss_type == "sapo":
                tau = cfg.sapo_temperature_pos if a > 0 else cfg.sapo_temperature_neg
                l = -a * (4.0 / tau) / (1.0 + math.exp(-tau * (r - 1.0)))
            elif cfg.loss_type == "vespo":
                l = -_phi(a, seq_log, cfg) * a * lp
            else:
                rc = min(max(r, 1 - cfg.epsilon_low), 1 + eh)
                r1 = r if cfg.delta is None else min(r, cfg.delta)
                l = -min(r1 * a, rc * a)
                low, high = r < 1 - cfg.epsilon_low and a < 0, r > 1 + eh and a > 0
            if ent_mask is not None:
                l *= ent_mask[i][t]
            if is_ratio is not None and cfg.loss_type != "vespo":
                l *= is_ratio[i][t]
            if ref is not None:
                kl = _kl(lp, ref[i][t], cfg.kl_estimator) * (r if cfg.use_bias_correction_kl else 1.0)
                kls.append(kl)
                l += cfg.beta * kl
            per_tok[i][t] = l
            lows.append(low)
            highs.append(high)
    lt = cfg.loss_type
    tok_sum = [sum(per_tok[i][t] * mask[i][t] for t in range(T)) for i in range(B)]
    if lt in ("grpo", "sapo"):
        loss = sum(tok_sum[i] / max(n_i[i], 1) for i in range(B)) / B
    elif lt == "bnpo":
        loss = sum(tok_sum) / max(n_all, 1)
    elif lt == "dr_grpo":
        loss = sum(tok_sum) / (B * cfg.max_completion_length)
    elif lt == "luspo":
        loss = sum(tok_sum) / B
    else:
        loss = sum(tok_sum) / max(num_items if num_items is not None else n_all, 1)
    if cfg.entropy_coef:
        loss -= cfg.entropy_coef * sum(entropy[i][t] * mask[i][t] for i in range(B) for t in range(T)) / max(n_all, 1)
    denom = max(n_all, 1)
    metrics = {
        "clip_ratio/low_mean": sum(lows) / denom,
        "clip_ratio/high_mean": sum(highs) / denom,
        "clip_ratio/region_mean": sum(a or b for a, b in zip(lows, highs)) / denom,
    }
    if ref is not None:
        metrics["kl"] = sum(kls) / denom
    if entropy is not None:
        metrics["entropy"] = sum(entropy[i][t] * mask[i][t] for i in range(B) for t in range(T)) / denom
    return loss, metrics


# ----------------------------------------------------------------------------- inputs
def make_inputs(B=3, T=5, *, per_token_adv=False, off_policy=True, masked_row=True, dtype=F64):
    logp = -torch.rand(B, T, dtype=dtype) * 3 - 0.05
    old = (logp + 0.4 * torch.randn(B, T, dtype=dtype)) if off_policy else None
    ref = logp + 0.3 * torch.randn(B, T, dtype=dtype)
    mask = (torch.rand(B, T) > 0.25).long()
    mask[0, 0] = 1
    if masked_row and B > 2:
        mask[-1] = 0
    adv = torch.randn(B, T, dtype=dtype) if per_token_adv else torch.randn(B, dtype=dtype)
    entropy = torch.rand(B, T, dtype=dtype) * 2
    return logp, adv, mask, old, ref, entropy


def lists(x):
    return None if x is None else x.tolist()


def config_for(loss_type, level, beta, delta, **kw):
    extra = {"epsilon_high": 3.0} if loss_type == "cispo" else {}
    if loss_type == "dr_grpo":
        extra["max_completion_length"] = 7
    if delta:
        extra["delta"] = 1.5 + (extra.get("epsilon_high") or 0.2)
    extra.update(kw)
    return gk.GRPOConfig(loss_type=loss_type, beta=beta, importance_sampling_level=level, **extra)


MATRIX = [
    (lt, level, beta, delta)
    for lt, level, beta, delta in itertools.product(LOSS_TYPES, ("token", "sequence"), (0.0, 0.05), (False, True))
    if not (level == "sequence" and lt in TOKEN_LEVEL_ONLY) and not (delta and lt not in CLIPPED_SURROGATE)
]


@pytest.mark.parametrize("loss_type,level,beta,delta", MATRIX,
                         ids=[f"{lt}-{lv}-beta{b}-{'delta' if d else 'nodelta'}" for lt, lv, b, d in MATRIX])
def test_loss_and_metrics_match_scalar_formulas(loss_type, level, beta, delta, seed):
    cfg = config_for(loss_type, level, beta, delta)
    logp, adv, mask, old, ref, _ = make_inputs()
    out = gk.grpo_loss(logp, adv, mask, cfg, old_logp=old, ref_logp=ref if beta else None)
    want, want_m = scalar_loss(lists(logp), lists(adv), lists(mask), cfg, lists(old), lists(ref) if beta else None)
    assert out.loss.dtype == F64
    assert out.loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    for k, v in want_m.items():
        assert out.metrics[k].item() == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert ("kl" in out.metrics) == bool(beta)


OPTION_CASES = {
    "per-token-advantages": dict(inputs=dict(per_token_adv=True)),
    "on-policy": dict(inputs=dict(off_policy=False)),
    "is-ratio-token": dict(is_ratio="token"),
    "is-ratio-sequence": dict(is_ratio="sequence"),
    "is-ratio-vespo": dict(cfg=dict(loss_type="vespo"), is_ratio="token"),
    "is-ratio-vespo-sequence": dict(cfg=dict(loss_type="vespo"), is_ratio="sequence"),
    "kl-k1": dict(cfg=dict(kl_estimator="k1")),
    "kl-k2": dict(cfg=dict(kl_estimator="k2")),
    "bias-corrected-kl": dict(cfg=dict(use_bias_correction_kl=True)),
    "bias-corrected-kl-sequence": dict(cfg=dict(use_bias_correction_kl=True, importance_sampling_level="sequence")),
    "num-items-dapo": dict(cfg=dict(loss_type="dapo"), num_items=40),
    "num-items-cispo": dict(cfg=dict(loss_type="cispo", epsilon_high=2.0), num_items=17),
    "asymmetric-clip": dict(cfg=dict(epsilon_low=0.1, epsilon_high=0.28)),
    "sapo-temperatures": dict(cfg=dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0)),
    "vespo-shapes": dict(cfg=dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.0, vespo_k_neg=2.5, vespo_lambda_neg=1.0)),
    "entropy-bonus": dict(cfg=dict(entropy_coef=0.01), entropy=True),
    "top-entropy-quantile": dict(cfg=dict(top_entropy_quantile=0.4), entropy=True),
    "entropy-metric-only": dict(entropy=True),
}


@pytest.mark.parametrize("case", list(OPTION_CASES), ids=list(OPTION_CASES))
def test_options_match_scalar_formulas(case, seed):
    spec = OPTION_CASES[case]
    cfg = gk.GRPOConfig(**{"beta": 0.05, **spec.get("cfg", {})})
    logp, adv, mask, old, ref, entropy = make_inputs(**spec.get("inputs", {}))
    B, T = logp.shape
    is_ratio = None
    if spec.get("is_ratio") == "token":
        is_ratio = torch.rand(B, T, dtype=F64) + 0.5
    elif spec.get("is_ratio") == "sequence":
        is_ratio = torch.rand(B, dtype=F64) + 0.5
    ent = entropy if spec.get("entropy") else None
    out = gk.grpo_loss(logp, adv, mask, cfg, old_logp=old, ref_logp=ref, is_ratio=is_ratio,
                       num_items_in_batch=spec.get("num_items"), entropy=ent)
    want, want_m = scalar_loss(lists(logp), lists(adv), lists(mask), cfg, lists(old), lists(ref), lists(is_ratio),
                               spec.get("num_items"), lists(ent))
    assert out.loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    for k, v in want_m.items():
        assert out.metrics[k].item() == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_hand_worked_grpo_case():
    # two sequences, on-policy start (ratio 1), no KL: loss = -mean_i(A_i) and each token of
    # sequence i has gradient -A_i / (B * |o_i|)
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -0.5], dtype=F64)
    out = gk.grpo_loss(logp, adv, mask, gk.GRPOConfig(beta=0.0))
    assert out.loss.item() == pytest.approx(-(1.0 - 0.5) / 2)
    (g,) = torch.autograd.grad(out.loss, logp)
    want = torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [0.25 / 2, 0.25 / 2, 0.0]], dtype=F64)
    torch.testing.assert_close(g, want)


def test_hand_worked_clipping_case():
    # ratio e^0.5 = 1.65 with A > 0 is clipped at 1.2 (no gradient); ratio e^-0.5 = 0.61 with A < 0 is
    # clipped at 0.8 (no gradient); ratio 1.1 with A > 0 is inside and keeps its gradient r * A.
    logp = torch.tensor([[0.5, -0.5, math.log(1.1)]], dtype=F64, requires_grad=True)
    old = torch.zeros(1, 3, dtype=F64)
    adv = torch.tensor([[2.0, -1.0, 3.0]], dtype=F64)
    out = gk.grpo_loss(logp, adv, torch.ones(1, 3), gk.GRPOConfig(loss_type="bnpo", beta=0.0), old_logp=old)
    assert out.loss.item() == pytest.approx(-(1.2 * 2.0 + 0.8 * -1.0 + 1.1 * 3.0) / 3)
    (g,) = torch.autograd.grad(out.loss, logp)
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.0, -1.1 * 3.0 / 3]], dtype=F64))
    assert out.metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert out.metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert out.metrics["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)


GRADCHECK = [lt for lt in LOSS_TYPES if lt not in ("cispo", "vespo")]  # those two stop gradients by design


@pytest.mark.parametrize("loss_type", GRADCHECK)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradcheck_float64(loss_type, level, seed):
    if level == "sequence" and loss_type in TOKEN_LEVEL_ONLY:
        pytest.skip("sequence level is not defined for this loss_type")
    cfg = config_for(loss_type, level, 0.05, False, entropy_coef=0.02)
    logp, adv, mask, old, ref, entropy = make_inputs(B=3, T=4)
    logp.requires_grad_(True)
    entropy.requires_grad_(True)
    # keep ratios away from the clip boundaries, where the surrogate has kinks
    old = (logp.detach() + 0.05 * torch.randn_like(logp)).detach()

    def f(lp, en):
        return gk.grpo_loss(lp, adv, mask, cfg, old_logp=old, ref_logp=ref, entropy=en).loss

    assert torch.autograd.gradcheck(f, (logp, entropy), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["cispo", "vespo"])
def test_stop_gradient_losses_have_the_documented_gradient(loss_type, seed):
    cfg = config_for(loss_type, "token", 0.0, False)
    logp, adv, mask, old, _, _ = make_inputs()
    logp.requires_grad_(True)
    out = gk.grpo_loss(logp, adv, mask, cfg, old_logp=old)
    (g,) = torch.autograd.grad(out.loss, logp)
    n_active = mask.sum().item()
    B, T = logp.shape
    for i in range(B):
        seq_log = sum(mask[i, t].item() * max(min((logp[i, t] - old[i, t]).item(), 20.0), -20.0) for t in range(T))
        for t in range(T):
            r = math.exp((logp[i, t] - old[i, t]).item())
            a = adv[i].item()
            coef = min(r, cfg.eps_high) if loss_type == "cispo" else _phi(a, seq_log, cfg)
            want = -coef * a / n_active if mask[i, t] else 0.0
            assert g[i, t].item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_on_policy_gradient_is_minus_advantage_over_length():
    B, T = 4, 6
    logp = (-torch.rand(B, T, dtype=F64) * 2).requires_grad_(True)
    mask = (torch.rand(B, T) > 0.3).long()
    mask[:, 0] = 1
    adv = torch.randn(B, dtype=F64)
    out = gk.grpo_loss(logp, adv, mask, gk.GRPOConfig(beta=0.0))
    (g,) = torch.autograd.grad(out.loss, logp)
    want = -adv[:, None] / (B * mask.sum(-1, keepdim=True)) * mask
    torch.testing.assert_close(g, want.to(F64))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_tokens_never_influence_the_loss(loss_type, seed):
    cfg = config_for(loss_type, "token", 0.05, False, entropy_coef=0.1)
    logp, adv, mask, old, ref, entropy = make_inputs(per_token_adv=True)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
    dirty = [x.clone() for x in (logp, adv, old, ref, entropy)]
    for x in dirty:
        pad = mask == 0
        x[pad] = garbage[torch.randint(0, 4, (int(pad.sum()),))].to(x.dtype)
    outs, grads = [], []
    for lp, a, o, r, e in ((logp, adv, old, ref, entropy), tuple(dirty)):
        lp = lp.clone().requires_grad_(True)
        e = e.clone().requires_grad_(True)
        out = gk.grpo_loss(lp, a, mask, cfg, old_logp=o, ref_logp=r, entropy=e)
        outs.append(out)
        grads.append(torch.autograd.grad(out.loss, [lp, e]))
    assert torch.isfinite(outs[1].loss)
    assert outs[0].loss.item() == pytest.approx(outs[1].loss.item(), rel=1e-12, abs=1e-15)
    for a, b in zip(grads[0], grads[1]):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b)
        assert (b[mask == 0] == 0).all()
    for k in outs[0].metrics:
        assert outs[0].metrics[k].item() == pytest.approx(outs[1].metrics[k].item(), abs=1e-12)


def test_clip_metrics_count_exactly_the_clipped_tokens():
    cfg = gk.GRPOConfig(beta=0.0, epsilon_low=0.2, epsilon_high=0.3)
    B, T = 6, 50
    old = torch.zeros(B, T, dtype=F64)
    logp = torch.log(torch.empty(B, T, dtype=F64).uniform_(0.5, 1.6))
    adv = torch.randn(B, T, dtype=F64)
    mask = (torch.rand(B, T) > 0.2).long()
    out = gk.grpo_loss(logp, adv, mask, cfg, old_logp=old)
    r = logp.exp()
    m = mask.bool()
    low = ((r < 0.8) & (adv < 0) & m).sum().item()
    high = ((r > 1.3) & (adv > 0) & m).sum().item()
    n = m.sum().item()
    assert out.metrics["clip_ratio/low_mean"].item() * n == pytest.approx(low)
    assert out.metrics["clip_ratio/high_mean"].item() * n == pytest.approx(high)
    assert out.metrics["clip_ratio/region_mean"].item() * n == pytest.approx(low + high)


def test_fully_masked_batch_gives_zero_loss_and_gradient():
    logp = torch.randn(2, 3, dtype=F64, requires_grad=True)
    out = gk.grpo_loss(logp, torch.randn(2, dtype=F64), torch.zeros(2, 3), gk.GRPOConfig(beta=0.0))
    assert out.loss.item() == 0.0
    (g,) = torch.autograd.grad(out.loss, logp)
    assert (g == 0).all()


def test_float32_matches_float64():
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.04)
    logp, adv, mask, old, ref, _ = make_inputs()
    a = gk.grpo_loss(logp, adv, mask, cfg, old_logp=old, ref_logp=ref).loss
    b = gk.grpo_loss(logp.float(), adv.float(), mask, cfg, old_logp=old.float(), ref_logp=ref.float()).loss
    assert b.dtype == torch.float32
    assert b.item() == pytest.approx(a.item(), rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- validation
def _call(**over):
    logp, adv, mask, old, ref, ent = make_inputs(dtype=torch.float32)
    kw = dict(logp=logp, advantages=adv, mask=mask, config=gk.GRPOConfig(), old_logp=old, ref_logp=ref)
    kw.update(over)
    return gk.grpo_loss(kw.pop("logp"), kw.pop("advantages"), kw.pop("mask"), kw.pop("config"), **kw)


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(logp=torch.zeros(3, 5, dtype=torch.long)), TypeError, "logp must have a floating dtype"),
        (dict(logp=torch.zeros(15)), ValueError, r"logp must be \[B, T\]"),
        (dict(mask=torch.ones(3, 4)), ValueError, r"mask must have the shape of the completion tokens \(3, 5\)"),
        (dict(mask=-torch.ones(3, 5)), ValueError, "mask must be non-negative"),
        (dict(advantages=torch.zeros(4)), ValueError, r"advantages must be \[B\]"),
        (dict(advantages=torch.zeros(3, 5, 1)), ValueError, r"advantages must be \[B\]"),
        (dict(advantages=torch.zeros(3, dtype=torch.long)), TypeError, "advantages must have a floating dtype"),
        (dict(advantages=torch.tensor([0.0, float("nan"), 1.0])), ValueError, "advantages must be finite"),
        (dict(old_logp=torch.zeros(3, 4)), ValueError, "old_logp must have the shape"),
        (dict(ref_logp=torch.zeros(2, 5)), ValueError, "ref_logp must have the shape"),
        (dict(ref_logp=None), ValueError, "ref_logp is required when config.beta != 0"),
        (dict(is_ratio=torch.ones(3, 4)), ValueError, r"is_ratio must be \[B, T\]"),
        (dict(is_ratio=-torch.ones(3)), ValueError, "is_ratio must be >= 0"),
        (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be a finite token count >= 1"),
        (dict(config=dict(beta=0.0)), TypeError, "config must be a grpo_kernels.GRPOConfig"),
        (dict(config=gk.GRPOConfig(entropy_coef=0.1)), ValueError, "entropy is required"),
        (dict(advantages=torch.zeros(3, device="meta")), ValueError, "one device"),
    ],
    ids=["int-logp", "logp-rank", "mask-shape", "negative-mask", "adv-length", "adv-rank", "int-adv", "nan-adv",
         "old-shape", "ref-shape", "missing-ref", "is-ratio-shape", "negative-is-ratio", "num-items", "config-type",
         "missing-entropy", "device-mismatch"],
)
def test_bad_inputs_raise_naming_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(loss_type="ppo"), "loss_type must be one of"),
        (dict(kl_estimator="k4"), "kl_estimator must be one of"),
        (dict(loss_type="dr_grpo"), "max_completion_length must be a positive int for loss_type='dr_grpo'"),
        (dict(loss_type="cispo", importance_sampling_level="sequence", epsilon_high=4.0), "not defined for loss_type='cispo'"),
        (dict(loss_type="sapo", importance_sampling_level="sequence"), "not defined for loss_type='sapo'"),
        (dict(loss_type="vespo", importance_sampling_level="sequence"), "not defined for loss_type='vespo'"),
        (dict(importance_sampling_level="seq"), "importance_sampling_level must be"),
        (dict(epsilon_low=1.5), r"epsilon_low must be a number in \[0, 1\]"),
        (dict(epsilon_low=-0.1), r"epsilon_low must be a number in \[0, 1\]"),
        (dict(epsilon_high=-1.0), "epsilon_high must be None or a finite number >= 0"),
        (dict(loss_type="cispo"), "epsilon_high must be set for loss_type='cispo'"),
        (dict(delta=1.1), r"delta must be None or a number > 1 \+ epsilon_high"),
        (dict(loss_type="sapo", delta=3.0), "delta must be None for loss_type='sapo'"),
        (dict(beta=-0.1), "beta must be a finite number >= 0"),
        (dict(beta=float("nan")), "beta must be a finite number >= 0"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg must be a finite number > 0"),
        (dict(vespo_lambda_pos=-1.0), "vespo_lambda_pos must be a finite number > 0"),
        (dict(top_entropy_quantile=0.0), r"top_entropy_quantile must be a number in \(0, 1\]"),
        (dict(logit_softcap=0.0), "logit_softcap must be None or a finite number > 0"),
        (dict(use_bias_correction_kl=1), "use_bias_correction_kl must be a bool"),
    ],
    ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else None,
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        gk.GRPOConfig(**kw)


# values no input dtype can use: subnormal in float64 (the kernels compute in float64 at the widest),
# or an int beyond float64, which used to escape as a raw OverflowError from math.isfinite
NO_DTYPE_VALUES = {
    "temperature-subnormal-f64": ("temperature", 1e-320),
    "temperature-smallest-subnormal": ("temperature", 5e-324),
    "softcap-subnormal-f64": ("logit_softcap", 1e-320),
    "softcap-smallest-subnormal": ("logit_softcap", 5e-324),
    "temperature-int-beyond-f64": ("temperature", 10**400),
    "softcap-int-beyond-f64": ("logit_softcap", 10**400),
    "beta-int-beyond-f64": ("beta", 10**400),
    "entropy-coef-int-beyond-f64": ("entropy_coef", -10**400),
}


@pytest.mark.parametrize("case", list(NO_DTYPE_VALUES))
def test_config_refuses_values_no_dtype_can_use(case):
    field, value = NO_DTYPE_VALUES[case]
    refused(ValueError, "GRPOConfig", field, lambda: gk.GRPOConfig(**{field: value}))


@pytest.mark.parametrize("field, arg", [("temperature", "temperature"), ("logit_softcap", "softcap")])
@pytest.mark.parametrize("value", [1e39, 1e-39, 2.2250738585072014e-308], ids=["above-f32", "below-f32", "f64-tiny"])
def test_config_keeps_float32_limits_for_the_call(field, arg, value):
    """A normal float64 outside float32's normal range is a valid config: float64 inputs compute with it,
    float32 inputs are refused by the call (whose message names the kernels' float32)."""
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.0, **{field: value})
    assert getattr(cfg, field) == value
    torch.manual_seed(0)
    h, w = 0.1 * torch.randn(1, 3, 4, dtype=F64), 0.1 * torch.randn(7, 4, dtype=F64)
    ids, mask, adv = torch.randint(0, 7, (1, 3)), torch.ones(1, 3), torch.ones(1)
    h.requires_grad_(True)
    out = gk.fused_linear_grpo_loss(h, w, ids, mask, adv, cfg)
    out.loss.backward()  # at temperature 2.2e-308, |dH| ~ 1e306: large, and finite
    assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all()
    refused(ValueError, "fused_linear_grpo_loss", arg,
            lambda: gk.fused_linear_grpo_loss(h.detach().float(), w.float(), ids, mask, adv, cfg))


def test_config_is_frozen_and_replace_revalidates():
    cfg = gk.GRPOConfig()
    with pytest.raises(Exception):
        cfg.beta = 1.0  # type: ignore[misc]
    assert cfg.replace(beta=0.0).beta == 0.0
    assert cfg.eps_high == cfg.epsilon_low
    with pytest.raises(ValueError, match="beta"):
        cfg.replace(beta=-1.0)
