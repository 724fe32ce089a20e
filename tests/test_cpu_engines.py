"""The C++ backend's tile-GEMM engines (backends/cpu_engines.py), each forced in turn.

Every engine this machine can run is checked against the float64 oracle by the 2x rule, for
linear_logprobs forward + backward and for the fused GRPO loss on the one-pass schedule (and on the
two-pass one); an engine that cannot run a dtype here is skipped with the reason the extension gives.
Hidden sizes: even (brgemm takes VNNI-packed operands on AMX) and odd (the plain path everywhere).
"""

from __future__ import annotations

import pytest
import torch

import grpo_kernels as gk
from oracle import HAS_CPU_EXT

pytestmark = pytest.mark.skipif(not HAS_CPU_EXT, reason="the C++ extension grpo_kernels._C is not built")

if HAS_CPU_EXT:
    from grpo_kernels.backends import cpu, cpu_engines

ENGINES = ("brgemm", "brgemm-vnni", "mkl", "mkl-upcast", "atmm", "amx", "avx512-bf16", "amx-emulated")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENV = "GRPO_KERNELS_CPU_ENGINE"
# our own kernels, which read B in VNNI pairs (amx_gemm.h, avx512_bf16_gemm.h); amx-emulated runs the amx kernel
# on software tiles, so that its code and the schedules' amx branches are tested on every machine
VNNI_KERNELS = ("amx", "amx-emulated", "avx512-bf16")


def force(monkeypatch, engine: str, dtype: torch.dtype) -> None:
    """Forces ``engine`` for every dtype, or skips when it cannot run ``dtype`` here."""
    why = cpu_engines.unavailable(engine, dtype)
    if why is not None:
        pytest.skip(f"engine {engine} cannot run {dtype} here: {why}")
    monkeypatch.setenv(ENV, engine)
    assert cpu_engines.engine_for(dtype) == engine


@pytest.mark.parametrize("dim", [64, 33], ids=["D64", "D33"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("engine", ENGINES)
def test_linear_logprobs_on_engine(engine, dtype, dim, seed, monkeypatch):
    """Forward and backward (dH, dW, dbias; logp and entropy gradients) on the forced engine."""
    from test_linear_logprobs import ALL, Case, check_case

    force(monkeypatch, engine, DTYPES[dtype])
    assert cpu.gemm_path(DTYPES[dtype], dim).startswith(engine + "/")
    check_case("cpu", Case((3, 70), 1031, dim, DTYPES[dtype], ignore="some", **ALL))


# M x N x K: row tails of every length below the avx512-bf16 kernel's 6-row strip, partial (masked) column
# vectors and 1-4 vectors per 64-column panel, K in several 512-element slices with a tail (1030), the amx
# kernel's 32-aligned blocks with ragged rests, and the forward's tile.
TILE_SHAPES = [(1, 1, 2), (5, 17, 64), (6, 64, 512), (7, 65, 514), (13, 130, 1030), (64, 48, 896), (257, 272, 896)]


@pytest.mark.parametrize("add", [False, True], ids=["store", "add"])
@pytest.mark.parametrize("m, n, k", TILE_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in TILE_SHAPES])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_tile_gemm_matches_float64(engine, dtype, m, n, k, add, seed):
    """Each engine's own GEMM, C (+)= A B from strided A and C, B in the layout the engine takes (VNNI pairs for
    brgemm-vnni, amx and avx512-bf16): every element within fp32 accumulation error of a float64 matmul, and the
    columns of C's rows past N (its leading-dimension padding) untouched."""
    dt = DTYPES[dtype]
    why = cpu_engines.unavailable(engine, dt)
    if why is not None:
        pytest.skip(f"engine {engine} cannot run {dt} here: {why}")
    vnni = dt != torch.float32 and engine in ("brgemm-vnni",) + VNNI_KERNELS
    a = torch.randn(m, k + 5)[:, :k].to(dt)  # rows k + 5 apart
    b = torch.randn(k, n).to(dt)
    buf = torch.randn(m, n + 7)  # C rows n + 7 apart
    before = buf.clone()
    c = buf[:, :n]
    cpu._ext().tile_gemm_check(engine, a, b, c, add, vnni)
    a64, b64 = a.double(), b.double()
    exact = a64 @ b64 + (before[:, :n].double() if add else 0.0)
    # fp32 accumulation of k products: far inside k * 2^-24 of the sum of magnitudes (a wrong element is O(1) off)
    scale = a64.abs() @ b64.abs() + (before[:, :n].double().abs() if add else 0.0)
    err = (c.double() - exact).abs()
    bound = 2e-5 * scale + 1e-6
    assert torch.isfinite(c).all(), f"{engine}: non-finite output"
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"{engine} {dtype} {m}x{n}x{k}: element {divmod(worst, n)} off by {err.reshape(-1)[worst]:.3e}"
        f" (bound {bound.reshape(-1)[worst]:.3e})")
    assert torch.equal(buf[:, n:], before[:, n:]), f"{engine}: wrote past column {n} of C"


