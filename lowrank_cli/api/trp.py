"""`lowrank trp-train`: Trained Rank Pruning of a causal LM's linear layers, then factorization.

Flow:
  1. checks from configs alone: options, model folder (dense, full precision), output folder, --targets on
     the model's skeleton, a --resume checkpoint's fingerprint;
  2. data: train and held-out examples (`lowrank_cli.train.data`), perplexity windows (the eval protocol);
  3. perplexity of the original model; full-parameter training through the shared loop
     (`lowrank_cli.train.loop`) with `TRPCallback`: every --period steps each target is projected to its
     --energy truncated SVD and the nuclear sub-gradient is added;
  4. perplexity after training (dense); each target factorized at its --final-energy rank where below
     break-even; perplexity of the factorized model;
  5. write the factorized checkpoint in the format of `lowrank decompose` (loads with
     trust_remote_code=True), ranks over training (trp_ranks.jsonl / .png), loss curve, manifest.

Trainable parameters: by default every parameter (the paper trains the whole network; the layers between
the targets adapt to the truncations). --freeze-non-targets trains only the targeted linears.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowrank_cli.api.common import with_overrides
from lowrank_cli.api.options.trp import TRPOptions
from lowrank_cli.result import Result
from lowrank_cli.utils.progress import Progress

__all__ = ["TRPOptions", "TRPResult", "trp_train"]


@dataclass
class TRPResult(Result):
    model: str
    output: str | None
    params: dict  # model/targeted before and after, trainable during training
    perplexity: dict  # before, trained (dense), final (factorized), eval tokens
    ranks: dict  # final: module -> rank (factorized modules only)
    dense_layers: list  # targets left dense (at or above break-even)
    rank_history: dict  # first/last TRP step's mean rank fraction, TRP steps
    overhead: dict  # TRP's measured cost against plain steps
    training: dict  # steps, tokens, losses
    timings_s: dict = field(default_factory=dict)
    files: list = field(default_factory=list)

    def summary(self):
        p, q, o = self.params, self.perplexity, self.overhead
        return [
            ("model", self.model), ("output", self.output),
            ("model params", f"{p['model_before']:,} -> {p['model_after']:,} ({p['model_ratio']:.3f})"),
            ("targeted params", f"{p['targeted_before']:,} -> {p['targeted_after']:,} "
                                f"({p['targeted_ratio']:.3f})"),
            ("factorized layers", f"{len(self.ranks)} of {p['targeted_layers']}"),
            ("perplexity", f"{q['before']:.4f} -> {q['trained']:.4f} trained -> {q['final']:.4f} factorized"),
            ("steps", f"{self.training['steps']} ({self.rank_history['trp_steps']} TRP steps)"),
            ("TRP overhead", f"{o['trp_seconds']:.2f} s in SVDs ({_percent(o['total_fraction'])} of training); "
                             f"TRP step {_seconds(o['mean_trp_step_s'])} vs plain {_seconds(o['mean_plain_step_s'])}"),
            ("time", f"{sum(self.timings_s.values()):.1f} s"),
        ]


def _seconds(value) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def _percent(value) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"


def trp_train(model: str, opts: TRPOptions | None = None, progress: Progress | None = None,
              **overrides) -> TRPResult:
    """TRP-train MODEL and write the factorized result; see TRPOptions. UsageError (exit 2) on bad input."""
    from lowrank_cli.api import trp_flow

    opts = with_overrides(opts or TRPOptions(), overrides)
    opts.validate()
    return trp_flow.run(model, opts, progress or Progress())
