"""Bytes of a GPTQ checkpoint before it is written: exact, from the shapes alone (for --dry-run and for
compress, which prices candidates before running them)."""

from __future__ import annotations

import math

from lowrank_cli.engine.targets import Target

__all__ = ["packed_layer_bytes", "quantized_checkpoint_bytes"]


def packed_layer_bytes(m: int, n: int, bits: int, group_size: int) -> int:
    """qweight (n x m levels, packed into int32), qzeros (packed int32), scales (float16), g_idx (int32)."""
    groups = 1 if group_size == -1 else math.ceil(n / group_size)
    return n * m * bits // 8 + groups * m * bits // 8 + groups * m * 2 + n * 4


def quantized_checkpoint_bytes(ckpt, targets: list[Target], bits: int, group_size: int,
                               ranks: dict[str, int] | None = None) -> int:
    """The weight files' bytes of a GPTQ output: targeted linears packed, every other float in float16
    (as `quantize` writes them). With `ranks`, target NAME is first factorized to up (m x r) and down (r x n),
    both packed (a rank of None keeps the layer dense)."""
    total = 0
    packed = {t.name + ".weight": t for t in targets}
    for name, info in ckpt.tensors.items():
        t = packed.get(name)
        if t is None:
            total += info.numel * 2 if info.float_dtype is not None else info.nbytes
            continue
        r = (ranks or {}).get(t.name)
        if r is None:
            total += packed_layer_bytes(t.m, t.n, bits, group_size)
        else:
            total += packed_layer_bytes(t.m, r, bits, group_size) + packed_layer_bytes(r, t.n, bits, group_size)
    return total