def test_engine_tile_gemm_check_rejects_what_no_engine_takes():
    """The test entry refuses VNNI operands for an engine that reads none, an odd K in pairs, and mismatched
    shapes, naming what is wrong, before any GEMM runs."""
    ext = cpu._ext()
    a, b, c = torch.randn(4, 6).bfloat16(), torch.randn(6, 5).bfloat16(), torch.zeros(4, 5)
    with pytest.raises(RuntimeError, match="takes no VNNI operands"):
        ext.tile_gemm_check("brgemm", a, b, c, False, True)
    with pytest.raises(RuntimeError, match="even k"):
        ext.tile_gemm_check("brgemm", a[:, :5], b[:5], c, False, True)
    with pytest.raises(RuntimeError, match=r"a \[m, k\], b \[k, n\]"):
        ext.tile_gemm_check("brgemm", a, b[:5], c, False, False)
    with pytest.raises(RuntimeError, match=r"c \[m, n\] fp32"):
        ext.tile_gemm_check("brgemm", a, b, c[:, :4], False, False)
    with pytest.raises(RuntimeError, match="needs its residual"):
        ext.tile_gemm_flush_check("brgemm", a, b, torch.zeros(4, 5).bfloat16(), None, False, False)
    with pytest.raises(RuntimeError, match="lo int8 like out"):
        ext.tile_gemm_flush_check("brgemm", a, b, torch.zeros(4, 5).bfloat16(), torch.zeros(4, 4, dtype=torch.int8),
                                  True, False)


def _compensated_add(hi: torch.Tensor, lo: torch.Tensor | None, tile: torch.Tensor, first: bool):
    """The dW accumulator's rule (csrc/dw_accumulator.h), decoded here independently: a 16-bit dW is hi plus an
    int8 residual in units of ulp(hi) / 256 (bf16: 2^(max(e, 1) - 15 - 127) for hi's float exponent field e; fp16:
    2^(max(e, 113) - 18 - 127)); adding an fp32 tile rounds hi + residual + tile to nearest even and keeps the
    rest, rounded to nearest even and clamped to +-127 units, as the new residual. fp32: a plain add."""
    if hi.dtype == torch.float32:
        return (tile.clone() if first else hi + tile), None
    min_field, shift = (1, 15) if hi.dtype == torch.bfloat16 else (113, 18)

    def field(h: torch.Tensor) -> torch.Tensor:
        return ((h.view(torch.int32) >> 23) & 0xFF).clamp(min=min_field) - shift

    def pow2(f: torch.Tensor) -> torch.Tensor:  # 2^(f - 127) where f > 0, else 0
        return torch.where(f > 0, (f.clamp(min=1) << 23).view(torch.float32), torch.zeros(f.shape))

    full = tile if first else (hi.float() + lo.float() * pow2(field(hi.float()))) + tile
    new_hi = full.to(hi.dtype)
    if lo is None:
        return new_hi, None
    h = new_hi.float()
    uf = field(h)
    q = torch.where(uf > 0, torch.round((full - h) * pow2(254 - uf)), torch.zeros(h.shape))
    return new_hi, q.clamp(-127, 127).to(torch.int8)


