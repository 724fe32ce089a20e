"""The one fused pipeline and the backend contract: what the restructure made testable.

- zero-token and all-masked calls run the same driver as any other (no special branch), with and
  without gradients, on every backend, and write every gradient element (outputs start as NaN);
- grad_output scales the coefficients of the gradient pass, and the one pass's gradients in place from
  the accumulator state it kept: a bf16 dW is rounded once, no second [V, D] tensor is formed, and the
  backward reads nothing back to the host;
- errors of the shared resolve name the calling op;
- float64 stays float64 through the fused loss (gradcheck on the weight), double backward is
  refused by name, the chunked-torch fallback accumulates its logits in fp32 (the 2x rule at large
  bf16 magnitudes), and the extra memory of the fused loss is what docs/design.md states.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import grpo_kernels as gk
from grpo_kernels import backends, reference
from grpo_kernels.backends import LogprobsParams
from oracle import HAS_CPU_EXT, assert_close_to_oracle, available_backends

BACKENDS = available_backends()
needs_cpu_ext = pytest.mark.skipif(not HAS_CPU_EXT, reason="the C++ extension grpo_kernels._C is not built")
BF16 = torch.bfloat16


def problem(B=3, T=6, D=24, V=97, dtype=torch.float32, masked="some"):
    hidden = torch.randn(B, T, D, dtype=dtype)
    weight = (torch.randn(V, D) / D**0.5).to(dtype)
    ids = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.3).long()
    if mask.numel():
        mask[0, 0] = 1
    if masked == "all":
        mask.zero_()
    adv = torch.randn(B)
    with torch.no_grad():
        lp = reference.linear_logprobs(hidden.double(), weight.double(), ids)
    old = (lp + 0.1 * torch.randn(B, T, dtype=torch.float64)).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return hidden, weight, ids, mask, adv, old


def leaves(*xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


# ---------------------------------------------------------------------------------------------------
# Zero-token and all-masked calls: the same pipeline, with need-flags
# ---------------------------------------------------------------------------------------------------

EMPTY_CASES = {"all-masked": dict(masked="all"), "zero-length": dict(T=0), "zero-batch": dict(B=0)}
EMPTY_CONFIGS = {"dapo-kl": dict(loss_type="dapo", beta=0.04), "gspo": dict(importance_sampling_level="sequence", beta=0.0),
                 "top-entropy": dict(top_entropy_quantile=0.5, beta=0.0)}


@pytest.mark.parametrize("options", list(EMPTY_CONFIGS), ids=list(EMPTY_CONFIGS))
@pytest.mark.parametrize("case", list(EMPTY_CASES), ids=list(EMPTY_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_kept_token_gives_zero_loss_metrics_and_written_zero_gradients(backend, case, options, monkeypatch):
    """No token to compute: the driver still runs the backend (zero-sized passes) and every gradient is a written 0."""
    cfg = gk.GRPOConfig(**EMPTY_CONFIGS[options])
    hidden, weight, ids, mask, adv, old = problem(**EMPTY_CASES[case])
    ref = old.clone() if cfg.beta else None
    impl = backends.get(backend)
    calls = []
    original = type(impl).forward

    def spy(self, h, *args, **kwargs):
        calls.append(h.shape[0])
        return original(self, h, *args, **kwargs)

    monkeypatch.setattr(type(impl), "forward", spy)
    h, w = leaves(hidden, weight)
    out = gk.fused_linear_grpo_loss(h, w, ids, mask, adv, cfg, old_logp=old, ref_logp=ref, backend=backend)
    dh, dw = torch.autograd.grad(out.loss, [h, w])
    assert out.loss.item() == 0.0 and out.loss.dtype == torch.float32
    assert (dh == 0).all() and (dw == 0).all() and dh.shape == hidden.shape
    want = reference.fused_linear_grpo_loss(hidden, weight, ids, mask, adv, cfg, old_logp=old, ref_logp=ref)
    assert set(out.metrics) == set(want.metrics)
    for k, v in want.metrics.items():
        assert out.metrics[k].item() == pytest.approx(v.item(), abs=1e-7), k
    with torch.no_grad():
        again = gk.fused_linear_grpo_loss(hidden, weight, ids, mask, adv, cfg, old_logp=old, ref_logp=ref, backend=backend)
    assert again.loss.item() == 0.0
    assert calls and all(n == 0 for n in calls if n is not None), calls


# ---------------------------------------------------------------------------------------------------
# grad_output scaling: coefficients scaled on the device, a 16-bit dW rounded once, no host sync
# ---------------------------------------------------------------------------------------------------


class _Recorder:
    """A backend wrapper (same class, so the contract holds) recording the coefficients of each backward."""

    @staticmethod
    def make(impl):
        seen = []

        class Recording(type(impl)):
            def backward(self, h, w, b, t, lse, ent, g_logp, g_ent, params, needs):
                seen.append((g_logp.clone(), None if g_ent is None else g_ent.clone()))
                return super().backward(h, w, b, t, lse, ent, g_logp, g_ent, params, needs)

        return Recording(**{f: getattr(impl, f) for f in impl.__dataclass_fields__}), seen


def _two_pass_backends():
    names = []
    if HAS_CPU_EXT:
        names.append("cpu")
    if "triton" in BACKENDS:
        names.append("triton")
    return names


def _instance(name):
    if name == "cpu":
        from grpo_kernels.backends.cpu import CpuBackend, CpuTuning

        return CpuBackend(CpuTuning(schedule="two-pass"))
    return backends.get(name)


HOST_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__")


def _forbid_host_reads(m: pytest.MonkeyPatch) -> None:
    """Fail on any Python-level read of a tensor value (a host sync on a GPU)."""
    for name in HOST_READS:
        def fail(*args, _name=name, **kwargs):
            raise AssertionError(f"the backward read a tensor value back to the host (Tensor.{_name})")

        m.setattr(torch.Tensor, name, fail)


@pytest.mark.skipif(not _two_pass_backends(), reason="no two-pass backend here (needs the C++ extension or Triton)")
@pytest.mark.parametrize("name", _two_pass_backends())
def test_scaled_grad_output_rounds_a_bf16_dweight_once_without_host_sync(name, seed, monkeypatch):
    """(loss / 3).backward(): the gradient pass gets coefficients / 3, so dW is the kernel's one rounding of the
    scaled gradient, not bf16(bf16(dW) / 3); the backward reads no tensor value on the host."""
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.04)
    hidden, weight, ids, mask, adv, old = problem(B=4, T=32, D=32, V=301, dtype=BF16)
    device = torch.device("cuda") if name == "triton" and not backends.triton_interpret() else torch.device("cpu")
    mv = lambda *xs: [x.to(device) for x in xs]  # noqa: E731
    hidden, weight, ids, mask, adv, old = mv(hidden, weight, ids, mask, adv, old)
    impl, seen = _Recorder.make(_instance(name))
    scale = torch.tensor(1.0 / 3.0, device=device)
    grads = {}
    with backends.use(impl):
        for label, s in (("one", None), ("third", scale)):
            h, w = leaves(hidden, weight)
            out = gk.fused_linear_grpo_loss(h, w, ids, mask, adv, cfg, old_logp=old, ref_logp=old, backend=name)
            loss = out.loss if s is None else out.loss * s
            if s is None:
                grads[label] = torch.autograd.grad(loss, [h, w])
            else:
                with monkeypatch.context() as m:
                    _forbid_host_reads(m)
                    grads[label] = torch.autograd.grad(loss, [h, w])
    (g1, _), (g3, _) = seen
    torch.testing.assert_close(g3, g1 * scale.float(), rtol=0, atol=0)
    # the dW of the scaled coefficients, formed directly: the fused backward returned exactly it
    kept = (mask.reshape(-1) != 0).nonzero().squeeze(-1)
    h2, t2 = hidden.reshape(-1, hidden.shape[-1])[kept], ids.reshape(-1)[kept]
    params = LogprobsParams.make(cfg.temperature, cfg.logit_softcap, True)
    _, ent, lse = impl.forward(h2, weight, None, t2, params)
    _, dw_direct, _ = impl.backward(h2, weight, None, t2, lse, ent, g3, None, params, (False, True, False))
    dw = grads["third"][1]
    assert dw.dtype == BF16
    assert torch.equal(dw, dw_direct)
    assert not torch.equal(dw, (grads["one"][1] * scale).to(BF16)), "expected the twice-rounded dW to differ somewhere"


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_grad_output_matches_the_oracle(backend, seed):
    """Every schedule (one pass multiplies its gradients, two passes scale the coefficients)."""
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.04, entropy_coef=0.02)
    hidden, weight, ids, mask, adv, old = problem(B=3, T=8, D=33, V=97)
    h, w = leaves(hidden, weight)
    out = gk.fused_linear_grpo_loss(h, w, ids, mask, adv, cfg, old_logp=old, ref_logp=old, backend=backend)
    (0.25 * out.loss).backward()
    h64, w64 = leaves(hidden.double(), weight.double())
    want = reference.fused_linear_grpo_loss(h64, w64, ids, mask, adv.double(), cfg, old_logp=old.double(),
                                            ref_logp=old.double(), compute_dtype=torch.float64)
    (0.25 * want.loss).backward()
    assert_close_to_oracle("dhidden", h.grad, h64.grad)
    assert_close_to_oracle("dweight", w.grad, w64.grad)


# The one pass forms its gradients in the forward, before grad_output is known: ``Formed.finish``
# scales them in place from the state the backend kept (C++: the bf16 dW and its int8 residual;
# torch: the fp32 accumulator), so a bf16 dW is still rounded once, and no second [V, D] tensor exists.


def _one_pass_instances():
    from grpo_kernels.backends.chunked_torch import TorchBackend, TorchTuning

    out = {"torch": TorchBackend(TorchTuning(chunk_elements=40 * 301))}  # several chunks at V = 301
    if HAS_CPU_EXT:
        from grpo_kernels.backends.cpu import CpuBackend, CpuTuning

        out["cpu-chunks"] = CpuBackend(CpuTuning(schedule="one-pass", fused_chunk_tokens=32))
        out["cpu-one-chunk"] = CpuBackend(CpuTuning(schedule="one-pass"))
    return out


ONE_PASS = _one_pass_instances()


def _capturing(impl):
    """impl's class, recording the Formed of every forward_backward (and the accumulator state at that time)."""
    seen = []

    class Capturing(type(impl)):
        def forward_backward(self, *args):
            logp, ent, formed = super().forward_backward(*args)
            seen.append(formed)
            return logp, ent, formed

    return Capturing(**{f: getattr(impl, f) for f in impl.__dataclass_fields__}), seen


