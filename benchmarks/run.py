"""Benchmark tables: time and peak memory of every provider, relative to the GEMM floor.

    python benchmarks/run.py [--ops ...] [--dtypes ...] [--sizes ...] [--providers ...] [--repeats K]
                             [--out bench_results/results.json] [--quick] [--max-gb 16] [--timeout S]
    python benchmarks/run.py --check        # do the providers agree with the float64 oracle? (tiny shapes)

For every case (op x dtype x size, see cases.py) each provider runs in fresh subprocesses, so no
provider inherits another's allocations, thread pools or compiled code:

- a timing run: build the inputs, run the op once (warm-up: library loading, thread pools,
  torch.compile), then K timed repetitions; the median is reported;
- a memory run, separate so that the warm-up cannot pollute it: build the inputs, prime the op on
  a 16-token slice (one-time costs a training loop pays once: imports, JIT, compilation), read RSS
  as the base, reset the kernel's high-water mark, run the op once at full size and read the
  high-water mark. Extra peak = peak - base - bytes of the outputs the op returns (gradients or
  log-probs: the user keeps those). glibc's dynamic mmap threshold is pinned in that subprocess
  (MALLOC_MMAP_THRESHOLD_) so freed large buffers go back to the kernel instead of lingering in the
  heap, where a later allocation could reuse them unseen by RSS.

The GEMM floor (the op's GEMMs into preallocated outputs) is timed before and after the case's
providers in the same invocation, so ratios compare runs under the same machine state. Tables go
to stdout (progress to stderr); every measurement, with machine info and the command line, goes to
the JSON file, rewritten after each case so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import itertools
import gc
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:  # running as a script puts HERE first already; as a module it may not
    sys.path.insert(0, str(HERE))

RESULT_TAG = "BENCH_RESULT "


# ---------------------------------------------------------------------------------------------------
# Memory probes (Linux /proc)
# ---------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is None:
        raise RuntimeError("/proc/self/status has no VmRSS: the memory run needs Linux")
    return kb * 1024


def peak_rss_bytes() -> int:
    """High-water mark of RSS: VmHWM, else ru_maxrss (which cannot be reset)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs). False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm = _status_kb("VmHWM")
    return hwm is not None and hwm * 1024 <= rss_bytes() + (1 << 20)


# ---------------------------------------------------------------------------------------------------
# The worker: one measurement of one provider on one case, in its own process
# ---------------------------------------------------------------------------------------------------


def worker(spec: dict) -> dict:
    import torch

    import cases
    import providers

    if spec.get("device", "cpu") == "cuda":  # CUDA events and the allocator's peak: timing_cuda.py
        import timing_cuda

        return timing_cuda.worker(spec, cases, providers)
    case = cases.Case.from_json(spec["case"])
    prov = providers.PROVIDERS[spec["provider"]]
    reason = prov.unavailable()
    if reason:
        return {"status": "n/a", "reason": reason}
    inp = cases.make_inputs(case, spec["seed"])
    floor_dtype = cases.DTYPES[spec["floor"]] if spec.get("floor", "dtype") != "dtype" else None
    out: dict[str, Any] = {"status": "ok", "threads": torch.get_num_threads(), "input_bytes": inp.nbytes()}

    if spec["mode"] == "time":
        fn = prov.build(case, inp, floor_dtype)
        t0 = time.perf_counter()
        res = fn()  # warm-up
        out["warmup_s"] = time.perf_counter() - t0
        del res
        times = []
        for _ in range(spec["repeats"]):
            gc.collect()
            t0 = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t0)
            del res  # free the outputs, so repetition k + 1 does not run next to k's gradients
        out["times_s"] = times
        out["median_s"] = statistics.median(times)
    else:
        if not prov.is_floor:
            small = inp.narrowed(cases.PRIME_TOKENS)
            res = prov.build(case.narrowed(cases.PRIME_TOKENS), small)()
            del res, small
        gc.collect()
        base = rss_bytes()
        out["hwm_reset"] = reset_peak_rss()
        fn = prov.build(case, inp, floor_dtype)  # the floor preallocates its outputs here: they count as its extra
        res = fn()
        peak = peak_rss_bytes()
        kept = cases.output_bytes(res)
        out.update(base_rss_bytes=base, peak_rss_bytes=peak, output_bytes=kept, extra_bytes=peak - base - kept)
    out["backend"] = prov.backend(case.op)
    return out


