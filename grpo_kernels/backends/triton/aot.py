"""Ahead-of-time compiles of the backend's launches for a GPU target, on a machine without a GPU.

``compile_launch(launch, arch)`` takes a :class:`~.launch_plan.Launch` exactly as a launcher built it
(kernel, grid, arguments, constexprs, ``num_warps`` / ``num_stages``), derives the kernel's signature,
constexprs and alignment attributes with Triton's own argument specializer (the code path
``kernel[grid](...)`` takes on a GPU), and compiles it with ``triton.compile`` for ``sm_<arch>``.
Tensors may live on the ``meta`` device: only their dtype and (zero) address are read, and a zero
address is 16-byte aligned, as every CUDA allocation is. ptxas and cuobjdump ship in the Triton
wheel, so the report (registers, spills, shared memory, which matrix instructions the code uses)
needs no CUDA toolkit either.

Kernels must be real ``triton.jit`` functions: import the package with ``TRITON_INTERPRET`` unset
(``tests/test_triton_compile.py`` runs the compiles in a subprocess for that reason).

    python -m grpo_kernels.backends.triton.aot        # the resource table of every tested launch
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from .launch_plan import Launch

# Largest dynamic shared memory one block may use (CUDA programming guide, compute capabilities table):
# sm_80 (A100) 163 KB, sm_90 (H100 / H200) 227 KB.
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}

# The matrix instructions a tensor-core tile kernel must use on each target: Hopper's warp-group MMA
# (PTX wgmma.mma_async, SASS HGMMA) and Ampere's warp MMA (PTX mma.sync, SASS HMMA). A layout or
# dtype change that makes Triton fall back to FMA loses these.
MMA_PATTERNS = {90: ("wgmma.mma_async", "HGMMA"), 80: ("mma.sync.aligned", "HMMA")}


@dataclass(frozen=True)
class CompileReport:
    """What one compiled launch uses per thread / per block, and its matrix instructions."""

    kernel: str
    arch: int
    registers: int
    local_bytes: int  # spilled registers and stack-resident arrays, per thread: 0 or the kernel is slow
    shared_bytes: int  # dynamic shared memory per block (Triton's pipelining buffers)
    ptx_mma: int  # matrix instructions (MMA_PATTERNS[arch][0]) in the PTX
    sass_mma: int  # and in the SASS
    num_warps: int
    num_stages: int

    @property
    def summary(self) -> str:
        return (f"sm_{self.arch} {self.kernel}: {self.registers} regs, {self.local_bytes} B local, "
                f"{self.shared_bytes / 1024:.1f} KiB smem, mma {self.ptx_mma}/{self.sass_mma} (ptx/sass), "
                f"{self.num_warps} warps, {self.num_stages} stages")


def _tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not in the Triton wheel at {path}")
    return str(path)


def compile_launch(launch: Launch, arch: int):
    """``triton.compile`` of ``launch`` for ``GPUTarget("cuda", arch, 32)``: -> the CompiledKernel."""
    fn = launch.kernel
    if not isinstance(fn, JITFunction):
        raise TypeError(f"compile_launch: {launch.name} is a {type(fn).__name__}, not a JITFunction; import "
                        "grpo_kernels with TRITON_INTERPRET unset to compile for a GPU")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    # The options JITFunction.run adds before binding (runtime/jit.py), so the compile matches a launch.
    kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the one function in ``cubin`` (cuobjdump --dump-resource-usage)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], check=True, capture_output=True,
                             text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", path], check=True, capture_output=True,
                              text=True).stdout
    fields = dict((k, int(v)) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump reported no resource usage:\n{out}")
    fields["_sass"] = sass  # type: ignore[assignment]
    return fields


def report(launch: Launch, arch: int) -> CompileReport:
    """Compile ``launch`` for ``sm_<arch>`` and read its resource usage and matrix instructions."""
    kernel = compile_launch(launch, arch)
    usage = _resource_usage(kernel.asm["cubin"])
    ptx_pat, sass_pat = MMA_PATTERNS[arch]
    md = kernel.metadata
    return CompileReport(
        kernel=launch.name, arch=arch, registers=usage["REG"],
        local_bytes=usage.get("LOCAL", 0) + usage.get("STACK", 0),
        shared_bytes=md.shared + usage.get("SHARED", 0),
        ptx_mma=kernel.asm["ptx"].count(ptx_pat), sass_mma=len(re.findall(rf"\b{sass_pat}\b", usage["_sass"])),
        num_warps=md.num_warps, num_stages=md.num_stages,
    )


def problems(report_: CompileReport, tile_kernel: bool) -> list[str]:
    """Why a compiled launch is unfit for the target (empty when fit): local memory, shared memory
    above the per-block limit, and, for a tensor-core tile kernel, no MMA instructions."""
    out = []
    if report_.local_bytes:
        out.append(f"{report_.local_bytes} bytes of local memory per thread (register spills / stack)")
    limit = MAX_SHARED_BYTES[report_.arch]
    if report_.shared_bytes > limit:
        out.append(f"{report_.shared_bytes} bytes of shared memory > sm_{report_.arch}'s per-block limit {limit}")
    if tile_kernel and not (report_.ptx_mma and report_.sass_mma):
        ptx_pat, sass_pat = MMA_PATTERNS[report_.arch]
        out.append(f"no tensor-core MMA (PTX {ptx_pat}: {report_.ptx_mma}, SASS {sass_pat}: {report_.sass_mma})")
    return out


# ---------------------------------------------------------------------------------------------------
# The tested grid: every kernel of the backend at the launch configurations a GPU run picks
# ---------------------------------------------------------------------------------------------------

# SM counts of the reference GPU of each target: A100 (sm_80) and H100 SXM (sm_90). They set the
# grid splitting of ``cuda_config``, hence which combine / split-sum kernels run.
SM_COUNT = {80: 108, 90: 132}
ARCHS = (80, 90)
# "tf32" is fp32 inputs with torch.backends.cuda.matmul.allow_tf32 = True (the launcher follows it).
LOGPROB_DTYPES = ("bf16", "fp16", "fp32", "tf32")
TILE_KERNELS = ("_fwd_kernel", "_bwd_dh_kernel", "_bwd_dw_kernel")


@dataclass(frozen=True)
class LogprobsCase:
    """One forward + backward of the log-prob op as the Triton backend would launch it on ``sm_<arch>``."""

    arch: int
    dtype: str
    n: int = 4096
    d: int = 896
    v: int = 151936
    bias: bool = False
    softcap: bool = False
    entropy: bool = False
    split_dz: bool = False
    needs: tuple[bool, bool, bool] = (True, True, True)  # dhidden, dweight, dbias

    @property
    def id(self) -> str:
        flags = [f for f, on in (("bias", self.bias), ("softcap", self.softcap), ("ent", self.entropy),
                                 ("splitdz", self.split_dz)) if on]
        grads = "" if self.needs == (True, True, True) else "-grad_" + "".join(
            g for g, on in zip(("h", "w", "b"), self.needs) if on)
        return f"sm{self.arch}-{self.dtype}-N{self.n}-D{self.d}-V{self.v}-" + ("+".join(flags) or "plain") + grads

    def launches(self) -> list[Launch]:
        """The kernel launches of the forward and of the backward, planned on ``meta`` tensors."""
        import torch

        from .. import LogprobsParams
        from . import logprobs_launch as L

        dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}[self.dtype]
        meta = torch.device("meta")
        h = torch.empty(self.n, self.d, dtype=dt, device=meta)
        w = torch.empty(self.v, self.d, dtype=dt, device=meta)
        b = torch.empty(self.v, dtype=dt, device=meta) if self.bias else None
        t = torch.empty(self.n, dtype=torch.int64, device=meta)
        p = LogprobsParams.make(1.0, 30.0 if self.softcap else None, self.entropy)
        cfg = L.cuda_config(dt, SM_COUNT[self.arch], self.arch)
        if self.split_dz:
            from dataclasses import replace

            cfg = replace(cfg, split_dz=True)
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.dtype == "tf32"
        try:
            (logp, ent, lse), fwd = L.forward_plan(h, w, b, t, p, cfg)
            _, bwd = L.backward_plan(h, w, b, t, lse, ent, logp, ent, p, self.needs, cfg)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
        return [s for s in fwd + bwd if isinstance(s, Launch)]

    def needs_mma(self, kernel: str) -> bool:
        """Tile kernels run their dots on tensor cores, except fp32 with IEEE precision (FMA by design)."""
        return kernel in TILE_KERNELS and self.dtype != "fp32"


@dataclass(frozen=True)
class AdvantagesCase:
    """One group_advantages call on the Triton backend (B samples, R reward columns)."""

    arch: int
    dtype: str  # of the rewards: fp32 and bf16 compute in fp32, fp64 in fp64
    scale: str
    rloo: bool
    group_ids: bool
    group_size: int = 8
    b: int = 64
    r: int = 2

    @property
    def id(self) -> str:
        grouping = "ids" if self.group_ids else "sized"
        return (f"sm{self.arch}-adv-{self.dtype}-{self.scale}-{'rloo' if self.rloo else 'grpo'}-{grouping}"
                f"-B{self.b}-G{self.group_size}")

    def launches(self) -> list[Launch]:
        """Planned on CPU tensors (the grouping's torch.unique needs values; the inputs are small)."""
        import torch

        from .advantages import group_advantages_plan

        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[self.dtype]
        rewards = torch.zeros(self.b, self.r, dtype=dt)
        weights = torch.ones(self.r, dtype=torch.float64 if dt == torch.float64 else torch.float32)
        ids = torch.arange(self.b) // self.group_size if self.group_ids else None
        _, launches = group_advantages_plan(rewards, weights, None if self.group_ids else self.group_size, ids,
                                            self.scale, self.rloo, 1e-4)
        return launches

    def needs_mma(self, kernel: str) -> bool:
        return False


def cases() -> list:
    """The compile grid (see tests/test_triton_compile.py): for each target, every dtype x bias x
    softcap x entropy (x split_dz for 16-bit inputs) at the Qwen2.5-0.5B head and 4096 tokens
    (the forward and dH kernels split the vocabulary over programs), the same at 32768 tokens
    (the forward finalizes in one pass; split_dz off), the Llama-3-8B head, GPT-2's head (V = 50257
    and N = 1000 not multiples of 16), the partial-gradient launches (frozen head; frozen
    weight with a bias), and group_advantages over dtype x scale x estimator x grouping."""
    out: list = []
    for arch in ARCHS:
        for dtype in LOGPROB_DTYPES:
            dz_options = (False,) if dtype in ("fp32", "tf32") else (False, True)
            for bias, softcap, entropy, split_dz in itertools.product((False, True), (False, True), (False, True),
                                                                      dz_options):
                out.append(LogprobsCase(arch, dtype, bias=bias, softcap=softcap, entropy=entropy, split_dz=split_dz))
                if not split_dz:
                    out.append(LogprobsCase(arch, dtype, n=32768, bias=bias, softcap=softcap, entropy=entropy))
            for on in (False, True):
                out.append(LogprobsCase(arch, dtype, n=4096, d=4096, v=128256, bias=on, softcap=on, entropy=on))
                out.append(LogprobsCase(arch, dtype, n=1000, d=768, v=50257, bias=on, softcap=on, entropy=on))
        out.append(LogprobsCase(arch, "bf16", bias=True, entropy=True, needs=(True, False, False)))
        out.append(LogprobsCase(arch, "bf16", bias=True, entropy=True, needs=(False, False, True)))
        for dtype, scale, rloo, ids in itertools.product(("fp32", "bf16", "fp64"), ("none", "group", "batch"),
                                                         (False, True), (False, True)):
            out.append(AdvantagesCase(arch, dtype, scale, rloo, ids))
        for dtype in ("fp32", "fp64"):
            out.append(AdvantagesCase(arch, dtype, "group", False, False, group_size=1024, b=4096))
    return out


# ---------------------------------------------------------------------------------------------------
# Running the grid: each distinct specialization compiled once, in parallel processes
# ---------------------------------------------------------------------------------------------------

_JOBS: list[tuple[Launch, int]] = []  # (launch, arch) of each distinct compile, shared with forked workers


def _compile_key(launch: Launch, arch: int) -> str:
    """Two launches with equal keys compile to the same binary (Triton's own specialization key)."""
    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    _, specialization, options = binder(*launch.args, **launch.kwargs)
    return f"sm{arch}:{launch.name}:{specialization}:{sorted(options.items())}"


def _run_job(index: int) -> dict:
    launch, arch = _JOBS[index]
    try:
        r = report(launch, arch)
    except Exception as exc:  # a compile error is a result: the test names the case it broke
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:2000]}"}
    return r.__dict__


