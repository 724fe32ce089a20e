"""The backend contract, the registry, the shared two-pass schedule, and one resolve for every op.

A backend implements the streamed log-prob op on flattened, validated inputs from which the tokens
that need no vocabulary work have been removed (N tokens). It is an object satisfying
:class:`Backend`; its tuning knobs are a frozen object it was built with (``CpuTuning``,
``TorchTuning``, Triton's ``LaunchConfig``), never module globals. Backends only assert: every
user-facing check runs in the public functions before any launch (``grpo_kernels._checks``).

Backends:
- ``cpu``: the C++ extension ``grpo_kernels._C`` (CPU tensors; fp32 / bf16 / fp16).
- ``triton``: Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1, for tests).
- ``torch``: chunked PyTorch, any device and dtype (float64 too); O(chunk x V) memory.

The materializing oracle is not a backend: it lives in ``grpo_kernels.reference``. docs/design.md,
"The backend contract", says the same in prose.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

BACKENDS = ("auto", "cpu", "triton", "torch")

# (dhidden, dweight, dbias): which gradients the caller needs.
Needs = tuple[bool, bool, bool]
Grads = tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]
# coef_fn(start, end, logp[start:end], entropy[start:end] | None) -> (dLoss/dlogp, dLoss/dentropy | None)
CoefFn = Callable[[int, int, Tensor, Optional[Tensor]], tuple[Tensor, Optional[Tensor]]]
# (logp [N], entropy [N] | None, the gradients formed, handed out by ``finish(scale)``)
FusedResult = tuple[Tensor, Optional[Tensor], "Formed"]

_state = threading.local()
_warned: set[str] = set()


@dataclass(frozen=True)
class LogprobsParams:
    """What the kernels read besides tensors: one frozen object travels to every backend.

    ``softcap == 0.0`` means no soft-capping: the one encoding of "off" in Python, C++ and Triton.
    """

    temperature: float = 1.0
    softcap: float = 0.0
    return_entropy: bool = False

    @classmethod
    def make(cls, temperature: float, softcap: Optional[float], return_entropy: bool) -> "LogprobsParams":
        """From the public options (``softcap=None`` is off)."""
        return cls(float(temperature), 0.0 if softcap is None else float(softcap), bool(return_entropy))


@runtime_checkable
class Backend(Protocol):
    """The contract every backend satisfies (inputs flattened and validated; N may be 0).

    dtypes: hidden / weight / bias share one dtype; the [N] vectors (logp, entropy, the coefficients)
    and lse [N, 2] are float32, or float64 for float64 inputs; gradients come back in the dtype of
    the tensor they belong to.

    lse: each row's log-sum-exp as the unevaluated sum ``lse[:, 0] + lse[:, 1]``: the row's max logit
    and ``log sum exp(z - max)`` (in [0, log V]). The backward forms ``p = exp((z - max) - log-sum)``,
    exact where it matters (z - max is exact near the max). One fp32 lse would round the log-sum to the
    ulp of the max logit: 4.9e-4 at logits of 4000, carried as a relative error into every p and into
    dH at up to 14x the materializing path's error (tests/test_bad_inputs.py, ``huge-logits``).
    """

    name: str

    def forward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                params: LogprobsParams) -> tuple[Tensor, Optional[Tensor], Tensor]:
        """hidden [N, D], weight [V, D], bias [V] | None, targets [N] int64 -> (logp [N], entropy [N] | None, lse [N, 2])."""
        ...

    def backward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                 entropy: Optional[Tensor], grad_logp: Tensor, grad_entropy: Optional[Tensor],
                 params: LogprobsParams, needs: Needs) -> Grads:
        """Gradients of ``sum(grad_logp * logp + grad_entropy * entropy)``: (dhidden [N, D], dweight [V, D],
        dbias [V]), None where ``needs`` says so. With N == 0 the needed dweight / dbias are zeros."""
        ...

    def one_pass(self, dtype: torch.dtype, d: int) -> bool:
        """Whether :meth:`forward_backward` beats the shared two-pass schedule for this dtype and hidden size."""
        ...

    def forward_backward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                         params: LogprobsParams, coef_fn: CoefFn, needs: Needs) -> FusedResult:
        """Forward, dLoss/dlogp and gradients in one pass over the logits: ``coef_fn`` is called on
        consecutive chunks covering [0, N) in order, each before that chunk's gradient is formed.
        -> (logp [N], entropy [N] | None, :class:`Formed`): the gradients come out of ``Formed.finish``."""
        ...


@runtime_checkable
class Formed(Protocol):
    """Gradients ``forward_backward`` formed before grad_output was known.

    ``finish(scale)`` hands them out once as (dhidden, dweight, dbias) times ``scale`` (a one-element
    tensor on the inputs' device; None: 1), None where ``needs`` said so: scaled in place, each 16-bit
    gradient rounded once (a backend keeps what it needs for that, e.g. the C++ one pass's int8
    residuals, until then), no second [V, D] tensor, no host sync. It releases what it held: a second
    call is a bug (asserted).
    """

    def finish(self, scale: Optional[Tensor]) -> Grads:
        ...


class TwoPassBackend:
    """Base of the backends: ``forward_backward`` is the shared two-pass schedule unless overridden."""

    name = "?"

    def one_pass(self, dtype: torch.dtype, d: int) -> bool:
        return False

    def forward_backward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                         params: LogprobsParams, coef_fn: CoefFn, needs: Needs) -> FusedResult:
        first = first_pass(self, hidden, weight, bias, targets, params, coef_fn)
        return first.logp, first.entropy, _PendingGradientPass(self, (hidden, weight, bias, targets), params, first, needs)


# ---------------------------------------------------------------------------------------------------
# The shared two-pass schedule: a forward-only pass, the coefficients, then the recomputing backward
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FirstPass:
    """What the forward-only pass leaves for the gradient pass: [N] vectors only."""

    logp: Tensor
    entropy: Optional[Tensor]
    lse: Tensor
    grad_logp: Tensor
    grad_entropy: Optional[Tensor]


def first_pass(impl: Backend, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
               params: LogprobsParams, coef_fn: CoefFn) -> FirstPass:
    """Pass one: logp / entropy / lse of every token, then ``coef_fn(0, N, ...)`` once for all of them."""
    logp, ent, lse = impl.forward(hidden, weight, bias, targets, params)
    g_logp, g_ent = coef_fn(0, hidden.shape[0], logp, ent)
    return FirstPass(logp, ent, lse, g_logp, g_ent)


def gradient_pass(impl: Backend, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                  params: LogprobsParams, first: FirstPass, needs: Needs, scale: Optional[Tensor] = None) -> Grads:
    """Pass two: the backend's recomputing backward with the coefficients, times ``scale`` when given.

    Scaling the [N] coefficients (on the device, no host sync) instead of the gradients keeps a
    16-bit dW rounded once and allocates no second [V, D] tensor.
    """
    g_logp, g_ent = first.grad_logp, first.grad_entropy
    if scale is not None:
        g_logp = g_logp * scale.to(g_logp.dtype)
        g_ent = None if g_ent is None else g_ent * scale.to(g_ent.dtype)
    acc = first.lse.dtype
    return impl.backward(hidden, weight, bias, targets, first.lse, first.entropy, g_logp.to(acc),
                         None if g_ent is None else g_ent.to(acc), params, needs)


class _PendingGradientPass:
    """The two-pass schedule's :class:`Formed`: the gradient pass runs in ``finish``, with the scaled
    coefficients (so grad_output costs nothing extra)."""

    def __init__(self, impl: Backend, inputs: tuple, params: LogprobsParams, first: FirstPass, needs: Needs) -> None:
        self._state: Optional[tuple] = (impl, inputs, params, first, needs)

    def finish(self, scale: Optional[Tensor]) -> Grads:
        assert self._state is not None, "Formed.finish runs once"
        (impl, (hidden, weight, bias, targets), params, first, needs), self._state = self._state, None
        return gradient_pass(impl, hidden, weight, bias, targets, params, first, needs, scale)


def scale_in_place(x: Optional[Tensor], scale: Optional[Tensor]) -> Optional[Tensor]:
    """``x *= scale`` on the device (no host read); None passes through."""
    if x is not None and scale is not None:
        x.mul_(scale.to(x.dtype))
    return x


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------

# name -> "module:factory" building the default instance (imported on first use: Triton is optional).
REGISTRY: dict[str, str] = {
    "cpu": "grpo_kernels.backends.cpu:CpuBackend",
    "torch": "grpo_kernels.backends.chunked_torch:TorchBackend",
    "triton": "grpo_kernels.backends.triton:TritonBackend",
}
_defaults: dict[str, Backend] = {}


def get(name: str) -> Backend:
    """The instance that runs a resolved backend name: the one :func:`use` installed in this thread, or the default."""
    override = getattr(_state, "override", {}).get(name)
    if override is not None:
        return override
    if name not in _defaults:
        module, factory = REGISTRY[name].split(":")
        _defaults[name] = getattr(importlib.import_module(module), factory)()
    return _defaults[name]


@contextlib.contextmanager
def use(backend: Backend) -> Iterator[Backend]:
    """Run the calls of this thread that resolve to ``backend.name`` on this instance (say, other tuning).

    ``with backends.use(CpuBackend(CpuTuning(fused_chunk_tokens=16))): fused_linear_grpo_loss(...)``
    """
    assert isinstance(backend, Backend) and backend.name in REGISTRY, backend
    if not hasattr(_state, "override"):
        _state.override = {}
    previous = _state.override.get(backend.name)
    _state.override[backend.name] = backend
    try:
        yield backend
    finally:
        if previous is None:
            del _state.override[backend.name]
        else:
            _state.override[backend.name] = previous


# ---------------------------------------------------------------------------------------------------
# Availability and resolve
# ---------------------------------------------------------------------------------------------------


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


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_name(fn: str, name: object) -> None:
    """``name`` must be one of BACKENDS; the error names ``fn``."""
    if name not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {', '.join(BACKENDS)}; got {name!r}")


def resolve(fn: str, name: str, device: torch.device, dtype: Optional[torch.dtype] = None, *,
            has_cpu_kernel: bool = True) -> str:
    """The backend that runs ``fn`` for ``dtype`` tensors on ``device`` when ``name`` is requested.

    One decision for every op; errors name ``fn``. ``has_cpu_kernel=False`` (group_advantages: an
    O(B) op) runs the PyTorch code for CPU tensors, under "auto" and "cpu" alike.
    """
    check_name(fn, name)
    if name == "auto":
        env = os.environ.get("GRPO_KERNELS_BACKEND", "auto")
        if env not in BACKENDS:  # a misspelling must not fall back to "auto" unnoticed
            raise ValueError(f"{fn}: the environment variable GRPO_KERNELS_BACKEND must be one of {', '.join(BACKENDS)}; "
                             f"got {env!r}")
        if env != "auto" and (has_cpu_kernel or env != "cpu"):
            try:
                return resolve(fn, env, device, dtype, has_cpu_kernel=has_cpu_kernel)
            except (ValueError, TypeError, RuntimeError) as exc:  # the caller asked for "auto": say where env came from
                raise type(exc)(f"{exc} (backend={env!r} comes from the environment variable GRPO_KERNELS_BACKEND; "
                                "the call asked for backend='auto')") from None
    if name == "auto":
        if dtype == torch.float64 and has_cpu_kernel:  # the kernels stop at fp32; float64 is for gradcheck and oracles
            return "torch"
        if device.type == "cuda":
            if triton_available():
                return "triton"
            _warn_once("triton", "grpo_kernels: Triton is not installed; CUDA tensors use the chunked PyTorch backend.")
            return "torch"
        if device.type == "cpu" and has_cpu_kernel and cpu_extension() is not None:
            return "cpu"
        return "torch"
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{fn}: backend='cpu' needs CPU tensors; got tensors on {device}")
        if not has_cpu_kernel:
            return "torch"
        if cpu_extension() is None:
            raise RuntimeError(f"{fn}: backend='cpu' was requested but grpo_kernels._C is not built; run `pip install -e .`")
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"{fn}: backend='triton' was requested but Triton is not installed")
        if device.type != "cuda" and not triton_interpret():
            raise ValueError(f"{fn}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); got {device}")
    if name in ("cpu", "triton") and has_cpu_kernel and dtype is not None and dtype not in KERNEL_DTYPES:
        raise TypeError(f"{fn}: backend={name!r} supports hidden/weight in float32, bfloat16 or float16; got "
                        f"{str(dtype).replace('torch.', '')} (use backend='torch' for float64, e.g. for gradcheck)")
    return name


# ---------------------------------------------------------------------------------------------------
# Output buffers and the record of what ran
# ---------------------------------------------------------------------------------------------------

_poison = os.environ.get("GRPO_KERNELS_POISON", "0") == "1"


def set_poison(enabled: bool) -> None:
    """Fill every output buffer the backends allocate with NaN before a kernel writes it (tests)."""
    global _poison
    _poison = bool(enabled)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
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
