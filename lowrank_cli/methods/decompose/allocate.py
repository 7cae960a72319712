"""Rank allocation across layers from each layer's error-versus-rank curve.

Every targeted layer is kept dense (choice `None`) or factorized at a rank r (an `int`) that is a
multiple of `multiple` and below the break-even rank m n / (m + n): at or above it the two factors
hold at least as many parameters as the dense weight: r (m + n) >= m n.

- `uniform_ranks`: the SVD-LLM recipe, every matrix keeps the same fraction of its parameters.
- `fixed_ranks`: the same rank everywhere (a per-type LoRD-style rank is this, per group).
- `allocate_ranks`: a Lagrangian allocation minimising the estimated loss increase
  sum(sensitivity * tails[r]) under a global parameter budget. At a price mu per parameter each
  layer picks its cheapest option (error + mu * params) on its own; the total is non-increasing in
  mu, so bisecting mu finds the largest total within the budget. By Everett's theorem the result
  is exactly optimal for the parameter count it reaches, which can fall short of the budget by
  less than one option step of a layer at the critical price.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_cli.errors import UsageError

__all__ = [
    "Choice", "LayerCurve", "break_even_rank", "round_rank", "uniform_ranks", "fixed_ranks",
    "allocate_ranks", "allocation_for_price", "kept_params", "summary",
]

Choice = int | None  # a rank, or None for "keep dense"

# Bisection on log(mu) stops at this relative width: far below any gap between breakpoints that
# matters, and reached in ~50 steps even across the whole float64 range.
_PRICE_RTOL = 1e-12
_MAX_BISECTIONS = 200


def break_even_rank(m: int, n: int) -> float:
    """m n / (m + n): at this rank the factors, r (m + n) params, are as big as the dense weight."""
    return m * n / (m + n)


@dataclass
class LayerCurve:
    """One layer's error-versus-rank curve.

    Attributes:
        name: The layer's unique name (the key of the returned rank maps).
        m: Output features.
        n: Input features.
        tails: float64, length min(m, n) + 1: tails[r] is the output error energy at rank r
            (`Spectrum.tails()`), so tails[k] = 0.
        sensitivity: Converts output error energy into an estimated loss increase (the caller
            measures it).
    """

    name: str
    m: int
    n: int
    tails: Tensor
    sensitivity: float = 1.0

    def __post_init__(self) -> None:
        if self.m < 1 or self.n < 1:
            raise ValueError(f"{self.name}: shape must be positive, got {self.m} x {self.n}")
        tails = torch.as_tensor(self.tails).detach().to(device="cpu", dtype=torch.float64)
        if tails.ndim != 1 or tails.numel() != self.k + 1:
            raise ValueError(f"{self.name}: tails need length {self.k + 1}, got {tails.shape}")
        if not bool(torch.isfinite(tails).all()) or bool((tails < 0).any()):
            raise ValueError(f"{self.name}: tails must be finite and >= 0")
        if not (math.isfinite(self.sensitivity) and self.sensitivity >= 0.0):
            raise ValueError(f"{self.name}: sensitivity must be finite, >= 0: {self.sensitivity}")
        self.tails = tails.contiguous()

    @property
    def k(self) -> int:
        """Full rank min(m, n)."""
        return min(self.m, self.n)

    @property
    def dense_params(self) -> int:
        """Parameters of the dense weight, m n."""
        return self.m * self.n

    def factored_params(self, r: int) -> int:
        """Parameters of the two factors at rank r."""
        return r * (self.m + self.n)

    def params(self, choice: Choice) -> int:
        """Parameters kept by a choice (None = dense)."""
        return self.dense_params if choice is None else self.factored_params(choice)

    def error(self, choice: Choice) -> float:
        """Estimated loss increase of a choice: sensitivity * tails[r], 0 when dense."""
        return 0.0 if choice is None else self.sensitivity * float(self.tails[choice])

    def saves(self, r: int) -> bool:
        """Whether rank r is below break-even (an exact integer test, no float rounding)."""
        return self.factored_params(r) < self.dense_params


def _check(curves: Sequence[LayerCurve], multiple: int, keep: float | None = None) -> None:
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise UsageError(f"rank multiple must be an integer >= 1, got {multiple!r}")
    if keep is not None and not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise UsageError(f"the kept fraction must be in (0, 1], got {keep!r}")
    if len({c.name for c in curves}) != len(curves):
        raise ValueError("layer names must be unique")


def round_rank(r: float, multiple: int = 8, full_rank: int | None = None) -> int:
    """Round a rank down to a multiple of `multiple`, at least `multiple`, at most `full_rank`.

    Down, so that a rank derived from a parameter target never overshoots it.

    Raises:
        UsageError: If multiple < 1, or r is negative or not finite.
    """
    _check((), multiple)
    if not (math.isfinite(r) and r >= 0):
        raise UsageError(f"rank must be a finite number >= 0, got {r!r}")
    # The epsilon absorbs float error in keep * m n / (m + n) (15.999999 must round like 16).
    q = max(math.floor(r / multiple + 1e-9) * multiple, multiple)
    return q if full_rank is None else min(q, full_rank)


def uniform_ranks(
    curves: Sequence[LayerCurve], keep: float, multiple: int = 8
) -> dict[str, Choice]:
    """SVD-LLM's recipe: r = keep m n / (m + n) rounded down to the multiple; dense if no saving.

    Raises:
        UsageError: If keep is outside (0, 1] or multiple < 1.
    """
    _check(curves, multiple, keep)
    ranks = {c.name: round_rank(keep * break_even_rank(c.m, c.n), multiple, c.k) for c in curves}
    return {c.name: ranks[c.name] if keep < 1 and c.saves(ranks[c.name]) else None for c in curves}


def fixed_ranks(curves: Sequence[LayerCurve], rank: int, multiple: int = 8) -> dict[str, Choice]:
    """The same rank (rounded down to the multiple) in every layer; dense where it saves nothing.

    Raises:
        UsageError: If rank < 1 or multiple < 1.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UsageError(f"rank must be an integer >= 1, got {rank!r}")
    _check(curves, multiple)
    ranks = {c.name: round_rank(rank, multiple, c.k) for c in curves}
    return {c.name: ranks[c.name] if c.saves(ranks[c.name]) else None for c in curves}


