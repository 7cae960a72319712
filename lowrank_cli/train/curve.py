"""The loss curve of a run: JSONL rows (one per logged step) and a PNG drawing of them.

Row keys: step, loss, lr, grad_norm, tokens, epoch, and eval_loss on the steps where it was measured
(plus whatever callbacks added). The PNG needs matplotlib (Agg backend, no display); without it the
drawing is skipped with a logged warning and the JSONL still carries every figure.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

__all__ = ["write_curve_jsonl", "read_curve_jsonl", "plot_curve"]

log = logging.getLogger("lowrank")


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_curve_jsonl(rows: list[dict], path: Path) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({k: _finite(v) for k, v in row.items()}, default=str) + "\n")
    return path


def read_curve_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curve(rows: list[dict], path: Path, *, title: str = "", initial_eval: float | None = None) -> bool:
    """Training loss (and eval loss, with the value before training at step 0) against the step.
    Returns False (after a warning) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: loss_curve.png not drawn (pip install matplotlib)")
        return False
    steps = [r["step"] for r in rows if r.get("loss") is not None]
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if initial_eval is not None:
        evals.insert(0, (0, initial_eval))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        ax.plot(steps, losses, label="train loss", linewidth=1.2)
        if evals:
            ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss", linewidth=1.2,
                    markersize=4)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats per token)")
        if title:
            ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return True
