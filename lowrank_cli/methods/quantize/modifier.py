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
from lowrank_cli.methods.quantize.gptq import NotPositiveDefinite, gptq_quantize, output_energies
from lowrank_cli.methods.quantize.grid import Grid, rtn_quantize
from lowrank_cli.methods.quantize.packing import pack

__all__ = ["Quantize", "quantize_layer", "quantize_layers", "packed_tensors"]

log = logging.getLogger("lowrank")


def quantize_layer(weight: torch.Tensor, gram: torch.Tensor | None, grid: Grid, *, method: str, damp: float,
                   act_order: bool, compare_rtn: bool = True):
    """(QuantizedWeight, its dequantized float64 weight, report) for one layer. `gram` = X^T X of its
    calibration inputs (None for rtn). `compare_rtn` adds round-to-nearest's output error on the same grid
    to the report (a reference for `quantize`; compress, which reports perplexities, skips its cost)."""
    return quantize_layers([weight], gram, grid, method=method, damp=damp, act_order=act_order,
                           compare_rtn=compare_rtn)[0]


def quantize_layers(weights: list[torch.Tensor], gram: torch.Tensor | None, grid: Grid, *, method: str,
                    damp: float, act_order: bool, compare_rtn: bool = True) -> list[tuple]:
    """`quantize_layer` for layers that read the same input (q/k/v, gate/up): one solve on their weights
    stacked by rows. GPTQ treats rows independently given the shared Hessian (a row's grid, rounding and
    error feedback involve that row and H only), so this is the per-layer result with one column loop
    instead of one per layer: the loop's per-column overhead dominates GPTQ's time on CPU."""
    stacked = weights[0] if len(weights) == 1 else torch.cat([w.detach() for w in weights], dim=0)
    rtn = rtn_quantize(stacked, grid) if compare_rtn or method == "rtn" else None
    if method == "rtn":
        qw = rtn
    else:
        try:
            qw = gptq_quantize(stacked, gram, grid, damp=damp, act_order=act_order)
        except NotPositiveDefinite:
            log.warning("Hessian not positive definite even after damping; using 10x the damping")
            qw = gptq_quantize(stacked, gram, grid, damp=max(10 * damp, 0.1), act_order=act_order)
    out, start = [], 0
    for weight in weights:
        rows = slice(start, start + weight.shape[0])
        start = rows.stop
        part, part_rtn = qw.rows(rows), rtn.rows(rows) if rtn is not None else None
        out.append((part, *_report(weight, part, part_rtn, gram)))
    return out


def _report(weight: torch.Tensor, qw, rtn, gram) -> tuple[torch.Tensor, dict]:
    report = {"shape": list(weight.shape)}
    deq = qw.dequantize()
    if gram is not None:
        energies, errors = output_energies(weight, [deq] + ([rtn.dequantize()] if rtn is not None else []), gram)
        # the absolute energy is what compress's prediction reads (engine/sequential.py reuses it)
        report["output_energy"], report["output_error"] = energies[0], errors[0]
        if rtn is not None:
            report["rtn_output_error"] = errors[1]
    report["weight_error"] = float((weight.double() - deq).square().sum()
                                   / weight.double().square().sum().clamp(min=1e-300))
    return deq, report


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
        self._store(module, name, qw, deq)
        return report

    def _store(self, module, name: str, qw, deq) -> None:
        with torch.no_grad():
            module.weight.copy_(deq.to(module.weight.dtype))
        self.packed[name] = pack(qw)

    def modify(self, block, group: list[Target], grams) -> list[dict]:
        """The group's layers that read one input (one Gram) are solved together (`quantize_layers`)."""
        shared: dict[int, tuple] = {}  # id(Gram) -> (Gram, the targets that read it)
        for t in group:
            gram = grams.gram(t.local) if grams is not None else None
            shared.setdefault(id(gram), (gram, []))[1].append(t)
        reports = []
        for gram, targets in shared.values():
            modules = [block.get_submodule(t.local) for t in targets]
            if len({(m.weight.shape[1], m.weight.dtype) for m in modules}) > 1:  # cannot stack: one by one
                for t, module in zip(targets, modules, strict=True):
                    reports.append({"name": t.name, **self.quantize(module, t.local, gram)})
                continue
            solved = quantize_layers([m.weight.detach() for m in modules], gram, self.grid, method=self.method,
                                     damp=self.damp, act_order=self.act_order, compare_rtn=self.compare_rtn)
            for t, module, (qw, deq, report) in zip(targets, modules, solved, strict=True):
                self._store(module, t.local, qw, deq)
                reports.append({"name": t.name, **report})
        return reports

    def tensors(self, block, prefix: str):
        return packed_tensors(block, prefix, self.packed)

    def undo(self, block) -> None:
        self.packed = {}
