"""GPTQ checkpoint tensors ("v1" layout, as transformers + optimum + gptqmodel load them).

Per quantized linear with `in` input and `out` output features, `bits` in {2, 3, 4, 8}:

    qweight  int32 [in * bits / 32, out]   levels packed along the input dimension
    qzeros   int32 [groups, out * bits / 32]  zero point minus one, packed along the output dimension
    scales   float16 [groups, out]
    g_idx    int32 [in]                    group of each input column

Packing is one rule for every bit width: each run of 32 values is a little-endian bit stream of 32 * bits
bits spread over `bits` consecutive int32 words, value j at bit offset j * bits. For 2, 4 and 8 bits no
value crosses a word; for 3 bits two of the 32 do (the "10 | 1 | 10 | 1 | 10" layout gptqmodel documents).
So `in` and `out` must be multiples of 32 (gptqmodel's packer requires the same).
"""

from __future__ import annotations

import torch

from lowrank_cli.methods.quantize.grid import Grid, QuantizedWeight

__all__ = ["pack", "unpack", "pack_bits", "unpack_bits", "packable", "SUPPORTED_BITS"]

SUPPORTED_BITS = (2, 3, 4, 8)
_MASK32 = (1 << 32) - 1


def packable(in_features: int, out_features: int) -> str | None:
    """None if a layer of this shape can be packed, else the reason."""
    bad = [f"{what} {n}" for what, n in (("in_features", in_features), ("out_features", out_features))
           if n % 32]
    return f"{' and '.join(bad)} not a multiple of 32" if bad else None


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer `values` [n, k] (each in [0, 2^bits)) along dim 0 into int32 [n * bits / 32, k]."""
    n, k = values.shape
    if n % 32:
        raise ValueError(f"cannot pack {n} values along the packed dimension: not a multiple of 32")
    v = values.to(torch.int64).reshape(n // 32, 32, k)
    out = torch.zeros(n // 32, bits, k, dtype=torch.int64)
    for j in range(32):
        offset = j * bits
        word, shift = divmod(offset, 32)
        out[:, word] |= (v[:, j] << shift) & _MASK32
        spill = shift + bits - 32
        if spill > 0:  # the value's high bits continue in the next word
            out[:, word + 1] |= v[:, j] >> (bits - spill)
    out = out.reshape(n // 32 * bits, k)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_bits: int32 [n * bits / 32, k] -> int64 [n, k]."""
    rows, k = packed.shape
    words = (packed.to(torch.int64) & _MASK32).reshape(rows // bits, bits, k)
    out = torch.zeros(rows // bits, 32, k, dtype=torch.int64)
    mask = (1 << bits) - 1
    for j in range(32):
        offset = j * bits
        word, shift = divmod(offset, 32)
        val = words[:, word] >> shift
        spill = shift + bits - 32
        if spill > 0:
            val = val | (words[:, word + 1] << (bits - spill))
        out[:, j] = val & mask
    return out.reshape(rows // bits * 32, k)


def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The four checkpoint tensors of one layer (names without the module prefix)."""
    bits = qw.grid.bits
    qw = QuantizedWeight(qw.q.cpu(), qw.scales.cpu(), qw.zeros.cpu(), qw.g_idx.cpu(), qw.grid)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits {bits}")
    out_f, in_f = qw.q.shape
    reason = packable(in_f, out_f)
    if reason:
        raise ValueError(reason)
    qweight = pack_bits(qw.q.T.contiguous(), bits)  # [in, out] packed along in
    stored = (qw.zeros.to(torch.int64) - 1) & ((1 << bits) - 1)  # v1 stores zero - 1 (zero >= 1, see grid)
    qzeros = pack_bits(stored.T.contiguous(), bits).T.contiguous()  # [groups, out] packed along out
    return {"qweight": qweight, "qzeros": qzeros, "scales": qw.scales.to(torch.float16),
            "g_idx": qw.g_idx.to(torch.int32)}


def unpack(tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool = True) -> QuantizedWeight:
    """Read back a layer's tensors (ours or another GPTQ v1 writer's)."""
    q = unpack_bits(tensors["qweight"], bits).T.contiguous()  # [out, in]
    zeros = unpack_bits(tensors["qzeros"].T.contiguous(), bits).T + 1  # [groups, out]
    zeros = zeros & ((1 << bits) - 1) if bits < 32 else zeros  # v1 writers that stored -1 wrap to 0
    scales = tensors["scales"].to(torch.float64)
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(q.shape[1]) // (q.shape[1] if group_size == -1 else group_size)
    return QuantizedWeight(q.to(torch.int32), scales, zeros.to(torch.int32), g_idx.to(torch.int32),
                           Grid(bits, group_size, sym))