def worker_main(spec_json: str) -> None:
    try:
        result = worker(json.loads(spec_json))
    except Exception as exc:  # reported to the parent as this measurement's error, not a crash of the run
        import traceback

        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------
# The parent: spawn workers, collect, print tables, write JSON
# ---------------------------------------------------------------------------------------------------


def spawn(mode: str, case, provider: str, args: argparse.Namespace) -> dict:
    """Run one measurement in a fresh subprocess with a timeout; always returns a dict with status."""
    spec = {"mode": mode, "case": case.to_json(), "provider": provider, "repeats": args.repeats, "seed": args.seed,
            "floor": args.floor, "device": getattr(args, "device", "cpu")}
    env = dict(os.environ)
    if mode == "mem":
        # A fixed threshold also disables glibc's dynamic raising of it (up to 32 MB), so every buffer of
        # >= 128 KiB is its own mapping, returned to the kernel on free: RSS then tracks live tensors.
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t0 = time.time()
    # Own session: on timeout the whole group dies (torch.compile may have spawned compile workers).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO),
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        return {"status": "timeout", "reason": f"after {args.timeout:.0f} s", "wall_s": time.time() - t0}
    wall = time.time() - t0
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["wall_s"] = wall
            if res.get("status") == "error":
                res["stderr_tail"] = stderr[-3000:]
            return res
    if proc.returncode is not None and proc.returncode < 0:
        sig = -proc.returncode
        why = "killed (SIGKILL: out of memory?)" if sig == signal.SIGKILL else f"killed by signal {sig}"
    else:
        why = f"exited {proc.returncode} without a result"
    return {"status": "error", "reason": why, "stderr_tail": stderr[-3000:], "wall_s": wall}


