"""linear_logprobs: every backend against the float64 oracle of reference.py (docs/design.md's 2x rule).

Values and gradients (dH, dW, dbias from random upstream gradients on logp and entropy) are
compared with ``reference.linear_logprobs(..., compute_dtype=torch.float64)``; the bar is twice the
error of the same reference run in the inputs' dtype. Outputs start as NaN (conftest), so a
token or gradient element a kernel never writes fails. The Triton backend runs on CUDA tensors
where a GPU is present, else on CPU tensors in the interpreter (TRITON_INTERPRET=1, set by conftest).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference
from grpo_kernels.backends import LogprobsParams
from oracle import HAS_CPU_EXT, assert_close_to_oracle, available_backends

BACKENDS = available_backends()
IGNORE = -100
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
DTYPE_IDS = {F32: "fp32", BF16: "bf16", F16: "fp16", F64: "fp64"}


def device_of(backend: str) -> torch.device:
    """Triton runs on CUDA when there is a GPU (conftest only turns the interpreter on without one)."""
    if backend == "triton" and not gk.backends.triton_interpret():
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass(frozen=True)
class Case:
    """One input configuration; ``str(case)`` is its pytest id."""

    shape: tuple[int, ...]  # leading dims of hidden ([B, T] or [N])
    vocab: int
    dim: int
    dtype: torch.dtype = F32
    bias: bool = False
    temperature: float = 1.0
    softcap: Optional[float] = None
    entropy: bool = False
    ignore: str = "none"  # "none" | "some" (scattered tokens and one whole row) | "all"
    grad_on: str = "auto"  # "logp" | "entropy" | "both"; auto: both when entropy is returned
    weight_view: bool = False  # weight as a non-contiguous [V, D] view of a [D, V] tensor

    def __str__(self) -> str:
        parts = [DTYPE_IDS[self.dtype], "x".join(map(str, self.shape)), f"V{self.vocab}", f"D{self.dim}"]
        parts += ["bias"] if self.bias else []
        parts += [f"temp{self.temperature:g}"] if self.temperature != 1.0 else []
        parts += [f"cap{self.softcap:g}"] if self.softcap is not None else []
        parts += ["ent"] if self.entropy else []
        parts += [f"ignore-{self.ignore}"] if self.ignore != "none" else []
        parts += [f"grad-{self.grad_on}"] if self.grad_on != "auto" else []
        parts += ["wview"] if self.weight_view else []
        return "-".join(parts)

    @property
    def grads(self) -> tuple[bool, bool]:
        """(upstream gradient on logp, upstream gradient on entropy)."""
        if self.grad_on == "auto":
            return True, self.entropy
        return self.grad_on in ("logp", "both"), self.grad_on in ("entropy", "both")

    def options(self) -> dict:
        return dict(temperature=self.temperature, softcap=self.softcap, ignore_index=IGNORE, return_entropy=self.entropy)


ALL = dict(bias=True, temperature=0.7, softcap=4.0, entropy=True)

SMALL_CASES = [
    Case((2, 7), 97, 40),
    Case((2, 7), 97, 40, BF16),
    Case((2, 7), 97, 40, F16, bias=True, temperature=0.7),
    Case((3, 1), 97, 24, entropy=True),  # T = 1
    Case((1,), 97, 24, BF16, bias=True, entropy=True),  # N = 1
    Case((2, 5), 97, 19, temperature=1.9),  # D odd and < one tile
    Case((3, 6), 97, 72, ignore="some", **ALL),
    Case((3, 6), 97, 72, BF16, ignore="some", **ALL),
    Case((2, 9), 97, 40, BF16, softcap=2.0, ignore="some"),
    Case((2, 4), 97, 24, entropy=True, grad_on="entropy", softcap=3.0),
    Case((2, 4), 97, 24, BF16, ignore="all", **ALL),
    Case((2, 3), 97, 40, weight_view=True, **ALL),
]

# Large vocabularies: tiny N and D. The torch / cpu backends run them all; Triton one case (below).
BIG_CASES = [
    Case((3,), v, 24, dt, ignore=ig, **ALL)
    for v in (50257, 151936) for dt, ig in ((F32, "none"), (BF16, "some"))
]
TRITON_BIG_CASE = Case((3,), 151936, 24, BF16, **ALL)


def make_inputs(case: Case):
    """hidden [*shape, D], weight [V, D], bias [V] | None, targets [*shape] on CPU; logits of order 1-5."""
    h = torch.randn(*case.shape, case.dim)
    if case.weight_view:
        w = (torch.randn(case.dim, case.vocab) * 2.0 / case.dim**0.5).to(case.dtype).t()
    else:
        w = (torch.randn(case.vocab, case.dim) * 2.0 / case.dim**0.5).to(case.dtype)
    b = (0.5 * torch.randn(case.vocab)).to(case.dtype) if case.bias else None
    t = torch.randint(0, case.vocab, case.shape)
    if case.ignore == "some":
        t[torch.rand(case.shape) < 0.25] = IGNORE
        if len(case.shape) > 1:
            t[-1] = IGNORE  # a fully ignored row (prompt padding, say)
    elif case.ignore == "all":
        t.fill_(IGNORE)
    return h.to(case.dtype), w, b, t


def run(fn, case: Case, h, w, b, t, g_logp, g_ent, device=None, **kwargs) -> dict:
    """Forward + backward of ``fn`` (gk.linear_logprobs or the reference) on fresh leaves -> values and grads."""
    device = device or h.device
    leaves = [x.detach().to(device).requires_grad_(True) if x is not None else None for x in (h, w, b)]
    out = fn(leaves[0], leaves[1], t.to(device), bias=leaves[2], **case.options(), **kwargs)
    logp, ent = out if case.entropy else (out, None)
    want_logp, want_ent = case.grads
    loss = 0.0
    if want_logp:
        loss = loss + (logp * g_logp.to(device, logp.dtype)).sum()
    if want_ent:
        loss = loss + (ent * g_ent.to(device, ent.dtype)).sum()
    loss.backward()
    res = {"logp": logp, "entropy": ent, "dhidden": leaves[0].grad, "dweight": leaves[1].grad,
           "dbias": None if b is None else leaves[2].grad}
    return {k: None if v is None else v.detach().cpu() for k, v in res.items()}


def check_case(backend: str, case: Case) -> None:
    h, w, b, t = make_inputs(case)
    g_logp, g_ent = torch.randn(case.shape), torch.randn(case.shape)
    ours = run(gk.linear_logprobs, case, h, w, b, t, g_logp, g_ent, device=device_of(backend), backend=backend)
    assert gk.last_backend() == backend
    up = lambda x: None if x is None else x.double()  # noqa: E731
    oracle = run(reference.linear_logprobs, case, h.double(), up(w), up(b), t, g_logp, g_ent, compute_dtype=F64)
    same = run(reference.linear_logprobs, case, h, w, b, t, g_logp, g_ent)

    assert ours["logp"].dtype == F32 and ours["logp"].shape == t.shape
    assert ours["dhidden"].dtype == h.dtype and ours["dweight"].dtype == w.dtype
    for name in ("logp", "entropy", "dhidden", "dweight", "dbias"):
        if oracle[name] is None:
            assert ours[name] is None, name
            continue
        assert_close_to_oracle(f"{backend}/{case}/{name}", ours[name], oracle[name], same_dtype=same[name])
    ignored = t == IGNORE
    if ignored.any():  # exact zeros, not just close ones
        assert (ours["logp"][ignored] == 0).all()
        assert (ours["dhidden"][ignored] == 0).all()
        if case.entropy:
            assert (ours["entropy"][ignored] == 0).all()


@pytest.mark.parametrize("case", SMALL_CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_oracle(backend, case, seed):
    check_case(backend, case)


@pytest.mark.parametrize("case", BIG_CASES, ids=str)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_large_vocab_matches_oracle(backend, case, seed):
    check_case(backend, case)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_large_vocab_matches_oracle_triton(seed):
    """One Qwen-sized vocabulary through the Triton kernels (about 10 s in the interpreter)."""
    check_case("triton", TRITON_BIG_CASE)


# ---------------------------------------------------------------------------------------------------
# Backend internals: the fused single pass and (Triton) the split-reduction grids
# ---------------------------------------------------------------------------------------------------


def backend_call_inputs(case: Case, device: torch.device):
    """Flattened inputs as a backend receives them (no ignore_index tokens) and oracle results."""
    h, w, b, t = make_inputs(replace(case, ignore="none"))
    h, t = h.reshape(-1, case.dim), t.reshape(-1)
    g_logp, g_ent = torch.randn(t.shape), torch.randn(t.shape)
    up = lambda x: None if x is None else x.double()  # noqa: E731
    flat = replace(case, shape=tuple(t.shape))
    oracle = run(reference.linear_logprobs, flat, h.double(), up(w), up(b), t, g_logp, g_ent, compute_dtype=F64)
    same = run(reference.linear_logprobs, flat, h, w, b, t, g_logp, g_ent)
    mv = lambda x: None if x is None else x.to(device)  # noqa: E731
    return (mv(h), mv(w), mv(b), mv(t)), g_logp.to(device), g_ent.to(device), oracle, same


def compare_backend_outputs(label, got: dict, oracle: dict, same: dict) -> None:
    for name, value in got.items():
        if oracle[name] is None:
            assert value is None, name
            continue
        assert_close_to_oracle(f"{label}/{name}", value.cpu(), oracle[name], same_dtype=same[name])


# Every backend has forward_backward (the contract): its own one pass, or the shared two-pass schedule.
ONE_PASS_BACKENDS = [name for name in BACKENDS if isinstance(gk.backends.get(name), gk.backends.Backend)]


@pytest.mark.parametrize("case", [Case((5, 3), 97, 40, BF16, **ALL), Case((7,), 97, 24, temperature=0.8)], ids=str)
@pytest.mark.parametrize("backend", ONE_PASS_BACKENDS)
def test_forward_backward_single_pass(backend, case, seed):
    """forward_backward (the fused loss's pass) == forward, coef_fn, backward; chunks cover [0, N) in order."""
    impl = gk.backends.get(backend)
    (h, w, b, t), g_logp, g_ent, oracle, same = backend_call_inputs(case, device_of(backend))
    params = LogprobsParams.make(case.temperature, case.softcap, case.entropy)
    chunks = []

    def coef_fn(start, end, lp, en):
        chunks.append((start, end))
        assert lp.shape == (end - start,) and (en is None) == (not case.entropy)
        return g_logp[start:end], (g_ent[start:end] if case.entropy else None)

    logp, ent, formed = impl.forward_backward(h, w, b, t, params, coef_fn, (True, True, b is not None))
    dh, dw, db = formed.finish(None)
    assert chunks[0][0] == 0 and chunks[-1][1] == t.numel()
    assert all(e0 == s1 for (_, e0), (s1, _) in zip(chunks, chunks[1:])), chunks
    got = {"logp": logp, "entropy": ent, "dhidden": dh, "dweight": dw, "dbias": db}
    compare_backend_outputs(f"{backend}/fb/{case}", got, oracle, same)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_skips_unneeded_gradients(backend, seed):
    case = Case((6,), 97, 24, BF16, **ALL)
    (h, w, b, t), g_logp, g_ent, oracle, same = backend_call_inputs(case, device_of(backend))
    impl = gk.backends.get(backend)
    params = LogprobsParams.make(case.temperature, case.softcap, True)
    logp, ent, lse = impl.forward(h, w, b, t, params)
    for needs in [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]:
        grads = impl.backward(h, w, b, t, lse, ent, g_logp, g_ent, params, needs)
        for name, need, got in zip(("dhidden", "dweight", "dbias"), needs, grads):
            if not need:
                assert got is None, (needs, name)
            else:
                assert_close_to_oracle(f"{backend}/{needs}/{name}", got.cpu(), oracle[name], same_dtype=same[name])


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
@pytest.mark.parametrize("programs, splits", [(64, ((7, 1), (3, 1))), (9, ((3, 3), (2, 2)))], ids=["one-block-per-split", "uneven-splits"])
@pytest.mark.parametrize("case", [Case((37,), 97, 40, **ALL), Case((37,), 97, 40, BF16, **ALL),
                                  Case((20,), 97, 24, F16, bias=True)], ids=str)
def test_triton_split_grids(case, programs, splits, seed):
    """Tiny tiles and a large program target: the forward / dH kernels split the vocabulary and the dW
    kernel splits the tokens over programs (what a GPU runs at small N), merged by the combine and
    split-sum kernels. The default interpreter tiles never split, so this is their only CPU coverage."""
    from grpo_kernels.backends.triton import logprobs_launch as launch

    cfg = launch.LaunchConfig(block_n=16, block_v=16, block_d=16, num_stages=1, target_programs=programs)
    assert (cfg.split(7, 3), cfg.split(3, 7)) == splits  # (97 columns / 16 over 3 row blocks, and back)
    assert replace(cfg, max_partial_bytes=4 * 97 * 40 * 2).split(3, 7, 97 * 40)[0] <= 2  # memory cap
    (h, w, b, t), g_logp, g_ent, oracle, same = backend_call_inputs(case, device_of("triton"))
    params = LogprobsParams.make(case.temperature, case.softcap, case.entropy)
    logp, ent, lse = launch.forward(h, w, b, t, params, cfg)
    dh, dw, db = launch.backward(h, w, b, t, lse, ent, g_logp, g_ent if case.entropy else None, params,
                                 (True, True, True), cfg)
    got = {"logp": logp, "entropy": ent, "dhidden": dh, "dweight": dw, "dbias": db}
    compare_backend_outputs(f"triton-split/{case}", got, oracle, same)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_triton_rejects_float64():
    h, w, t = torch.randn(2, 8, dtype=F64), torch.randn(5, 8, dtype=F64), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="backend='torch'"):
        gk.linear_logprobs(h.to(device_of("triton")), w.to(device_of("triton")), t.to(device_of("triton")),
                           backend="triton")


