"""Issue 14's CPU targets judged from ``benchmarks/run.py`` JSON files: one verdict table for one machine.

    python benchmarks/targets.py RUN.json [RUN.json ...] [--out verdict.json]
    python benchmarks/targets.py --fastest-bf16-floor     # 'dtype' or 'fp32': the floor run.py should take for bf16

``benchmarks/cpu_targets.sh OUTDIR`` runs every measurement these need on this machine, then this script.

Every ratio is ours against the GEMM floor that ``run.py`` timed in the same invocation:

- ``grpo_fwd_bwd``: ours <= 1.25x the three-GEMM floor, and faster than every peer in the same run (a peer in the
  file that was not timed, e.g. not installed, leaves that verdict "not measured" unless a timed peer beat us);
- ``logprobs_fwd``: ours <= 1.10x the one-GEMM floor, at every N;
- ``logprobs_fwd_bwd``: ours <= 1.30x four GEMMs, at every N. Under autograd the backward recomputes the logits,
  so the floor is the op's three-GEMM floor plus the forward's one-GEMM floor of the same dtype and N (from a
  ``logprobs_fwd`` run of the same machine). Without that run the row is judged "not measured".
- extra peak memory of ours <= 256 MB at every size, which also keeps it flat in N.

Files are read in the order given; a later file's case (op, dtype, size) replaces an earlier one's (reruns).
Files from different machines are refused, since times must not be compared across machines. Prints a Markdown
table; ``--out`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

LOSS_MAX, FORWARD_MAX, FWD_BWD_MAX = 1.25, 1.10, 1.30
MEMORY_MAX_BYTES = 256e6  # MB as run.py prints them (10^6 bytes)
OURS, FLOOR = "ours", "gemm-floor"
# providers that are not peers: our own fallback and the floor
NOT_PEERS = {OURS, FLOOR, "ours-torch"}

Case = tuple[str, str, tuple[int, ...]]  # (op, dtype, size)


@dataclass(frozen=True)
class Verdict:
    """One target at one case: what was measured against what bound, and whether it holds."""

    target: str
    dtype: str
    size: str
    measured: str
    bound: str
    verdict: str  # "met", "missed" or "not measured"


def _machine_key(machine: dict) -> tuple:
    return (machine.get("cpu_model"), tuple(machine.get("cpu_flags") or ()), machine.get("cpu_count"),
            machine.get("torch_threads"))


def load(paths: list[Path]) -> tuple[dict, dict[Case, dict[str, dict]]]:
    """(machine info of the first file, case -> provider -> record), later files replacing earlier cases."""
    machine: Optional[dict] = None
    cases: dict[Case, dict[str, dict]] = {}
    for path in paths:
        payload = json.loads(path.read_text())
        m = payload.get("machine", {})
        if machine is None:
            machine = m
        elif _machine_key(m) != _machine_key(machine):
            raise SystemExit(f"targets: {path} comes from another machine ({m.get('cpu_model')}, "
                             f"flags {m.get('cpu_flags')}) than {paths[0]}; compare ratios within one machine only")
        fresh: dict[Case, dict[str, dict]] = {}
        for rec in payload.get("results", []):
            size = rec["size"]  # N for the log-prob ops, [B, T] for the loss
            key = (rec["op"], rec["dtype"], tuple(size) if isinstance(size, list) else (size,))
            fresh.setdefault(key, {})[rec["provider"]] = rec
        cases.update(fresh)
    return machine or {}, cases


def _time(rec: Optional[dict]) -> Optional[float]:
    if rec is None or rec.get("status") != "ok":
        return None
    t = rec.get("time") or {}
    return t.get("median_s") if t.get("status") == "ok" else None


def _floor(recs: dict[str, dict]) -> Optional[float]:
    floor = recs.get(FLOOR)
    return floor.get("floor_s") if floor else None


def _extra(rec: Optional[dict]) -> Optional[int]:
    mem = (rec or {}).get("memory") or {}
    return mem.get("extra_bytes") if mem.get("status") == "ok" else None


def _label(size: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in size)


def _ratio_verdict(target: str, dtype: str, size: tuple[int, ...], ours: Optional[float], floor: Optional[float],
                   bound: float, floor_name: str) -> Verdict:
    if ours is None or not floor:
        return Verdict(target, dtype, _label(size), "-", f"<= {bound:.2f}x {floor_name}", "not measured")
    r = ours / floor
    return Verdict(target, dtype, _label(size), f"{r:.2f}x ({ours:.3g} s / {floor:.3g} s)", f"<= {bound:.2f}x {floor_name}",
                   "met" if r <= bound else "missed")


def judge(cases: dict[Case, dict[str, dict]]) -> list[Verdict]:
    """Every target at every case the files hold."""
    out: list[Verdict] = []
    for (op, dtype, size), recs in sorted(cases.items()):
        ours = _time(recs.get(OURS))
        if op == "grpo_fwd_bwd":
            out.append(_ratio_verdict("loss", dtype, size, ours, _floor(recs), LOSS_MAX, "3 GEMMs"))
            peers = {p: _time(r) for p, r in recs.items() if p not in NOT_PEERS}
            timed = {p: t for p, t in peers.items() if t is not None}
            if ours is None or not timed:
                out.append(Verdict("loss ahead of every peer", dtype, _label(size), "-", "faster than each", "not measured"))
            else:
                best, t_best = min(timed.items(), key=lambda kv: kv[1])
                missing = sorted(p for p, t in peers.items() if t is None)
                note = f"; not timed: {', '.join(missing)}" if missing else ""
                # a peer that was not timed (not installed, failed, timed out) may be the fastest: behind a timed
                # peer is a miss whatever the others did, ahead of the timed ones is not yet "met"
                verdict = "missed" if ours >= t_best else "not measured" if missing else "met"
                out.append(Verdict("loss ahead of every peer", dtype, _label(size),
                                   f"ours {ours:.3g} s, fastest peer {best} {t_best:.3g} s{note}", "faster than each",
                                   verdict))
        elif op == "logprobs_fwd":
            out.append(_ratio_verdict("forward", dtype, size, ours, _floor(recs), FORWARD_MAX, "1 GEMM"))
        elif op == "logprobs_fwd_bwd":
            fwd = cases.get(("logprobs_fwd", dtype, size), {})
            three, one = _floor(recs), _floor(fwd)
            four = three + one if three and one else None
            out.append(_ratio_verdict("forward + backward", dtype, size, ours, four, FWD_BWD_MAX, "4 GEMMs"))
        else:
            continue
        extra = _extra(recs.get(OURS))
        out.append(Verdict(f"memory ({op})", dtype, _label(size), "-" if extra is None else f"+{extra / 1e6:.0f} MB",
                           f"<= {MEMORY_MAX_BYTES / 1e6:.0f} MB",
                           "not measured" if extra is None else "met" if extra <= MEMORY_MAX_BYTES else "missed"))
    return out


def markdown(machine: dict, verdicts: list[Verdict]) -> str:
    head = (f"Issue 14 targets on {machine.get('cpu_model', '?')} ({machine.get('torch_threads', '?')} threads, flags "
            f"{', '.join(machine.get('cpu_flags') or [])}, torch {machine.get('torch', '?')})")
    rows = ["| target | dtype | size | measured | bound | verdict |", "|---|---|---|---|---|---|"]
    rows += [f"| {v.target} | {v.dtype} | {v.size} | {v.measured} | {v.bound} | **{v.verdict}** |" for v in verdicts]
    missed = sum(v.verdict == "missed" for v in verdicts)
    unmeasured = sum(v.verdict == "not measured" for v in verdicts)
    tail = f"{len(verdicts) - missed - unmeasured} met, {missed} missed, {unmeasured} not measured"
    return "\n".join([head, "", *rows, "", tail])


def fastest_bf16_floor(d: int = 896, v: int = 151936 // 4, n: int = 2048) -> tuple[str, dict[str, float]]:
    """("dtype" or "fp32": the run.py --floor for bf16 inputs, whichever of torch's bf16 and fp32 GEMMs runs the
    logits shape [n, d] x [d, v] faster here (issue 14's floor), and the GFLOP/s of each (best of 3)."""
    import time

    import torch

    rates = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        h, w = torch.randn(n, d).to(dt), torch.randn(v, d).to(dt)
        out = torch.empty(n, v, dtype=dt)
        torch.mm(h, w.t(), out=out)  # warm-up
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            torch.mm(h, w.t(), out=out)
            best = min(best, time.perf_counter() - t0)
        rates[name] = 2.0 * n * d * v / best / 1e9
    return ("dtype" if rates["bf16"] >= rates["fp32"] else "fp32"), rates


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="benchmarks/run.py --out files of one machine")
    ap.add_argument("--out", type=Path, default=None, help="also write the verdicts as JSON")
    ap.add_argument("--fastest-bf16-floor", action="store_true",
                    help="print the run.py --floor for bf16 inputs here ('dtype' or 'fp32', whichever GEMM is faster)")
    args = ap.parse_args(argv)
    if args.fastest_bf16_floor:
        choice, rates = fastest_bf16_floor()
        print(choice)
        print(", ".join(f"torch {k} GEMM {r:.0f} GFLOP/s" for k, r in rates.items()), file=sys.stderr)
        return 0
    if not args.files:
        ap.error("give the run.py JSON files to judge (or --fastest-bf16-floor)")
    machine, cases = load(args.files)
    verdicts = judge(cases)
    print(markdown(machine, verdicts))
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "files": [str(p) for p in args.files],
                                        "verdicts": [asdict(v) for v in verdicts]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
