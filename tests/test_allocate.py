"""Rank allocation (lowrank_cli.methods.decompose.allocate) against formulas and brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lowrank_cli.errors import UsageError
from lowrank_cli.methods.decompose.allocate import (
    LayerCurve,
    allocate_ranks,
    allocation_for_price,
    break_even_rank,
    fixed_ranks,
    kept_params,
    round_rank,
    summary,
    uniform_ranks,
)

F64 = torch.float64



def _curve(name: str, m: int, n: int, seed: int, sensitivity: float = 1.0,
           convex: bool = True) -> LayerCurve:
    """A random error curve: tails of a decaying spectrum (convex) or any decreasing sequence."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    if convex:
        eig = torch.rand(k, generator=g, dtype=F64).sort(descending=True).values ** (1 + seed % 4)
        tails = torch.cat([eig.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=F64)])
    else:
        tails = torch.cat([torch.rand(k, generator=g, dtype=F64).sort(descending=True).values * 10,
                           torch.zeros(1, dtype=F64)])
    return LayerCurve(name, m, n, tails, sensitivity)


def _error(curves: list[LayerCurve], ranks: dict[str, int | None]) -> float:
    return sum(c.error(ranks[c.name]) for c in curves)


def _options(c: LayerCurve, multiple: int) -> list[int | None]:
    return [None] + [r for r in range(multiple, c.k + 1, multiple) if c.saves(r)]