# ---------------------------------------------------------------------------------------------------
# Autograd plumbing
# ---------------------------------------------------------------------------------------------------


def test_gradcheck_float64(seed):
    """fp64 gradcheck of the autograd Function (torch backend) with bias, softcap, temperature, entropy."""
    h = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    w = torch.randn(11, 5, dtype=F64, requires_grad=True)
    b = torch.randn(11, dtype=F64, requires_grad=True)
    t = torch.randint(0, 11, (2, 3))
    t[1, 2] = IGNORE

    def fn(h, w, b):
        return gk.linear_logprobs(h, w, t, bias=b, temperature=0.8, softcap=2.5, return_entropy=True, backend="torch")

    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_returns_plain_outputs(backend, seed):
    dev = device_of(backend)
    h = torch.randn(2, 3, 24, device=dev, requires_grad=True)
    w = torch.randn(97, 24, device=dev, requires_grad=True)
    t = torch.randint(0, 97, (2, 3), device=dev)
    with torch.no_grad():
        logp, ent = gk.linear_logprobs(h, w, t, return_entropy=True, backend=backend)
    assert not logp.requires_grad and not ent.requires_grad
    assert logp.grad_fn is None and ent.grad_fn is None
    assert h.grad is None and w.grad is None
    # inputs without requires_grad: no graph either
    out = gk.linear_logprobs(h.detach(), w.detach(), t, backend=backend)
    assert out.grad_fn is None and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_backend_reports_what_ran(backend):
    dev = device_of(backend)
    h, w, t = torch.randn(4, 16, device=dev), torch.randn(33, 16, device=dev), torch.randint(0, 33, (4,), device=dev)
    gk.linear_logprobs(h, w, t, backend=backend)
    assert gk.last_backend() == backend
    assert gk.last_backend("linear_logprobs") == backend