def _accumulated(formed, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW or dH as handed out for grad_output 1, the fp32 value the accumulator holds), decoded here
    independently: C++: bf16 hi + int8 residual in units of ulp(hi) / 256 (2^(max(e, 1) - 15) for hi's
    exponent field e); torch: the fp32 accumulator itself."""
    state = getattr(formed, "_state", None)
    if state is not None:  # grpo_kernels.backends.cpu._Formed: (dh, dh_lo, dw, dw_lo, db_acc)
        hi, lo = state[2:4] if which == "dweight" else state[0:2]
        h = hi.float()
        field = ((h.view(torch.int32) >> 23) & 0xFF).clamp(min=1) - 15
        unit = torch.where(field > 0, (field.clamp(min=0) << 23).view(torch.float32), torch.zeros_like(h))
        return hi.clone(), h + lo.float() * unit
    acc = formed._grads[1 if which == "dweight" else 0]  # chunked_torch._Formed: fp32 accumulators
    return acc.to(BF16), acc.clone()


@pytest.mark.parametrize("which", ["dweight", "dhidden"])
@pytest.mark.parametrize("g", [0.25, 1 / 3, 3.7, 1.0], ids=["quarter", "third", "3.7", "one"])
@pytest.mark.parametrize("name", list(ONE_PASS))
def test_one_pass_scaled_grad_output_rounds_bf16_gradients_once(name, g, which, seed, monkeypatch):
    """(loss * g).backward() through the one pass: dW and dH == bf16(g * accumulated value), rounded once (g == 1:
    the accumulator's own rounding), not bf16(bf16(grad) * g); the backward reads no tensor value in Python.
    (dH used to be rounded twice: its mean error at g = 1/3 was 1.3x the materializing path's.)"""
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.04)
    hidden, weight, ids, mask, adv, old = problem(B=4, T=32, D=33, V=301, dtype=BF16)  # V D odd: the scalar tail too
    impl, seen = _capturing(ONE_PASS[name])
    scale = torch.tensor(g)
    with backends.use(impl):
        h, w = leaves(hidden, weight)
        out = gk.fused_linear_grpo_loss(h, w, ids, mask, adv, cfg, old_logp=old, ref_logp=old, backend=impl.name)
        (formed,) = seen
        once, value = _accumulated(formed, which)
        with monkeypatch.context() as m:
            _forbid_host_reads(m)
            dh, dw = torch.autograd.grad(out.loss * scale, [h, w])
    assert dw.dtype == BF16 and dh.dtype == BF16
    # the one pass forms dH for the kept tokens (mask != 0); the driver scatters it into [B, T, D]
    got = dw if which == "dweight" else dh.reshape(-1, dh.shape[-1])[mask.reshape(-1) != 0]
    want = once if g == 1.0 else (value * scale).to(BF16)
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    if g == 1 / 3:
        assert not torch.equal(got, (once * scale).to(BF16)), f"expected the twice-rounded {which} to differ somewhere"


@pytest.mark.parametrize("dtype", [BF16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(ONE_PASS))
def test_one_pass_backward_allocates_no_second_dweight(name, dtype, seed):
    """loss * 0.25 through the one pass: the backward creates no [V, D] tensor (the torch backend's 16-bit
    dW excepted: the one rounding of its fp32 accumulator, which is what .grad gets), and .grad is
    the very tensor the forward formed (no copy by autograd either)."""
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.0)
    hidden, weight, ids, mask, adv, _ = problem(B=4, T=32, D=32, V=301, dtype=dtype)
    impl, seen = _capturing(ONE_PASS[name])
    V, D = weight.shape
    with backends.use(impl):
        h, w = leaves(hidden, weight)
        loss = gk.fused_linear_grpo_loss(h, w, ids, mask, adv, cfg, backend=impl.name).loss * 0.25
        (formed,) = seen
        state = getattr(formed, "_state", None)
        formed_dw = state[2] if state is not None else formed._grads[1]  # cpu: (dh, dh_lo, dw, dw_lo, db_acc)
        ptr = formed_dw.untyped_storage().data_ptr()
        del state, formed_dw, formed, seen[:]
        big = {}  # storage -> the op that produced it, for the [V, D]-sized outputs of the backward's ops

        class Big(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for x in tree_flatten(out)[0]:
                    if isinstance(x, torch.Tensor) and x.numel() >= V * D:
                        big.setdefault(x.untyped_storage().data_ptr(), str(func))
                return out

        with Big():
            loss.backward()
    new = {k: f for k, f in big.items() if k != ptr}  # in-place ops on the formed dW return its own storage
    grad_ptr = w.grad.untyped_storage().data_ptr()
    assert w.grad.dtype == dtype
    if name == "torch" and dtype == BF16:
        assert list(new) == [grad_ptr], new
    else:
        assert not new and grad_ptr == ptr, new


@pytest.mark.parametrize("name", list(ONE_PASS))
def test_one_pass_backward_twice_through_a_retained_graph(name, seed):
    """The first backward hands the one pass's gradients out; a second one (retain_graph) recomputes them with
    the two-pass schedule, and both match the oracle."""
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.04)
    hidden, weight, ids, mask, adv, old = problem(B=3, T=8, D=33, V=97)
    with backends.use(ONE_PASS[name]):
        h, w = leaves(hidden, weight)
        out = gk.fused_linear_grpo_loss(h, w, ids, mask, adv, cfg, old_logp=old, ref_logp=old, backend=ONE_PASS[name].name)
        first = torch.autograd.grad(out.loss, [h, w], retain_graph=True)
        second = torch.autograd.grad(out.loss * 0.5, [h, w])
    h64, w64 = leaves(hidden.double(), weight.double())
    want = reference.fused_linear_grpo_loss(h64, w64, ids, mask, adv.double(), cfg, old_logp=old.double(),
                                            ref_logp=old.double(), compute_dtype=torch.float64)
    gh, gw = torch.autograd.grad(want.loss, [h64, w64])
    for label, (dh, dw), s in (("first", first, 1.0), ("second", second, 0.5)):
        assert_close_to_oracle(f"{label}/dhidden", dh, gh * s)
        assert_close_to_oracle(f"{label}/dweight", dw, gw * s)


# ---------------------------------------------------------------------------------------------------
# Errors of the shared resolve name the calling op
# ---------------------------------------------------------------------------------------------------


def _fused(h, w, ids, backend):
    B, T = ids.shape
    return gk.fused_linear_grpo_loss(h.reshape(B, T, -1), w, ids, torch.ones(B, T), torch.zeros(B),
                                     gk.GRPOConfig(beta=0.0), backend=backend)


OPS = {
    "linear_logprobs": lambda h, w, ids, backend: gk.linear_logprobs(h, w, ids, backend=backend),
    "fused_linear_grpo_loss": _fused,
}


@pytest.mark.parametrize("op", list(OPS))
def test_resolve_errors_name_the_calling_op(op, monkeypatch):
    h, w, ids = torch.randn(2, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 3))
    call = OPS[op]
    with pytest.raises(ValueError, match=f"^{op}: backend must be one of auto, cpu, triton, torch; got 'gpu'"):
        call(h, w, ids, "gpu")
    if HAS_CPU_EXT:
        with pytest.raises(TypeError, match=f"^{op}: backend='cpu' supports .*got float64 .*backend='torch'"):
            call(h.double(), w.double(), ids, "cpu")
    if backends.triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match=f"^{op}: backend='triton' needs CUDA tensors"):
            call(h, w, ids, "triton")


