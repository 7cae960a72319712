"""frontier.png: test perplexity against checkpoint bytes, one line per family, the Pareto set and the choice.

Input: one dict per candidate, {"family", "label", "bytes", "test_ppl", "passed"} (more keys are ignored;
`"chosen": True` on one of them marks the choice, or pass `chosen=label`). Matplotlib is imported only when a
picture is drawn (the `plot` extra), through its object API (Figure + Agg canvas): no pyplot, no global
backend switch in the caller's process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from lowrank_cli.errors import UsageError

__all__ = ["pareto_indices", "frontier_figure", "write_frontier_png"]


def pareto_indices(candidates: Sequence[dict]) -> list[int]:
    """Indices of the candidates no other candidate beats on both bytes and test perplexity (smaller is
    better on both; a tie on both keeps both), sorted by bytes."""
    keep = []
    for i, a in enumerate(candidates):
        dominated = any(
            b["bytes"] <= a["bytes"] and b["test_ppl"] <= a["test_ppl"]
            and (b["bytes"] < a["bytes"] or b["test_ppl"] < a["test_ppl"])
            for j, b in enumerate(candidates) if j != i
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (candidates[i]["bytes"], candidates[i]["test_ppl"]))


def _chosen_index(candidates: Sequence[dict], chosen: str | None) -> int | None:
    for i, c in enumerate(candidates):
        if (chosen is not None and c.get("label") == chosen) or (chosen is None and c.get("chosen")):
            return i
    if chosen is not None:
        raise ValueError(f"no candidate is labelled {chosen!r}")
    return None


def _megabytes(value: float, _pos=None) -> str:
    return f"{value / 1e6:.3g} MB"


def frontier_figure(candidates: Sequence[dict], *, chosen: str | None = None, title: str | None = None,
                    base_ppl: float | None = None, budget_ppl: float | None = None):
    """The frontier as a matplotlib Figure (not saved): lines per family, filled markers for candidates that
    met the budget, hollow ones for those that did not, the Pareto set as a dashed black step, the choice
    as a star; optional horizontal lines for the base model's and the budget's perplexity."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError as exc:
        raise UsageError("drawing frontier.png needs matplotlib: pip install 'lowrank-cli[plot]'") from exc
    if not candidates:
        raise ValueError("no candidates to plot")
    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    families = list(dict.fromkeys(c["family"] for c in candidates))
    for k, family in enumerate(families):
        rows = sorted((c for c in candidates if c["family"] == family), key=lambda c: c["bytes"])
        color = f"C{k % 10}"
        ax.plot([c["bytes"] for c in rows], [c["test_ppl"] for c in rows], "-", color=color, lw=1.2, label=family)
        for c in rows:
            ax.plot(c["bytes"], c["test_ppl"], "o", color=color, ms=6,
                    markerfacecolor=color if c.get("passed") else "white")
    front = [candidates[i] for i in pareto_indices(candidates)]
    ax.step([c["bytes"] for c in front], [c["test_ppl"] for c in front], "--", where="post", color="black",
            lw=0.9, label="Pareto set")
    pick = _chosen_index(candidates, chosen)
    if pick is not None:
        c = candidates[pick]
        ax.plot(c["bytes"], c["test_ppl"], "*", color="gold", mec="black", ms=16, label=f"chosen: {c['label']}")
    if base_ppl is not None:
        ax.axhline(base_ppl, color="grey", lw=0.8, ls=":", label=f"base {base_ppl:.3g}")
    if budget_ppl is not None:
        ax.axhline(budget_ppl, color="red", lw=0.8, ls=":", label=f"budget {budget_ppl:.3g}")
    # the legend's key to the markers
    ax.plot([], [], "o", color="black", label="met the budget")
    ax.plot([], [], "o", color="black", markerfacecolor="white", label="missed it")
    ax.set_xscale("log")
    # sizes usually span less than a decade: label 1-2-5 steps, not just the powers of ten
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(_megabytes))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("checkpoint size (bytes of weight files, log scale)")
    ax.set_ylabel("test perplexity")
    ax.set_title(title or "smallest checkpoint within the budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def write_frontier_png(path: str | Path, candidates: Sequence[dict], **kwargs) -> Path | None:
    """Draw `frontier_figure(candidates, **kwargs)` into a PNG file at `path`; returns the path, or None
    (after a warning, as for loss_curve.png) when matplotlib is not installed."""
    try:
        fig = frontier_figure(candidates, **kwargs)
    except UsageError:
        logging.getLogger("lowrank").warning("matplotlib is not installed: frontier.png not drawn "
                                             "(pip install 'lowrank-cli[plot]')")
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    out = Path(path)
    fig.savefig(out, format="png")
    return out