# (m, n, k): row and column tails of the engines' blocks and of flush_dw's 16- and 8-lane loops (its scalar tail),
# K across a slice boundary (avx512-bf16 slices 512), the one pass's own block shape (256 vocab rows x D x 256 tokens).
FLUSH_SHAPES = [(1, 5, 2), (5, 17, 34), (7, 100, 256), (13, 64, 512), (6, 130, 514), (256, 896, 256)]


@pytest.mark.parametrize("state", ["first", "first-no-residual", "add"])
@pytest.mark.parametrize("m, n, k", FLUSH_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in FLUSH_SHAPES])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("engine", ENGINES)
def test_engine_dw_step_is_its_gemm_then_the_compensated_add(engine, dtype, m, n, k, state, seed):
    """The one pass's dW step (the engine's GEMM into fp32, then flush_dw) stores exactly the bits of that product
    added into dW and its int8 residual by the accumulator's rule, decoded here independently, from a dW state that
    is not zero, and writes nothing past either. That is the schedules' 16-bit step (dw_step); an fp32 dW they form
    by the GEMM in place, whose bits are the engine's own, so for fp32 this checks flush_dw's rule alone."""
    dt = DTYPES[dtype]
    why = cpu_engines.unavailable(engine, dt)
    if why is not None:
        pytest.skip(f"engine {engine} cannot run {dt} here: {why}")
    if dt == torch.float32 and state == "first-no-residual":
        pytest.skip("an fp32 dW keeps no residual: the 'first' case is this one")
    vnni = dt != torch.float32 and engine in ("brgemm-vnni",) + VNNI_KERNELS
    a = torch.randn(m, k + 5)[:, :k].to(dt)  # rows k + 5 apart
    b = torch.randn(k, n).to(dt)
    # an earlier chunk's dW and its residual, each followed by 64 guard elements that must stay untouched
    out_buf = (4 * torch.randn(m * n + 64)).to(dt)
    out = out_buf[: m * n].view(m, n)
    lo_buf = None if dt == torch.float32 or state == "first-no-residual" else torch.randint(-127, 128, (m * n + 64,), dtype=torch.int8)
    lo = None if lo_buf is None else lo_buf[: m * n].view(m, n)
    hi0, lo0 = out.clone(), None if lo is None else lo.clone()
    guards = [buf[m * n :].clone() for buf in (out_buf, lo_buf) if buf is not None]
    first = state != "add"
    c = cpu._ext().tile_gemm_flush_check(engine, a, b, out, lo, first, vnni)
    # the product is the GEMM's (a wrong or missing one is O(1) off)
    exact = a.double() @ b.double()
    assert bool(((c.double() - exact).abs() <= 2e-5 * (a.double().abs() @ b.double().abs()) + 1e-6).all())
    want_hi, want_lo = _compensated_add(hi0, lo0, c, first)
    bits = torch.int16 if dt != torch.float32 else torch.int32
    diff = (out.view(bits) != want_hi.view(bits)).nonzero()
    assert diff.numel() == 0, f"{engine} {dtype}: dW differs at {diff[:4].tolist()} ({diff.shape[0]} elements)"
    if lo is not None:
        diff = (lo != want_lo).nonzero()
        assert diff.numel() == 0, f"{engine} {dtype}: residual differs at {diff[:4].tolist()} ({diff.shape[0]} elements)"
    for buf, guard in zip((out_buf, lo_buf), guards):
        assert torch.equal(buf[m * n :], guard), f"{engine} {dtype}: wrote past the end of dW or its residual"