def test_last_backend_auto_on_cpu(monkeypatch):
    monkeypatch.delenv("GRPO_KERNELS_BACKEND", raising=False)
    h, w, t = torch.randn(4, 16), torch.randn(33, 16), torch.randint(0, 33, (4,))
    gk.linear_logprobs(h, w, t)
    assert gk.last_backend() == ("cpu" if HAS_CPU_EXT else "torch")


# ---------------------------------------------------------------------------------------------------
# Input validation: every message names the argument
# ---------------------------------------------------------------------------------------------------


def _good():
    return torch.randn(2, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 3))


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        pytest.param(lambda h, w, t, kw: (h, w, t.fill_(11), kw), ValueError, r"targets.*\[0, 11\).*got 11", id="target-too-big"),
        pytest.param(lambda h, w, t, kw: (h, w, t.fill_(-3), kw), ValueError, r"targets.*got -3", id="target-negative"),
        pytest.param(lambda h, w, t, kw: (h, w, t.float(), kw), TypeError, "targets", id="float-targets"),
        pytest.param(lambda h, w, t, kw: (h, w, t[:, :2], kw), ValueError, "targets", id="targets-shape"),
        pytest.param(lambda h, w, t, kw: (h[..., :7], w, t, kw), ValueError, r"hidden.*D = weight.shape\[1\] = 8", id="D-mismatch"),
        pytest.param(lambda h, w, t, kw: (h, w[None], t, kw), ValueError, r"weight must be \[V, D\]", id="weight-3d"),
        pytest.param(lambda h, w, t, kw: (h, w, t, {"temperature": 0.0}), ValueError, "temperature", id="temperature-0"),
        pytest.param(lambda h, w, t, kw: (h, w, t, {"temperature": -1.0}), ValueError, "temperature", id="temperature-neg"),
        pytest.param(lambda h, w, t, kw: (h, w, t, {"softcap": 0.0}), ValueError, "softcap", id="softcap-0"),
        # ints beyond float64 used to escape as a raw OverflowError from math.isfinite
        pytest.param(lambda h, w, t, kw: (h, w, t, {"temperature": 10**400}), ValueError,
                     "^linear_logprobs: temperature must be a finite number > 0; got 1000", id="temperature-int-beyond-f64"),
        pytest.param(lambda h, w, t, kw: (h, w, t, {"softcap": 10**400}), ValueError,
                     "^linear_logprobs: softcap must be a finite number > 0; got 1000", id="softcap-int-beyond-f64"),
        pytest.param(lambda h, w, t, kw: ((h * 10).long(), w, t, kw), TypeError, "hidden.*floating", id="integer-hidden"),
        pytest.param(lambda h, w, t, kw: (h, w.bfloat16(), t, kw), TypeError, "hidden and weight.*dtype", id="dtype-mismatch"),
        pytest.param(lambda h, w, t, kw: (h.to("meta"), w, t, kw), ValueError, "device.*hidden on meta", id="device-mismatch"),
        pytest.param(lambda h, w, t, kw: (h, w, t, {"bias": torch.randn(12)}), ValueError, r"bias must be \[V\]", id="bias-shape"),
        pytest.param(lambda h, w, t, kw: (h, w, t, {"bias": torch.randn(11).double()}), TypeError, "bias", id="bias-dtype"),
        pytest.param(lambda h, w, t, kw: (h, w, t, {"backend": "cuda-magic"}), ValueError, "backend.*cuda-magic", id="unknown-backend"),
        pytest.param(lambda h, w, t, kw: (h, w, t, {"return_entropy": 1}), TypeError, "return_entropy", id="entropy-flag"),
    ],
)
def test_bad_inputs_name_the_argument(mutate, error, match):
    h, w, t, kw = mutate(*_good(), {})
    with pytest.raises(error, match=match):
        gk.linear_logprobs(h, w, t, **kw)


