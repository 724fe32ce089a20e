"""The benchmark problems: ops, the case grid, and their inputs (the providers are in providers.py).

Both the pytest-benchmark suites (``test_bench_*.py``) and the table script (``run.py``) take their
cases and inputs from here and their provider callables from ``providers.py``, so the two can never
time different things.

Vocabulary:

- an *op* is what is timed: ``logprobs_fwd`` (old/ref log-probs, forward only, under no_grad),
  ``logprobs_fwd_bwd`` (forward + backward of ``sum(logp * g)`` w.r.t. hidden and weight) or
  ``grpo_fwd_bwd`` (hidden [B, T, D] -> GRPO loss -> backward w.r.t. hidden and weight);
- a :class:`Case` is an op at one dtype and one size (N tokens, or B x T for the GRPO loss) of the
  Qwen2.5-0.5B head (D = 896, V = 151936);
- a provider (``providers.py``) turns a case and its :class:`Inputs` into a zero-argument callable
  that runs the op once and returns the tensors a user would keep (the log-probs, or the gradients).
  The callable is what gets timed; what it returns is subtracted from the measured peak memory.

The ``gemm-floor`` provider runs only the GEMMs the op cannot avoid (into preallocated outputs), so
``time / floor`` says how close a provider is to the machine's matrix-multiply speed.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

# Benchmark this checkout's package, not whichever grpo_kernels an editable install points at.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo_kernels as gk  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# The problems
# ---------------------------------------------------------------------------------------------------

D = 896  # Qwen2.5-0.5B hidden size
V = 151936  # Qwen2.5-0.5B vocabulary (the LM head's rows)

OPS = ("logprobs_fwd", "logprobs_fwd_bwd", "grpo_fwd_bwd")
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DEFAULT_DTYPES = ("bf16", "fp32")

Size = Union[int, tuple[int, int]]  # N tokens (log-prob ops) or (B, T) (GRPO loss)
LOGPROBS_SIZES: tuple[int, ...] = (1024, 4096, 16384)
GRPO_SIZES: tuple[tuple[int, int], ...] = ((8, 512), (4, 2048), (16, 1024))
# The smoke-test subset: one small size per op, about a second per bf16 run.
QUICK_LOGPROBS_SIZES: tuple[int, ...] = (1024,)
QUICK_GRPO_SIZES: tuple[tuple[int, int], ...] = ((2, 512),)

# The benchmarked loss: DAPO token-level normalization with the KL term on, old and ref log-probs given
# (the off-policy, beta != 0 case that needs every input a GRPO step has).
GRPO_CONFIG = gk.GRPOConfig(loss_type="dapo", beta=0.04)

# Tokens of the priming call the memory run makes before it reads its baseline (see run.py).
PRIME_TOKENS = 16


def quick_from_env() -> bool:
    """BENCH_QUICK=1 restricts the suites to the smoke-test sizes."""
    return os.environ.get("BENCH_QUICK", "0") not in ("", "0", "false", "False")


def parse_size(text: str) -> Size:
    """'1024' -> 1024; '8x512' (or '8×512') -> (8, 512)."""
    t = text.strip().lower().replace("×", "x")
    if "x" in t:
        b, s = t.split("x", 1)
        return (int(b), int(s))
    return int(t)


@dataclass(frozen=True)
class Case:
    """One op at one dtype and size. ``d`` and ``v`` default to the Qwen2.5-0.5B head."""

    op: str
    dtype: str
    size: Size
    d: int = D
    v: int = V

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; expected one of {OPS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {tuple(DTYPES)}")
        if self.op == "grpo_fwd_bwd" and not isinstance(self.size, tuple):
            raise ValueError(f"grpo_fwd_bwd needs a B x T size; got {self.size!r}")
        if self.op != "grpo_fwd_bwd" and isinstance(self.size, tuple):
            raise ValueError(f"{self.op} needs a token count N; got {self.size!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def n_tokens(self) -> int:
        return self.size[0] * self.size[1] if isinstance(self.size, tuple) else self.size

    @property
    def size_id(self) -> str:
        """'N1024' or '8x512': the size part of a test id (a plain word, so ``-k`` can select it)."""
        return f"{self.size[0]}x{self.size[1]}" if isinstance(self.size, tuple) else f"N{self.size}"

    @property
    def size_label(self) -> str:
        """The row label of the tables."""
        return f"{self.size[0]}×{self.size[1]}" if isinstance(self.size, tuple) else str(self.size)

    @property
    def backward(self) -> bool:
        return self.op != "logprobs_fwd"

    @property
    def is_quick(self) -> bool:
        sizes = QUICK_GRPO_SIZES if self.op == "grpo_fwd_bwd" else QUICK_LOGPROBS_SIZES
        return self.size in sizes

    def test_id(self, provider: str) -> str:
        """op-provider-dtype-size, e.g. ``logprobs_fwd_bwd-ours-bf16-N1024``."""
        return f"{self.op}-{provider}-{self.dtype}-{self.size_id}"

    def gemm_flops(self) -> float:
        """FLOPs of the GEMMs the op needs (one for forward-only, three with the backward)."""
        return (3 if self.backward else 1) * 2.0 * self.n_tokens * self.d * self.v

    def to_json(self) -> dict:
        return {"op": self.op, "dtype": self.dtype, "size": list(self.size) if isinstance(self.size, tuple) else self.size,
                "d": self.d, "v": self.v}

    @staticmethod
    def from_json(obj: dict) -> "Case":
        size = obj["size"]
        return Case(obj["op"], obj["dtype"], tuple(size) if isinstance(size, list) else size, obj.get("d", D), obj.get("v", V))

    def narrowed(self, tokens: int) -> "Case":
        """The same op on only ``tokens`` tokens (1 x tokens for the GRPO loss)."""
        return Case(self.op, self.dtype, (1, tokens) if isinstance(self.size, tuple) else tokens, self.d, self.v)


def default_sizes(op: str, quick: bool) -> tuple[Size, ...]:
    if op == "grpo_fwd_bwd":
        return QUICK_GRPO_SIZES if quick else GRPO_SIZES
    return QUICK_LOGPROBS_SIZES if quick else LOGPROBS_SIZES


def grid(ops: tuple[str, ...] = OPS, dtypes: tuple[str, ...] = DEFAULT_DTYPES, sizes: Optional[list[Size]] = None,
         quick: bool = False) -> list[Case]:
    """The cases of ops x dtypes x sizes, op-major then dtype then size (the order of the tables).

    ``sizes`` mixes both kinds: ints go to the log-prob ops, (B, T) pairs to the GRPO loss; an op for
    which ``sizes`` holds none of its kind keeps its default sizes (the quick ones when ``quick``).
    """
    out = []
    for op in ops:
        want_pairs = op == "grpo_fwd_bwd"
        mine = [s for s in (sizes or []) if isinstance(s, tuple) == want_pairs]
        for dtype in dtypes:
            for size in mine or default_sizes(op, quick):
                out.append(Case(op, dtype, size))
    return out


def suite_cases(ops: tuple[str, ...]) -> list[Case]:
    """The pytest suites' cases: the quick sizes always, the full grid unless BENCH_QUICK=1."""
    quick = quick_from_env()
    out = []
    for op in ops:
        sizes = list(default_sizes(op, True)) + ([] if quick else [s for s in default_sizes(op, False)
                                                                  if s not in default_sizes(op, True)])
        for dtype in DEFAULT_DTYPES:
            out.extend(Case(op, dtype, s) for s in sizes)
    return out


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """The tensors of one case. Shapes: log-prob ops [N, ...]; the GRPO loss [B, T, ...].

    hidden and weight are leaves that require grad exactly when the op has a backward, so each
    provider differentiates w.r.t. the same two tensors and returns (dhidden, dweight).
    """

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    grad_logp: Optional[Tensor] = None  # logprobs_fwd_bwd: the upstream gradient g of sum(logp * g)
    mask: Optional[Tensor] = None  # grpo_fwd_bwd from here on
    advantages: Optional[Tensor] = None
    old_logp: Optional[Tensor] = None
    ref_logp: Optional[Tensor] = None

    def narrowed(self, tokens: int) -> "Inputs":
        """The first ``tokens`` tokens (of the first sequence for the GRPO loss), sharing the weight."""
        def cut(x: Optional[Tensor]) -> Optional[Tensor]:
            if x is None:
                return None
            return x[:1, :tokens] if x.dim() >= 2 and self.mask is not None else x[:tokens]

        h = cut(self.hidden).detach().requires_grad_(self.hidden.requires_grad)
        adv = None if self.advantages is None else self.advantages[:1]
        return Inputs(h, self.weight, cut(self.targets), cut(self.grad_logp), cut(self.mask), adv,
                      cut(self.old_logp), cut(self.ref_logp))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, Tensor))