@pytest.mark.parametrize("dim", [326, 896, 1030], ids=["D326", "D896", "D1030"])
@pytest.mark.parametrize("engine", VNNI_KERNELS)
def test_vnni_kernel_k_slices_and_ragged_edges(engine, dim, seed, monkeypatch):
    """Our VNNI kernels at D with K slices and a K tail (326 = 256 + 64 + 6 for amx; 1030 = 512 + 512 + 6 for
    avx512-bf16) or the benchmarks' D, with vocab and token counts off multiples of 32 (amx runs its ragged edges on
    ATen's brgemm (amx-emulated: a plain loop), avx512-bf16 on narrower strips and masked column vectors of its own)."""
    from test_linear_logprobs import ALL, Case, check_case

    force(monkeypatch, engine, torch.bfloat16)
    assert cpu.gemm_path(torch.bfloat16, dim) in ("amx/amx-vnni", "amx-emulated/amx-vnni", "avx512-bf16/vnni")
    check_case("cpu", Case((3, 67), 1000, dim, torch.bfloat16, ignore="some", **ALL))


@pytest.mark.parametrize("engine", VNNI_KERNELS)
def test_vnni_kernel_over_super_chunks_with_an_odd_last_one(engine, seed, monkeypatch):
    """A VNNI kernel over several super-chunks (dW accumulated across them), the last one odd
    (601 = 256 + 256 + 89 tokens: its VNNI-packed H^T pairs the last token's features with zeros)."""
    from test_linear_logprobs import Case, check_case

    force(monkeypatch, engine, torch.bfloat16)
    with gk.backends.use(cpu.CpuBackend(cpu.CpuTuning(super_chunk_tokens=256))):
        check_case("cpu", Case((601,), 517, 64, torch.bfloat16, bias=True, entropy=True))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("engine", ENGINES)
def test_linear_logprobs_on_engine_over_super_chunks(engine, dtype, seed, monkeypatch):
    """Several backward super-chunks (dW accumulated across them) on the forced engine."""
    from test_linear_logprobs import Case, check_case

    force(monkeypatch, engine, DTYPES[dtype])
    with gk.backends.use(cpu.CpuBackend(cpu.CpuTuning(super_chunk_tokens=256))):
        check_case("cpu", Case((600,), 517, 48, DTYPES[dtype], bias=True, entropy=True))