# ---------------------------------------------------------------------------------------------------
# C++ backend: token super-chunks (flat memory in N) and dW accumulated across them
# ---------------------------------------------------------------------------------------------------

SUPER_CHUNK_CASES = [
    Case((3, 250), 613, 40, BF16, **ALL),  # 750 tokens in super-chunks of 256: an odd last chunk
    Case((700,), 300, 34, F16, bias=True, entropy=True),
    Case((600,), 500, 64, F32, bias=True),
    Case((513,), 97, 33, BF16, bias=True),  # odd D: the plain (non-VNNI) GEMM path
]


@pytest.mark.skipif(not HAS_CPU_EXT, reason="the C++ extension grpo_kernels._C is not built")
@pytest.mark.parametrize("case", SUPER_CHUNK_CASES, ids=str)
def test_cpu_super_chunks_match_oracle(case, seed):
    """Inputs larger than one super-chunk: dW crosses super-chunks through the compensated accumulator."""
    from grpo_kernels.backends import cpu

    with gk.backends.use(cpu.CpuBackend(cpu.CpuTuning(super_chunk_tokens=256))):
        check_case("cpu", case)


@pytest.mark.skipif(not HAS_CPU_EXT, reason="the C++ extension grpo_kernels._C is not built")
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
def test_cpu_dweight_across_super_chunks_is_rounded_once(dtype, seed):
    """16 super-chunks give the dW of one: the int8 residual carries what bf16/fp16 rounding drops."""
    from grpo_kernels.backends import cpu

    n, v, d = 4096, 64, 32
    h = torch.randn(n, d).to(dtype)
    w = (torch.randn(v, d) / d**0.5).to(dtype)
    t = torch.randint(0, v, (n,))
    g = torch.randn(n)
    params = LogprobsParams.make(1.0, None, False)
    once, split = cpu.CpuBackend(), cpu.CpuBackend(cpu.CpuTuning(super_chunk_tokens=256))
    _, _, lse = once.forward(h, w, None, t, params)
    _, dw_once, _ = once.backward(h, w, None, t, lse, None, g, None, params, (False, True, False))
    _, dw_split, _ = split.backward(h, w, None, t, lse, None, g, None, params, (False, True, False))
    ulp = torch.finfo(dtype).eps * dw_once.float().abs().max()
    assert (dw_split.float() - dw_once.float()).abs().max() <= ulp


