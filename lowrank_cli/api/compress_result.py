"""The result of `lowrank compress` (the flow: `lowrank_cli.api.compress`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lowrank_cli.result import Result

__all__ = ["CompressResult", "FRONTIER_JSON", "FRONTIER_PNG"]

FRONTIER_JSON, FRONTIER_PNG = "frontier.json", "frontier.png"


@dataclass
class CompressResult(Result):
    model: str
    output: str | None
    dry_run: bool
    budget: dict  # kind and value, and the resolved limit (perplexity or bytes)
    chosen: dict | None  # the winning candidate's record
    candidates: list  # every candidate: family, settings, bytes, bits per weight, eval/test perplexity, seconds
    baseline: dict  # eval and test perplexity of the input, its weight bytes
    timings_s: dict = field(default_factory=dict)
    precision: dict = field(default_factory=dict)  # dtype of each pass: compute, sensitivity, profile Gram products

    def summary(self):
        rows = [("model", self.model), ("budget", _budget_text(self.budget))]
        if self.dry_run:
            rows.append(("dry run", "nothing written"))
            rows += [(f"  {c['label']}", f"{c['bytes'] / 2**20:.1f} MiB, {c['bits_per_weight']:.2f} bits/weight")
                     for c in self.candidates]
            rows.append(("est. cost", f"{self.baseline['cost']['token_forwards']:,} token-forwards "
                                      f"({self.baseline['cost']['vs_one_pass']:.1f} x one profile pass)"))
            return rows
        c = self.chosen
        rows += [("output", self.output), ("chosen", c["label"]),
                 ("size", f"{self.baseline['bytes'] / 2**20:.1f} MiB -> {c['bytes'] / 2**20:.1f} MiB "
                          f"({c['bytes'] / self.baseline['bytes']:.3f})"),
                 ("perplexity (eval)", f"{self.baseline['eval']:.4f} -> {c['eval_perplexity']:.4f}"),
                 ("perplexity (test)", f"{self.baseline['test']:.4f} -> {c['test_perplexity']:.4f}"),
                 ("candidates", f"{len(self.candidates)} ({sum(x['passed'] for x in self.candidates)} passed, "
                                f"{sum(bool(x.get('pruned')) for x in self.candidates)} pruned)"),
                 ("time", f"{sum(self.timings_s.values()):.1f} s")]
        return rows


def _budget_text(budget: dict) -> str:
    if budget["kind"] == "target_size":
        return f"size <= {budget['limit_bytes'] / 2**20:.1f} MiB"
    return f"eval perplexity <= +{budget['value'] * 100:.3g}%"


