"""frontier.json and frontier.png: every candidate `compress` built, its size and its perplexity."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_frontier"]


def write_frontier(json_path: Path, png_path: Path, doc: dict) -> None:
    """The JSON always; the picture when matplotlib is installed (write_frontier_png warns otherwise)."""
    from lowrank_cli.utils.frontier_plot import write_frontier_png

    Path(json_path).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    # pruned candidates (compress --prune) have a prediction, no measured perplexity: the JSON lists them
    points = [{**r, "family": r["family"] + (" + heal" if r.get("healed") else ""), "test_ppl": r["test_perplexity"]}
              for r in doc["candidates"] if not r.get("pruned")]
    budget = doc["budget"]
    budget_ppl = None
    if budget["kind"] == "target_ppl_increase":
        budget_ppl = doc["baseline"]["eval"] * (1 + budget["value"])
    write_frontier_png(png_path, points, chosen=doc["chosen"], base_ppl=doc["baseline"]["test"],
                       budget_ppl=budget_ppl, title=f"{doc['model']}: size vs test perplexity")
