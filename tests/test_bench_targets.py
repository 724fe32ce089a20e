"""benchmarks/targets.py: issue 14's verdicts from run.py JSON files (synthetic records, no timing)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_targets", REPO / "benchmarks" / "targets.py")
targets = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = targets  # its dataclass resolves string annotations through sys.modules
_spec.loader.exec_module(targets)

MACHINE = {"cpu_model": "Test CPU", "cpu_flags": ["avx2"], "cpu_count": 2, "torch_threads": 2, "torch": "x"}


def rec(op: str, dtype: str, size, provider: str, seconds: float | None, extra_mb: float = 10.0) -> dict:
    """One run.py result record: the floor carries floor_s, a provider its median time and extra memory."""
    r = {"op": op, "dtype": dtype, "size": size, "provider": provider, "status": "ok"}
    if provider == "gemm-floor":
        r["floor_s"] = seconds
    elif seconds is None:
        r.update(status="skipped", reason="not installed")
    else:
        r["time"] = {"status": "ok", "median_s": seconds}
        r["memory"] = {"status": "ok", "extra_bytes": int(extra_mb * 1e6)}
    return r


def write(tmp_path: Path, name: str, results: list[dict], machine: dict = MACHINE) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps({"machine": machine, "results": results}))
    return p


def verdicts(*paths: Path) -> dict[tuple[str, str, str], str]:
    _, cases = targets.load(list(paths))
    return {(v.target, v.dtype, v.size): v.verdict for v in targets.judge(cases)}


def test_loss_ratio_peers_and_memory(tmp_path):
    f = write(tmp_path, "grpo.json", [
        rec("grpo_fwd_bwd", "bf16", [8, 512], "gemm-floor", 4.0),
        rec("grpo_fwd_bwd", "bf16", [8, 512], "ours", 4.8, extra_mb=300),  # 1.20x: met; +300 MB: missed
        rec("grpo_fwd_bwd", "bf16", [8, 512], "cce", 4.7),  # a peer ahead of us
        rec("grpo_fwd_bwd", "bf16", [8, 512], "liger", None),  # not installed: cannot save a verdict a timed peer lost
        rec("grpo_fwd_bwd", "fp32", [8, 512], "gemm-floor", 4.0),
        rec("grpo_fwd_bwd", "fp32", [8, 512], "ours", 5.2),  # 1.30x: missed
        rec("grpo_fwd_bwd", "fp32", [8, 512], "cce", 5.3),
        rec("grpo_fwd_bwd", "fp32", [8, 512], "ours-torch", 1.0),  # our own fallback is no peer
    ])
    v = verdicts(f)
    assert v[("loss", "fp32", "8x512")] == "missed"
    assert v[("loss ahead of every peer", "fp32", "8x512")] == "met"
    assert v[("loss", "bf16", "8x512")] == "met"
    assert v[("loss ahead of every peer", "bf16", "8x512")] == "missed"
    assert v[("memory (grpo_fwd_bwd)", "bf16", "8x512")] == "missed"


def test_an_untimed_peer_leaves_the_race_unmeasured(tmp_path):
    f = write(tmp_path, "grpo.json", [
        rec("grpo_fwd_bwd", "fp32", [8, 512], "gemm-floor", 4.0),
        rec("grpo_fwd_bwd", "fp32", [8, 512], "ours", 4.2),
        rec("grpo_fwd_bwd", "fp32", [8, 512], "materialize", 8.0),
        rec("grpo_fwd_bwd", "fp32", [8, 512], "cce", None),  # not installed: it might have been the fastest
    ])
    assert verdicts(f)[("loss ahead of every peer", "fp32", "8x512")] == "not measured"
    timed = write(tmp_path, "grpo2.json", [
        rec("grpo_fwd_bwd", "fp32", [8, 512], "gemm-floor", 4.0),
        rec("grpo_fwd_bwd", "fp32", [8, 512], "ours", 4.2),
        rec("grpo_fwd_bwd", "fp32", [8, 512], "materialize", 8.0),
        rec("grpo_fwd_bwd", "fp32", [8, 512], "cce", 4.3),
    ])
    assert verdicts(timed)[("loss ahead of every peer", "fp32", "8x512")] == "met"


def test_forward_backward_counts_four_gemms_from_the_forward_run(tmp_path):
    fwd_bwd = write(tmp_path, "fb.json", [rec("logprobs_fwd_bwd", "fp32", 1024, "gemm-floor", 3.0),
                                          rec("logprobs_fwd_bwd", "fp32", 1024, "ours", 5.0)])
    fwd = write(tmp_path, "f.json", [rec("logprobs_fwd", "fp32", 1024, "gemm-floor", 1.0),
                                     rec("logprobs_fwd", "fp32", 1024, "ours", 1.2)])
    # without the forward's floor the four-GEMM ratio is unknown, not guessed
    assert verdicts(fwd_bwd)[("forward + backward", "fp32", "1024")] == "not measured"
    v = verdicts(fwd_bwd, fwd)
    assert v[("forward + backward", "fp32", "1024")] == "met"  # 5.0 / (3.0 + 1.0) = 1.25 <= 1.30
    assert v[("forward", "fp32", "1024")] == "missed"  # 1.2 > 1.10


def test_a_later_file_replaces_a_case_and_other_machines_are_refused(tmp_path):
    first = write(tmp_path, "a.json", [rec("logprobs_fwd", "bf16", 4096, "gemm-floor", 1.0),
                                       rec("logprobs_fwd", "bf16", 4096, "ours", 1.5)])
    rerun = write(tmp_path, "b.json", [rec("logprobs_fwd", "bf16", 4096, "gemm-floor", 1.0),
                                       rec("logprobs_fwd", "bf16", 4096, "ours", 1.05)])
    assert verdicts(first, rerun)[("forward", "bf16", "4096")] == "met"
    other = write(tmp_path, "c.json", [], machine={**MACHINE, "cpu_model": "Another CPU"})
    with pytest.raises(SystemExit, match="another machine"):
        targets.load([first, other])