def _brute_force(curves: list[LayerCurve], multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(params, error) of every combination of options, for budget queries by masking."""
    combos = list(itertools.product(*(_options(c, multiple) for c in curves)))
    params = [sum(c.params(r) for c, r in zip(curves, combo, strict=True)) for combo in combos]
    errors = [sum(c.error(r) for c, r in zip(curves, combo, strict=True)) for combo in combos]
    return torch.tensor(params), torch.tensor(errors, dtype=F64)


def _best_within(table: tuple[torch.Tensor, torch.Tensor], budget: int) -> float:
    """Least total error over every combination of options within the budget."""
    params, errors = table
    return float(errors[params <= budget].min())


def _check_valid(curves: list[LayerCurve], ranks: dict[str, int | None], multiple: int) -> None:
    assert set(ranks) == {c.name for c in curves}
    for c in curves:
        r = ranks[c.name]
        if r is not None:
            assert r >= multiple and r % multiple == 0
            assert r < break_even_rank(c.m, c.n) and c.saves(r)


SMALL = [  # (m, n): 8, 8 and 7 options at multiple 1
    (10, 30),
    (16, 16),
    (20, 9),
]


@pytest.mark.parametrize("convex", [True, False])
@pytest.mark.parametrize("multiple", [1, 2])
def test_optimal_for_the_size_it_reaches(convex: bool, multiple: int) -> None:
    curves = [_curve(f"l{i}", m, n, seed=i + 7 * convex, sensitivity=1.0 + i, convex=convex)
              for i, (m, n) in enumerate(SMALL)]
    targeted = sum(c.dense_params for c in curves)
    table = _brute_force(curves, multiple)
    for keep in torch.linspace(0.3, 0.98, 15, dtype=F64).tolist():
        budget = math.floor(keep * targeted)
        ranks = allocate_ranks(curves, keep, multiple)
        _check_valid(curves, ranks, multiple)
        kept = kept_params(curves, ranks)
        assert kept <= budget
        # Everett: no combination with at most as many parameters has less error.
        assert _error(curves, ranks) == pytest.approx(_best_within(table, kept), rel=1e-9)


def test_exact_when_the_budget_is_a_lagrangian_size() -> None:
    curves = [_curve(f"l{i}", m, n, seed=i, sensitivity=2.0 - 0.5 * i)
              for i, (m, n) in enumerate(SMALL)]
    targeted = sum(c.dense_params for c in curves)
    table = _brute_force(curves, 1)
    hits = 0
    for mu in torch.logspace(-4, 0, 15, dtype=F64).tolist():
        target = allocation_for_price(curves, mu, multiple=1)
        size = kept_params(curves, target)
        if size == targeted:
            continue
        ranks = allocate_ranks(curves, (size + 0.5) / targeted, multiple=1)
        assert kept_params(curves, ranks) == size
        assert _error(curves, ranks) == pytest.approx(_best_within(table, size), rel=1e-9)
        assert _error(curves, ranks) == pytest.approx(_error(curves, target), rel=1e-9)
        hits += 1
    assert hits >= 5


def test_tied_layers_share_the_slack() -> None:
    # Identical layers jump together at the same price; without splitting that tie the budget left
    # between two Lagrangian sizes would go unused. Every option step here costs 32 params (dense
    # = 8 x 32 for 16 x 16) and the errors are convex, so the best use of the budget is reachable.
    eig = 3.0 ** -torch.arange(16, dtype=F64)
    tails = torch.cat([eig.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=F64)])
    curves = [LayerCurve(f"l{i}", 16, 16, tails) for i in range(3)]
    table = _brute_force(curves, 1)
    for keep in torch.linspace(0.2, 0.99, 20, dtype=F64).tolist():
        ranks = allocate_ranks(curves, keep, multiple=1)
        budget = math.floor(keep * 768)
        assert kept_params(curves, ranks) > budget - 32
        assert _error(curves, ranks) == pytest.approx(_best_within(table, budget), rel=1e-9)


def _many_curves(count: int = 40) -> list[LayerCurve]:
    shapes = [(64, 172), (172, 64), (64, 64), (64, 16), (16, 64), (8, 8), (120, 40)]
    return [_curve(f"layer.{i}", *shapes[i % len(shapes)], seed=i, sensitivity=0.5 + (i % 5))
            for i in range(count)]


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("keep", [0.45, 0.6, 0.8, 0.95])
def test_respects_the_budget_and_break_even(keep: float, multiple: int) -> None:
    curves = _many_curves()
    ranks = allocate_ranks(curves, keep, multiple)
    _check_valid(curves, ranks, multiple)
    info = summary(curves, ranks)
    assert info["kept_params"] <= keep * info["targeted_params"]
    assert info["ratio"] == pytest.approx(info["kept_params"] / info["targeted_params"])
    assert info["dense_layers"] + info["factored_layers"] == len(curves)
    assert info["estimated_error"] == pytest.approx(_error(curves, ranks))
    # 8 x 8 can never save at multiple 8 (break-even 4): it must stay dense.
    if multiple == 8:
        assert all(ranks[c.name] is None for c in curves if (c.m, c.n) == (8, 8))


def test_beats_uniform_at_no_more_parameters() -> None:
    curves = _many_curves()
    uniform = uniform_ranks(curves, 0.6, multiple=1)
    lagrangian = allocate_ranks(curves, 0.6, multiple=1)
    assert kept_params(curves, lagrangian) >= kept_params(curves, uniform)
    assert _error(curves, lagrangian) < _error(curves, uniform)


def test_sensitivity_moves_rank_to_the_sensitive_layer() -> None:
    base = _curve("a", 64, 64, seed=1)
    curves = [base, LayerCurve("b", 64, 64, base.tails.clone(), sensitivity=10.0)]
    ranks = allocate_ranks(curves, 0.4, multiple=1)
    assert ranks["a"] is not None and (ranks["b"] is None or ranks["b"] > ranks["a"])


def test_keep_one_keeps_everything_dense() -> None:
    curves = _many_curves(10)
    # A layer whose error is zero from rank 1 on would be factorized for free at any price < 1.
    curves.append(LayerCurve("free", 32, 32, torch.cat([torch.ones(1, dtype=F64),
                                                        torch.zeros(32, dtype=F64)])))
    for fn in (allocate_ranks, uniform_ranks):
        assert all(r is None for r in fn(curves, 1.0).values())
    assert allocate_ranks(curves, 0.9, multiple=1)["free"] == 1


def test_price_sweep_is_monotone() -> None:
    curves = _many_curves(20)
    sizes = [kept_params(curves, allocation_for_price(curves, mu, multiple=1))
             for mu in torch.logspace(-8, 4, 40, dtype=F64).tolist()]
    assert all(a >= b for a, b in zip(sizes, sizes[1:], strict=False))
    assert all(r is None for r in allocation_for_price(curves, 0.0, multiple=1).values())
    expensive = allocation_for_price(curves, 1e9, multiple=1)
    assert all(expensive[c.name] == 1 for c in curves)


def test_uniform_matches_the_svd_llm_formula() -> None:
    shapes = [(4096, 11008), (11008, 4096), (4096, 4096), (1024, 4096), (64, 64), (8, 8)]
    curves = [LayerCurve(f"{m}x{n}", m, n, torch.zeros(min(m, n) + 1)) for m, n in shapes]
    for keep in (0.2, 0.6, 0.8):
        ranks = uniform_ranks(curves, keep, multiple=8)
        for c in curves:
            r = max(int(keep * c.m * c.n / (c.m + c.n)) // 8 * 8, 8)
            assert ranks[c.name] == (r if r * (c.m + c.n) < c.m * c.n else None)
    ranks = uniform_ranks(curves, 0.8, multiple=8)
    assert ranks["4096x4096"] == 1632 and ranks["8x8"] is None  # 0.8 * 2048 = 1638.4


def test_fixed_ranks() -> None:
    shapes = [(4096, 4096), (64, 4096), (100, 100)]
    curves = [LayerCurve(f"{m}x{n}", m, n, torch.zeros(min(m, n) + 1)) for m, n in shapes]
    ranks = fixed_ranks(curves, 100, multiple=8)
    assert ranks == {"4096x4096": 96, "64x4096": None, "100x100": None}  # break-evens 2048, 63, 50
    assert fixed_ranks(curves, 40, multiple=8)["100x100"] == 40


def test_round_rank() -> None:
    assert break_even_rank(6144, 24576) == pytest.approx(4915.2)
    assert round_rank(0.8 * 20.0, 8) == 16  # 15.999999999999998 must not round down to 8
    assert round_rank(23.9, 8) == 16
    assert round_rank(3, 8) == 8
    assert round_rank(100, 8, full_rank=50) == 50
    assert round_rank(17, 1) == 17
    with pytest.raises(UsageError):
        round_rank(5, 0)
    with pytest.raises(UsageError):
        round_rank(-1.0, 8)


def test_bad_inputs_raise_usage_error() -> None:
    curves = _many_curves(5)
    for keep in (0.0, -0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(UsageError):
            allocate_ranks(curves, keep)
        with pytest.raises(UsageError):
            uniform_ranks(curves, keep)
    for rank in (0, -3):
        with pytest.raises(UsageError):
            fixed_ranks(curves, rank)
    with pytest.raises(UsageError):
        allocate_ranks(curves, 0.5, multiple=0)
    with pytest.raises(UsageError):
        allocation_for_price(curves, -1.0)
    with pytest.raises(UsageError, match="smallest reachable"):
        allocate_ranks(curves, 0.01, multiple=8)


def test_layer_curve_validation() -> None:
    with pytest.raises(ValueError):
        LayerCurve("x", 4, 6, torch.zeros(4))  # needs min(m, n) + 1 = 5 entries
    with pytest.raises(ValueError):
        LayerCurve("x", 4, 6, torch.zeros(5), sensitivity=-1.0)
    with pytest.raises(ValueError):
        allocate_ranks([_curve("a", 8, 8, 0), _curve("a", 8, 8, 1)], 0.5, multiple=1)
    c = LayerCurve("x", 4, 6, torch.arange(5, 0, -1), sensitivity=2.0)
    assert c.tails.dtype == F64 and c.dense_params == 24 and c.factored_params(2) == 20
    assert c.error(2) == 6.0 and c.error(None) == 0.0


def test_large_case_runs() -> None:
    # 300 layers x 5999 candidate ranks each (m = n = 12000, multiple 1): must stay vectorised.
    k = 12000
    base = torch.linspace(1.0, 0.0, k + 1, dtype=F64).square()
    curves = [LayerCurve(f"l{i}", k, k, base, sensitivity=1.0 + (i % 7)) for i in range(300)]
    ranks = allocate_ranks(curves, 0.5, multiple=1)
    assert kept_params(curves, ranks) <= 0.5 * 300 * k * k
    assert all(r is None or 1 <= r < 6000 for r in ranks.values())
    # More sensitive layers never get a smaller rank than less sensitive ones with the same curve.
    by_sens = {}
    for c in curves:
        r = ranks[c.name]
        by_sens.setdefault(c.sensitivity, set()).add(k if r is None else r)
    keys = sorted(by_sens)
    assert all(max(by_sens[a]) <= min(by_sens[b]) for a, b in zip(keys, keys[1:], strict=False))