@pytest.mark.skipif(not HAS_CPU_EXT, reason="the C++ extension grpo_kernels._C is not built")
@pytest.mark.parametrize("dtype", [BF16, torch.float32], ids=["bf16", "fp32"])
def test_cpu_backward_super_chunks_budget_the_dw_residual(dtype):
    """The two-pass backward's default sizing at the Qwen head: one super-chunk while N fits its 96 MB
    budget; past that, a 16-bit dW's int8 residual [V, D] counts against the split budget (200 MB), the
    super-chunks are balanced, and the workspace stays flat in N (issue 14's N = 16384 case). An engine
    that widens 16-bit operands to fp32 copies (off AMX) has those copies counted too."""
    v, d = 151936, 896
    ext = gk.backends.cpu_extension()
    threads = ext.num_threads()
    engine = "brgemm"
    widens = ext.widens_operands(engine, dtype)
    assert widens == (dtype != torch.float32 and not ext.has_amx(dtype))
    # the backward's buffers per token of a super-chunk: per thread an fp32 dH^T column and 4 x 256 dZ values;
    # once N is split, also the fp32 copies of a whole-group GEMM's dZ_g^T and H columns where the engine widens
    per_token = threads * (4 * d + 1024 * dtype.itemsize + (4 * (1024 + d) if widens else 0))
    sizes = {n: ext.backward_tokens(n, v, d, dtype, True, engine) for n in (1024, 4096, 8192, 16384, 65536)}
    for n, s in sizes.items():
        assert s % 256 == 0 or s == n, (n, s)
        assert s <= n
    if dtype == torch.float32:  # fp32 super-chunks are capped at 1024 tokens, and an fp32 dW has no residual
        assert all(s == min(n, 1024) for n, s in sizes.items()), sizes
    else:
        assert sizes[1024] == 1024 and sizes[4096] == 4096 and sizes[8192] == 8192
        for n in (16384, 65536):
            s = sizes[n]
            assert _ceil_div(n, s) >= 2
            assert s * per_token + v * d <= 200 << 20, (n, s)
            # as few super-chunks as the budget allows (each one re-reads W and dW), balanced within them
            largest = ((200 << 20) - v * d) // per_token // 256 * 256
            k = _ceil_div(n, largest)
            assert _ceil_div(n, s) == k, (n, s, largest)
            assert s == _ceil_div(_ceil_div(n, k), 256) * 256, (n, s, k)  # n / k rounded up to whole token chunks
    # without dW there is no residual to budget: the 96 MB budget's larger super-chunks
    no_dw = ext.backward_tokens(16384, v, d, dtype, False, engine)
    assert no_dw == sizes[16384] if dtype == torch.float32 else no_dw > sizes[16384]


