"""`lowrank decompose`: LoRD low-rank compression of a checkpoint's linear layers under a budget.

Flow (every model pass streams one decoder block at a time):
  1. profile: the original model over calibration text -> each layer's error-versus-rank curve, and over
     evaluation text -> the baseline perplexity;
  2. sensitivity (allocation "fisher"): one streamed backward pass -> loss per unit of output error;
  3. allocation: ranks from the curves for a kept-parameter fraction (or one rank everywhere);
  4. compress: factorize block by block (sequential calibration) while measuring perplexity; for
     --target-ppl-increase, bisection over the kept fraction repeats this step a few times;
  5. write the winner: shards, config (+ modeling file), side files, manifest; rename into place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowrank_cli.api.common import check_device, with_overrides
from lowrank_cli.api.options.decompose import ALLOCATIONS, FORMATS, METHODS, DecomposeOptions
from lowrank_cli.errors import UsageError
from lowrank_cli.io.checkpoint import Checkpoint
from lowrank_cli.io.output import check_output_target
from lowrank_cli.io.resolve import resolve_model
from lowrank_cli.result import Result
from lowrank_cli.utils.progress import Progress

__all__ = ["DecomposeOptions", "DecomposeResult", "decompose", "METHODS", "ALLOCATIONS", "FORMATS"]


@dataclass
class DecomposeResult(Result):
    model: str
    output: str | None
    method: str
    allocation: str
    budget: dict
    dry_run: bool
    params: dict  # model-level and targeted-layer counts, before and after
    perplexity: dict  # baseline, final, increase, budget limit
    ranks: dict  # module -> rank (dense modules omitted)
    dense_layers: list
    evaluations: list  # one entry per full evaluation (the search's history)
    plan: list  # layer kinds, shapes, break-even ranks
    memory: dict  # estimated peak bytes by component; measured peaks
    timings_s: dict = field(default_factory=dict)

    def summary(self):
        p, q = self.params, self.perplexity
        rows = [("model", self.model), ("method", f"{self.method} ({self.allocation} allocation)")]
        if self.dry_run:
            rows += [("dry run", "nothing written"), ("targeted layers", p.get("targeted_layers")),
                     ("targeted params", p.get("targeted_before")), ("model params", p.get("model_before")),
                     ("est. peak memory", f"{self.memory.get('total', 0) / 2**20:.1f} MiB"),
                     ("est. output size", f"{self.memory['output']['bytes'] / 2**20:.1f} MiB "
                                          f"({self.memory['output']['kind']})")]
            rows += [(f"  {r['layer']} x{r['count']}", f"{r['shape'][0]}x{r['shape'][1]}, break-even rank "
                      f"{r['break_even_rank']}") for r in self.plan]
            return rows
        rows += [
            ("output", self.output),
            ("model params", f"{p['model_before']:,} -> {p['model_after']:,} ({p['model_ratio']:.3f})"),
            ("targeted params", f"{p['targeted_before']:,} -> {p['targeted_after']:,} "
                                f"({p['targeted_ratio']:.3f})"),
            ("factorized layers", f"{len(self.ranks)} of {p['targeted_layers']}"),
            ("perplexity", f"{q['baseline']:.4f} -> {q['final']:.4f} ({q['increase'] * 100:+.2f}%)"),
            ("evaluations", len(self.evaluations)),
            ("time", f"{sum(self.timings_s.values()):.1f} s"),
        ]
        return rows


def decompose(model: str, opts: DecomposeOptions | None = None, progress: Progress | None = None,
              **overrides) -> DecomposeResult:
    """Compress MODEL; see DecomposeOptions. Raises UsageError (2) or BudgetNotMet (3)."""
    from lowrank_cli.api import decompose_flow

    opts = with_overrides(opts or DecomposeOptions(), overrides)
    opts.validate()
    path = resolve_model(model)
    if opts.output and not opts.dry_run:
        check_output_target(opts.output, overwrite=opts.overwrite, inputs=[path])
    check_device(opts.device)
    ckpt = Checkpoint(path)
    if ckpt.quantization:
        raise UsageError(f"'{model}' is quantized ({ckpt.quantization.get('quant_method', '?')}); "
                         "decompose a full-precision checkpoint, then quantize the result")
    return decompose_flow.run(model, path, ckpt, opts, progress or Progress())