def run_grid(jobs: int = 2) -> dict:
    """Compile every distinct launch of :func:`cases` -> {"cases": {id: [launch entries]}, "reports": {key: ...}}."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.time()
    keys: dict[str, int] = {}
    table: dict[str, list[dict]] = {}
    _JOBS.clear()
    for case in cases():
        entries = []
        for launch in case.launches():
            key = _compile_key(launch, case.arch)
            if key not in keys:
                keys[key] = len(_JOBS)
                _JOBS.append((launch, case.arch))
            entries.append({"kernel": launch.name, "job": keys[key], "mma": case.needs_mma(launch.name),
                            "grid": list(launch.grid)})
        table[case.id] = entries
    plan_s = time.time() - t0
    if jobs > 1:
        # fork: the workers inherit _JOBS (the launches hold meta tensors and jit functions)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_run_job, range(len(_JOBS)), chunksize=4))
    else:
        results = [_run_job(i) for i in range(len(_JOBS))]
    return {"cases": table, "reports": results, "distinct_compiles": len(_JOBS), "plan_s": plan_s,
            "wall_s": time.time() - t0, "jobs": jobs, "triton": triton.__version__}


def summary_table(res: dict) -> str:
    """Markdown: per target, kernel and input dtype, the range of registers, local and shared memory
    and MMA instruction counts over the variants compiled (every launch is in the JSON)."""
    groups: dict[tuple, dict] = {}
    for case_id, entries in res["cases"].items():
        arch, dtype = case_id.split("-")[0], case_id.split("-")[2 if "-adv-" in case_id else 1]
        for e in entries:
            g = groups.setdefault((arch, e["kernel"], dtype), {"jobs": set(), "errors": 0})
            g["jobs"].add(e["job"])
    lines = ["| target | kernel | inputs | variants | registers | local B | shared KiB | SASS MMA |",
             "|---|---|---|---|---|---|---|---|"]
    for (arch, kernel, dtype), g in sorted(groups.items()):
        reps = [res["reports"][j] for j in sorted(g["jobs"])]
        ok = [r for r in reps if "error" not in r]
        if not ok:
            lines.append(f"| {arch} | {kernel} | {dtype} | {len(reps)} | compile error | | | |")
            continue
        def span(key, scale=1.0, fmt="{:.0f}"):
            lo, hi = min(r[key] for r in ok) / scale, max(r[key] for r in ok) / scale
            return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"
        err = f" ({len(reps) - len(ok)} errors)" if len(ok) < len(reps) else ""
        lines.append(f"| {arch} | {kernel} | {dtype} | {len(reps)}{err} | {span('registers')} | {span('local_bytes')} | "
                     f"{span('shared_bytes', 1024, '{:.1f}')} | {span('sass_mma')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Ahead-of-time sm_80 / sm_90 compiles of every Triton launch")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 2))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("TRITON_INTERPRET=1 makes the kernels interpreted functions: unset it to compile")
    res = run_grid(args.jobs)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res))
    print(summary_table(res))
    print(f"\n{len(res['cases'])} cases, {res['distinct_compiles']} distinct compiles, {res['wall_s']:.0f} s "
          f"with {res['jobs']} processes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
