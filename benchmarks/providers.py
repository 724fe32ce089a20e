"""The providers that solve the benchmark problems of cases.py, and their agreement with the float64 oracle.

A :class:`Provider` turns a case and its :class:`cases.Inputs` into a zero-argument callable that
runs the op once and returns the tensors a user would keep (the log-probs, or the gradients). The
callable is what gets timed; what it returns is subtracted from the measured peak memory. The
``gemm-floor`` provider runs only the GEMMs the op cannot avoid (into preallocated outputs).

:func:`gold` computes the float64 oracle's outputs of a case once; :func:`check_provider` (run.py
--check) and accuracy.py both compare against it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import torch
from torch import Tensor

import grpo_kernels as gk
from grpo_kernels import reference
from cases import GRPO_CONFIG, WEIGHT_STD, Case, Inputs, Size, element_size, make_inputs

# ---------------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------------

Fn = Callable[[], tuple[Tensor, ...]]
# hidden [N, D], weight [V, D], targets [N] -> logp [N] (float32, differentiable)
LogprobsFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# the case's inputs -> scalar GRPO loss (differentiable w.r.t. inputs.hidden and inputs.weight)
GRPOFn = Callable[[Inputs], Tensor]


def _grads(loss: Tensor, inp: Inputs) -> tuple[Tensor, ...]:
    # autograd.grad, not .backward(): nothing accumulates into .grad between repetitions.
    return tuple(torch.autograd.grad(loss, (inp.hidden, inp.weight)))


def _composed_grpo(logprobs: LogprobsFn) -> GRPOFn:
    """A peer that only gives log-probs: its log-probs, then grpo_kernels' policy-loss math on top.

    That is what a TRL-style trainer does with such a kernel; the loss math is O(N) and costs nothing
    next to the head. (No entropy is computed: these peers have no entropy output.)
    """
    def loss(inp: Inputs) -> Tensor:
        B, T, Dh = inp.hidden.shape
        logp = logprobs(inp.hidden.reshape(B * T, Dh), inp.weight, inp.targets.reshape(-1)).reshape(B, T)
        return gk.grpo_loss(logp, inp.advantages, inp.mask, GRPO_CONFIG, old_logp=inp.old_logp,
                            ref_logp=inp.ref_logp).loss
    return loss


@dataclass(frozen=True)
class Provider:
    """One way of computing the ops.

    Attributes:
        name: column name and the provider part of test ids.
        description: one line for the README / JSON.
        logprobs: the log-prob function, for the two log-prob ops (None: not offered).
        grpo: the GRPO-loss function (None: not offered).
        requires: modules that must import, else the provider is "n/a (not installed)".
        probe: optional check run once on a tiny problem; it raises where the provider cannot run here
            (for example Triton kernels without a GPU driver) and its message becomes the n/a reason.
        probe_hint: what the probe failing usually means, put before the exception in the reason.
        logit_bytes: per op, (a, b): estimated extra peak bytes per element of the [N, V] logits are
            ``a * element_size + b``, for the --max-gb skip (materializing paths hold several [N, V]
            buffers: the GEMM output in the inputs' dtype plus float32 copies; streaming ones ~0).
        weight_bytes: estimated extra peak bytes per element of the [V, D] weight (fp32 dW accumulators).
        backend_ops: per op, the grpo_kernels op whose ``last_backend`` names the backend that ran
            (providers built on the library only).
        is_floor: the GEMM floor: no log-prob or loss function, its own callable (:func:`_build_floor`).
    """

    name: str
    description: str
    logprobs: Optional[LogprobsFn] = None
    grpo: Optional[GRPOFn] = None
    requires: tuple[str, ...] = ()
    probe: Optional[Callable[[], None]] = None
    probe_hint: str = ""
    logit_bytes: dict[str, tuple[float, float]] = field(default_factory=dict)
    weight_bytes: dict[str, float] = field(default_factory=dict)
    backend_ops: dict[str, str] = field(default_factory=dict)
    is_floor: bool = False

    def supports(self, op: str) -> bool:
        if self.is_floor:
            return True
        return self.grpo is not None if op == "grpo_fwd_bwd" else self.logprobs is not None

    def unavailable(self) -> Optional[str]:
        """None when the provider runs here, else why not (cached: imports and probes run once)."""
        return _unavailable(self.name)

    def build(self, case: Case, inp: Inputs, floor_dtype: Optional[torch.dtype] = None) -> Fn:
        """The callable that runs ``case`` once; preallocation (the floor's outputs) happens here.

        ``floor_dtype`` (the floor only): run its GEMMs in this dtype instead of the inputs' one.
        """
        if self.is_floor:
            return _build_floor(case, inp, floor_dtype or case.torch_dtype)
        if case.op == "grpo_fwd_bwd":
            grpo = self.grpo
            return lambda: _grads(grpo(inp), inp)
        logprobs = self.logprobs
        if case.op == "logprobs_fwd":
            def fwd() -> tuple[Tensor, ...]:
                with torch.no_grad():
                    return (logprobs(inp.hidden, inp.weight, inp.targets),)
            return fwd
        return lambda: _grads((logprobs(inp.hidden, inp.weight, inp.targets) * inp.grad_logp).sum(), inp)

    def backend(self, op: str) -> Optional[str]:
        """Which grpo_kernels backend ran the last call of ``op`` (providers built on the library)."""
        key = self.backend_ops.get(op)
        return gk.last_backend(key) if key else None

    def estimate_extra_bytes(self, case: Case) -> int:
        """Rough extra peak bytes (above inputs and returned outputs), for the --max-gb skip."""
        el = element_size(case.torch_dtype)
        a, b = (1.0, 0.0) if self.is_floor else self.logit_bytes.get(case.op, (0.0, 0.0))
        per_logit = a * el + b  # the floor: one [N, V] buffer in the inputs' dtype
        return int(per_logit * case.n_tokens * case.v + self.weight_bytes.get(case.op, 0.0) * case.v * case.d)


def estimate_total_bytes(case: Case, provider: Provider) -> int:
    """Inputs + returned outputs + the provider's estimated extra: what the process must hold at peak."""
    el = element_size(case.torch_dtype)
    inputs = (case.n_tokens + case.v) * case.d * el
    outputs = inputs if case.backward else case.n_tokens * 4
    return inputs + outputs + provider.estimate_extra_bytes(case)


def _build_floor(case: Case, inp: Inputs, gemm_dtype: torch.dtype) -> Fn:
    """The GEMMs the op cannot avoid, in ``gemm_dtype``, into outputs allocated here (outside the timed call).

    forward-only: logits [N, V] = H @ W^T. With the backward, two more: dH = dlogits @ W and
    dW = dlogits^T @ H; the logits buffer doubles as dlogits (the values do not change a GEMM's speed,
    and a second [N, V] buffer would not fit the largest fp32 cases in memory). A ``gemm_dtype`` other
    than the inputs' (``run.py --floor fp32``: CPUs without bf16 matrix units run fp32 GEMMs several
    times faster than bf16 ones) converts the inputs here, untimed.
    """
    h = inp.hidden.detach().reshape(-1, case.d).to(gemm_dtype)
    w = inp.weight.detach().to(gemm_dtype)
    logits = torch.empty(h.shape[0], case.v, dtype=h.dtype, device=h.device)  # on CUDA: cuBLAS into it
    if not case.backward:
        def fwd() -> tuple[Tensor, ...]:
            torch.mm(h, w.t(), out=logits)
            return ()
        return fwd
    dh = torch.empty_like(h)
    dw = torch.empty_like(w)

    def fwd_bwd() -> tuple[Tensor, ...]:
        torch.mm(h, w.t(), out=logits)
        torch.mm(logits, w, out=dh)
        torch.mm(logits.t(), h, out=dw)
        return (dh, dw)  # the gradients a real op would return: not counted as extra memory
    return fwd_bwd


# --- ours ------------------------------------------------------------------------------------------

def _ours_logprobs(backend: str) -> LogprobsFn:
    return lambda h, w, t: gk.linear_logprobs(h, w, t, backend=backend)


def _ours_grpo(backend: str) -> GRPOFn:
    def loss(inp: Inputs) -> Tensor:
        return gk.fused_linear_grpo_loss(inp.hidden, inp.weight, inp.targets, inp.mask, inp.advantages, GRPO_CONFIG,
                                         old_logp=inp.old_logp, ref_logp=inp.ref_logp, backend=backend).loss
    return loss


# --- the materializing path (grpo_kernels.reference in the inputs' dtype) -----------------------------

def _materialize_logprobs(h: Tensor, w: Tensor, t: Tensor) -> Tensor:
    return reference.linear_logprobs(h, w, t)  # compute_dtype=None: the inputs' dtype, as TRL does


def _materialize_grpo(inp: Inputs) -> Tensor:
    return reference.fused_linear_grpo_loss(inp.hidden, inp.weight, inp.targets, inp.mask, inp.advantages, GRPO_CONFIG,
                                            old_logp=inp.old_logp, ref_logp=inp.ref_logp).loss


# --- liger-kernel ----------------------------------------------------------------------------------

def _liger_logprobs(h: Tensor, w: Tensor, t: Tensor) -> Tensor:
    # The chunked selective-log-prob path LigerFusedLinearGRPOLoss runs per chunk (pure PyTorch with a
    # custom backward that recomputes logits per vocab chunk), exposed as a static method of its PPO base.
    from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

    return LigerFusedLinearPPOBase.chunk_forward(h.unsqueeze(0), w, t.unsqueeze(0)).reshape(-1)


def _liger_grpo(inp: Inputs) -> Tensor:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    cfg = GRPO_CONFIG
    eps_high = cfg.epsilon_low if cfg.epsilon_high is None else cfg.epsilon_high
    # compiled=False: torch.compile of the loss math is a GPU-oriented option; on CPU it only adds compile
    # time. chunk_size stays at Liger's default (1 sequence per chunk), as TRL uses it.
    crit = LigerFusedLinearGRPOLoss(beta=cfg.beta, compiled=False, use_ref_model=True, loss_type=cfg.loss_type,
                                    epsilon_low=cfg.epsilon_low, epsilon_high=eps_high, temperature=cfg.temperature)
    loss, _metrics = crit(inp.hidden, inp.weight, inp.targets, inp.mask, inp.advantages,
                          ref_per_token_logps=inp.ref_logp, old_per_token_logps=inp.old_logp)
    return loss


def _liger_flce_logprobs(h: Tensor, w: Tensor, t: Tensor) -> Tensor:
    # Liger's public fused linear cross-entropy (Triton kernels): per-token CE = -logp.
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return -LigerFusedLinearCrossEntropyLoss(reduction="none")(w, h, t).float()


# --- cut-cross-entropy -----------------------------------------------------------------------------

def _cce_impl(device: torch.device) -> str:
    # The "cce" impl is Triton (GPU only); "torch_compile" is CCE's portable implementation.
    return "cce" if device.type == "cuda" else "torch_compile"


def _cce_logprobs(h: Tensor, w: Tensor, t: Tensor) -> Tensor:
    from cut_cross_entropy import linear_cross_entropy

    return -linear_cross_entropy(h, w, t, reduction="none", impl=_cce_impl(h.device)).float()


# --- TRL's chunked LM head ---------------------------------------------------------------------------

def _trl_logprobs(h: Tensor, w: Tensor, t: Tensor) -> Tensor:
    # trl.kernels.ChunkedLogProbFunction (TRL >= 1.16): what GRPOTrainer's fused LM head calls, cuBLAS GEMMs on
    # [4096-token x chunk] tiles folded by Triton on GPU (torch on CPU); chunk = TRL's own default.
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils as trl_utils

    chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)
    return ChunkedLogProbFunction.apply(h, w, None, t, 1.0, chunk, None, 1.0, ())[0]


def _probe(logprobs: LogprobsFn) -> Callable[[], None]:
    """Run ``logprobs`` forward and backward on a tiny problem (raises where it cannot run here)."""
    def probe() -> None:
        dev = "cuda" if torch.cuda.is_available() else "cpu"  # where run.py --device cuda would run it
        h = torch.randn(8, 64, device=dev, requires_grad=True)
        w = (torch.randn(256, 64, device=dev) * WEIGHT_STD).requires_grad_(True)
        t = torch.randint(0, 256, (8,), device=dev)
        logprobs(h, w, t).sum().backward()
    return probe


# Extra-memory estimates: measured extra peak of the quick run (N = 1024, bf16 and fp32, on the project's
# CPU) divided by N x V (or V x D for weight-sized buffers) and rounded up, everything attributed to the
# bigger term so larger N errs on the safe side. They only decide what --max-gb skips.
PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("gemm-floor", "the op's GEMMs only (1 forward, 3 with backward) into preallocated outputs, torch.mm(out=)",
             is_floor=True),
    Provider("ours", "grpo_kernels, backend='auto' (C++ grpo_kernels._C on CPU, Triton on CUDA)",
             logprobs=_ours_logprobs("auto"), grpo=_ours_grpo("auto"),
             backend_ops={"logprobs_fwd": "linear_logprobs", "logprobs_fwd_bwd": "linear_logprobs",
                          "grpo_fwd_bwd": "fused_linear_grpo_loss"}),
    Provider("ours-torch", "grpo_kernels, backend='torch' (chunked PyTorch, the portable fallback)",
             logprobs=_ours_logprobs("torch"), grpo=_ours_grpo("torch"),
             # measured 8.4 / 4.5 bytes per weight element with backward (bf16 / fp32), ~70-100 MB forward
             weight_bytes={"logprobs_fwd": 0.8, "logprobs_fwd_bwd": 8.5, "grpo_fwd_bwd": 8.5},
             backend_ops={"logprobs_fwd": "linear_logprobs", "logprobs_fwd_bwd": "linear_logprobs",
                          "grpo_fwd_bwd": "fused_linear_grpo_loss"}),
    Provider("materialize", "grpo_kernels.reference in the inputs' dtype: logits -> log_softmax -> gather (-> loss), autograd",
             logprobs=_materialize_logprobs, grpo=_materialize_grpo,
             # measured 8.0 / 8.2 (fwd) and 18.2 / 16.7 (fwd_bwd, grpo) bytes per logit in bf16 / fp32
             logit_bytes={"logprobs_fwd": (0, 8.5), "logprobs_fwd_bwd": (0, 18.5), "grpo_fwd_bwd": (0, 18.5)}),
    Provider("liger", "liger-kernel: LigerFusedLinearGRPOLoss(compiled=False) for the loss; its chunked selective "
             "log-prob path (LigerFusedLinearPPOBase.chunk_forward) for log-probs",
             logprobs=_liger_logprobs, grpo=_liger_grpo, requires=("liger_kernel",),
             # fp32 dW accumulators: measured 4.1 / 0.7 (fwd_bwd) and 6.1 / 4.4 (grpo) bytes per weight element
             weight_bytes={"logprobs_fwd": 0.6, "logprobs_fwd_bwd": 4.5, "grpo_fwd_bwd": 6.5}),
    Provider("liger-flce", "liger-kernel: LigerFusedLinearCrossEntropyLoss(reduction='none') (Triton), -CE = logp",
             logprobs=_liger_flce_logprobs, requires=("liger_kernel",), probe=_probe(_liger_flce_logprobs),
             probe_hint="Triton kernels, no GPU here",
             weight_bytes={"logprobs_fwd_bwd": 4}),
    Provider("cce", "cut-cross-entropy: linear_cross_entropy(reduction='none', impl='torch_compile' on CPU), -CE = logp; "
             "grpo_kernels.grpo_loss on top for the loss",
             logprobs=_cce_logprobs, grpo=_composed_grpo(_cce_logprobs), requires=("cut_cross_entropy",),
             # one [N, V] buffer in the inputs' dtype: measured 2.0-2.2 (bf16) and 4.2-4.4 (fp32) bytes per logit
             logit_bytes={"logprobs_fwd": (1, 0.5), "logprobs_fwd_bwd": (1, 0.5), "grpo_fwd_bwd": (1, 0.5)}),
    Provider("trl-chunked", "TRL 1.16's chunked head trl.kernels.ChunkedLogProbFunction (its fused LM head's op), -> logp; "
             "grpo_kernels.grpo_loss on top for the loss",
             logprobs=_trl_logprobs, grpo=_composed_grpo(_trl_logprobs), requires=("trl.kernels",),
             probe=_probe(_trl_logprobs),
             # fp32 [N, D] and [V, D] gradient accumulators and [4096 x 32768] tiles (+4.1 GB measured at 8 x 512, Intel Xeon with AMX)
             logit_bytes={"logprobs_fwd_bwd": (0, 1.0), "grpo_fwd_bwd": (0, 1.0)},
             weight_bytes={"logprobs_fwd": 0.5, "logprobs_fwd_bwd": 8.5, "grpo_fwd_bwd": 8.5}),
)}


