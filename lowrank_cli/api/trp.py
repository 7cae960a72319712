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
from lowrank_cli.errors import UsageError
from lowrank_cli.result import Result
from lowrank_cli.utils.progress import Progress

__all__ = ["TRPOptions", "TRPResult", "trp_train"]


@dataclass
class TRPOptions:
    """Every knob of a trp-train run; TRP defaults follow the official code/README (period 5, energy 0.9,
    nuclear weight 3e-4); training defaults suit fine-tuning a pretrained LM (lr 1e-4)."""

    output: str | None = None
    data: str | None = None  # default: the stdlib's "train" part
    eval_data: str | None = None  # default: held out from --data (stdlib: its "eval" part)
    text_field: str = "text"
    period: int = 5  # optimizer steps between truncations
    energy: float = 0.9  # fraction of squared singular values kept by each truncation
    nuclear_weight: float = 3e-4  # lambda of the nuclear-norm sub-gradient; 0 = off
    final_energy: float = 0.9  # energy of the final factorization
    targets: list[str] | None = None  # module-name patterns; None = every linear in the decoder blocks
    freeze_non_targets: bool = False
    svd: str = "auto"  # auto | exact | randomized (see methods/trp/svd.py)
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 512
    warmup: float = 0.03
    max_grad_norm: float = 1.0
    eval_every: int | None = None
    max_eval_examples: int = 256
    eval_tokens: int = 4096  # perplexity before/after: tokens of held-out text
    save_every: int | None = None
    resume: bool = False
    checkpoint_dir: str | None = None  # default: OUT's hidden sibling .OUT.checkpoints
    max_shard_size: str = "2GB"
    device: str = "cpu"
    overwrite: bool = False
    seed: int = 0

    def validate(self) -> None:
        from lowrank_cli.methods.trp.svd import SVD_METHODS
        from lowrank_cli.train.loop import sharded_launch

        if sharded_launch():
            raise UsageError(f"trp-train takes the SVD of whole weights on every process; {sharded_launch()} "
                             "shards them: launch with plain data parallelism (DDP) instead")

        for name in ("energy", "final_energy"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
        if self.period < 1:
            raise UsageError(f"--period must be at least 1, got {self.period}")
        if self.nuclear_weight < 0:
            raise UsageError(f"--nuclear-weight must be >= 0, got {self.nuclear_weight}")
        if self.svd not in SVD_METHODS:
            raise UsageError(f"unknown --svd '{self.svd}' (choose {', '.join(SVD_METHODS)})")
        if not self.output:
            raise UsageError("an output folder is required: -o/--output OUT")
        if self.max_seq_len < 2:
            raise UsageError(f"--max-seq-len must be at least 2, got {self.max_seq_len}")
        if self.eval_tokens < self.max_seq_len:
            raise UsageError(f"--eval-tokens ({self.eval_tokens}) must be at least --max-seq-len "
                             f"({self.max_seq_len})")
        if self.max_eval_examples < 1:
            raise UsageError("--max-eval-examples must be at least 1")
        from lowrank_cli.io.writer import parse_size

        parse_size(self.max_shard_size)
        self.loop_config({}).validate()

    def loop_config(self, fingerprint: dict):
        from lowrank_cli.train.loop import LoopConfig

        return LoopConfig(lr=self.lr, weight_decay=self.weight_decay, epochs=self.epochs,
                          max_steps=self.max_steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
                          warmup=self.warmup, max_grad_norm=self.max_grad_norm or None,
                          device="cpu" if self.device == "cpu" else "auto", seed=self.seed,
                          eval_every=self.eval_every, save_every=self.save_every, fingerprint=fingerprint)

    def fingerprint(self, model_fingerprint: str) -> dict:
        keep = ("period", "energy", "nuclear_weight", "targets", "freeze_non_targets", "svd", "data",
                "eval_data", "text_field", "max_seq_len", "max_eval_examples")
        return {"model": model_fingerprint, "method": "trp", "options": {k: getattr(self, k) for k in keep}}


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
