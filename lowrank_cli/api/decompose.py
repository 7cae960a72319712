"""`lowrank decompose`: low-rank compression of a checkpoint's linear layers under a budget.

The per-layer factorization is LoRD's (data-aware, one-shot); the Fisher allocation, the sequential
calibration (Grams measured on the compressed model's own activations, which re-measures the inputs but
does not compensate upstream error) and the perplexity-budget search are this project's additions.

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
from lowrank_cli.errors import UsageError
from lowrank_cli.io.checkpoint import Checkpoint
from lowrank_cli.io.output import check_output_target
from lowrank_cli.io.resolve import resolve_model
from lowrank_cli.result import Result
from lowrank_cli.utils.progress import Progress

__all__ = ["DecomposeOptions", "DecomposeResult", "decompose", "METHODS", "ALLOCATIONS", "FORMATS"]

METHODS = ("lord", "svd")
ALLOCATIONS = ("fisher", "error", "uniform")
FORMATS = ("factorized", "dense")


@dataclass
class DecomposeOptions:
    """Every knob of a decompose run; defaults are the recommended setting."""

    output: str | None = None
    method: str = "lord"  # lord: data-aware optimum of ||(W - W')X||; svd: weights only
    target_ppl_increase: float | None = None  # fraction, 0.01 = 1%; the default budget when none is given
    params_ratio: float | None = None  # fraction of the targeted layers' parameters kept
    rank: int | None = None  # one rank for every targeted layer
    targets: list[str] | None = None  # module-name patterns; None = every linear in the decoder blocks
    allocation: str = "fisher"  # how ranks are spread across layers
    rank_multiple: int = 8  # ranks rounded to this (tensor-core and kernel friendly)
    calib: str | None = None  # calibration text; default: the stdlib's "calib" part
    calib_samples: int = 16
    calib_seq_len: int = 512
    eval_data: str | None = None  # evaluation text; default: the stdlib's "eval" part
    eval_tokens: int = 4096
    text_field: str = "text"
    sequential: bool = True
    damp: float = 0.01  # relative Gram damping (fraction of the mean diagonal)
    search_steps: int = 6  # full evaluations the perplexity search may spend
    format: str = "factorized"
    max_shard_size: str = "2GB"
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 1
    offload_dir: str | None = None
    overwrite: bool = False
    dry_run: bool = False
    seed: int = 0

    def budget_kind(self) -> str:
        given = [k for k in ("target_ppl_increase", "params_ratio", "rank") if getattr(self, k) is not None]
        if len(given) > 1:
            raise UsageError("give only one budget: --target-ppl-increase, --params-ratio or --rank "
                             f"(got {', '.join('--' + g.replace('_', '-') for g in given)})")
        return given[0] if given else "target_ppl_increase"

    def validate(self) -> None:
        kind = self.budget_kind()
        if self.method not in METHODS:
            raise UsageError(f"unknown --method '{self.method}' (choose {', '.join(METHODS)})")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"unknown --allocation '{self.allocation}' (choose {', '.join(ALLOCATIONS)})")
        if self.format not in FORMATS:
            raise UsageError(f"unknown --format '{self.format}' (choose {', '.join(FORMATS)})")
        if kind == "target_ppl_increase" and self.target_ppl_increase is not None and not (
                0 <= self.target_ppl_increase < 1):
            raise UsageError(f"--target-ppl-increase must be in [0%, 100%), got "
                             f"{self.target_ppl_increase:.4g} ({self.target_ppl_increase * 100:.4g}%)")
        if kind == "params_ratio" and not (0 < self.params_ratio <= 1):
            raise UsageError(f"--params-ratio must be in (0, 1], got {self.params_ratio}")
        if kind == "rank" and self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if self.rank_multiple < 1:
            raise UsageError("--rank-multiple must be at least 1")
        for name in ("calib_samples", "eval_tokens", "search_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.calib_seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2, got {self.calib_seq_len}")
        if self.damp < 0:
            raise UsageError("--damp must be >= 0")
        from lowrank_cli.io.writer import parse_size

        parse_size(self.max_shard_size)  # a bad size fails now, not after the compression work
        if not self.dry_run and not self.output:
            raise UsageError("an output folder is required: -o/--output OUT")


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
