"""GPTQ (or round-to-nearest) as a modifier of the sequential pipeline (`lowrank_cli.engine.sequential`).

Each targeted linear's weight is replaced in place by its dequantized value, so later groups and blocks are
calibrated on (and the evaluation windows run through) the quantized model; the packed GPTQ tensors are
kept for the checkpoint.
"""

from __future__ import annotations

import logging

import torch

from lowrank_cli.engine.sequential import Modifier
from lowrank_cli.engine.targets import Target
from lowrank_cli.methods.quantize.gptq import NotPositiveDefinite, gptq_quantize, output_errors
from lowrank_cli.methods.quantize.grid import Grid, rtn_quantize
from lowrank_cli.methods.quantize.packing import pack

__all__ = ["Quantize", "quantize_layer", "packed_tensors"]

log = logging.getLogger("lowrank")


def quantize_layer(weight: torch.Tensor, gram: torch.Tensor | None, grid: Grid, *, method: str, damp: float,
                   act_order: bool, compare_rtn: bool = True):
    """(QuantizedWeight, its dequantized float64 weight, report) for one layer. `gram` = X^T X of its
    calibration inputs (None for rtn). `compare_rtn` adds round-to-nearest's output error on the same grid
    to the report (a reference for `quantize`; compress, which reports perplexities, skips its cost)."""
    rtn = rtn_quantize(weight, grid) if compare_rtn or method == "rtn" else None
    if method == "rtn":
        qw = rtn
    else:
        try:
            qw = gptq_quantize(weight, gram, grid, damp=damp, act_order=act_order)
        except NotPositiveDefinite:
            log.warning("Hessian not positive definite even after damping; using 10x the damping")
            qw = gptq_quantize(weight, gram, grid, damp=max(10 * damp, 0.1), act_order=act_order)
    report = {"shape": list(weight.shape)}
    deq = qw.dequantize()
    if gram is not None and rtn is not None:
        report["output_error"], report["rtn_output_error"] = output_errors(weight, [deq, rtn.dequantize()], gram)
    elif gram is not None:
        report["output_error"] = output_errors(weight, [deq], gram)[0]
    report["weight_error"] = float((weight.double() - deq).square().sum()
                                   / weight.double().square().sum().clamp(min=1e-300))
    return qw, deq, report


def packed_tensors(block, prefix: str, packed: dict[str, dict]):
    """The block's checkpoint tensors with each quantized linear's weight replaced by its packed tensors."""
    for key, tensor in block.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in packed and leaf == "weight":
            for part, value in packed[owner].items():
                yield f"{prefix}{owner}.{part}", value
            continue
        yield prefix + key, tensor


class Quantize(Modifier):
    """GPTQ / RTN on every target of the group, in place."""

    product_dtype = torch.float32  # GPTQ's 1% damping is far above float32 product rounding (2x faster)

    def __init__(self, grid: Grid, *, method: str = "gptq", damp: float = 0.01, act_order: bool = True,
                 compare_rtn: bool = True):
        self.grid, self.method, self.damp, self.act_order = grid, method, damp, act_order
        self.compare_rtn = compare_rtn
        self.needs_data = method != "rtn"
        self.packed: dict[str, dict] = {}

    def quantize(self, module, name: str, gram: torch.Tensor | None) -> dict:
        """Quantize one linear in place; its packed tensors are kept under `name` (local to the block)."""
        qw, deq, report = quantize_layer(module.weight.detach(), gram, self.grid, method=self.method,
                                         damp=self.damp, act_order=self.act_order, compare_rtn=self.compare_rtn)
        with torch.no_grad():
            module.weight.copy_(deq.to(module.weight.dtype))
        self.packed[name] = pack(qw)
        return report

    def modify(self, block, group: list[Target], grams) -> list[dict]:
        reports = []
        for t in group:
            gram = grams.gram(t.local) if grams is not None else None
            reports.append({"name": t.name, **self.quantize(block.get_submodule(t.local), t.local, gram)})
        return reports

    def tensors(self, block, prefix: str):
        return packed_tensors(block, prefix, self.packed)

    def undo(self, block) -> None:
        self.packed = {}
