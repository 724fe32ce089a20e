"""Backend registry: which implementation of the streamed log-prob op runs, and a record of it.

Every backend implements the same two functions on flattened, already-validated inputs from
which ignore_index tokens have been removed (N valid tokens):

``forward(hidden [N, D], weight [V, D], bias [V] | None, targets [N] int64, params)
    -> (logp [N] f32, entropy [N] f32 | None, lse [N] f32)``

``backward(hidden, weight, bias, targets, lse, entropy, grad_logp [N] f32, grad_entropy [N] f32 | None,
    params, needs (dhidden, dweight, dbias)) -> (dhidden | None, dweight | None, dbias | None)``

and optionally the fused single pass the GRPO loss uses (see ``fused.py``):

``forward_backward(hidden, weight, bias, targets, params, coef_fn, needs)
    -> (logp, entropy, dhidden | None, dweight | None, dbias | None)``

where ``coef_fn(start, end, logp_chunk, entropy_chunk) -> (grad_logp_chunk, grad_entropy_chunk | None)``
is called once per chunk of tokens, in order, before that chunk's gradient is formed.

Backends:
- ``cpu``: the C++ extension ``grpo_kernels._C`` (CPU tensors).
- ``triton``: Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1, for tests).
- ``torch``: chunked PyTorch, any device; O(chunk x V) memory but unfused GEMM + softmax.

The materializing oracle is not a backend: it lives in ``grpo_kernels.reference``.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch

BACKENDS = ("auto", "cpu", "triton", "torch")

_state = threading.local()
_warned: set[str] = set()


@dataclass(frozen=True)
class LogprobsParams:
    """Non-tensor options of the log-prob op; one frozen object travels to every backend."""

    temperature: float = 1.0
    softcap: Optional[float] = None
    ignore_index: int = -100
    return_entropy: bool = False
    backend: str = "auto"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def cpu_extension() -> Optional[ModuleType]:
    """The compiled ``grpo_kernels._C`` module, or None (with one warning naming why)."""
    try:
        return importlib.import_module("grpo_kernels._C")
    except ImportError as exc:
        _warn_once(
            "cpu",
            f"grpo_kernels: the C++ CPU extension grpo_kernels._C is not available ({exc}); CPU tensors use the "
            "chunked PyTorch backend instead. Build it with `pip install -e .` (needs a C++ compiler and ninja).",
        )
        return None


def triton_available() -> bool:
    """Whether Triton imports (it is optional: CPU-only installs run without it)."""
    try:
        importlib.import_module("triton")
        return True
    except ImportError:
        return False


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that will run for ``dtype`` tensors on ``device`` when ``name`` is requested."""
    if name == "auto":
        name = os.environ.get("GRPO_KERNELS_BACKEND", "auto")
    if name == "auto":
        if dtype == torch.float64:  # the kernels stop at fp32; float64 is for gradcheck and oracles
            return "torch"
        if device.type == "cuda":
            if triton_available():
                return "triton"
            _warn_once("triton", "grpo_kernels: Triton is not installed; CUDA tensors use the chunked PyTorch backend.")
            return "torch"
        if device.type == "cpu" and cpu_extension() is not None:
            return "cpu"
        return "torch"
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors; got tensors on {device}")
        if cpu_extension() is None:
            raise RuntimeError("backend='cpu' was requested but grpo_kernels._C is not built; run `pip install -e .`")
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but Triton is not installed")
        if device.type != "cuda" and not triton_interpret():
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); got {device}")
    return name


def module(name: str) -> ModuleType:
    """The implementation module of a resolved backend name."""
    return importlib.import_module(
        {"cpu": ".cpu", "triton": ".triton", "torch": ".chunked_torch"}[name], __name__
    )


_poison = os.environ.get("GRPO_KERNELS_POISON", "0") == "1"


def set_poison(enabled: bool) -> None:
    """Fill every output buffer the backends allocate with NaN before a kernel writes it (tests)."""
    global _poison
    _poison = bool(enabled)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel to fill: uninitialized, or NaN in poison mode."""
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def record(op: str, name: str) -> None:
    if not hasattr(_state, "last"):
        _state.last = {}
    _state.last[op] = name


def last_backend(op: str = "linear_logprobs") -> Optional[str]:
    """The backend that ran the most recent call of ``op`` in this thread (None before any call).

    ops: ``linear_logprobs``, ``fused_linear_grpo_loss``, ``group_advantages``.
    """
    return getattr(_state, "last", {}).get(op)
