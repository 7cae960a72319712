"""The smallest model that meets a perplexity budget, with few full evaluations.

The knob is `keep`, the fraction of the targeted layers' parameters kept; rank allocation turns a keep
into ranks, and `evaluate(keep)` compresses and measures. Perplexity grows (nearly) monotonically as keep
shrinks, so bisection finds the boundary: each step halves the interval between the smallest keep known
to pass and the largest known to fail. The untouched model (keep = 1) never counts as a pass.

Pure control flow: no model, no files; `evaluate` does the work and is logged by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Candidate", "SearchOutcome", "search_keep", "first_guess"]


@dataclass
class Candidate:
    keep: float  # requested fraction of targeted parameters
    kept_fraction: float  # what the allocation actually kept
    perplexity: float
    passed: bool
    factorized_layers: int
    payload: object = None  # whatever the caller wants to keep (e.g. where the shards were written)


@dataclass
class SearchOutcome:
    best: Candidate | None  # the smallest passing candidate, None if none passed
    tried: list[Candidate]

    @property
    def closest(self) -> Candidate | None:
        """The lowest-perplexity candidate, reported when nothing met the budget."""
        return min(self.tried, key=lambda c: c.perplexity, default=None)


def search_keep(evaluate: Callable[[float], Candidate], *, steps: int = 6, first: float = 0.8,
                floor: float = 0.05, tolerance: float = 0.01) -> SearchOutcome:
    """Bisect keep in (floor, 1) for the smallest passing candidate within `steps` evaluations.

    `first` is the opening guess (0.8 keeps 80% of the targeted parameters). A candidate that factorizes no
    layer is never a pass. Evaluations stop early once pass and fail are within `tolerance`.
    """
    tried: list[Candidate] = []
    lo, hi = floor, 1.0  # lo: fails (or the floor), hi: passes (or the untouched model)
    keep = first
    best: Candidate | None = None
    for _ in range(steps):
        cand = evaluate(keep)
        cand.passed = cand.passed and cand.factorized_layers > 0
        tried.append(cand)
        if cand.passed:
            if best is None or cand.kept_fraction < best.kept_fraction:
                best = cand
            hi = min(hi, keep)
        else:
            lo = max(lo, keep)
        if hi - lo <= tolerance:
            break
        keep = (lo + hi) / 2
    return SearchOutcome(best, tried)


def first_guess(predict: Callable[[float], float], budget: float, *, lo: float = 0.3, hi: float = 0.95,
                points: int = 14) -> float:
    """The smallest keep on a grid whose *predicted* perplexity increase is within the budget.

    `predict(keep)` is a cheap estimate (e.g. the Fisher-weighted error of the allocation); it only
    chooses where the bisection starts, so a biased predictor costs evaluations, never correctness.
    """
    grid = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    for keep in grid:
        if predict(keep) <= budget:
            return keep
    return hi
