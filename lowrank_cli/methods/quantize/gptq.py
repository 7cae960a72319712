"""GPTQ (Frantar et al. 2022) for one linear layer, after the compact reference algorithm (IST-DASLab/gptq).

Columns of W ([out, in]) are rounded one at a time; the rounding error of column j is spread over the
columns not yet rounded through the inverse Hessian of the layer's input (H = 2 X X^T / n), which keeps
the layer's output error ||(W - Q) X|| small rather than the weight error. Implementation notes:
- H is accumulated in float64 by the caller, damped by a fraction of its mean diagonal and factorized in
  float64; we work with the upper Cholesky factor of H^-1 (as the reference does), so no explicit inverse is
  formed. The column loop works in float32 (`SOLVER_DTYPE`; in float64 it matches a direct float64 reference
  code for code);
- lazy batches: errors are applied to the remaining columns one block at a time (one matmul), which is
  the same arithmetic as the column-by-column algorithm, reordered;
- a group's scale and zero point are computed when the solver reaches its first column, from the
  already-updated weights. Blocks are aligned to groups so that the group's columns are up to date then
  (the reference uses stale columns when a group starts inside a block);
- act-order: columns in decreasing order of H's diagonal (largest input energy first); groups are then
  contiguous in that order, and g_idx maps each original column to its group.
Dead inputs (diag(H) = 0: never active in calibration) get H_jj = 1 and weight 0, as in the reference.
"""

from __future__ import annotations

import torch

# QuantizedWeight lives with the grid (round-to-nearest returns one too); re-exported here
from lowrank_cli.engine.calibration import output_energy
from lowrank_cli.methods.quantize.grid import Grid, QuantizedWeight, find_params
from lowrank_cli.utils.threads import single_thread_upto

__all__ = ["QuantizedWeight", "gptq_quantize", "output_error", "output_errors", "output_energies"]


# The column loop's working precision; the Hessian's Cholesky factors are always computed in float64. Measured on
# SmolLM2 (4-bit symmetric, groups of 64, 16 x 512 calibration, 4096 eval tokens): the whole solve in float64 gave
# eval perplexity 9.290; in float32, as the reference implementation and llm-compressor do, 9.514 and 9.595 (the
# second with H scaled by 1 + 1e-9: float32 factors of a Hessian damped by only 1% are that fragile); float64
# factors with a float32 loop 9.253, a little faster than all-float64.
SOLVER_DTYPE = torch.float32


class NotPositiveDefinite(ValueError):
    pass


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128, dtype: torch.dtype = SOLVER_DTYPE) -> QuantizedWeight:
    """Quantize `weight` [out, in] given the input Hessian `hessian` [in, in] (any positive scale); `dtype` is
    the solver's working precision (see SOLVER_DTYPE)."""
    # The column loop is thousands of small operations: one thread (see utils/threads.py)
    with single_thread_upto(weight, limit=8192):
        return _gptq(weight, hessian, grid, damp=damp, act_order=act_order, block_size=block_size, dtype=dtype)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, damp: float, act_order: bool,
          block_size: int, dtype: torch.dtype) -> QuantizedWeight:
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(torch.float64).clone()  # factorized in float64 whatever `dtype` (see SOLVER_DTYPE)
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    dev = W.device
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=dev)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=dev)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(dtype)
    except RuntimeError as exc:  # torch raises LinAlgError (a RuntimeError) when H is not SPD
        raise NotPositiveDefinite(f"the damped input Hessian is not positive definite ({exc})") from exc

    gs = cols if grid.group_size == -1 else grid.group_size
    step = gs if grid.group_size != -1 else block_size  # blocks aligned to groups (see module doc)
    # Transposed (one input column per row): every column the loop reads, rounds and updates is contiguous.
    WT = W.T.contiguous()
    QT = torch.zeros_like(WT)
    n_groups = grid.groups(cols)
    scales = torch.empty(n_groups, rows, dtype=dtype, device=dev)
    zeros = torch.empty(n_groups, rows, dtype=dtype, device=dev)
    scale = zero = offset = None
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        W1 = WT[i1:i2].clone()
        Err1 = torch.zeros_like(W1)  # each column's rounding error w - q
        # Rows of H^-1 divided by their diagonal, so the error needs no division per column: the update
        # err / d_i * Hinv[i, j] of the reference is err * (Hinv[i, j] / d_i).
        scaled = Hinv[i1:i2, i1:] / Hinv[i1:i2, i1:i2].diagonal().unsqueeze(1)
        # The column loop runs once per input column of every layer: few, fused, in-place ops (the
        # arithmetic of quantize/dequantize from grid.py, inlined; a rank-1 update with addr_).
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                scale, zero = find_params(W1[i:i + gs].T if grid.group_size != -1 else WT.T, grid)
                scale, zero = scale.to(dtype), zero.to(dtype)  # float16-representable: exact in float32
                scales[col // gs], zeros[col // gs] = scale, zero
                offset = zero * scale
            w, q, err = W1[i], QT[col], Err1[i]
            torch.div(w, scale, out=q).round_().add_(zero).clamp_(0, grid.maxq)
            torch.addcmul(w, q, scale, value=-1, out=err).add_(offset)  # w - (q - zero) * scale
            W1[i + 1:].addr_(scaled[i, i + 1:i2 - i1], err, alpha=-1)
        WT[i2:].addmm_(scaled[:, i2 - i1:].T, Err1, alpha=-1)

    inv = torch.argsort(perm)
    g_idx = (torch.arange(cols, device=dev) // gs)[inv]
    return QuantizedWeight(QT[inv].T.contiguous().to(torch.int32), scales.double(), zeros.to(torch.int32),
                           g_idx.to(torch.int32), grid)


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - W') X||^2 / ||W X||^2 from H = X X^T (any scale): the error GPTQ minimises, relative."""
    return output_errors(weight, [approx], hessian)[0]


def output_errors(weight: torch.Tensor, approxes: list[torch.Tensor], hessian: torch.Tensor) -> list[float]:
    """`output_error` of several approximations of one weight, sharing the denominator."""
    return output_energies(weight, approxes, hessian)[1]


def output_energies(weight: torch.Tensor, approxes: list[torch.Tensor], hessian: torch.Tensor):
    """(absolute, relative): each approximation's ||(W - W') X||^2 (`output_energy`) and that over ||W X||^2."""
    den = output_energy(weight, torch.zeros_like(weight), hessian)
    energies = [output_energy(weight, approx, hessian) for approx in approxes]
    return energies, [e / den if den > 0 else 0.0 for e in energies]
