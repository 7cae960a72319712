"""The streaming GPTQ pass: one decoder block in memory at a time, each block calibrated on the outputs of
the already-quantized blocks before it, and inside a block one input group at a time (q/k/v, then o, ...),
so every layer's Hessian sees the error of everything quantized upstream of it.

The evaluation windows ride along through the quantized blocks, so the same pass yields the quantized
model's perplexity. No file is touched here: checkpoint tensors go to `sink(name, tensor)`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lowrank_cli.engine.calibration import InputGrams, run_stored
from lowrank_cli.eval.perplexity import NLL
from lowrank_cli.methods.decompose.targets import by_block
from lowrank_cli.methods.quantize.gptq import NotPositiveDefinite, gptq_quantize, output_errors
from lowrank_cli.methods.quantize.grid import Grid, rtn_quantize
from lowrank_cli.methods.quantize.packing import pack

__all__ = ["QuantizePassOutcome", "quantize_pass", "quantize_layer"]

log = logging.getLogger("lowrank")


@dataclass
class QuantizePassOutcome:
    nll: NLL
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def quantize_layer(weight: torch.Tensor, gram: torch.Tensor | None, grid: Grid, *, method: str, damp: float,
                   act_order: bool):
    """(QuantizedWeight, its dequantized float64 weight, report) for one layer. `gram` = X^T X of its
    calibration inputs (None for rtn)."""
    rtn = rtn_quantize(weight, grid)
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
    if gram is not None:
        report["output_error"], report["rtn_output_error"] = output_errors(weight, [deq, rtn.dequantize()], gram)
    report["weight_error"] = float((weight.double() - deq).square().sum()
                                   / weight.double().square().sum().clamp(min=1e-300))
    return qw, deq, report


def _quantize_in_place(module, gram, grid: Grid, *, method: str, damp: float, act_order: bool):
    """Quantize one linear's weight in place (later groups and blocks see the quantized layer); returns its
    packed checkpoint tensors and its report."""
    qw, deq, report = quantize_layer(module.weight.detach(), gram, grid, method=method, damp=damp,
                                     act_order=act_order)
    with torch.no_grad():
        module.weight.copy_(deq.to(module.weight.dtype))
    return pack(qw), report


def quantize_pass(streamed, calib, evalw, targets, grid: Grid, *, method: str, damp: float, act_order: bool,
                  batch_size: int, sink: Callable, progress=None) -> QuantizePassOutcome:
    """Quantize every target (block linears) in place, block by block; packed tensors and the block's other
    tensors go to `sink`; returns the quantized model's NLL on `evalw` and per-layer reports."""
    start = time.perf_counter()
    need_calib = method != "rtn"
    acts_c = streamed.capture(calib, batch_size) if need_calib else None
    acts_e = streamed.capture(evalw, batch_size)
    targets_of = by_block(targets)
    kw = dict(method=method, damp=damp, act_order=act_order)
    reports: list[dict] = []
    for i in range(streamed.num_blocks):
        t0 = time.perf_counter()
        block = streamed.load_block(i)
        mine = {t.local: t for t in targets_of.get(i, [])}
        packed: dict[str, dict] = {}
        if mine and method == "rtn":  # no data needed: round every layer where it is
            for local, target in mine.items():
                packed[local], report = _quantize_in_place(block.get_submodule(local), None, grid, **kw)
                reports.append({"name": target.name, **report})
        elif mine:
            with InputGrams(block, list(mine)) as probe:  # learn the input groups and their order
                run_stored(block, acts_c, i, keep=False, batches=1)
            for group in probe.groups():
                with InputGrams(block, group, halt=True, product_dtype=torch.float32) as grams:
                    run_stored(block, acts_c, i, keep=False)
                for local in group:
                    packed[local], report = _quantize_in_place(block.get_submodule(local), grams.gram(local), grid,
                                                               **kw)
                    reports.append({"name": mine[local].name, **report})
                del grams
        if need_calib:
            new_c = run_stored(block, acts_c, i, keep=True)
            acts_c.release()
            acts_c = new_c
        new_e = run_stored(block, acts_e, i, keep=True)
        acts_e.release()
        acts_e = new_e
        prefix = streamed.block_prefix(i)
        for key, tensor in block.state_dict().items():
            owner, _, leaf = key.rpartition(".")
            if owner in packed:
                if leaf == "weight":
                    for part, value in packed[owner].items():
                        sink(f"{prefix}{owner}.{part}", value)
                    continue
            sink(prefix + key, tensor)
        streamed.free_block(i)
        log.debug("block %d/%d quantized in %.1fs", i + 1, streamed.num_blocks, time.perf_counter() - t0)
        if progress:
            progress()
    nll = NLL(*streamed.head_nll(acts_e, evalw, batch_size))
    acts_e.release()
    if acts_c is not None:
        acts_c.release()
    return QuantizePassOutcome(nll, reports, time.perf_counter() - start)
