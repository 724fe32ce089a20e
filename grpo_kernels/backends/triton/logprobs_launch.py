"""Typed launchers of the log-prob kernels: output buffers, grids, tile settings.

Every output is allocated with :func:`grpo_kernels.backends.empty` (NaN in the tests' poison mode),
so an element a kernel forgets to write fails a test. Inputs arrive validated and flattened
(``hidden [N, D]``, ``weight [V, D]``, ``targets [N]``), with ignore_index tokens already removed.

Each launcher is a plan (``forward_plan`` / ``backward_plan``: output buffers and the list of
kernel launches that fill them, see ``launch_plan.py``) followed by running it; the ahead-of-time
compile test builds the same plans, so what it compiles is what a GPU launches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor

from .. import LogprobsParams, empty, triton_interpret
from . import logprobs_kernels as K
from .launch_plan import Launch, Step, run

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and grid shaping of every kernel of the op.

    block_n / block_v / block_d: token rows, vocab columns and hidden chunk of one logit tile
    (powers of two, >= 16 for ``tl.dot``). A kernel streams one axis (vocab for forward and dH,
    tokens for dW) and splits that axis over programs until the grid has about ``target_programs``
    programs (at most ``max_split`` splits, and fp32 partial gradients of at most
    ``max_partial_bytes``), so small N or small V still fill the device; the splits are merged by
    a combine / split-sum kernel. ``target_programs = 1`` never splits.

    split_dz: with bf16 / fp16 inputs, feed the gradient GEMMs dz as hi + lo parts in the inputs'
    dtype (two tensor-core dots each) instead of dz rounded once. Off by default: rounding dz once
    is what the materializing bf16 path (and the C++ backend) does, and it stays within docs/design.md's
    2x rule (whose floor is one ulp of the gradient's dtype); on, dH / dW reach fp32-accumulation
    accuracy for 1.5x the backward's dot work.

    maxnreg: register cap per thread passed to ptxas for the tile kernels (None: ptxas picks; on
    sm_80 it then caps 8-warp kernels at 128 registers and spills a few bytes in some variants).
    """

    block_n: int = 64
    block_v: int = 128
    block_d: int = 32
    num_warps: int = 8
    num_stages: int = 3
    target_programs: int = 1
    max_split: int = 32
    max_partial_bytes: int = 1 << 28
    split_dz: bool = False
    maxnreg: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("block_n", "block_v", "block_d"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"LaunchConfig: {name} must be a power of two >= 16; got {value}")
        if self.target_programs < 1 or self.max_split < 1:
            raise ValueError("LaunchConfig: target_programs and max_split must be >= 1")

    def split(self, stream_blocks: int, other_blocks: int, partial_elems: int = 0) -> tuple[int, int]:
        """(number of splits, blocks per split) of a streamed axis of ``stream_blocks`` blocks, each
        split owning ``partial_elems`` fp32 partial results.

        Every split gets at least one block, so every split's partial buffer gets written.
        """
        want = _cdiv(self.target_programs, max(other_blocks, 1))
        by_memory = self.max_partial_bytes // max(4 * partial_elems, 1)
        n_split = max(1, min(want, stream_blocks, self.max_split, by_memory))
        per = _cdiv(stream_blocks, n_split)
        return _cdiv(stream_blocks, per), per


# The interpreter runs a program as numpy ops, with a fixed cost per op and per nested jit call:
# few, wide vocab tiles are fastest. Every tile dot is kept at 16 x 16 x 1024 = 2**18 multiply-adds,
# OpenBLAS's threshold for going multi-threaded, which on a small shared CPU is 2-3x slower.
INTERPRETER_CONFIG = LaunchConfig(block_n=16, block_v=1024, block_d=16, num_warps=4, num_stages=1, target_programs=1)


def default_config(device: torch.device, dtype: torch.dtype) -> LaunchConfig:
    """Interpreter tiles on CPU tensors; on CUDA, :func:`cuda_config` for the device's SM count and
    compute capability."""
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    props = torch.cuda.get_device_properties(device)
    return cuda_config(dtype, props.multi_processor_count, 10 * props.major + props.minor)


def cuda_config(dtype: torch.dtype, sm_count: int, arch: int = 90) -> LaunchConfig:
    """The CUDA launch configuration: a grid of about two programs per SM and tiles picked from
    ahead-of-time sm_80 / sm_90 compiles (``tests/test_triton_compile.py``: ptxas register / spill
    report, 8 warps, 3 stages): 64 x 128 x 32 for 16-bit inputs and 64 x 64 x 16 for fp32 (with
    BLOCK_D = 32 the IEEE-fp32 FMA dots spill 8-24 bytes per thread in the forward and dH kernels,
    with bias, softcap and entropy on). Below sm_90 (``arch``, 10 * major + minor) ptxas caps these
    8-warp kernels at 128 registers and spills 4-8 bytes in some variants (fp16 forward with bias,
    softcap and entropy; fp32 dH with entropy), so the cap is lifted there (``maxnreg=255``: forward
    128-146 registers, dH / dW 200-255, so one 8-warp program per SM instead of two). No kernel
    spills at these settings. Not timed
    on a GPU yet (none was at hand): tune here first (docs/gpu_performance.md)."""
    maxnreg = 255 if arch < 90 else None
    if dtype == torch.float32:
        return LaunchConfig(block_n=64, block_v=64, block_d=16, num_warps=8, num_stages=3,
                            target_programs=2 * sm_count, maxnreg=maxnreg)
    return LaunchConfig(block_n=64, block_v=128, block_d=32, num_warps=8, num_stages=3, target_programs=2 * sm_count,
                        maxnreg=maxnreg)


