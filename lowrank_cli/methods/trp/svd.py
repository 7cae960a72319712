"""Truncated SVD at an energy threshold, the projection TRP applies, and the nuclear-norm sub-gradient.

Energy rank: the smallest k with sum_{i<=k} s_i^2 / sum_i s_i^2 >= e (the official code's
`EnergyThreshold(0.9)`). The total sum_i s_i^2 is ||W||_F^2, known without an SVD.

Which SVD (`method`):
- "exact": torch.linalg.svd (float32; float64 stays float64).
- "randomized": torch.svd_lowrank with q = guess + oversampling columns and `niter` power iterations.
  The energy is measured against the exact ||W||_F^2, so the threshold is reached only once the top-q
  values really hold that energy; a k that lands in the oversampling margin doubles q and retries; once q
  would pass half of min(m, n) the exact SVD is used instead (no saving left). Randomized values are
  slight underestimates, so k can only come out equal or a little larger than the exact one. Random probes
  come from a private seed (forked RNG), so the run's own random stream, and a resumed run, are untouched.
- "auto": randomized when min(m, n) >= `RANDOMIZED_MIN_DIM` (2048), exact below. A 576 x 1536 layer
  (SmolLM2-135M) takes milliseconds exactly; a 4096 x 11008 one takes seconds, and TRP's ranks at e = 0.9
  are usually well under half of min(m, n).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["energy_rank", "value_rank", "Truncation", "truncated_svd", "svd_above", "project",
           "nuclear_subgradient", "RANDOMIZED_MIN_DIM", "SVD_METHODS"]

RANDOMIZED_MIN_DIM = 2048
OVERSAMPLE = 8
POWER_ITERATIONS = 2
SVD_METHODS = ("auto", "exact", "randomized")


def energy_rank(s, energy: float, total: float | None = None) -> int:
    """Smallest k with sum(s[:k]^2) >= energy * total (total defaults to sum(s^2)); at least 1.

    `s`: singular values in descending order. Returns len(s) + 1 when `total` is given and the values
    passed do not reach the energy (the caller needs more of them).
    """
    import torch

    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    sq = s.detach().to(torch.float64) ** 2
    cum = torch.cumsum(sq, 0)
    whole = float(cum[-1]) if total is None else float(total)
    if whole <= 0.0:
        return 1
    if total is None and energy >= 1.0:
        return max(1, int((sq > 0).sum()))  # all the nonzero values: cum[-1] / whole == 1 exactly
    reached = torch.nonzero(cum >= energy * whole)
    if reached.numel() == 0:
        return len(s) + 1
    return int(reached[0, 0]) + 1


def value_rank(s, threshold: float) -> int:
    """Number of singular values >= `threshold` (the official code's `ValueThreshold`); at least 1."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return max(1, int((s.detach() >= threshold).sum()))


@dataclass
class Truncation:
    u: object  # m x k, orthonormal columns
    s: object  # k
    v: object  # n x k, orthonormal columns
    k: int
    kept_energy: float  # sum(s[:k]^2) / ||W||_F^2
    method: str  # "exact" or "randomized"


def _matrix(weight):
    """The matrix view TRP works on: W itself, or a conv weight N x C x kh x kw as N x (C kh kw) (the
    channel-wise "NC" view)."""
    return weight.reshape(weight.shape[0], -1)


def truncated_svd(weight, energy: float, *, method: str = "auto", guess: int | None = None,
                  seed: int = 0, max_rank: int | None = None) -> Truncation:
    """The rank-k SVD of `weight` (2-D, or a conv weight in its NC view) with k the energy rank.

    `guess`: expected k (e.g. the layer's previous rank) to size the randomized probe. `max_rank` caps k.
    """
    import torch

    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r} (choose {', '.join(SVD_METHODS)})")
    w = _matrix(weight).detach()
    w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    m, n = w.shape
    small = min(m, n)
    use_random = method == "randomized" or (method == "auto" and small >= RANDOMIZED_MIN_DIM)
    if use_random:
        total = float((w.to(torch.float64) ** 2).sum())  # the exact energy the top values are measured against
        q = min(small, max(1, guess or small // 8) + OVERSAMPLE)
        while 2 * q <= small or method == "randomized":
            with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
                torch.manual_seed(seed)
                u, s, v = torch.svd_lowrank(w, q=q, niter=POWER_ITERATIONS)
            k = energy_rank(s, energy, total)
            if k <= q - OVERSAMPLE or q >= small:
                k = min(k, q)
                break
            q = min(small, 2 * q)
        else:
            use_random = False
    if not use_random:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        v = vh.mH
        k = energy_rank(s, energy)  # against the values' own sum: no rounding gap with ||W||_F^2
        total = float((s.to(torch.float64) ** 2).sum())
    if max_rank is not None:
        k = min(k, max_rank)
    kept = float((s[:k].to(torch.float64) ** 2).sum()) / total if total > 0 else 1.0
    return Truncation(u[:, :k], s[:k], v[:, :k], k, kept, "randomized" if use_random else "exact")


def svd_above(weight, threshold: float) -> Truncation:
    """The exact SVD of `weight` (2-D, or a conv weight in its NC view) keeping the singular values
    >= `threshold` (absolute, in the weight's own scale), at least one."""
    import torch

    w = _matrix(weight).detach()
    w = w.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k = value_rank(s, threshold)
    total = float((s.to(torch.float64) ** 2).sum())
    kept = float((s[:k].to(torch.float64) ** 2).sum()) / total if total > 0 else 1.0
    return Truncation(u[:, :k], s[:k], vh.mH[:, :k], k, kept, "exact")


def project(t: Truncation, shape=None):
    """U_k S_k V_k^T, reshaped to `shape` (a conv weight's shape) when given."""
    w = (t.u * t.s) @ t.v.mH
    return w.reshape(shape) if shape is not None else w


def nuclear_subgradient(t: Truncation, weight: float = 1.0, shape=None):
    """weight * U_k V_k^T: a sub-gradient of weight * ||W||_* at the truncated W (whose SVD this is)."""
    g = (t.u @ t.v.mH) * weight
    return g.reshape(shape) if shape is not None else g
