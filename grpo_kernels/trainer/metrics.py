"""Metrics out of the trainer: one JSON line per step, and a PNG of reward and KL over steps."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional


class JsonlLog:
    """Append-only metrics file; on resume, lines past the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: Path, resume_step: Optional[int] = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in read_jsonl(path) if line.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics file (a torn last line from a kill is skipped)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_metrics(jsonl: Path, png: Path, smooth: int = 20) -> Path:
    """Reward (raw and moving average, plus held-out accuracy when logged) and KL against step, as a PNG."""
    import matplotlib  # imported here: it is slow to import and only the end of a run needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(jsonl)
    fig, (ax_r, ax_kl) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    steps, reward = _series(records, "reward")
    ax_r.plot(steps, reward, color="tab:blue", alpha=0.25, lw=1)
    ax_r.plot(steps, _moving_average(reward, smooth), color="tab:blue", lw=2,
              label=f"train reward, weighted total ({smooth}-step avg)")
    names = sorted({k for r in records for k in r if k.startswith("rewards/")})
    if len(names) > 1:
        for name in names:
            s, v = _series(records, name)
            ax_r.plot(s, _moving_average(v, smooth), lw=1, ls="--", label=f"train {name}")
    e_steps, acc = _series(records, "eval/accuracy")
    if acc:
        ax_r.plot(e_steps, acc, "o-", color="tab:green", lw=2, ms=4, label="held-out greedy accuracy")
    ax_r.set_ylabel("reward / accuracy")
    ax_r.grid(alpha=0.3)
    ax_r.legend(loc="best", fontsize=8)
    k_steps, kl = _series(records, "kl")
    if kl:
        ax_kl.plot(k_steps, kl, color="tab:red", lw=1)
    else:
        ax_kl.text(0.5, 0.5, "KL not computed (beta = 0)", ha="center", va="center", transform=ax_kl.transAxes)
    ax_kl.set_ylabel("KL(policy || reference)")
    ax_kl.set_xlabel("step")
    ax_kl.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
