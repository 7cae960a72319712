"""Closed-form factorizations (methods.decompose.factorize) against brute-force references.

Notation as in the module: W is m x n, X holds one token per row, the error of factors (up, down) is
||(W - up @ down) X^T||_F^2.
"""

from __future__ import annotations

import pytest
import torch

from lowrank_cli.engine import calibration
from lowrank_cli.errors import RuntimeFailure, UsageError
from lowrank_cli.methods.decompose.factorize import (
    Spectrum,
    accumulate_gram,
    data_spectrum,
    factors_from_spectrum,
    lord_factors,
    relative_error,
    svd_factors,
    weight_spectrum,
)

F64 = torch.float64



def _problem(m: int, n: int, tokens: int, x_rank: int | None = None, seed: int = 0):
    """A random weight and anisotropic inputs (so the data-aware and plain solutions differ)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=F64)
    if x_rank is None:
        x = torch.randn(tokens, n, generator=g, dtype=F64)
    else:
        x = torch.randn(tokens, x_rank, generator=g, dtype=F64)
        x = x @ torch.randn(x_rank, n, generator=g, dtype=F64)
    return w, x * torch.logspace(0, -1.5, n, dtype=F64)


def _err2(w: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - up.to(F64) @ down.to(F64)) @ x.T).square().sum())


def _eckart_young(w: torch.Tensor, x: torch.Tensor, r: int) -> float:
    """The optimum: the trailing squared singular values of W X^T."""
    return float(torch.linalg.svdvals(w @ x.T)[r:].square().sum())


def _als(w: torch.Tensor, x: torch.Tensor, r: int, seed: int, iters: int = 400) -> float:
    """A generic numerical minimiser over B (m x r), A (r x n): alternating least squares."""
    gram = x.T @ x
    b = torch.randn(w.shape[0], r, generator=torch.Generator().manual_seed(seed), dtype=F64)
    for _ in range(iters):
        # A = B^+ W zeroes the gradient B^T (W - B A) G for any G, singular or not.
        a = torch.linalg.pinv(b) @ w
        # B solves B (A G A^T) = W G A^T; pinv copes with a rank-deficient A G A^T.
        b = w @ gram @ a.T @ torch.linalg.pinv(a @ gram @ a.T)
    return _err2(w, b, a, x)


CASES = [  # m, n, tokens, rank of X (None = full)
    (6, 10, 40, None),
    (10, 6, 40, None),
    (6, 10, 7, None),  # fewer tokens than inputs: rank-deficient Gram
    (12, 7, 30, 3),
    (8, 12, 50, 5),
]


@pytest.mark.parametrize(("m", "n", "tokens", "x_rank"), CASES)
def test_lord_reaches_the_optimum(m: int, n: int, tokens: int, x_rank: int | None) -> None:
    w, x = _problem(m, n, tokens, x_rank, seed=m * 100 + n)
    gram = accumulate_gram(None, x)
    total = float((w @ x.T).square().sum())
    for r in range(1, min(m, n)):
        up, down = lord_factors(w, gram, r)
        err = _err2(w, up, down, x)
        assert err == pytest.approx(_eckart_young(w, x, r), rel=1e-9, abs=1e-10 * total)
        assert err <= _als(w, x, r, seed=r) + 1e-9 * total


def test_lord_beats_plain_svd_on_the_data() -> None:
    w, x = _problem(10, 16, 80, seed=3)
    gram = accumulate_gram(None, x)
    for r in (2, 5, 8):
        lord = _err2(w, *lord_factors(w, gram, r), x)
        plain = _err2(w, *svd_factors(w, r), x)
        assert lord < plain * (1 - 1e-3)


@pytest.mark.parametrize(("m", "n"), [(7, 11), (11, 7)])
@pytest.mark.parametrize("damp", [0.0, 0.3])
def test_tail_is_the_measured_error(m: int, n: int, damp: float) -> None:
    w, x = _problem(m, n, 30, seed=5)
    gram = accumulate_gram(None, x)
    spectrum = data_spectrum(w, gram, damp)
    # With damping the spectrum describes the damped objective tr(E G' E^T).
    g = gram + damp * gram.diagonal().mean() * torch.eye(n, dtype=F64)
    tails = spectrum.tails()
    assert tails.shape == (min(m, n) + 1,)
    assert float(tails[0]) == pytest.approx(float(torch.trace(w @ g @ w.T)), rel=1e-12)
    assert spectrum.total == pytest.approx(float(tails[0]), rel=1e-12)
    assert float(tails[-1]) == 0.0
    for r in range(1, min(m, n) + 1):
        up, down = factors_from_spectrum(w, spectrum, r)
        e = w - up @ down
        assert spectrum.tail(r) == pytest.approx(
            float(torch.trace(e @ g @ e.T)), rel=1e-9, abs=1e-12 * spectrum.total
        )
        assert relative_error(spectrum, r) == pytest.approx(spectrum.tail(r) / spectrum.total)


@pytest.mark.parametrize(("m", "n"), [(12, 20), (20, 12)])
def test_exact_recovery_of_a_rank_5_weight(m: int, n: int) -> None:
    g = torch.Generator().manual_seed(11)
    w = torch.randn(m, 5, generator=g, dtype=F64) @ torch.randn(5, n, generator=g, dtype=F64)
    x = torch.randn(60, n, generator=g, dtype=F64)
    gram = accumulate_gram(None, x)
    for up, down in (lord_factors(w, gram, 5), svd_factors(w, 5)):
        assert up.shape == (m, 5) and down.shape == (5, n)
        assert float(torch.linalg.norm(w - up @ down) / torch.linalg.norm(w)) < 1e-10
    spectrum = data_spectrum(w, gram)
    # Only the numerical floor is left past rank 5 (eigh of W G W^T: ~ k eps * the top eigenvalue).
    assert spectrum.tail(5) < 1e-13 * spectrum.total
    assert spectrum.rank_for_error(1e-12) == 5


@pytest.mark.parametrize(("m", "n"), [(6, 10), (14, 10)])
def test_damping_a_rank_deficient_gram(m: int, n: int) -> None:
    w, x = _problem(m, n, 40, x_rank=3, seed=7)
    gram = accumulate_gram(None, x)
    r = 2
    plain = _err2(w, *lord_factors(w, gram, r), x)
    up, down = lord_factors(w, gram, r, damp=1e-6)
    assert bool(torch.isfinite(up).all() and torch.isfinite(down).all())
    damped = _err2(w, up, down, x)
    assert plain <= damped * (1 + 1e-9)  # undamped is the optimum on X
    assert damped == pytest.approx(plain, rel=1e-3)


def test_strong_damping_pulls_toward_plain_svd() -> None:
    w, x = _problem(8, 12, 40, x_rank=3, seed=9)
    gram = accumulate_gram(None, x)
    up, down = lord_factors(w, gram, 5, damp=1e8)
    ref_up, ref_down = svd_factors(w, 5)
    assert torch.allclose(up @ down, ref_up @ ref_down, atol=1e-5)


@pytest.mark.parametrize(("m", "n"), [(9, 13), (13, 9)])
def test_weight_spectrum_is_truncated_svd(m: int, n: int) -> None:
    w, _ = _problem(m, n, 1, seed=13)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    spectrum = weight_spectrum(w)
    assert torch.allclose(spectrum.eigvals, s.square(), rtol=1e-12)
    assert spectrum.total == pytest.approx(float(w.square().sum()), rel=1e-12)
    for r in (1, 4, min(m, n)):
        up, down = svd_factors(w, r)
        assert torch.allclose(up @ down, u[:, :r] * s[:r] @ vh[:r], atol=1e-12)
        assert spectrum.tail(r) == pytest.approx(float((w - up @ down).square().sum()), abs=1e-10)


@pytest.mark.parametrize(("m", "n", "tokens"), [(6, 10, 40), (10, 6, 40), (10, 14, 5), (14, 10, 5)])
def test_spectrum_shape_and_order(m: int, n: int, tokens: int) -> None:
    w, x = _problem(m, n, tokens, seed=17)
    spectrum = data_spectrum(w, accumulate_gram(None, x))
    k = min(m, n)
    assert spectrum.eigvals.dtype == F64 and spectrum.eigvals.shape == (k,)
    assert spectrum.basis.dtype == F64 and spectrum.basis.shape == (m, k)
    assert bool((spectrum.eigvals >= 0).all())
    assert bool((spectrum.eigvals[:-1] >= spectrum.eigvals[1:]).all())
    assert torch.allclose(spectrum.basis.T @ spectrum.basis, torch.eye(k, dtype=F64), atol=1e-10)
    # The eigenvalues are the squared singular values of W X^T (zero past the number of tokens).
    ref = torch.zeros(k, dtype=F64)
    sv = torch.linalg.svdvals(w @ x.T).square()[:k]
    ref[: sv.numel()] = sv
    assert torch.allclose(spectrum.eigvals, ref, rtol=1e-9, atol=1e-9 * float(ref[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_factors_keep_the_weight_dtype(dtype: torch.dtype) -> None:
    w, x = _problem(8, 12, 30, seed=19)
    up, down = lord_factors(w.to(dtype), accumulate_gram(None, x.to(dtype)), 4)
    assert up.dtype == dtype and down.dtype == dtype
    assert up.shape == (8, 4) and down.shape == (4, 12)
    # `up` stays orthonormal (no balancing), so its scale is O(1) whatever W's scale is.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(up.to(F64).T @ up.to(F64), torch.eye(4, dtype=F64), atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_gram_in_float64(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "_GRAM_CHUNK_ROWS", 3)  # exercise several chunks per batch
    g = torch.Generator().manual_seed(23)
    batches = [(100 * torch.randn(2, 5, 4, generator=g)).to(dtype) for _ in range(3)]
    gram = None
    for b in batches:
        before = gram
        gram = accumulate_gram(gram, b)
        assert before is None or gram is before  # updated in place
    assert gram is not None and gram.dtype == F64 and gram.shape == (4, 4)
    rows = torch.cat([b.reshape(-1, 4) for b in batches]).to(F64)
    assert torch.allclose(gram, rows.T @ rows, rtol=1e-12)
    # float16 would overflow here (sum of 30 squares of ~100 exceeds 65504); float64 does not.
    assert bool(torch.isfinite(gram).all())


def test_accumulate_gram_rejects_bad_input() -> None:
    gram = accumulate_gram(None, torch.randn(3, 4))
    with pytest.raises(ValueError):
        accumulate_gram(gram, torch.randn(3, 5))
    with pytest.raises(ValueError):
        accumulate_gram(None, torch.ones(3, 4, dtype=torch.int64))


def test_all_zero_gram_falls_back_to_plain_svd() -> None:
    w, _ = _problem(6, 9, 1, seed=29)
    spectrum = data_spectrum(w, torch.zeros(9, 9, dtype=F64), damp=0.1)
    assert spectrum.total == 0.0 and float(spectrum.eigvals.abs().max()) == 0.0
    assert relative_error(spectrum, 2) == 0.0
    up, down = factors_from_spectrum(w, spectrum, 3)
    ref_up, ref_down = svd_factors(w, 3)
    assert torch.allclose(up @ down, ref_up @ ref_down, atol=1e-12)


def test_bad_inputs() -> None:
    w, x = _problem(6, 9, 20, seed=31)
    gram = accumulate_gram(None, x)
    spectrum = data_spectrum(w, gram)
    for rank in (0, 7, -1):
        with pytest.raises(UsageError):
            factors_from_spectrum(w, spectrum, rank)
    with pytest.raises(UsageError):
        spectrum.tail(7)
    with pytest.raises(UsageError):
        data_spectrum(w, gram, damp=-0.1)
    with pytest.raises(ValueError):
        data_spectrum(w, gram[:5, :5])
    bad = gram.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(RuntimeFailure):
        data_spectrum(w, bad)
    with pytest.raises(ValueError):
        factors_from_spectrum(w.T, spectrum, 2)


def test_rank_for_error() -> None:
    eigvals = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64)
    spectrum = Spectrum(eigvals, torch.eye(4, dtype=F64), 10.0)
    assert spectrum.tails().tolist() == [10.0, 6.0, 3.0, 1.0, 0.0]
    assert spectrum.rank_for_error(1.0) == 0
    assert spectrum.rank_for_error(0.3) == 2
    assert spectrum.rank_for_error(0.29) == 3
    assert spectrum.rank_for_error(0.0) == 4
    with pytest.raises(UsageError):
        spectrum.rank_for_error(1.5)


@pytest.mark.parametrize(("m", "n", "damp", "samples"), [(24, 40, 0.01, 200), (40, 24, 0.01, 200),
                                                          (40, 24, 0.0, 10), (24, 40, 0.0, 10)])
def test_energies_only_equal_the_full_spectrum(m, n, damp, samples):
    """The profile's curves use data_spectrum(vectors=False): the same energies (and tails) as the full
    decomposition, for both sides of the weight and for a singular Gram without damping."""
    from lowrank_cli.methods.decompose.factorize import data_spectrum

    g = torch.Generator().manual_seed(m * n + samples)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(samples, n, generator=g, dtype=torch.float64)
    gram = x.T @ x
    full = data_spectrum(w, gram, damp)
    only = data_spectrum(w, gram, damp, vectors=False)
    assert only.basis is None
    scale = float(full.eigvals[0])
    assert torch.allclose(only.eigvals, full.eigvals, rtol=1e-9, atol=1e-9 * scale)
    assert torch.allclose(only.tails(), full.tails(), rtol=1e-9, atol=1e-9 * scale)
    assert only.total == pytest.approx(full.total, rel=1e-12)
