"""The integer grid a weight group is rounded to: w ~ scale * (q - zero), q in [0, 2^bits - 1].

Scales and zero points are chosen per output row and per group of input columns, from the group's range
(min/max, always including 0 so that zero weights stay exact). Symmetric grids put the zero point in the
middle, 2^(bits-1), as GPTQ checkpoints expect.

Asymmetric zero points are kept in [1, 2^bits - 1]: GPTQ "v1" checkpoints store zero - 1 in a `bits`-wide
field, so a zero point of 0 would be written as -1 and corrupt its neighbour when loaders add the 1 back.
A group whose range would need zero point 0 (all weights >= 0) gets a scale that fits the grid shifted by
one step instead, a loss of one level out of 2^bits for those rare groups only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Grid", "QuantizedWeight", "find_params", "quantize", "dequantize", "rtn_quantize"]


@dataclass(frozen=True)
class Grid:
    bits: int = 4
    group_size: int = 128  # input columns per group; -1 = one group per row (per channel)
    sym: bool = True

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def groups(self, columns: int) -> int:
        return 1 if self.group_size == -1 else -(-columns // self.group_size)


@dataclass
class QuantizedWeight:
    """Integer levels and grid of one weight, in the original column order."""

    q: torch.Tensor  # [out, in] int32 levels in [0, 2^bits - 1]
    scales: torch.Tensor  # [groups, out] float64 (float16-representable)
    zeros: torch.Tensor  # [groups, out] int32
    g_idx: torch.Tensor  # [in] int32: group of each input column
    grid: Grid

    def rows(self, rows: slice) -> QuantizedWeight:
        """The output rows `rows` (a layer of a row-stacked solve), as a weight of their own."""
        if rows.start == 0 and rows.stop == self.q.shape[0]:
            return self
        return QuantizedWeight(self.q[rows].contiguous(), self.scales[:, rows].contiguous(),
                               self.zeros[:, rows].contiguous(), self.g_idx, self.grid)

    def dequantize(self) -> torch.Tensor:
        """The float64 weight [out, in] this represents."""
        g = self.g_idx.long()
        return self.scales.T[:, g] * (self.q.double() - self.zeros.T[:, g].double())


def find_params(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (both [rows], float) for the columns of `w` ([rows, cols]), computed in float64."""
    w = w.double()
    maxq = grid.maxq
    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    if grid.sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    if grid.sym:
        scale = (hi - lo) / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / scale)
        # zero point 0 is not storable in GPTQ v1 (see module doc): fit [0, hi] into levels 1..maxq instead.
        low = zero < 1
        scale = torch.where(low, hi / (maxq - 1), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    # Checkpoints store scales in float16: round here so the solver's error feedback sees the stored grid.
    scale = scale.clamp(min=torch.finfo(torch.float16).tiny).to(torch.float16).double()
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer levels of `w` ([rows] or [rows, cols]) on the grid (scale, zero per row)."""
    if w.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if q.dim() == 2:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return scale * (q - zero)


def rtn_quantize(weight: torch.Tensor, grid: Grid):
    """Round-to-nearest baseline, same grid and output as `gptq.gptq_quantize` (no data, no error feedback)."""
    w = weight.detach().double()
    rows, cols = w.shape
    gs = cols if grid.group_size == -1 else grid.group_size
    n_groups = grid.groups(cols)
    q = torch.empty_like(w)
    scales = torch.empty(n_groups, rows, dtype=torch.float64, device=w.device)
    zeros = torch.empty(n_groups, rows, dtype=torch.float64, device=w.device)
    for g in range(n_groups):
        sl = slice(g * gs, min(cols, (g + 1) * gs))
        scale, zero = find_params(w[:, sl], grid)
        q[:, sl] = quantize(w[:, sl], scale, zero, grid.maxq)
        scales[g], zeros[g] = scale, zero
    g_idx = torch.arange(cols, device=w.device) // gs
    return QuantizedWeight(q.to(torch.int32), scales, zeros.to(torch.int32), g_idx.to(torch.int32), grid)