# The LM head's scale: with hidden ~ N(0, 1) after the final norm and weights ~ N(0, 0.02^2) the logits
# have std ~0.6, in the range of a real model's (and far from bf16/fp32 overflow or denormals).
WEIGHT_STD = 0.02


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Random inputs of ``case``, the same for every provider (same seed -> same tensors)."""
    g = torch.Generator().manual_seed(seed)
    dt = case.torch_dtype
    n = case.n_tokens
    lead = case.size if isinstance(case.size, tuple) else (n,)
    weight = (torch.randn(case.v, case.d, generator=g) * WEIGHT_STD).to(dt)
    hidden = torch.randn(*lead, case.d, generator=g).to(dt)
    targets = torch.randint(0, case.v, lead, generator=g)
    weight.requires_grad_(case.backward)
    hidden.requires_grad_(case.backward)
    inp = Inputs(hidden, weight, targets)
    if case.op == "logprobs_fwd_bwd":
        inp.grad_logp = torch.randn(n, generator=g)
    if case.op == "grpo_fwd_bwd":
        B, T = case.size
        # Every position is a completion token: each provider then does the full N x V work and the
        # floor's N is exact (padding would let the kernels that skip masked tokens look faster).
        inp.mask = torch.ones(B, T)
        inp.advantages = torch.randn(B, generator=g)
        # old/ref log-probs close to the current policy's, so the ratios sit near 1 and a few tokens clip,
        # as in a real step. Computing the true log-probs would cost a full forward per subprocess; with
        # i.i.d. N(0, s^2) weights, logsumexp over V rows is log V + ||h||^2 s^2 / 2 to a tiny error, so
        # logp is approximated from the target logit alone (O(N D) work).
        with torch.no_grad():
            h32 = hidden.detach().float()
            z_t = (h32 * weight.detach()[targets].float()).sum(-1)
            lse = math.log(case.v) + h32.pow(2).sum(-1) * WEIGHT_STD ** 2 / 2
            logp = z_t - lse
            inp.old_logp = logp + 0.1 * torch.randn(B, T, generator=g)
            inp.ref_logp = logp + 0.1 * torch.randn(B, T, generator=g)
    return inp


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def output_bytes(outputs: tuple[Tensor, ...]) -> int:
    """Bytes of the distinct storages behind the tensors a provider returned (what the user keeps)."""
    seen: dict[int, int] = {}
    for t in outputs:
        if isinstance(t, Tensor):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())
