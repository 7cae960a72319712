"""GPTQ plus a low-rank correction (W ~ Q + L R): the correction step against an independent whitened-SVD
reference in float64, the alternation's bookkeeping, and rank 0 == plain GPTQ."""

from __future__ import annotations

import pytest
import torch

from lowrank_cli.methods.quantize.gptq import gptq_quantize
from lowrank_cli.methods.quantize.grid import Grid
from lowrank_cli.methods.quantize.lowrank_correction import (
    correction_factors,
    gptq_quantizer,
    lowrank_correct,
    relative_output_error,
)


def _layer(rows=40, cols=64, tokens=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, cols)
    X = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mix
    return W, X, X.T @ X


def whitened_svd_optimum(E, G, r):
    """min ||(E - A) C|| over rank-r A with G = C C^T (Cholesky): A = (E C)_r C^-1 (Eckart-Young in the
    whitened space). Written independently of factorize.py (Cholesky + SVD, not eigh of E G E^T)."""
    C = torch.linalg.cholesky(G)
    U, S, Vh = torch.linalg.svd(E @ C, full_matrices=False)
    best = (U[:, :r] * S[:r]) @ Vh[:r]
    return torch.linalg.solve_triangular(C, best, upper=False, left=False)


def error_via_x(W, A, X):
    """The relative output error from the activations themselves, not the Gram."""
    return float(((W - A) @ X.T).square().sum() / (W @ X.T).square().sum())


@pytest.mark.parametrize("r", [1, 5, 16])
def test_correction_step_is_the_exact_optimum(r):
    W, X, G = _layer()
    Q = gptq_quantize(W, G, Grid(3, 32, True)).dequantize()
    E = W - Q
    L, R = correction_factors(E, G, r)
    assert L.shape == (40, r) and R.shape == (r, 64)
    ref = whitened_svd_optimum(E, G, r)
    assert torch.allclose(L @ R, ref, atol=1e-8 * float(ref.abs().max()))
    ours = error_via_x(W, Q + L @ R, X)
    assert ours == pytest.approx(relative_output_error(W, Q + L @ R, G), rel=1e-9)
    # no other rank-r correction does better: try random ones and the plain (data-free) SVD of E
    U, S, Vh = torch.linalg.svd(E, full_matrices=False)
    assert ours < error_via_x(W, Q + (U[:, :r] * S[:r]) @ Vh[:r], X)
    g = torch.Generator().manual_seed(r)
    for _ in range(5):
        bump = 1e-3 * torch.randn(40, r, generator=g, dtype=torch.float64) @ R
        assert ours <= error_via_x(W, Q + L @ R + bump, X) + 1e-15


def test_rank_zero_is_plain_gptq():
    W, _, G = _layer(seed=1)
    grid = Grid(4, 32, False)
    plain = gptq_quantize(W, G, grid, act_order=True)
    got = lowrank_correct(W, G, gptq_quantizer(grid), 0, iterations=3)
    assert torch.equal(got.quantized.q, plain.q) and torch.equal(got.dequantized, plain.dequantize())
    assert got.up.shape == (40, 0) and got.down.shape == (0, 64)
    assert got.history == [pytest.approx(relative_output_error(W, plain.dequantize(), G))]
    assert torch.equal(got.weight(), plain.dequantize())


@pytest.mark.parametrize("bits", [2, 3])
def test_alternation_keeps_the_best_and_never_loses_to_round_zero(bits):
    W, X, G = _layer(seed=bits)
    grid = Grid(bits, 32, True)
    got = lowrank_correct(W, G, gptq_quantizer(grid), 8, iterations=4)
    assert len(got.history) == 5 and got.error == min(got.history)
    assert got.history[got.best_round] == got.error
    kept = [min(got.history[:i + 1]) for i in range(len(got.history))]
    assert all(b <= a for a, b in zip(kept, kept[1:], strict=False))  # the kept error never increases
    assert got.error == pytest.approx(error_via_x(W, got.weight(), X), rel=1e-9)
    # the stored pieces are what was scored: the quantizer's levels dequantize to `dequantized`
    assert torch.equal(got.quantized.dequantize(), got.dequantized)
    plain = relative_output_error(W, gptq_quantize(W, G, grid, act_order=True).dequantize(), G)
    assert got.error < 0.9 * plain  # a rank-8 correction of a 2/3-bit error helps a lot on this layer


def test_a_quantizer_returning_a_plain_tensor():
    """Any quantizer fits: here round-to-nearest on a fixed step of 0.5, returning the dequantized tensor."""
    W, X, G = _layer(seed=5)

    def rounding(target, gram):
        return torch.round(target * 2) / 2

    got = lowrank_correct(W, G, rounding, 4, iterations=3)
    assert got.quantized is got.dequantized or torch.equal(got.quantized, got.dequantized)
    assert torch.equal(got.dequantized, torch.round(got.dequantized * 2) / 2)  # still on the grid
    assert got.error <= got.history[0] and got.error == pytest.approx(error_via_x(W, got.weight(), X), rel=1e-9)
    plain = relative_output_error(W, rounding(W, G), G)
    assert got.error < plain


def test_bad_arguments():
    W, _, G = _layer()
    quant = gptq_quantizer(Grid(4, 32, True))
    with pytest.raises(ValueError):
        lowrank_correct(W, G, quant, 41)
    with pytest.raises(ValueError):
        lowrank_correct(W, G, quant, 2, iterations=-1)
    with pytest.raises(ValueError):
        lowrank_correct(W, G[:10, :10], quant, 2)
