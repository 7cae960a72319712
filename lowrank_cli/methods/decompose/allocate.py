"""Rank allocation across layers from each layer's error-versus-rank curve.

Every targeted layer is either kept dense (choice `None`) or factorized at a rank r (an `int`) that is a
multiple of `multiple` and below the break-even rank m n / (m + n), since at or above it the two factors
hold at least as many parameters as the dense weight (design/decomposition.md §3). Three strategies:

- `uniform_ranks`: the SVD-LLM recipe, every matrix keeps the same fraction of its parameters (§4.0);
- `fixed_ranks`: the same rank everywhere (a per-type LoRD-style rank is this, per group);
- `allocate_ranks`: a Lagrangian allocation that minimises the estimated loss increase
  sum(sensitivity * tails[r]) under a global parameter budget. For a price mu on parameters each layer
  independently picks its cheapest option (error + mu * params); the total is non-increasing in mu, so
  bisecting mu finds the largest total within the budget. By Everett's theorem the result is exactly
  optimal for the parameter count it reaches (which may fall short of the budget by the size of one
  option step at the critical price).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_cli.errors import UsageError

__all__ = [
    "Choice",
    "LayerCurve",
    "break_even_rank",
    "round_rank",
    "uniform_ranks",
    "fixed_ranks",
    "allocate_ranks",
    "allocation_for_price",
    "kept_params",
    "summary",
]

Choice = int | None  # a rank, or None for "keep dense"

# Bisection on log(mu) stops at this relative width: far below any gap between distinct breakpoints
# that matters, and reached in ~50 steps even across the full float64 range.
_PRICE_RTOL = 1e-12
_MAX_BISECTIONS = 200


def break_even_rank(m: int, n: int) -> float:
    """m n / (m + n): at this rank the factors r (m + n) hold as many parameters as the dense weight."""
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
        sensitivity: Converts output error energy into an estimated loss increase; measured by the caller.
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
            raise ValueError(f"{self.name}: tails must have length {self.k + 1}, got {tuple(tails.shape)}")
        if not bool(torch.isfinite(tails).all()) or bool((tails < 0).any()):
            raise ValueError(f"{self.name}: tails must be finite and >= 0")
        if not (math.isfinite(self.sensitivity) and self.sensitivity >= 0.0):
            raise ValueError(f"{self.name}: sensitivity must be finite and >= 0, got {self.sensitivity}")
        self.tails = tails.contiguous()

    @property
    def k(self) -> int:
        """Full rank min(m, n)."""
        return min(self.m, self.n)

    @property
    def dense_params(self) -> int:
        """Parameters of the dense weight."""
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
        """Whether rank r is below break-even (exact integer test, no float rounding)."""
        return self.factored_params(r) < self.dense_params


def _check_keep(keep: float) -> None:
    if not (isinstance(keep, (int, float)) and math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise UsageError(f"the kept fraction must be in (0, 1], got {keep!r}")


def _check_multiple(multiple: int) -> None:
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise UsageError(f"rank multiple must be an integer >= 1, got {multiple!r}")


def _check_names(curves: Sequence[LayerCurve]) -> None:
    names = [c.name for c in curves]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")


def round_rank(r: float, multiple: int = 8, full_rank: int | None = None) -> int:
    """Round a rank down to a multiple of `multiple`, at least `multiple`, at most `full_rank`.

    Down, so that a rank derived from a parameter target never overshoots it.
    """
    _check_multiple(multiple)
    if not (math.isfinite(r) and r >= 0):
        raise UsageError(f"rank must be a finite number >= 0, got {r!r}")
    # The epsilon absorbs float error in keep * m n / (m + n) (15.999999 must round like 16).
    q = max(math.floor(r / multiple + 1e-9) * multiple, multiple)
    return q if full_rank is None else min(q, full_rank)


def uniform_ranks(curves: Sequence[LayerCurve], keep: float, multiple: int = 8) -> dict[str, Choice]:
    """SVD-LLM's recipe: r = keep * m n / (m + n) rounded down to the multiple; dense at/above break-even."""
    _check_keep(keep)
    _check_multiple(multiple)
    _check_names(curves)
    out: dict[str, Choice] = {}
    for c in curves:
        r = round_rank(keep * break_even_rank(c.m, c.n), multiple, c.k)
        out[c.name] = r if keep < 1.0 and c.saves(r) else None
    return out