@dataclass
class _Options:
    """Every layer's rank options as padded (layers x C) tables, plus the dense option.

    A choice is a column index: j < C is rank multiple * (j + 1), C is dense. A layer's cheapest
    rank only moves down as the price mu grows (the first argmin of err + mu * params, params
    ascending), so a bisection need only search each layer between its bracket ends' ranks.
    """

    ranks: Tensor  # (C,) int64, the shared rank grid multiple * (1..C)
    err: Tensor  # (L, C) float64 sensitivity * tails[rank]; +inf where the rank saves nothing
    params: Tensor  # (L, C) float64 factor params (integers: exact below 2**53)
    dense: Tensor  # (L,) float64 m * n
    count: Tensor  # (L,) int64 number of ranks below break-even

    @classmethod
    def build(cls, curves: Sequence[LayerCurve], multiple: int) -> _Options:
        # Ranks multiple * j below break-even: j (m + n) multiple < m n.
        counts = [(c.dense_params - 1) // (multiple * (c.m + c.n)) for c in curves]
        # At least one (all +inf) column keeps the gathers valid when no layer can be factorized.
        cols = max(max(counts, default=0), 1)
        ranks = multiple * torch.arange(1, cols + 1, dtype=torch.int64)
        err = torch.full((len(curves), cols), math.inf, dtype=torch.float64)
        for i, (c, j) in enumerate(zip(curves, counts, strict=True)):
            err[i, :j] = c.sensitivity * c.tails[multiple : multiple * j + 1 : multiple]
        sides = torch.tensor([c.m + c.n for c in curves], dtype=torch.float64)
        dense = torch.tensor([c.dense_params for c in curves], dtype=torch.float64)
        params = sides[:, None] * ranks.to(torch.float64)[None, :]
        return cls(ranks, err, params, dense, torch.tensor(counts, dtype=torch.int64))

    def choose(self, mu: float, first: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
        """Each layer's cheapest option at price mu, searching rank columns first..last only.

        Returns:
            (choice, best): `best` is the cheapest rank column ignoring dense (it narrows the next
            window). Ties go to fewer parameters: the first minimum; dense only if strictly cheaper.
        """
        width = int((last - first).max()) + 1
        cols = (first[:, None] + torch.arange(width)).minimum(last[:, None])
        cost = torch.add(self.err.gather(1, cols), self.params.gather(1, cols), alpha=mu)
        best_cost, offset = cost.min(dim=1)
        best = first + offset
        return torch.where(mu * self.dense < best_cost, self.ranks.numel(), best), best

    def kept(self, choice: Tensor) -> Tensor:
        """(L,) float64 parameters each layer keeps under a choice."""
        dense_col = self.ranks.numel()
        factored = self.params.gather(1, choice.clamp_max(dense_col - 1)[:, None])[:, 0]
        return torch.where(choice == dense_col, self.dense, factored)

    def total(self, choice: Tensor) -> int:
        return int(self.kept(choice).sum())

    def full_window(self) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(self.count), (self.count - 1).clamp_min(0)

    def decode(self, curves: Sequence[LayerCurve], choice: Tensor) -> dict[str, Choice]:
        grid, dense = self.ranks.tolist(), self.ranks.numel()
        picks = zip(curves, choice.tolist(), strict=True)
        return {c.name: None if j == dense else grid[j] for c, j in picks}


def allocation_for_price(
    curves: Sequence[LayerCurve], mu: float, multiple: int = 8
) -> dict[str, Choice]:
    """Each layer's option minimising sensitivity * tails[r] + mu * params (dense: 0 + mu m n).

    Raises:
        UsageError: If mu is negative or not finite, or multiple < 1.
    """
    if not (math.isfinite(mu) and mu >= 0.0):
        raise UsageError(f"price must be a finite number >= 0, got {mu!r}")
    _check(curves, multiple)
    if not curves:
        return {}
    opts = _Options.build(curves, multiple)
    return opts.decode(curves, opts.choose(mu, *opts.full_window())[0])


def allocate_ranks(
    curves: Sequence[LayerCurve], keep: float, multiple: int = 8
) -> dict[str, Choice]:
    """Lagrangian allocation: least sum of sensitivity * tails[r] with kept <= keep * sum(m n).

    Args:
        curves: The targeted layers (unique names).
        keep: Fraction of the targeted dense parameters to keep; 1 keeps every layer dense.
        multiple: Ranks are multiples of this.

    Returns:
        Layer name -> rank, or None for dense.

    Raises:
        UsageError: If keep is outside (0, 1], multiple < 1, or the budget is below the smallest
            reachable size (every layer at rank `multiple`).
    """
    _check(curves, multiple, keep)
    if keep >= 1.0 or not curves:
        return {c.name: None for c in curves}
    opts = _Options.build(curves, multiple)
    targeted = sum(c.dense_params for c in curves)
    budget = math.floor(keep * targeted)
    # What every layer takes at a high enough price: rank `multiple`, or dense where none saves.
    hi_choice = torch.where(opts.count > 0, 0, opts.ranks.numel())
    if opts.total(hi_choice) > budget:
        raise UsageError(
            f"keep={keep} is below the smallest reachable size: rank {multiple} everywhere keeps "
            f"{opts.total(hi_choice) / targeted:.4f} of the targeted parameters"
        )
    positive = opts.err[torch.isfinite(opts.err) & (opts.err > 0)]
    if positive.numel() == 0:
        return opts.decode(curves, hi_choice)  # nothing loses anything: the fewest params win
    # A bracket valid for any curve shape: above mu_hi no error difference (<= max err) pays for a
    # single parameter, so every layer takes its smallest option; below mu_lo no lossy rank beats
    # dense (it saves < m n params), so the allocation is the largest any price gives.
    mu_lo = max(0.5 * float(positive.min()) / float(opts.dense.max()), math.ulp(0.0))
    mu_hi = 2.0 * float(positive.max())
    first, last = opts.full_window()
    lo_choice, last = opts.choose(mu_lo, first, last)
    if opts.total(lo_choice) <= budget:
        return opts.decode(curves, lo_choice)
    for _ in range(_MAX_BISECTIONS):
        if mu_hi <= mu_lo * (1.0 + _PRICE_RTOL):
            break
        mid = math.sqrt(mu_lo) * math.sqrt(mu_hi)  # no under/overflow of the product
        choice, best = opts.choose(mid, first, last)
        if opts.total(choice) <= budget:
            mu_hi, hi_choice, first = mid, choice, best
        else:
            mu_lo, lo_choice, last = mid, choice, best
    return opts.decode(curves, _fill_ties(opts, lo_choice, hi_choice, budget))


def _fill_ties(opts: _Options, lo_choice: Tensor, hi_choice: Tensor, budget: int) -> Tensor:
    """Spend the slack left at the critical price on layers that are tied there.

    Layers whose choice differs across the final (1e-12 wide) bracket sit at a breakpoint: at the
    critical price both options cost the same, so any of them may take the bigger one and the
    allocation stays a Lagrangian minimiser (hence optimal for its new total). Every switch saves
    error at that same price per parameter: packing the most parameters saves the most error.
    """
    choice = hi_choice.clone()
    slack = budget - opts.total(hi_choice)
    rows = torch.nonzero(lo_choice != hi_choice).flatten()
    extra = (opts.kept(lo_choice) - opts.kept(hi_choice))[rows].round().to(torch.int64)
    for k in torch.argsort(extra, descending=True).tolist():
        if int(extra[k]) <= slack:
            choice[rows[k]] = lo_choice[rows[k]]
            slack -= int(extra[k])
    return choice


def kept_params(curves: Sequence[LayerCurve], ranks: dict[str, Choice]) -> int:
    """Parameters kept over the targeted layers by a rank map."""
    return sum(c.params(ranks[c.name]) for c in curves)


def summary(curves: Sequence[LayerCurve], ranks: dict[str, Choice]) -> dict[str, float | int]:
    """Matrix-level totals of a rank map (a model-level ratio also needs the untargeted params).

    Returns:
        targeted_params (dense params of the targeted layers), kept_params, ratio (kept /
        targeted), dense_layers, factored_layers, estimated_error (sum of sensitivity * tails[r]).
    """
    targeted = sum(c.dense_params for c in curves)
    kept = kept_params(curves, ranks)
    dense = sum(1 for c in curves if ranks[c.name] is None)
    return {
        "targeted_params": targeted,
        "kept_params": kept,
        "ratio": kept / targeted if targeted else 1.0,
        "dense_layers": dense,
        "factored_layers": len(curves) - dense,
        "estimated_error": sum(c.error(ranks[c.name]) for c in curves),
    }
