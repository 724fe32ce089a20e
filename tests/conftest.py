"""Test configuration: CPU-only machines run the Triton kernels in the interpreter."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates any kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from grpo_kernels import backends  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every kernel output starts as NaN, so an element a kernel never wrote fails the test."""
    backends.set_poison(True)
    yield
    backends.set_poison(False)


@pytest.fixture(scope="module")
def tokenizer():
    """The built-in character tokenizer of the trainer, left-padded (the trainer tests' models use it)."""
    from transformers import AutoTokenizer

    from grpo_kernels.trainer.model import ASSETS

    tok = AutoTokenizer.from_pretrained(ASSETS)
    tok.padding_side = "left"
    return tok


@pytest.fixture
def seed():
    """Fresh random inputs every run; the seed is printed on failure for replay."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The resource table of the ahead-of-time Triton compiles (tests/test_triton_compile.py), if they ran."""
    lines = getattr(config, "_triton_compile_summary", None)
    if lines:
        terminalreporter.write_sep("-", "Triton sm_80 / sm_90 ahead-of-time compiles")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def vs_trl():
    """benchmarks/vs_trl.py loaded as a module (benchmarks/ is not a package), for the tests of its logic."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("vs_trl", Path(__file__).resolve().parents[1] / "benchmarks" / "vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("vs_trl", None)
