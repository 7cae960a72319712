"""Closed-form low-rank factors of one linear layer: the data-aware optimum (LoRD) and plain SVD.

Notation: a layer y = W x + b with W m x n (out x in, the `nn.Linear` weight); calibration inputs
X have one token per row and G = X^T X is the n x n input Gram. A rank-r factorisation
W ~ up @ down has `up` m x r and `down` r x n, stored as two `nn.Linear` (down: n -> r without
bias, up: r -> m with the original bias).

The data-aware optimum (whitening and feature mimicking give the same answer): the rank-r W' minimising
||(W - W') X^T||_F is W' = U_r U_r^T W, where U_r holds the top-r eigenvectors of M = W G W^T (the left
singular vectors of W X^T). LoRD/AFM (output-covariance eigenvectors) and SVD-LLM (truncation-aware
whitening) reach the same W'. This form needs no Cholesky and no inverse, so rank-deficient Grams are
fine, and the error at every rank is the sum of the eigenvalues past it: one decomposition gives the
whole error-versus-rank curve that rank allocation (`allocate.py`) consumes.

Everything is computed in float64: the eigenvalues of M are the *squares* of the singular values
of W X^T, so the small tail that decides the error at high rank needs the extra precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_cli.engine.calibration import accumulate_gram  # re-exported: part of this module's API
from lowrank_cli.errors import RuntimeFailure, UsageError
from lowrank_cli.utils.threads import single_thread_upto

__all__ = [
    "Spectrum",
    "accumulate_gram",
    "data_spectrum",
    "weight_spectrum",
    "factors_from_spectrum",
    "lord_factors",
    "svd_factors",
    "relative_error",
]

@dataclass
class Spectrum:
    """Output-side directions of a layer, ordered by how much output energy each one carries.

    Attributes:
        eigvals: float64, descending, >= 0, length k = min(m, n): the energy along each direction.
        basis: m x k float64 with orthonormal columns, in the same order as `eigvals` (None when only
            the energies were computed: `data_spectrum(..., vectors=False)`).
        total: Sum of all eigvals: ||W X^T||_F^2 on the calibration data (plus damping), or
            ||W||_F^2 for plain SVD.
    """

    eigvals: Tensor
    basis: Tensor | None
    total: float

    @property
    def k(self) -> int:
        """The full rank min(m, n): the largest rank a factorisation can use."""
        return int(self.eigvals.numel())

    def tails(self) -> Tensor:
        """Squared output error at every rank: float64, length k + 1, tails[r] for r = 0..k."""
        # Summed from the smallest eigenvalue up, so that small tails keep their relative precision
        # instead of being the difference of two large partial sums.
        rev = torch.cumsum(self.eigvals.flip(0), dim=0).flip(0)
        return torch.cat([rev, rev.new_zeros(1)])

    def tail(self, r: int) -> float:
        """Squared output error ||(W - W'_r) X^T||_F^2 of the rank-r factorisation (r = 0..k)."""
        _check_rank(r, self.k, allow_zero=True)
        return float(self.tails()[r])

    def rank_for_error(self, max_relative_error: float) -> int:
        """Smallest rank r (0..k) whose tail(r) / total is at most `max_relative_error`."""
        if not 0.0 <= max_relative_error <= 1.0:
            raise UsageError(f"a relative error budget must be in [0, 1], got {max_relative_error}")
        ok = self.tails() <= max_relative_error * self.total
        return int(torch.nonzero(ok)[0])  # tails are non-increasing and tails[k] = 0, so one exists


def _check_weight(weight: Tensor) -> tuple[int, int]:
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor, got {weight.dtype} {weight.ndim}-D")
    return int(weight.shape[0]), int(weight.shape[1])


def _check_rank(rank: int, k: int, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(rank, bool) or not isinstance(rank, int) or not low <= rank <= k:
        raise UsageError(f"rank must be an integer in [{low}, {k}] for this layer, got {rank!r}")


def data_spectrum(weight: Tensor, gram: Tensor, damp: float = 0.0, vectors: bool = True) -> Spectrum:
    """Eigen-decomposition of the output covariance W G' W^T, computed on the smaller side of W.

    Args:
        weight: The m x n layer weight, any float dtype.
        gram: The n x n input Gram G = X^T X (see `accumulate_gram`).
        damp: Relative damping: G' = G + damp * mean(diag(G)) * I. It makes a rank-deficient Gram
            well-posed and pulls the solution toward plain SVD in directions the data never visits.
        vectors: False computes the energies only (`basis` is None): what an error-versus-rank curve
            needs, at about a third of the cost (eigvalsh, and a Cholesky factor instead of G's eigh).

    Returns:
        The Spectrum on gram's device: the data-aware optimum at every rank.

    Raises:
        ValueError: If the shapes do not match.
        UsageError: If damp is negative or not finite.
        RuntimeFailure: If the Gram holds inf or NaN (overflowing activations).
    """
    m, n = _check_weight(weight)
    if gram.shape != (n, n):
        raise ValueError(f"Gram must be {n} x {n} for a {m} x {n} weight, got {tuple(gram.shape)}")
    if not (math.isfinite(damp) and damp >= 0.0):
        raise UsageError(f"damping must be a finite number >= 0, got {damp}")
    # Symmetrise (eigh reads one triangle only, and accumulation can leave rounding asymmetry)
    # into one new n x n buffer: the caller's Gram stays untouched and is often ~1 GB.
    g = (gram + gram.T).to(torch.float64).mul_(0.5)
    if not bool(torch.isfinite(g).all()):
        raise RuntimeFailure("the calibration Gram holds inf or NaN: activations overflowed")
    scale = float(g.diagonal().mean())
    if scale <= 0.0:
        # The layer never saw a non-zero input: every rank is exact on the data, so any basis is
        # optimal; plain SVD is the tie-break that also behaves on unseen inputs.
        plain = weight_spectrum(weight.to(g.device))
        return Spectrum(torch.zeros_like(plain.eigvals), plain.basis, 0.0)
    if damp > 0.0:
        g.diagonal().add_(damp * scale)
    w = weight.to(device=g.device, dtype=torch.float64)
    if not vectors:
        return _energies(w, g)
    if m <= n:
        # m x m problem: cost ~ m n^2 to form, m^3 to decompose.
        cov = w @ g @ w.T
        with single_thread_upto(cov):
            vals, vecs = torch.linalg.eigh(0.5 * (cov + cov.T))
        vals, vecs = vals.flip(0), vecs.flip(1)
    else:
        # n x n problem: W S with S = G'^{1/2} = V diag(sqrt(lam)) V^T. The trailing V^T is
        # orthogonal and leaves the left singular vectors alone, so W V diag(sqrt(lam)) is enough.
        with single_thread_upto(g):
            lam, v = torch.linalg.eigh(g)
        ws = (w @ v) * lam.clamp_min(0.0).sqrt()
        with single_thread_upto(g):
            vecs, s, _ = torch.linalg.svd(ws, full_matrices=False)
        vals = s.square()
    # Round-off can leave tiny negative eigenvalues; energies are >= 0 by definition.
    vals = vals.clamp_min(0.0).contiguous()
    return Spectrum(vals, vecs.contiguous(), float(vals.sum()))


def _energies(w: Tensor, g: Tensor) -> Spectrum:
    """The eigenvalues of W G W^T alone. For m > n they are those of the n x n matrix C^T W^T W C with
    G = C C^T (Cholesky), which shares its nonzero eigenvalues; a Gram too singular to factor (no
    damping) takes G's eigh, as data_spectrum does."""
    m, n = w.shape
    if m <= n:
        cov = w @ g @ w.T
        with single_thread_upto(cov):
            vals = torch.linalg.eigvalsh(0.5 * (cov + cov.T))
    else:
        c, info = torch.linalg.cholesky_ex(g)
        if int(info) != 0:
            with single_thread_upto(g):
                lam, v = torch.linalg.eigh(g)
            c = v * lam.clamp_min(0.0).sqrt()
        wc = w @ c
        small = wc.T @ wc
        with single_thread_upto(small):
            vals = torch.linalg.eigvalsh(0.5 * (small + small.T))
    vals = vals.flip(0).clamp_min(0.0).contiguous()
    return Spectrum(vals, None, float(vals.sum()))


def weight_spectrum(weight: Tensor) -> Spectrum:
    """Plain (data-free) SVD of the weight: eigvals are the squared singular values.

    Args:
        weight: The m x n layer weight, any float dtype.

    Returns:
        The Spectrum on weight's device; its error is ||W - W'_r||_F^2 (identity input Gram).
    """
    _check_weight(weight)
    w = weight.to(torch.float64)
    with single_thread_upto(w if w.shape[0] >= w.shape[1] else w.T):
        u, s, _ = torch.linalg.svd(w, full_matrices=False)
    vals = s.square()
    return Spectrum(vals, u.contiguous(), float(vals.sum()))


def factors_from_spectrum(weight: Tensor, spectrum: Spectrum, rank: int) -> tuple[Tensor, Tensor]:
    """Rank-r factors up = U_r (m x r) and down = U_r^T W (r x n): up @ down = U_r U_r^T W.

    Args:
        weight: The m x n layer weight the spectrum was computed from.
        spectrum: Its Spectrum (`data_spectrum` or `weight_spectrum`).
        rank: The kept rank, 1..k.

    Returns:
        (up, down) in weight's dtype and on weight's device.

    Raises:
        ValueError: If the spectrum does not belong to a weight of this shape.
        UsageError: If rank is outside 1..k.
    """
    m, _ = _check_weight(weight)
    if spectrum.basis.shape[0] != m:
        raise ValueError(f"spectrum basis has {spectrum.basis.shape[0]} rows, weight has {m}")
    _check_rank(rank, spectrum.k)
    # `up` stays orthonormal (no sqrt(sigma) balancing): its entries are O(1/sqrt(m)) and `down`
    # carries W's own scale, so a quantizer applied later sees two well-scaled factors.
    up = spectrum.basis[:, :rank]
    down = up.T @ weight.to(device=up.device, dtype=torch.float64)
    return (
        up.to(device=weight.device, dtype=weight.dtype).contiguous(),
        down.to(device=weight.device, dtype=weight.dtype).contiguous(),
    )


def lord_factors(
    weight: Tensor, gram: Tensor, rank: int, damp: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Data-aware rank-r factors (up, down) minimising ||(W - up @ down) X^T||_F.

    See `data_spectrum` for the arguments; rank is 1..min(m, n).
    """
    return factors_from_spectrum(weight, data_spectrum(weight, gram, damp), rank)


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Plain truncated-SVD rank-r factors (up, down) minimising ||W - up @ down||_F."""
    return factors_from_spectrum(weight, weight_spectrum(weight), rank)


def relative_error(spectrum: Spectrum, r: int) -> float:
    """tail(r) / total: the fraction of output energy lost at rank r (0.0 for a zero spectrum)."""
    tail = spectrum.tail(r)
    return tail / spectrum.total if spectrum.total > 0.0 else 0.0