def _dot_flags(x: Tensor) -> tuple[bool, str]:
    """(DOT_FP32, DOT_PRECISION). The interpreter's tl.dot multiplies bfloat16 bit patterns as
    integers, so its tiles are upcast (exactly) to fp32 first. fp32 inputs follow torch's TF32 switch
    on a GPU (and on ``meta`` tensors, which the ahead-of-time compile test plans with)."""
    dot_fp32 = triton_interpret() and x.device.type != "cuda"
    tf32 = not dot_fp32 and torch.backends.cuda.matmul.allow_tf32
    return dot_fp32, "tf32" if tf32 else "ieee"


def check_supported(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """The kernels compute in fp32 from fp32 / bf16 / fp16 inputs of one dtype (the public functions
    refuse the rest, naming backend='torch' for float64)."""
    assert hidden.dtype in SUPPORTED_DTYPES and weight.dtype == hidden.dtype, (hidden.dtype, weight.dtype)
    assert bias is None or bias.dtype == hidden.dtype, bias.dtype


def _vec(x: Tensor) -> Tensor:
    """An [N] row vector as the kernels read it: contiguous float32 (autograd may hand an expanded view)."""
    return x.to(torch.float32).contiguous()


def _common(h: Tensor, w: Tensor, b: Optional[Tensor], p: LogprobsParams):
    dot_fp32, precision = _dot_flags(h)
    # softcap 0.0 is "off" (LogprobsParams); HAS_SOFTCAP removes the tanh from the generated code
    args = (h.stride(0), h.stride(1), w.stride(0), w.stride(1), float(p.temperature), float(p.softcap))
    flags = dict(HAS_BIAS=b is not None, HAS_SOFTCAP=p.softcap != 0.0)
    return args, flags, dict(DOT_FP32=dot_fp32, DOT_PRECISION=precision)


def forward(h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, p: LogprobsParams,
            cfg: Optional[LaunchConfig] = None) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """logp [N] f32, entropy [N] f32 (None unless ``p.return_entropy``), lse [N, 2] f32 (max, log-sum)."""
    outputs, steps = forward_plan(h, w, b, t, p, cfg)
    run(steps)
    return outputs


def forward_plan(h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, p: LogprobsParams,
                 cfg: Optional[LaunchConfig] = None) -> tuple[tuple[Tensor, Optional[Tensor], Tensor], list[Step]]:
    """The forward's outputs (logp, entropy | None, lse), allocated, and the launches that fill them."""
    check_supported(h, w, b)
    cfg = cfg or default_config(h.device, h.dtype)
    (n, d), v = h.shape, w.shape[0]
    dev = h.device
    logp = empty((n,), torch.float32, dev)
    lse = empty((n, 2), torch.float32, dev)  # (max, log-sum) per token: see logprobs_kernels
    ent = empty((n,), torch.float32, dev) if p.return_entropy else None
    if n == 0:
        return (logp, ent, lse), []
    t = t.contiguous()
    b = None if b is None else b.contiguous()
    n_blocks = _cdiv(n, cfg.block_n)
    n_split, per = cfg.split(_cdiv(v, cfg.block_v), n_blocks)
    finalize = n_split == 1
    part = lse if finalize else empty((4, n_split, n), torch.float32, dev)
    args, flags, dot = _common(h, w, b, p)
    steps: list[Step] = [Launch(
        K._fwd_kernel, (n_blocks, n_split),
        (h, w, w if b is None else b, t, logp, lse, lse if ent is None else ent, part,
         n, v, d, *args, per * cfg.block_v, n_split),
        dict(**flags, WANT_ENT=ent is not None, FINALIZE=finalize,
             BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, **dot,
             num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg),
    )]
    if not finalize:
        block_s = max(2, triton.next_power_of_2(n_split))
        block = max(16, min(128, 2048 // block_s))  # 128 x 32 partials of four planes spill on sm_90
        steps.append(Launch(
            K._fwd_combine_kernel, (_cdiv(n, block),),
            (part, logp, lse, lse if ent is None else ent, n, n_split),
            dict(WANT_ENT=ent is not None, BLOCK_N=block, BLOCK_S=block_s, num_warps=4),
        ))
    return (logp, ent, lse), steps


def _sum_splits(part: Tensor, out: Tensor) -> Step:
    """The step out = part.sum(0) cast to out's dtype, in one pass (the split reduction's single cast)."""
    if part.shape[0] == 1:
        return lambda: out.copy_(part[0])
    numel = out.numel()
    interpreted = triton_interpret() and out.device.type != "cuda"
    bf16_bits = interpreted and out.dtype == torch.bfloat16  # the interpreter's bf16 cast truncates
    block = 1 << 16 if interpreted else 1024
    return Launch(
        K._split_sum_cast_kernel, (_cdiv(numel, block),),
        (part, out.view(torch.int16) if bf16_bits else out, numel, part.shape[0]),
        dict(BLOCK=block, BF16_BITS=bf16_bits, num_warps=4),
    )


def _accumulator(n_split: int, shape: tuple[int, ...], out_dtype: torch.dtype, dev: torch.device) -> tuple[Tensor, bool]:
    """The fp32 buffer a gradient kernel accumulates into: the output itself when one split writes
    fp32, else [n_split, *shape] partials to be summed and cast. Returns (buffer, is_output)."""
    if n_split == 1 and out_dtype == torch.float32:
        return empty(shape, torch.float32, dev), True
    return empty((n_split,) + shape, torch.float32, dev), False


def backward(h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, lse: Tensor, ent: Optional[Tensor],
             g_logp: Tensor, g_ent: Optional[Tensor], p: LogprobsParams, needs,
             cfg: Optional[LaunchConfig] = None) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dhidden [N, D] like hidden, dweight [V, D] like weight, dbias [V] like bias), None where not needed."""
    outputs, steps = backward_plan(h, w, b, t, lse, ent, g_logp, g_ent, p, needs, cfg)
    run(steps)
    return outputs


def backward_plan(h: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, lse: Tensor, ent: Optional[Tensor],
                  g_logp: Tensor, g_ent: Optional[Tensor], p: LogprobsParams, needs,
                  cfg: Optional[LaunchConfig] = None):
    """The backward's outputs (dhidden | None, dweight | None, dbias | None), allocated, and the steps
    that fill them: -> (outputs, steps)."""
    check_supported(h, w, b)
    cfg = cfg or default_config(h.device, h.dtype)
    (n, d), v = h.shape, w.shape[0]
    dev = h.device
    need_dh, need_dw, need_db = bool(needs[0]), bool(needs[1]), bool(needs[2]) and b is not None
    assert g_ent is None or ent is not None, "a gradient for the entropy needs the entropy saved by the forward"
    if n == 0:  # no valid token: nothing flows back
        return (empty((0, d), h.dtype, dev) if need_dh else None,
                torch.zeros((v, d), dtype=w.dtype, device=dev) if need_dw else None,
                torch.zeros((v,), dtype=b.dtype, device=dev) if need_db else None), []
    t, lse, g_logp = t.contiguous(), _vec(lse), _vec(g_logp)
    ent = None if ent is None else _vec(ent)
    g_ent = None if g_ent is None else _vec(g_ent)
    b = None if b is None else b.contiguous()
    has_ent_grad = g_ent is not None
    vecs = (t, lse, lse if ent is None or not has_ent_grad else ent, g_logp, g_logp if g_ent is None else g_ent)
    args, flags, dot = _common(h, w, b, p)
    tiles = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, **dot,
                 SPLIT_DZ=cfg.split_dz and h.dtype != torch.float32,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
    n_blocks, v_blocks = _cdiv(n, cfg.block_n), _cdiv(v, cfg.block_v)
    bias_arg = w if b is None else b
    steps: list[Step] = []

    dh = None
    if need_dh:
        n_split, per = cfg.split(v_blocks, n_blocks, n * d)
        acc, is_out = _accumulator(n_split, (n, d), h.dtype, dev)
        steps.append(Launch(
            K._bwd_dh_kernel, (n_blocks, n_split),
            (h, w, bias_arg, *vecs, acc, n, v, d, *args, per * cfg.block_v),
            dict(**flags, HAS_ENT_GRAD=has_ent_grad, **tiles),
        ))
        dh = acc
        if not is_out:
            dh = empty((n, d), h.dtype, dev)
            steps.append(_sum_splits(acc, dh))

    dw = db = None
    if need_dw or need_db:
        n_split, per = cfg.split(n_blocks, v_blocks, v * d if need_dw else v)
        dw_acc, dw_is_out = _accumulator(n_split, (v, d), w.dtype, dev) if need_dw else (lse, True)
        db_acc, db_is_out = _accumulator(n_split, (v,), b.dtype, dev) if need_db else (lse, True)
        steps.append(Launch(
            K._bwd_dw_kernel, (v_blocks, n_split),
            (h, w, bias_arg, *vecs, dw_acc, db_acc, n, v, d, *args, per * cfg.block_n),
            dict(**flags, HAS_ENT_GRAD=has_ent_grad, COMPUTE_DW=need_dw, COMPUTE_DB=need_db, **tiles),
        ))
        if need_dw:
            dw = dw_acc
            if not dw_is_out:
                dw = empty((v, d), w.dtype, dev)
                steps.append(_sum_splits(dw_acc, dw))
        if need_db:
            db = db_acc
            if not db_is_out:
                db = empty((v,), b.dtype, dev)
                steps.append(_sum_splits(db_acc, db))
    return (dh, dw, db), steps