def machine_info() -> dict:
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + sys.argv),
        "cwd": os.getcwd(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_start": list(os.getloadavg()),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), [])
        # The ISA features that decide bf16/fp32 GEMM speed on x86.
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16") if f in flags]
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()
        info["mem_total_gb"] = round(int(mem[0].split()[1]) / 1e6, 1)
    except (OSError, IndexError, ValueError):
        pass
    versions = {}
    for dist in ("grpo_kernels", "liger-kernel", "cut-cross-entropy", "triton"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = None
    info["versions"] = versions
    # Which package and GEMM engines were measured: comparing two trees means running each tree's own
    # harness (cases.py imports the checkout it lives in, whatever PYTHONPATH says), and this records it.
    import cases

    info["grpo_kernels_file"] = cases.gk.__file__
    try:
        from grpo_kernels.backends import cpu as _cpu

        info["cpu_gemm_path"] = {name: _cpu.gemm_path(dt, 896) for name, dt in
                                 (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    except Exception as exc:  # no extension, or an engine that cannot run here: say so, do not fail
        info["cpu_gemm_path"] = f"unavailable: {exc}"
    try:  # read-only: which commit was measured
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _fmt_s(s: float) -> str:
    return f"{s:.3g} s" if s < 100 else f"{s:.0f} s"


def _fmt_mb(b: float) -> str:
    mb = b / 1e6
    return f"{mb:+,.0f} MB" if abs(mb) < 10_000 else f"{mb / 1000:+,.1f} GB"


def _short(reason: str, n: int = 48) -> str:
    return reason if len(reason) <= n else reason[: n - 1] + "…"


def cell(rec: dict, floor_s: Optional[float]) -> str:
    """'time · time/floor · extra MB', or why there is no number."""
    if rec["status"] != "ok":
        return f"{rec['status']} ({_short(rec.get('reason', ''))})"
    t, m = rec.get("time", {}), rec.get("memory", {})
    parts = []
    if t.get("status") == "ok":
        parts.append(_fmt_s(t["median_s"]))
        if floor_s and not rec.get("is_floor"):
            parts.append(f"{t['median_s'] / floor_s:.2f}×")
    else:
        parts.append(f"time {t.get('status', '?')} ({_short(t.get('reason', ''), 32)})")
    if m.get("status") == "ok":
        parts.append(_fmt_mb(m["extra_bytes"]) + ("" if m.get("hwm_reset", True) else "*"))
    else:
        parts.append(f"mem {m.get('status', '?')} ({_short(m.get('reason', ''), 32)})")
    return " · ".join(parts)


def table(op: str, dtype: str, records: list[dict], providers: list[str], repeats: int, floor_kind: str = "dtype") -> str:
    """One markdown table: rows = sizes, columns = floor + providers."""
    import cases

    rows = []
    for size_label in dict.fromkeys(r["size_label"] for r in records):
        by = {r["provider"]: r for r in records if r["size_label"] == size_label}
        floor = by.get("gemm-floor")
        floor_s = floor.get("floor_s") if floor else None
        rows.append([size_label] + [cell(by[p], floor_s) if p in by else "" for p in providers])
    floor_name = "GEMM floor" if floor_kind in ("dtype", dtype) else f"GEMM floor ({floor_kind} GEMMs)"
    head = ["B×T" if op == "grpo_fwd_bwd" else "N"] + [floor_name if p == "gemm-floor" else p for p in providers]
    d, v = (records[0].get("d", cases.D), records[0].get("v", cases.V)) if records else (cases.D, cases.V)
    cuda = any(r.get("time", {}).get("device") for r in records)
    mem = "extra peak CUDA allocation" if cuda else "extra peak RSS"
    lines = [f"### {op} · {dtype}  (D={d}, V={v})", "",
             f"cells: time (median of {repeats} after warm-up) · time / GEMM floor · {mem} above inputs "
             f"and returned outputs", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    notes = []
    backends = sorted({f"{r['provider']} → {r['backend']}" for r in records if r.get("backend")})
    if backends:
        notes.append("backends that ran: " + ", ".join(backends))
    reasons = {}
    for r in records:
        for why in (r.get("reason"), r.get("time", {}).get("reason"), r.get("memory", {}).get("reason")):
            if why and len(why) > 32:
                reasons.setdefault(f"{r['provider']}: {why}", None)
    notes += list(reasons)
    if any(r.get("memory", {}).get("hwm_reset") is False for r in records):
        notes.append("* peak RSS could not be reset after building the inputs: the number is an upper bound")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_case(case, provider_names: list[str], args: argparse.Namespace) -> list[dict]:
    """Floor (timed before and after), then each provider: timing run, memory run."""
    import cases
    import providers

    limit = args.max_gb * 1e9
    records = []

    def base_record(p) -> dict:
        return {"op": case.op, "dtype": case.dtype, "size": case.to_json()["size"], "size_label": case.size_label,
                "d": case.d, "v": case.v,
                "n_tokens": case.n_tokens, "provider": p.name, "is_floor": p.is_floor,
                "estimate_bytes": providers.estimate_total_bytes(case, p), "gemm_gflop": case.gemm_flops() / 1e9}

    def skip_reason(p) -> Optional[str]:
        est = providers.estimate_total_bytes(case, p)
        return f"est. {est / 1e9:.1f} GB > --max-gb {args.max_gb:g}" if est > limit else None

    floor = providers.PROVIDERS["gemm-floor"]
    floor_rec = base_record(floor)
    floor_times: list[float] = []
    floor_skip = skip_reason(floor)
    if floor_skip:
        floor_rec.update(status="skipped", reason=floor_skip)
    else:
        first = spawn("time", case, floor.name, args)
        floor_rec["time_before"] = first
        floor_times += first.get("times_s", [])
        log(f"  [{case.test_id('gemm-floor')}] time before: {_fmt_s(first['median_s']) if 'median_s' in first else first.get('reason')}")

    for p in providers.providers_for(case.op, provider_names):
        if p.is_floor:
            continue
        rec = base_record(p)
        records.append(rec)
        why = p.unavailable()
        if why:
            rec.update(status="n/a", reason=why)
        elif skip_reason(p):
            rec.update(status="skipped", reason=skip_reason(p))
        else:
            rec["status"] = "ok"
            rec["time"] = spawn("time", case, p.name, args)
            if args.device == "cpu":
                rec["memory"] = spawn("mem", case, p.name, args)
            else:  # the CUDA timing subprocess also measured the allocator's peak (timing_cuda.py)
                rec["memory"] = rec["time"].get("memory") or {k: rec["time"].get(k, "") for k in ("status", "reason")}
            rec["backend"] = rec["time"].get("backend") or rec["memory"].get("backend")
            if rec["time"].get("status") == "n/a":  # unavailable in the worker though importable here
                rec.update(status="n/a", reason=rec["time"].get("reason"))
        log(f"  [{case.test_id(p.name)}] {cell(rec, None)}")

    if not floor_skip:
        floor_rec["status"] = "ok"
        if args.device == "cpu":
            floor_rec["memory"] = spawn("mem", case, floor.name, args)
        else:
            floor_rec["memory"] = first.get("memory") or {k: first.get(k, "") for k in ("status", "reason")}
        second = spawn("time", case, floor.name, args)
        floor_rec["time_after"] = second
        floor_times += second.get("times_s", [])
        ok = floor_times and first.get("status") == "ok" and second.get("status") == "ok"
        if ok:
            floor_rec["floor_s"] = statistics.median(floor_times)
            floor_rec["time"] = {"status": "ok", "median_s": floor_rec["floor_s"], "times_s": floor_times}
            floor_rec["gflops"] = case.gemm_flops() / 1e9 / floor_rec["floor_s"]
        else:
            bad = first if first.get("status") != "ok" else second
            floor_rec["time"] = {"status": bad.get("status", "error"), "reason": bad.get("reason", "")}
        log(f"  [{case.test_id('gemm-floor')}] time after: {_fmt_s(second['median_s']) if 'median_s' in second else second.get('reason')}"
            f"; floor {cell(floor_rec, None)}")
    floor_s = floor_rec.get("floor_s")
    for rec in records:
        t = rec.get("time", {})
        if floor_s and t.get("status") == "ok":
            rec["ratio_to_floor"] = t["median_s"] / floor_s
    return [floor_rec] + records


def run_check(args: argparse.Namespace) -> int:
    """Each provider's outputs vs the float64 oracle on tiny fp32 problems (seconds, not hours)."""
    import cases
    import providers

    bad = 0
    print("| provider | op | max rel. error vs fp64 oracle |\n|---|---|---|")
    for p in providers.PROVIDERS.values():
        if p.is_floor or (args.providers and p.name not in args.providers):
            continue
        why = p.unavailable()
        for op in args.ops:
            if not p.supports(op):
                continue
            if why:
                print(f"| {p.name} | {op} | n/a ({why}) |")
                continue
            err = providers.check_provider(p, op)
            bad += err > 1e-4
            print(f"| {p.name} | {op} | {err:.1e}{'  **MISMATCH**' if err > 1e-4 else ''} |")
    return 1 if bad else 0


def parse_head(text: str) -> tuple[int, int]:
    """'4096x128256' -> (4096, 128256): an LM head's hidden size and vocabulary."""
    d, sep, v = text.lower().replace("×", "x").partition("x")
    if not sep or not d.isdigit() or not v.isdigit() or int(d) < 1 or int(v) < 1:
        raise argparse.ArgumentTypeError(f"expected DxV, e.g. 896x151936; got {text!r}")
    return int(d), int(v)


def main(argv: Optional[list[str]] = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:
        worker_main(argv[1])
        return 0

    import cases
    import providers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", choices=cases.OPS, default=list(cases.OPS))
    ap.add_argument("--dtypes", nargs="+", choices=sorted(cases.DTYPES), default=list(cases.DEFAULT_DTYPES))
    ap.add_argument("--sizes", nargs="+", type=cases.parse_size, default=None, metavar="N|BxT",
                    help="ints (N) go to the log-prob ops, BxT to grpo_fwd_bwd; an op given none of its kind keeps "
                         f"its defaults (N {list(cases.LOGPROBS_SIZES)}, BxT "
                         f"{['%dx%d' % s for s in cases.GRPO_SIZES]})")
    ap.add_argument("--providers", nargs="+", choices=list(providers.PROVIDERS), default=None,
                    help="default: all (the GEMM floor is always measured)")
    ap.add_argument("--floor", choices=["dtype"] + sorted(cases.DTYPES), default="dtype",
                    help="dtype of the floor's GEMMs: the inputs' (default) or e.g. fp32, the fastest GEMM on CPUs "
                         "without bf16 matrix units (the bf16 inputs are converted outside the timed call)")
    ap.add_argument("--repeats", type=int, default=3, metavar="K", help="timed repetitions after one warm-up (median)")
    ap.add_argument("--out", type=Path, default=REPO / "bench_results" / "results.json")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke-test sizes: N {list(cases.QUICK_LOGPROBS_SIZES)}, BxT "
                         f"{['%dx%d' % s for s in cases.QUICK_GRPO_SIZES]}")
    ap.add_argument("--max-gb", type=float, default=16.0,
                    help="skip a provider on a case whose estimated peak memory exceeds this (default 16)")
    ap.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds per subprocess (default 3600: the slowest full-grid runs take ~25 min on 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: inputs on GPU 0, CUDA-event timing, torch.cuda.max_memory_allocated (timing_cuda.py)")
    ap.add_argument("--heads", nargs="+", type=parse_head, default=None, metavar="DxV",
                    help=f"LM-head shapes hidden x vocab (default {cases.D}x{cases.V}), e.g. 896x151936 4096x128256")
    ap.add_argument("--check", action="store_true",
                    help="only check every provider against the float64 oracle on tiny fp32 shapes, then exit")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.check:
        return run_check(args)

    names = None if args.providers is None else sorted(set(args.providers) | {"gemm-floor"},
                                                       key=list(providers.PROVIDERS).index)
    grid = cases.grid(tuple(args.ops), tuple(args.dtypes), args.sizes, args.quick)
    heads = args.heads or [(cases.D, cases.V)]
    grid = [dataclasses.replace(c, d=d, v=v) for d, v in heads for c in grid]
    info = machine_info()
    if args.device == "cuda":
        import timing_cuda

        info.update(timing_cuda.device_info())
    payload: dict[str, Any] = {
        "machine": info,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shape": {"D": cases.D, "V": cases.V},
        "grpo_config": {"loss_type": cases.GRPO_CONFIG.loss_type, "beta": cases.GRPO_CONFIG.beta,
                        "epsilon_low": cases.GRPO_CONFIG.epsilon_low, "old_and_ref_logp": True},
        "providers": {p.name: p.description for p in providers.PROVIDERS.values()},
        "results": [],
    }
    log(f"{len(grid)} cases on {info.get('cpu_model')} ({info['torch_threads']} threads, torch {info['torch']}); "
        f"JSON -> {args.out}")
    tables = []
    for op, dtype, (d, v) in itertools.product(args.ops, args.dtypes, heads):  # one table per op, dtype, head
        group = [c for c in grid if c.op == op and c.dtype == dtype and (c.d, c.v) == (d, v)]
        if not group:
            continue
        recs = []
        for case in group:
            log(f"[{case.op} {case.dtype} {case.size_label} D={case.d} V={case.v}]")
            new = run_case(case, names, args)
            recs += new
            payload["results"].extend(new)
            payload["machine"]["loadavg_end"] = list(os.getloadavg())
            write_json(args.out, payload)
        cols = [p.name for p in providers.providers_for(op, names)]
        tables.append(table(op, dtype, recs, cols, args.repeats, args.floor))
        log("\n" + tables[-1] + "\n")
    print(f"# grpo_kernels benchmarks — {info.get('gpu') or info.get('cpu_model')}, {info['torch_threads']} threads, torch {info['torch']}, "
          f"{info['date']}\n")
    print("\n\n".join(tables))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
