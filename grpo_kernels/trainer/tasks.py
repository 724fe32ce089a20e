"""The main job's verifiable task: two-operand integer arithmetic, checked by exact match.

A prompt is ``"07+45="``: operands zero-padded to a fixed width, so every prompt has the same
length and no padding is needed. The answer is the result with a fixed number of digits,
``"52"`` (``"05"`` for 5): a completion is exactly that many tokens, and every answer digit has
its own place. The answer depends on the prompt through both operands, so a policy that
ignores the prompt cannot beat chance, and the untrained model scores about 0.

The default range, operands 0..49 (2,500 prompts, 250 of them held out and never trained on),
is what pure GRPO can teach a randomly initialized model on two CPU cores in minutes, and big
enough that the held-out prompts can only be answered by the rule, carry included, not by
recall. Sums stay below 100 on purpose: the answers of 99 + 99 would start with a hundreds
digit that is only ever 0 or 1, and a policy that has learnt "0 or 1 comes first" early tends
to write 0s and 1s in every place and stall there.

Reward functions follow the trainer's convention ``fn(prompts, completions, **columns) ->
list[float | None]`` where the columns are the task rows' fields (here ``answer``).
:func:`exact_match` is the verifier; :func:`digit_match` is a shaping reward that gives partial
credit for every digit in place, so early in training, when no completion is fully right, the
group still has a reward spread to learn from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

Row = dict[str, Any]


@dataclass(frozen=True)
class ArithmeticTask:
    """All prompts ``a op b`` with ``0 <= a, b <= max_operand``, split once into train and held-out.

    Attributes:
        max_operand: largest operand; operands are written with ``len(str(max_operand))`` digits.
        ops: the operators to draw from, a subset of ``"+-*"``.
        num_eval: size of the held-out set; its prompts never appear in training.
        split_seed: seeds the split only, so the held-out set does not change with the training seed.
        pad_answer: write every answer with the same number of characters, zero-padded (``"052"``).
    """

    max_operand: int = 49
    ops: str = "+"
    num_eval: int = 250
    split_seed: int = 1234
    pad_answer: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_operand, int) or self.max_operand < 1:
            raise ValueError(f"ArithmeticTask: max_operand must be an int >= 1; got {self.max_operand!r}")
        if not self.ops or any(op not in OPS for op in self.ops) or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ArithmeticTask: ops must be distinct characters of '+-*'; got {self.ops!r}")
        total = len(self.ops) * (self.max_operand + 1) ** 2
        if not isinstance(self.num_eval, int) or not 0 < self.num_eval < total:
            raise ValueError(f"ArithmeticTask: num_eval must be an int in [1, {total}) (the number of prompts); got {self.num_eval!r}")

    def prompt(self, a: int, op: str, b: int) -> str:
        width = len(str(self.max_operand))
        return f"{a:0{width}d}{op}{b:0{width}d}="

    @property
    def answer_width(self) -> int:
        """Characters of the longest answer (a minus sign counts)."""
        m = self.max_operand
        return max(len(str(OPS[op](a, b))) for op in self.ops for a in (0, m) for b in (0, m))

    def answer(self, a: int, op: str, b: int) -> str:
        value = OPS[op](a, b)
        return f"{value:0{self.answer_width}d}" if self.pad_answer else str(value)

    def rows(self) -> list[Row]:
        """Every prompt of the task with its answer, in a fixed order."""
        n = self.max_operand + 1
        return [
            {"prompt": self.prompt(a, op, b), "answer": self.answer(a, op, b)}
            for op in self.ops
            for a in range(n)
            for b in range(n)
        ]

    def split(self) -> tuple[list[Row], list[Row]]:
        """(train rows, held-out rows): disjoint sets of prompts, the same for every training seed."""
        rows = self.rows()
        order = list(range(len(rows)))
        random.Random(self.split_seed).shuffle(order)
        held_out = set(order[: self.num_eval])
        train = [r for i, r in enumerate(rows) if i not in held_out]
        return train, [rows[i] for i in sorted(held_out)]


def exact_match(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[Optional[float]]:
    """The verifier: 1.0 when the completion (surrounding whitespace ignored) is exactly the answer, else 0.0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def digit_match(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[Optional[float]]:
    """Shaping reward in [0, 1]: characters equal to the answer's at the same position, over the longer length.

    Positions count from the left, the order the model writes in, and dividing by the longer
    length makes a too-long or too-short completion cost credit.
    """
    out: list[Optional[float]] = []
    for c, a in zip(completions, answer):
        c = c.strip()
        same = sum(x == y for x, y in zip(c, a))
        out.append(same / max(len(c), len(a), 1))
    return out