def test_group_advantages_resolves_through_the_same_rule():
    with pytest.raises(ValueError, match="^group_advantages: backend='cpu' needs CPU tensors; got tensors on meta"):
        gk.group_advantages(torch.zeros(4, device="meta"), 2, backend="cpu")
    gk.group_advantages(torch.randn(4), 2, backend="cpu")
    assert gk.last_backend("group_advantages") == "torch"  # no C++ kernel: the PyTorch code runs CPU tensors


def test_the_ids_argument_is_named_by_its_own_op():
    h, w, ids = torch.randn(2, 3, 8), torch.randn(11, 8), torch.full((2, 3), 11)
    with pytest.raises(ValueError, match=r"^linear_logprobs: targets must be in \[0, V\)"):
        gk.linear_logprobs(h, w, ids)
    with pytest.raises(ValueError, match=r"^fused_linear_grpo_loss: completion_ids must be in \[0, V\)"):
        _fused(h, w, ids, "torch")


# ---------------------------------------------------------------------------------------------------
# issue 11 items that live in the pipeline
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["dapo", "gspo"])
def test_float64_stays_float64_and_gradchecks(loss):
    """Item 5: float64 in means float64 throughout (log-probs, reduction weights, the loss): gradcheck passes."""
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.04) if loss == "dapo" else \
        gk.GRPOConfig(importance_sampling_level="sequence", beta=0.04)
    hidden, weight, ids, mask, adv, old = problem(B=2, T=3, D=5, V=7, dtype=torch.float64)
    adv = adv.double()

    def f(h, w):
        return gk.fused_linear_grpo_loss(h, w, ids, mask, adv, cfg, old_logp=old, ref_logp=old, backend="torch").loss

    h, w = leaves(hidden, weight)
    out = f(h, w)
    assert out.dtype == torch.float64
    want = reference.fused_linear_grpo_loss(hidden, weight, ids, mask, adv, cfg, old_logp=old, ref_logp=old).loss
    assert abs(out.item() - want.item()) <= 1e-12 * (1 + abs(want.item()))
    assert torch.autograd.gradcheck(lambda w_: f(hidden, w_), (w,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(lambda h_: f(h_, weight), (h,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("op", ["linear_logprobs", "fused_linear_grpo_loss"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused_by_name(backend, op):
    """Item 6: a backward with create_graph=True (a gradient penalty, say) raises instead of a silent wrong answer."""
    hidden, weight, ids, mask, adv, old = problem()
    h, w = leaves(hidden, weight)
    if op == "linear_logprobs":
        loss = gk.linear_logprobs(h, w, ids, backend=backend).sum()
    else:
        loss = gk.fused_linear_grpo_loss(h, w, ids, mask, adv, gk.GRPOConfig(beta=0.0), old_logp=old, backend=backend).loss
    with pytest.raises(RuntimeError, match=f"^{op}: create_graph must be False .*differentiable once"):
        torch.autograd.grad(loss, [h, w], create_graph=True)


def test_chunked_torch_accumulates_logits_in_fp32_at_large_bf16_magnitudes(seed):
    """Item 8: hidden states of magnitude ~50 give logits of ~1000; a bf16-rounded logit is off by up to 4 nats.
    The fallback must err at most 2x as much as the same inputs through an fp32 GEMM (what the kernels do)."""
    D, V = 64, 301
    h = (50.0 * torch.randn(40, D)).to(BF16)
    w = (torch.randn(V, D) / D**0.5).to(BF16)
    t = torch.randint(0, V, (40,))
    hh, ww = leaves(h, w)
    logp = gk.linear_logprobs(hh, ww, t, backend="torch")
    g = torch.randn(40)
    (logp * g).sum().backward()
    h64, w64 = leaves(h.double(), w.double())
    want = reference.linear_logprobs(h64, w64, t, compute_dtype=torch.float64)
    (want * g.double()).sum().backward()
    h32, w32 = leaves(h, w)
    fp32_gemm = reference.linear_logprobs(h32, w32, t, compute_dtype=torch.float32)
    (fp32_gemm * g).sum().backward()
    assert_close_to_oracle("logp", logp, want, fp32_gemm)
    assert float((logp.detach().double() - want.detach()).abs().max()) < 0.5  # a bf16 logits GEMM errs by nats here


class _PeakBytes(TorchDispatchMode):
    """Peak bytes of the storages that aten ops create inside the mode (polled after each op).

    Storages that existed before (the inputs) are not counted; allocations inside C++ kernels
    that do not go through aten (bounded workspaces) are not seen.
    """

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.skip = {x.untyped_storage().data_ptr() for x in existing}
        self.live: dict[int, tuple[int, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                st = x.untyped_storage()
                key = st.data_ptr()
                if st.nbytes() and key not in self.skip and key not in self.live:
                    self.live[key] = (st._weak_ref(), st.nbytes())
        for key in [k for k, (ref, _) in self.live.items() if torch.UntypedStorage._expired(ref)]:
            torch.UntypedStorage._free_weak_ref(self.live.pop(key)[0])
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _bounded(backend: str, V: int):
    """The backend with a workspace bounded below the smallest N measured."""
    if backend == "torch":
        from grpo_kernels.backends.chunked_torch import TorchBackend, TorchTuning

        return TorchBackend(TorchTuning(chunk_elements=256 * V))
    return backends.get(backend)


def _extra_peak(backend: str, n_tokens: int, D: int = 64, V: int = 1024) -> tuple[int, int]:
    B, T = n_tokens // 256, 256
    hidden = torch.randn(B, T, D).to(BF16)
    weight = (torch.randn(V, D) / D**0.5).to(BF16)
    ids = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[:, -32:] = 0
    adv = torch.randn(B)
    h, w = leaves(hidden, weight)
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.0)
    run = lambda: torch.autograd.grad(gk.fused_linear_grpo_loss(h, w, ids, mask, adv, cfg, backend=backend).loss, [h, w])  # noqa: E731
    with backends.use(_bounded(backend, V)):
        run()
        probe = _PeakBytes([h, w, ids, mask, adv])
        with probe:
            grads = run()
    returned = sum(g.numel() * g.element_size() for g in grads)
    return probe.peak - returned, int(mask.sum())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_extra_memory_grows_as_docs_design_states(backend):
    """Item 16, measured: besides a bounded workspace, the fused loss holds 2 x kept tokens x D x 2 bytes
    (bf16: the kept hidden rows, gathered for the kernels, and their dH before it is scattered) and
    under 64 bytes per token of [N] vectors; docs/design.md ("Memory") states this growth."""
    (small, n_small), (large, n_large) = _extra_peak(backend, 1024), _extra_peak(backend, 4096)
    per_token = (large - small) / (n_large - n_small)
    assert per_token <= 2 * 64 * 2 + 64, per_token
