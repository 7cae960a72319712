"""frontier.json and frontier.png: every candidate `compress` built, its size and its perplexity."""

from __future__ import annotations

import json
import logging
from pathlib import Path

__all__ = ["write_frontier", "plot_frontier"]

log = logging.getLogger("lowrank")


def write_frontier(json_path: Path, png_path: Path, doc: dict) -> None:
    Path(json_path).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    try:
        plot_frontier(doc, png_path)
    except ImportError:
        log.warning("matplotlib is not installed: %s not drawn (pip install 'lowrank-cli[plot]')", png_path.name)


def plot_frontier(doc: dict, path: Path) -> None:
    """Test perplexity against weight bytes (log scale), one line per family, the baseline as a line,
    the Pareto set circled, the chosen candidate starred."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lowrank_cli.methods.compress.plan import pareto

    rows = doc["candidates"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for family in dict.fromkeys(r["family"] + (" + heal" if r.get("healed") else "") for r in rows):
        pts = sorted((r for r in rows if r["family"] + (" + heal" if r.get("healed") else "") == family),
                     key=lambda r: r["bytes"])
        ax.plot([r["bytes"] / 2**20 for r in pts], [r["test_perplexity"] for r in pts], "o-", label=family, ms=4)
    front = pareto(rows)
    ax.scatter([r["bytes"] / 2**20 for r in front], [r["test_perplexity"] for r in front], s=110,
               facecolors="none", edgecolors="black", label="Pareto set (test)")
    chosen = next((r for r in rows if r["label"] == doc.get("chosen")), None)
    if chosen is not None:
        ax.scatter([chosen["bytes"] / 2**20], [chosen["test_perplexity"]], marker="*", s=260, c="gold",
                   edgecolors="black", zorder=5, label=f"chosen: {chosen['label']}")
    base = doc["baseline"]
    ax.axhline(base["test"], color="grey", ls="--", lw=1, label=f"input ({base['bytes'] / 2**20:.0f} MiB)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("weight files, MiB (log)")
    ax.set_ylabel("test perplexity")
    ax.set_title(f"{doc.get('model', '')}: size vs quality")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
