"""The smallest model that meets a perplexity budget, with few streamed passes over the model.

The knob is `keep`, the fraction of the targeted layers' parameters kept; rank allocation turns a keep
into ranks, and evaluating a keep compresses and measures. Perplexity grows (nearly) monotonically as keep
shrinks, so the boundary lies between the smallest keep known to pass and the largest known to fail.

One streamed pass can evaluate several keeps (every block is read once for all of them), so the search
works in rounds: `evaluate_many(keeps)` is one pass of up to `width` keeps. Width 1 is plain bisection.
For wider rounds:
- the opening brackets the predicted boundary when a cheap predictor is given;
- while every candidate so far has failed (or every one passed), the predictor is rescaled by what was
  measured and brackets again, instead of spreading keeps over the whole untried range;
- once bracketed, a round may zoom on the boundary interpolated from the increases measured at the two
  ends (keeps a tolerance apart, so a good interpolation ends the search), and the round after a zoom
  splits the remaining (fail, pass) interval evenly, shrinking it by width + 1 whatever the curve.
The untouched model (keep = 1) never counts as a pass, and neither does a candidate that factorizes no layer.

Pure control flow: no model, no files; the caller's `evaluate_many` does the work and logs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Candidate", "SearchOutcome", "search_keep", "search_keep_batched", "first_guess", "opening_keeps"]


@dataclass
class Candidate:
    keep: float  # requested fraction of targeted parameters
    kept_fraction: float  # what the allocation actually kept
    perplexity: float
    passed: bool
    factorized_layers: int
    payload: object = None  # whatever the caller wants to keep (e.g. where the shards were written)
    round: int = 0  # the search round (the streamed pass) that evaluated it, from 1
    increase: float | None = None  # measured relative perplexity increase (rescales the predictor, and
    # places a zoom round by interpolation)


@dataclass
class SearchOutcome:
    best: Candidate | None  # the smallest passing candidate, None if none passed
    tried: list[Candidate]
    rounds: int = 0  # calls of evaluate_many (streamed passes)

    @property
    def closest(self) -> Candidate | None:
        """The lowest-perplexity candidate, reported when nothing met the budget."""
        return min(self.tried, key=lambda c: c.perplexity, default=None)


def search_keep_batched(evaluate_many: Callable[[list[float]], list[Candidate]], *, width: int = 3,
                        rounds: int = 6, first: float = 0.8, predict: Callable[[float], float] | None = None,
                        budget: float | None = None, floor: float = 0.05, tolerance: float = 0.01) -> SearchOutcome:
    """Search keep in (floor, 1) for the smallest passing candidate within `rounds` calls of evaluate_many.

    The first round evaluates `opening_keeps(first, width, predict, budget)`; later rounds are placed by
    `_next_keeps`. A candidate that factorizes no layer never passes; it bounds the interval from above (a
    larger keep factorizes no more). Stops once pass and fail are within `tolerance`.
    """
    if width < 1 or rounds < 1:
        raise ValueError(f"width and rounds must be at least 1, got {width}, {rounds}")
    tried: list[Candidate] = []
    lo, hi = floor, 1.0  # lo: fails (or the floor), hi: passes (or the untouched model)
    best: Candidate | None = None
    keeps = _inside(opening_keeps(first, width, predict=predict, budget=budget, floor=floor), floor, 1.0)
    keeps = keeps or [(floor + 1.0) / 2]
    done, zoomed = 0, False
    while done < rounds and keeps:
        done += 1
        for cand in evaluate_many(keeps):
            cand.round = done
            cand.passed = cand.passed and cand.factorized_layers > 0
            tried.append(cand)
            if cand.passed and (best is None or cand.kept_fraction < best.kept_fraction):
                best = cand
            if cand.passed or cand.factorized_layers == 0:
                hi = min(hi, cand.keep)
            else:
                lo = max(lo, cand.keep)
        if hi - lo <= tolerance:
            break
        keeps, zoomed = _next_keeps(tried, lo, hi, width, tolerance, predict, budget, zoomed)
    return SearchOutcome(best, tried, done)


def _next_keeps(tried: list[Candidate], lo: float, hi: float, width: int, tolerance: float, predict, budget,
                zoomed: bool) -> tuple[list[float], bool]:
    """The next round's keeps inside (lo, hi), and whether they zoom on an interpolated boundary.

    - Nothing bracketed yet (all passed or all failed): the predictor's opening bracket, rescaled to the
      measured increase (width > 1 with a predictor), else even spacing.
    - Bracketed, width > 1, the measured increases at both ends known, and the previous round did not zoom:
      `width` keeps `tolerance` apart around the boundary interpolated in log(increase) between the two
      ends, so a good interpolation closes the gap in this round; a zoom that misses leaves a smaller gap,
      and the round after it spreads evenly (the guarantee of the even split, at most every other round).
    - Otherwise `width` keeps evenly spaced, no more than it takes to bring the gap within tolerance.
    """
    n = min(width, max(1, math.ceil((hi - lo) / tolerance - 1e-9) - 1))
    even = _inside([lo + (hi - lo) * j / (n + 1) for j in range(1, n + 1)], lo, hi)
    if width == 1:
        return even, False
    bracketed = any(c.passed for c in tried) and any(not c.passed and c.factorized_layers for c in tried)
    if not bracketed:
        return _rescaled_opening(tried, width, predict, budget, lo, hi) or even, False
    target = _interpolated(tried, lo, hi, budget)
    if zoomed or n < width or target is None:
        return even, False
    step = 0.98 * tolerance  # a boundary within (keep - step, keep + step) of the target ends the search
    zoom = _inside([target + step * (j - (width - 1) / 2) for j in range(width)], lo, hi)
    return (zoom, True) if zoom else (even, False)


def _interpolated(tried: list[Candidate], lo: float, hi: float, budget) -> float | None:
    """The keep where log(increase) interpolated linearly between the candidates at lo (failed) and hi
    (passed) meets the budget; None where either increase is unknown or not positive."""
    ends = {c.keep: c for c in tried if c.keep in (lo, hi) and c.factorized_layers}
    if not budget or lo not in ends or hi not in ends:
        return None
    inc_lo, inc_hi = ends[lo].increase, ends[hi].increase
    if inc_lo is None or inc_hi is None or not (inc_lo > budget >= inc_hi > 0) or not math.isfinite(inc_lo):
        return None
    t = (math.log(budget) - math.log(inc_hi)) / (math.log(inc_lo) - math.log(inc_hi))
    return hi - (hi - lo) * t


def _rescaled_opening(tried: list[Candidate], width: int, predict, budget, lo: float, hi: float) -> list[float]:
    """The predictor's opening bracket after scaling it to match the measured increase of the candidate
    nearest the untried side (the smallest keep if all passed, the largest if all failed); [] if unusable."""
    measured = [c for c in tried if c.factorized_layers]
    if predict is None or not budget or not measured:
        return []
    nearest = min(measured, key=lambda c: c.keep) if measured[0].passed else max(measured, key=lambda c: c.keep)
    predicted = predict(nearest.keep)
    if nearest.increase is None or not (nearest.increase > 0 and predicted > 0) or not math.isfinite(
            nearest.increase):
        return []
    scale = nearest.increase / predicted
    return _inside(opening_keeps(0.5 * (lo + hi), width, predict=lambda k: scale * predict(k), budget=budget,
                                 floor=lo), lo, hi)


def search_keep(evaluate: Callable[[float], Candidate], *, steps: int = 6, first: float = 0.8,
                floor: float = 0.05, tolerance: float = 0.01) -> SearchOutcome:
    """Bisection: the batched search with one keep per round (one evaluation per step, from `first`)."""
    return search_keep_batched(lambda keeps: [evaluate(k) for k in keeps], width=1, rounds=steps, first=first,
                               floor=floor, tolerance=tolerance)


def opening_keeps(first: float, width: int, *, predict: Callable[[float], float] | None = None,
                  budget: float | None = None, floor: float = 0.05, step: float = 0.1) -> list[float]:
    """The first round's keeps, largest first.

    Width 1: `first`. With a predictor of the perplexity increase (`predict(keep)`, decreasing in keep)
    and the budget: the keeps whose predicted increase is budget x 2^t for t evenly spaced in [-1, 1]
    (budget x {0.5, 1, 2} at width 3), so a predictor off by up to 2x still brackets the boundary.
    Otherwise `width` keeps `step` apart centred on `first`. A predictor only moves where the search
    looks: a biased one costs rounds, never correctness.
    """
    if width == 1:
        return [first]
    if predict is not None and budget is not None and budget > 0:
        factors = [2.0 ** (-1 + 2 * j / (width - 1)) for j in range(width)]
        keeps = [_keep_for(predict, budget * f, floor) for f in factors]
    else:
        keeps = [first + step * (j - (width - 1) / 2) for j in range(width)]
    return sorted(set(keeps), reverse=True)


def _keep_for(predict: Callable[[float], float], target: float, floor: float, iters: int = 14) -> float:
    """About the smallest keep in (floor, 1) whose predicted increase is at most `target` (bisection)."""
    lo, hi = floor, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if predict(mid) <= target:
            hi = mid
        else:
            lo = mid
    return round(hi, 4)


def _inside(keeps: list[float], lo: float, hi: float) -> list[float]:
    """The distinct keeps strictly inside (lo, hi), largest first."""
    return sorted({round(k, 6) for k in keeps if lo < k < hi}, reverse=True)


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
