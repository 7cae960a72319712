"""A quantized weight plus a low-rank correction of its error: W ~ Q + L R (the idea of CALDERA and LQER).

Notation as in `methods/decompose/factorize.py`: W is m x n (out x in), calibration inputs X have one token per
row and G = X^T X is the n x n input Gram. The quality measure is the relative output error

    e(Q, L, R) = ||(W - Q - L R) X^T||_F^2 / ||W X^T||_F^2 = tr(D G D^T) / tr(W G W^T),  D = W - Q - L R.

Two steps, each the best (or, for Q, a good) answer given the other:
- L R = the data-aware rank-r optimum of the residual W - Q under G: exactly decompose's LoRD factors
  (`data_spectrum` + `factors_from_spectrum`): L = U_r (orthonormal, m x r), R = U_r^T (W - Q) (r x n);
- Q = quant(W - L R, G): the quantizer (GPTQ) aimed at what the correction leaves over.
Starting from Q = quant(W) (plain GPTQ), the two alternate for `iterations` rounds. GPTQ is not an exact
minimiser, so a round can make things worse: every round is scored and the best (Q, L, R) is kept, so the
result is never worse than plain GPTQ plus its optimal correction.

Rank 0 is plain GPTQ (no correction). Everything is float64; L and R are cast by whoever stores them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lowrank_cli.methods.decompose.factorize import data_spectrum, factors_from_spectrum

__all__ = ["CorrectedWeight", "Quantizer", "gptq_quantizer", "lowrank_correct", "relative_output_error",
           "correction_factors"]

# quantizer(target m x n, gram n x n) -> a Tensor, or an object with .dequantize() (GPTQ's QuantizedWeight)
Quantizer = Callable[[Tensor, Tensor], Any]


@dataclass
class CorrectedWeight:
    """W ~ dequantized + up @ down, with the quantizer's own result kept for storage."""

    quantized: Any  # what the quantizer returned (a QuantizedWeight for GPTQ)
    dequantized: Tensor  # m x n float64
    up: Tensor  # L: m x r float64 (orthonormal columns)
    down: Tensor  # R: r x n float64
    error: float  # relative output error of dequantized + up @ down
    rank: int
    # relative output error of each round, in order (round 0: plain quantization plus its correction)
    history: list[float] = field(default_factory=list)
    best_round: int = 0

    def weight(self) -> Tensor:
        return self.dequantized + self.up @ self.down


def _dequantized(result: Any) -> Tensor:
    out = result if isinstance(result, Tensor) else result.dequantize()
    return out.to(torch.float64)


def relative_output_error(weight: Tensor, approx: Tensor, gram: Tensor) -> float:
    """||(W - W') X^T||^2 / ||W X^T||^2 from G = X^T X, in float64 (0.0 when W X^T = 0)."""
    w, g = weight.to(torch.float64), gram.to(torch.float64)
    d = w - approx.to(torch.float64)
    den = float(((w @ g) * w).sum())
    return float(((d @ g) * d).sum()) / den if den > 0 else 0.0


def correction_factors(residual: Tensor, gram: Tensor, rank: int, damp: float = 0.0) -> tuple[Tensor, Tensor]:
    """The rank-r (L, R) minimising ||(residual - L R) X^T|| (under G damped by `damp`), float64."""
    m, n = residual.shape
    if rank == 0:
        return residual.new_zeros(m, 0, dtype=torch.float64), residual.new_zeros(0, n, dtype=torch.float64)
    r64 = residual.to(torch.float64)
    return factors_from_spectrum(r64, data_spectrum(r64, gram, damp), rank)


def gptq_quantizer(grid, *, damp: float = 0.01, act_order: bool = True, block_size: int = 128) -> Quantizer:
    """The project's GPTQ as a `Quantizer`: returns a QuantizedWeight (its grid, scales and levels)."""
    from lowrank_cli.methods.quantize.gptq import gptq_quantize

    def quantize(target: Tensor, gram: Tensor):
        return gptq_quantize(target, gram, grid, damp=damp, act_order=act_order, block_size=block_size)

    return quantize


def lowrank_correct(weight: Tensor, gram: Tensor, quantizer: Quantizer, rank: int, *, iterations: int = 2,
                    damp: float = 0.0) -> CorrectedWeight:
    """Q + L R for one layer, alternating `iterations` rounds after plain quantization (see the module doc).

    Args:
        weight: The m x n layer weight.
        gram: The n x n input Gram G = X^T X (float64 preferred); also the quantizer's Hessian.
        quantizer: quantizer(target, gram) -> Tensor or object with .dequantize() (`gptq_quantizer`).
        rank: Correction rank, 0..min(m, n); 0 is the quantizer alone.
        iterations: Rounds of (Q = quant(W - L R); L R = top-r(W - Q)) after the first.
        damp: Relative damping of G for the correction's spectrum (0: the exact optimum on the data).

    Raises:
        ValueError: On a rank outside 0..min(m, n), a negative iteration count or mismatched shapes.
    """
    m, n = weight.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(m, n):
        raise ValueError(f"rank must be an integer in [0, {min(m, n)}], got {rank!r}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if gram.shape != (n, n):
        raise ValueError(f"Gram must be {n} x {n} for a {m} x {n} weight, got {tuple(gram.shape)}")
    w = weight.detach().to(torch.float64)
    quantized = quantizer(w, gram)
    q = _dequantized(quantized)
    up, down = correction_factors(w - q, gram, rank, damp)
    best = CorrectedWeight(quantized, q, up, down, relative_output_error(w, q + up @ down, gram), rank)
    best.history.append(best.error)
    if rank == 0:
        return best  # nothing to alternate with: the quantizer's answer is final
    for round_ in range(1, iterations + 1):
        quantized = quantizer(w - up @ down, gram)
        q = _dequantized(quantized)
        up, down = correction_factors(w - q, gram, rank, damp)
        error = relative_output_error(w, q + up @ down, gram)
        best.history.append(error)
        if error < best.error:
            best.quantized, best.dequantized, best.up, best.down = quantized, q, up, down
            best.error, best.best_round = error, round_
    return best