@pytest.mark.parametrize("schedule", ["one-pass", "two-pass"])
@pytest.mark.parametrize("dim", [64, 33], ids=["D64", "D33"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("engine", ENGINES)
def test_fused_loss_on_engine(engine, dtype, dim, schedule, seed, monkeypatch):
    """The fused GRPO loss (dapo, KL, entropy bonus, bias) over several token chunks, each schedule forced."""
    from test_fused_loss import _forbid, check, make_problem, oracle64, run_loss, same_dtype

    force(monkeypatch, engine, DTYPES[dtype])
    one = schedule == "one-pass"
    # the one pass never runs the two-pass functions; the two passes never the chunk loop
    _forbid(monkeypatch, cpu.CpuBackend, *(("forward", "backward") if one else ("_one_pass_schedule",)))
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.04, entropy_coef=0.05)
    hidden, weight, b, ids, mask, adv, old, ref = make_problem(B=4, T=40, D=dim, V=611, dtype=DTYPES[dtype], bias=True)
    with gk.backends.use(cpu.CpuBackend(cpu.CpuTuning(fused_chunk_tokens=48, schedule=schedule))):
        out, grads = run_loss(gk.fused_linear_grpo_loss, hidden, weight, b, ids, mask, adv, cfg, old, ref, backend="cpu")
    args = (hidden, weight, b, ids, mask, adv, cfg, old, ref)
    check(out, grads, oracle64(*args), same_dtype(*args))


@pytest.mark.parametrize("dim", [64, 326], ids=["D64", "D326"])
@pytest.mark.parametrize("engine", VNNI_KERNELS)
def test_vnni_kernel_one_pass_gradients_with_odd_chunk_and_vocab(engine, dim, seed, monkeypatch):
    """The one pass on a VNNI kernel takes VNNI operands in its gradient GEMMs too (H_chunk in token pairs,
    W_group in vocab-row pairs): an odd last chunk (123 = 48 + 48 + 27 tokens) pairs its last token with zero, an
    odd vocabulary (611) its last W row; D = 326 adds K slices and a K tail to the dW GEMM's N side."""
    from test_fused_loss import check, make_problem, oracle64, run_loss, same_dtype

    force(monkeypatch, engine, torch.bfloat16)
    cfg = gk.GRPOConfig(loss_type="dapo", beta=0.04, entropy_coef=0.05)
    hidden, weight, b, ids, mask, adv, old, ref = make_problem(B=3, T=41, D=dim, V=611, dtype=torch.bfloat16, bias=True)
    with gk.backends.use(cpu.CpuBackend(cpu.CpuTuning(fused_chunk_tokens=48, schedule="one-pass"))):
        out, grads = run_loss(gk.fused_linear_grpo_loss, hidden, weight, b, ids, mask, adv, cfg, old, ref, backend="cpu")
    args = (hidden, weight, b, ids, mask, adv, cfg, old, ref)
    check(out, grads, oracle64(*args), same_dtype(*args))


def test_default_schedule_two_passes_only_for_16bit_on_amx():
    """One pass everywhere but for 16-bit tiles on AMX at an even D, where two passes measured faster."""
    for dt in DTYPES.values():
        amx = dt != torch.float32 and cpu._ext().has_amx(dt)
        assert cpu.one_pass(dt, 896) == (not amx)
        assert cpu.one_pass(dt, 33)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_default_selection_is_runnable_and_reported(dtype, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    dt = DTYPES[dtype]
    engine, why = cpu_engines.selection(dt)
    assert engine in cpu_engines.available_engines(dt) and why
    assert cpu.gemm_path(dt, 896).startswith(engine + "/")
    if dt == torch.bfloat16 and cpu_engines.unavailable("amx", dt) is None:
        assert (engine, cpu.gemm_path(dt, 896)) == ("amx", "amx/amx-vnni")
    elif dt == torch.bfloat16 and cpu_engines.unavailable("avx512-bf16", dt) is None:
        # off AMX the probe decides; our vdpbf16ps kernel measured 4-5x the widening engines on AMD Zen 5
        assert engine == "avx512-bf16" and cpu.gemm_path(dt, 896) == "avx512-bf16/vnni", why
    elif dt != torch.float32 and cpu._ext().has_amx(dt):
        assert (engine, cpu.gemm_path(dt, 896)) == ("brgemm", "brgemm/plain")
        assert cpu_engines.gemm_path(dt, 896, "brgemm-vnni") == "brgemm-vnni/amx-vnni"


@pytest.mark.parametrize(
    "rates, winner",
    [({"brgemm": 120.0, "mkl": 110.0, "mkl-upcast": 130.0}, "brgemm"),  # within the margin: a 16-bit engine
     ({"brgemm": 80.0, "mkl": 82.0, "mkl-upcast": 110.0}, "mkl-upcast"),
     ({"brgemm": 100.0, "mkl": 140.0}, "mkl")],
    ids=["tie-keeps-16bit", "widening-wins-by-margin", "no-widening-engine"],
)
def test_probe_prefers_a_16bit_engine_unless_widening_wins_by_the_margin(rates, winner):
    assert cpu_engines.pick(rates) == winner


def test_engine_forced_per_dtype(monkeypatch):
    monkeypatch.setenv(ENV, "fp32=atmm, bf16=brgemm")
    assert cpu_engines.engine_for(torch.float32) == "atmm"
    assert cpu_engines.engine_for(torch.bfloat16) == "brgemm"
    assert cpu_engines.selection(torch.float32) == ("atmm", f"forced by {ENV}")
    # a dtype the setting does not name keeps the automatic choice
    assert cpu_engines.engine_for(torch.float16) == cpu_engines.selection(torch.float16)[0]


@pytest.mark.parametrize(
    "spec, message",
    [("cublas", "engine one of"), ("bf16=cublas", "engine one of"), ("int8=mkl", "dtype=engine"),
     ("bf16", "engine one of")],
)
def test_bad_engine_setting_is_rejected(spec, message, monkeypatch):
    monkeypatch.setenv(ENV, spec)
    with pytest.raises(ValueError, match=message):
        cpu_engines.engine_for(torch.bfloat16)


def test_engine_that_cannot_run_the_dtype_is_rejected_with_the_reason(monkeypatch):
    monkeypatch.setenv(ENV, "atmm")
    with pytest.raises(ValueError, match="cannot run torch.bfloat16 here .*16-bit"):
        cpu_engines.engine_for(torch.bfloat16)
    with pytest.raises(ValueError, match="unavailable: engine one of"):
        cpu_engines.unavailable("cublas", torch.float32)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_probe_measures_every_runnable_engine(dtype):
    dt = DTYPES[dtype]
    rates = cpu_engines.probe(dt)
    assert set(rates) == set(cpu_engines.available_engines(dt)) - set(cpu_engines.TEST_ENGINES) and "brgemm" in rates
    assert all(r > 0 for r in rates.values())


def test_upcast_engine_names_why_it_cannot_run_fp32():
    assert "no widening" in cpu_engines.unavailable("mkl-upcast", torch.float32)


def test_avx512_bf16_engine_names_why_it_cannot_run():
    """The AVX-512-BF16 kernel runs bf16 tiles only, and only where the CPU has vdpbf16ps; an odd D takes the plain
    path (ATen's brgemm), which its gemm_path says."""
    for dt in (torch.float32, torch.float16):
        assert "bf16 tiles only" in cpu_engines.unavailable("avx512-bf16", dt)
    why = cpu_engines.unavailable("avx512-bf16", torch.bfloat16)
    assert why is None or "AVX-512-BF16" in why
    if why is None:
        assert cpu_engines.gemm_path(torch.bfloat16, 896, "avx512-bf16") == "avx512-bf16/vnni"
        assert cpu_engines.gemm_path(torch.bfloat16, 33, "avx512-bf16") == "avx512-bf16/plain"


def test_amx_engine_names_why_it_cannot_run():
    """The AMX kernel runs bf16 tiles only, and only where the CPU and Linux give it AMX tiles."""
    for dt in (torch.float32, torch.float16):
        assert "bf16 tiles only" in cpu_engines.unavailable("amx", dt)
    why = cpu_engines.unavailable("amx", torch.bfloat16)
    assert why is None or "AMX" in why


def test_emulated_amx_engine_runs_everywhere_and_is_never_chosen(monkeypatch):
    """amx-emulated runs bf16 tiles on every machine, with the amx engine's operand layout (VNNI pairs at an even D,
    the plain path at an odd one), and is only ever forced: neither the probe nor the default selection takes it."""
    for dt in (torch.float32, torch.float16):
        assert "bf16 tiles only" in cpu_engines.unavailable("amx-emulated", dt)
    assert cpu_engines.unavailable("amx-emulated", torch.bfloat16) is None
    assert cpu_engines.gemm_path(torch.bfloat16, 896, "amx-emulated") == "amx-emulated/amx-vnni"
    assert cpu_engines.gemm_path(torch.bfloat16, 33, "amx-emulated") == "amx-emulated/plain"
    monkeypatch.delenv(ENV, raising=False)
    assert cpu_engines.selection(torch.bfloat16)[0] != "amx-emulated"
    monkeypatch.setenv(ENV, "bf16=amx-emulated")
    assert cpu_engines.selection(torch.bfloat16) == ("amx-emulated", f"forced by {ENV}")