def fixed_ranks(curves: Sequence[LayerCurve], rank: int, multiple: int = 8) -> dict[str, Choice]:
    """The same rank (rounded down to the multiple) in every layer; dense where it saves nothing."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UsageError(f"rank must be an integer >= 1, got {rank!r}")
    _check_multiple(multiple)
    _check_names(curves)
    out: dict[str, Choice] = {}
    for c in curves:
        r = round_rank(rank, multiple, c.k)
        out[c.name] = r if c.saves(r) else None
    return out


@dataclass
class _Options:
    """Every layer's rank options as padded (layers x C) tables, plus the dense option.

    A choice is a column index: j < C is rank multiple * (j + 1), C is dense. For a price mu a layer's
    cheapest rank only moves down as mu grows (smallest-index argmin of err + mu * params with params
    ascending), so a bisection can search each layer between the ranks chosen at its two bracket ends.
    """

    ranks: Tensor  # (C,) int64, the shared rank grid multiple * (1..C)
    err: Tensor  # (L, C) float64 sensitivity * tails[rank]; +inf where the rank saves nothing
    params: Tensor  # (L, C) float64 factor params (integers: exact below 2**53)
    dense: Tensor  # (L,) float64 m * n
    count: Tensor  # (L,) int64 number of ranks below break-even

    @property
    def dense_col(self) -> int:
        return self.ranks.numel()

    def choose(self, mu: float, first: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
        """Each layer's cheapest option at price mu, searching ranks in columns first..last only.

        Returns:
            (choice, best): `best` is the cheapest rank column ignoring dense (it narrows the next
            window). Ties go to fewer parameters: the first minimum, and dense only when strictly cheaper.
        """
        width = int((last - first).max()) + 1
        cols = (first[:, None] + torch.arange(width)).minimum(last[:, None])
        cost = torch.add(self.err.gather(1, cols), self.params.gather(1, cols), alpha=mu)
        best_cost, offset = cost.min(dim=1)
        best = first + offset
        return torch.where(mu * self.dense < best_cost, self.dense_col, best), best

    def full_window(self) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(self.count), (self.count - 1).clamp_min(0)

    def kept(self, choice: Tensor) -> Tensor:
        """(L,) float64 parameters each layer keeps under a choice."""
        rank_params = self.params.gather(1, choice.clamp_max(self.dense_col - 1)[:, None]).squeeze(1)
        return torch.where(choice == self.dense_col, self.dense, rank_params)

    def total(self, choice: Tensor) -> int:
        return int(self.kept(choice).sum())

    def decode(self, curves: Sequence[LayerCurve], choice: Tensor) -> dict[str, Choice]:
        grid = self.ranks.tolist()
        return {
            c.name: (None if j == self.dense_col else grid[j]) for c, j in zip(curves, choice.tolist())
        }


def _options(curves: Sequence[LayerCurve], multiple: int) -> _Options:
    # Number of ranks multiple * j below break-even: j (m + n) multiple < m n.
    counts = [(c.dense_params - 1) // (multiple * (c.m + c.n)) for c in curves]
    # At least one (all +inf) column, so the gathers stay valid when no layer can be factorized.
    cols = max(max(counts, default=0), 1)
    ranks = multiple * torch.arange(1, cols + 1, dtype=torch.int64)
    err = torch.full((len(curves), cols), math.inf, dtype=torch.float64)
    for i, (c, j) in enumerate(zip(curves, counts)):
        err[i, :j] = c.sensitivity * c.tails[multiple : multiple * j + 1 : multiple]
    sides = torch.tensor([c.m + c.n for c in curves], dtype=torch.float64)
    params = sides[:, None] * ranks.to(torch.float64)[None, :]
    dense = torch.tensor([c.dense_params for c in curves], dtype=torch.float64)
    return _Options(ranks, err, params, dense, torch.tensor(counts, dtype=torch.int64))


def allocation_for_price(
    curves: Sequence[LayerCurve], mu: float, multiple: int = 8
) -> dict[str, Choice]:
    """Each layer's option minimising sensitivity * tails[r] + mu * params (dense: error 0, m n params)."""
    if not (math.isfinite(mu) and mu >= 0.0):
        raise UsageError(f"price must be a finite number >= 0, got {mu!r}")
    _check_multiple(multiple)
    _check_names(curves)
    if not curves:
        return {}
    opts = _options(curves, multiple)
    return opts.decode(curves, opts.choose(mu, *opts.full_window())[0])