@pytest.mark.skipif(not HAS_CPU_EXT, reason="the C++ extension grpo_kernels._C is not built")
def test_widening_engine_counts_its_copies_in_the_backward_budget():
    """mkl-upcast always widens 16-bit operands, so its super-chunks are the smaller ones; fp32 never widens."""
    ext = gk.backends.cpu_extension()
    v, d = 151936, 896
    assert ext.widens_operands("mkl-upcast", BF16) and not ext.widens_operands("mkl", torch.float32)
    upcast = ext.backward_tokens(16384, v, d, BF16, True, "mkl-upcast")
    if ext.widens_operands("brgemm", BF16):  # off AMX both widen: the same sizing
        assert upcast == ext.backward_tokens(16384, v, d, BF16, True, "brgemm")
    else:  # on AMX brgemm reads its operands in place
        assert upcast < ext.backward_tokens(16384, v, d, BF16, True, "brgemm")


@pytest.mark.skipif(not HAS_CPU_EXT, reason="the C++ extension grpo_kernels._C is not built")
def test_vnni_gradient_engine_counts_its_packed_h_in_the_backward_budget():
    """Engines whose two-pass dW takes VNNI-packed dZ per chunk (brgemm-vnni, avx512-bf16) keep H^T of the whole
    super-chunk in bf16 beside the per-thread buffers: 2 D bytes more per token, counted against the split
    budget (with the int8 dW residual) like a widening engine's copies; one super-chunk is sized as before."""
    ext = gk.backends.cpu_extension()
    v, d, threads = 151936, 896, ext.num_threads()
    own = threads * (4 * d + 1024 * 2)
    for n in (16384, 65536):
        s = ext.backward_tokens(n, v, d, BF16, True, "avx512-bf16")
        assert s * (own + 2 * d) + v * d <= 200 << 20, (n, s)
        assert ext.backward_tokens(n, v, d, BF16, False, "avx512-bf16") > s  # no dW: no residual, no packed H
    assert ext.backward_tokens(8192, v, d, BF16, True, "avx512-bf16") == 8192  # one super-chunk still


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