def providers_for(op: str, names: Optional[list[str]] = None) -> list[Provider]:
    """The providers offering ``op`` (all of them, or those in ``names``), in the tables' column order."""
    return [p for p in PROVIDERS.values() if p.supports(op) and (names is None or p.name in names)]


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


@lru_cache(maxsize=None)
def _unavailable(name: str) -> Optional[str]:
    p = PROVIDERS[name]
    for mod in p.requires:
        try:
            importlib.import_module(mod)
        except Exception as exc:  # ImportError, or a broken install raising anything on import
            return f"not installed ({_one_line(exc)})" if isinstance(exc, ImportError) else f"import failed: {_one_line(exc)}"
    if p.probe is not None:
        try:
            p.probe()
        except Exception as exc:
            return f"{p.probe_hint}: {_one_line(exc)}" if p.probe_hint else _one_line(exc)
    return None


# ---------------------------------------------------------------------------------------------------
# Agreement check: a benchmark of a wrongly wired provider is meaningless
# ---------------------------------------------------------------------------------------------------


def check_provider(provider: Provider, op: str, seed: int = 0) -> float:
    """Max relative error of the provider's outputs vs the float64 oracle on a tiny fp32 problem.

    Catches API misuse (sign of a cross-entropy, a wrong loss option) before hours of timing. The
    outputs are the log-probs (forward-only) or (dhidden, dweight); errors are relative to each
    tensor's max magnitude.
    """
    size: Size = (2, 32) if op == "grpo_fwd_bwd" else 64
    case = Case(op, "fp32", size, d=64, v=1000)
    inp = make_inputs(case, seed)
    got = provider.build(case, inp)()
    want = gold(case, inp)[1:] if case.backward else gold(case, inp)
    return max(rel_error(g, w) for g, w in zip(got, want))


def gold(case: Case, inp: Inputs) -> tuple[Tensor, ...]:
    """The float64 oracle on the case's inputs: (logp or the loss, then dH and dW when the op has a backward).

    logprobs ops: logp [N] and the gradients of ``sum(logp * g)``; grpo_fwd_bwd: the loss (shape [1])
    and its gradients.
    """
    h64 = inp.hidden.detach().double().requires_grad_(case.backward)
    w64 = inp.weight.detach().double().requires_grad_(case.backward)
    if case.op == "grpo_fwd_bwd":
        value = reference.fused_linear_grpo_loss(h64, w64, inp.targets, inp.mask, inp.advantages, GRPO_CONFIG,
                                                 old_logp=inp.old_logp, ref_logp=inp.ref_logp,
                                                 compute_dtype=torch.float64).loss
        objective = value
    else:
        value = reference.linear_logprobs(h64, w64, inp.targets, compute_dtype=torch.float64)
        if not case.backward:
            return (value.detach(),)
        objective = (value * inp.grad_logp.double()).sum()
    return (value.detach().reshape(-1), *torch.autograd.grad(objective, (h64, w64)))


def rel_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want|: the error measure of check_provider and accuracy.py."""
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))
