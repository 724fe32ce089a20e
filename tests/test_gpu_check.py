"""The CPU-checkable parts of benchmarks/gpu_check.sh and of the benchmark's CUDA path.

gpu_check.sh runs on a GPU machine; here: its argument parsing, the commands it would run
(--dry-run), its install list against the benchmark's providers, and benchmarks/run.py
--device cuda end to end on a machine without a GPU (every cell says why there is no number).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def _benchmarks():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import cases
    import providers
    import run
    import timing_cuda

    return cases, providers, run, timing_cuda


def test_arguments():
    bad = _sh("--bogus")
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
    missing = _sh("--out")
    assert missing.returncode == 2 and "--out needs a directory" in missing.stderr
    helped = _sh("--help")
    assert helped.returncode == 0 and "--skip-install" in helped.stdout and "--dry-run" in helped.stdout


def test_dry_run_plans_every_step_into_one_folder(tmp_path):
    out = tmp_path / "results"
    res = _sh("--dry-run", "--out", str(out))
    assert res.returncode == 0, res.stderr
    steps = re.findall(r"^\[(\w+)\] ", res.stdout, re.M)
    assert steps == ["install", "env", "tests", "bench"]
    assert not out.exists()  # nothing ran
    for name in ("install.log", "env.txt", "tests.txt", "tests.xml", "bench.json", "bench.md"):
        assert str(out / name) in res.stdout, name
    bench = next(line for line in res.stdout.splitlines() if line.startswith("[bench]"))
    assert "--device cuda" in bench and "--heads 896x151936 4096x128256" in bench
    for op in ("logprobs_fwd", "logprobs_fwd_bwd", "grpo_fwd_bwd"):
        assert f" {op}" in bench
    quick = _sh("--dry-run", "--quick", "--skip-install", "--out", str(out))
    assert "[install]" not in quick.stdout and "--heads 896x151936 --providers" in quick.stdout


def test_install_list_covers_the_benchmark_providers():
    _, providers, _, _ = _benchmarks()
    packages = _sh("--print-packages").stdout.split()
    names = {re.split(r"[=<>]", p)[0] for p in packages}
    assert "torch==2.13.0" in packages  # pinned: the benchmark's torch, a CUDA build from the index on Linux
    assert {"triton", "pytest", "transformers"} <= names
    bench = next(line for line in _sh("--dry-run").stdout.splitlines() if line.startswith("[bench]"))
    names_run = bench.split("--providers ")[1].split(" --")[0].split()
    dist = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy", "trl": "trl"}
    for name in names_run:
        assert name in providers.PROVIDERS, name
        for module in providers.PROVIDERS[name].requires:
            assert dist[module.split(".")[0]] in names, f"{name} needs {module}: not in the install list"


def test_cuda_helpers_without_a_gpu():
    cases, _, run, timing_cuda = _benchmarks()
    assert run.parse_head("4096x128256") == (4096, 128256)
    with pytest.raises(Exception, match="DxV"):
        run.parse_head("4096")
    case = cases.Case("logprobs_fwd_bwd", "fp32", 8, d=16, v=32)
    moved = timing_cuda.to_device(cases.make_inputs(case), torch.device("cpu"))
    assert moved.hidden.is_leaf and moved.hidden.requires_grad and moved.grad_logp is not None
    assert timing_cuda.output_bytes((torch.zeros(3), (torch.zeros(2, dtype=torch.float16),))) == 16
    if not torch.cuda.is_available():
        spec = {"case": case.to_json(), "provider": "ours", "seed": 0, "repeats": 1, "device": "cuda"}
        assert run.worker(spec)["status"] == "n/a"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer of the CUDA path")
def test_run_py_cuda_path_end_to_end_without_a_gpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--device", "cuda", "--ops", "logprobs_fwd",
           "--dtypes", "bf16", "--sizes", "16", "--heads", "8x32", "--providers", "ours", "--repeats", "1",
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "### logprobs_fwd · bf16  (D=8, V=32)" in res.stdout
    records = json.loads(out.read_text())["results"]
    ours = next(r for r in records if r["provider"] == "ours")
    assert ours["status"] == "n/a" and "cuda" in ours["reason"]
