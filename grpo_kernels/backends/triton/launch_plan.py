"""One kernel launch as data: what the launchers run and what the ahead-of-time compile test compiles.

Every launcher of this backend first builds its output buffers and a list of steps, then runs the
steps. A :class:`Launch` step holds the kernel, its grid, its positional arguments and its keyword
arguments (constexprs, ``num_warps``, ``num_stages``) exactly as ``kernel[grid](*args, **kwargs)``
receives them. ``tests/test_triton_compile.py`` builds the same plans (on ``meta`` tensors, with
the configurations ``default_config`` picks on a GPU) and compiles every ``Launch`` for sm_80 and
sm_90 with Triton's own argument specialization, so a kernel argument added to a launcher is in
the test the moment it is in the launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union


@dataclass(frozen=True)
class Launch:
    """``kernel[grid](*args, **kwargs)``; ``kwargs`` holds the constexprs and the launch options."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)  # JITFunction / InterpretedFunction wrap the Python function
        return getattr(fn, "__name__", repr(fn))


# A plan step: a kernel launch, or a plain torch call (a copy) that needs no kernel of ours.
Step = Union[Launch, Callable[[], Any]]


def run(steps: list[Step]) -> None:
    """Run a plan's steps in order (each one reads what the steps before it wrote)."""
    for step in steps:
        step()