def allocate_ranks(curves: Sequence[LayerCurve], keep: float, multiple: int = 8) -> dict[str, Choice]:
    """Lagrangian allocation: least total sensitivity * tails[r] with kept params <= keep * sum(m n).

    Raises:
        UsageError: If keep is outside (0, 1], multiple < 1, or the budget is below the smallest
            reachable size (every layer at rank `multiple`).
    """
    _check_keep(keep)
    _check_multiple(multiple)
    _check_names(curves)
    if keep >= 1.0 or not curves:
        return {c.name: None for c in curves}
    opts = _options(curves, multiple)
    targeted = sum(c.dense_params for c in curves)
    budget = math.floor(keep * targeted)
    # What every layer takes at a high enough price: rank `multiple`, or dense where none saves.
    hi_choice = torch.where(opts.count > 0, 0, opts.dense_col)
    if opts.total(hi_choice) > budget:
        raise UsageError(
            f"keep={keep} is below the smallest reachable size: rank {multiple} everywhere keeps "
            f"{opts.total(hi_choice) / targeted:.4f} of the targeted parameters"
        )
    positive = opts.err[torch.isfinite(opts.err) & (opts.err > 0)]
    if positive.numel() == 0:
        return opts.decode(curves, hi_choice)  # no option loses anything: the fewest params win
    # Bracket valid for any curve shape: above mu_hi no error difference (<= max err) pays for one
    # parameter, so every layer takes its smallest option; below mu_lo no lossy rank beats dense (it
    # saves < m n params), so the allocation is the largest any price gives.
    mu_lo = 0.5 * float(positive.min()) / float(opts.dense.max())
    mu_hi = 2.0 * float(positive.max())
    first, last = opts.full_window()
    lo_choice, last = opts.choose(mu_lo, first, last)
    if opts.total(lo_choice) <= budget:
        return opts.decode(curves, lo_choice)
    for _ in range(_MAX_BISECTIONS):
        if mu_hi <= mu_lo * (1.0 + _PRICE_RTOL):
            break
        mid = math.sqrt(mu_lo * mu_hi)
        choice, best = opts.choose(mid, first, last)
        if opts.total(choice) <= budget:
            mu_hi, hi_choice, first = mid, choice, best
        else:
            mu_lo, lo_choice, last = mid, choice, best
    return opts.decode(curves, _fill_ties(opts, lo_choice, hi_choice, budget))


def _fill_ties(opts: _Options, lo_choice: Tensor, hi_choice: Tensor, budget: int) -> Tensor:
    """Spend the slack left at the critical price on layers that are tied there.

    Layers whose choice differs across the final (1e-12 wide) bracket sit at a breakpoint: at the
    critical price both options cost the same, so any of them may take the bigger one and the allocation
    stays a Lagrangian minimiser (hence optimal for its new total). Each such switch saves error at that
    same price per parameter, so packing the most parameters (largest first) saves the most error.
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
    """Matrix-level totals of a rank map (the model-level ratio also needs the untargeted parameters).

    Returns:
        targeted_params (dense params of the targeted layers), kept_params, ratio (kept / targeted),
        dense_layers, factored_layers, and estimated_error (sum of sensitivity * tails[r]).
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
