"""`lowrank trp-train`: Trained Rank Pruning of a causal LM's linear layers, then factorization.

Flow:
  1. checks from configs alone: options, model folder (dense, full precision), output folder, --targets on
     the model's skeleton, a --resume checkpoint's fingerprint;
  2. data: train and held-out examples (`lowrank_cli.train.data`), perplexity windows (the eval protocol);
  3. perplexity of the original model; full-parameter training through the shared loop
     (`lowrank_cli.train.loop`) with --optimizer (SGD momentum 0.9 by default, as the paper) and
     `TRPCallback`: every --period steps each target is projected to its --energy truncated SVD and the
     nuclear sub-gradient is added;
  4. perplexity after training (dense); each target factorized where below break-even, at the rank the
     --final-rule gives (default: singular values >= --final-threshold, the authors' rule; or
     --final-energy); perplexity of the factorized model;
  5. write the factorized checkpoint in the format of `lowrank decompose` (loads with
     trust_remote_code=True), ranks over training (trp_ranks.jsonl / .png), loss curve, manifest.

Trainable parameters: by default every parameter (the paper trains the whole network; the layers between
the targets adapt to the truncations). --freeze-non-targets trains only the targeted linears.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lowrank_cli.api import trp_flow
from lowrank_cli.api.common import with_overrides
from lowrank_cli.api.trp_flow import TRPResult
from lowrank_cli.errors import UsageError
from lowrank_cli.utils.progress import Progress

__all__ = ["TRPOptions", "TRPResult", "trp_train", "FINAL_RULES"]

FINAL_RULES = ("threshold", "energy")


@dataclass
class TRPOptions:
    """Every knob of a trp-train run. TRP follows the paper's code: SGD with momentum 0.9, a truncation
    every 5 steps, the nuclear weight 3e-4, the final factorization by a singular-value threshold (0.05).
    `lr` and `nuclear_weight` left None take the optimizer's defaults (`methods/trp/optim.py`, with the
    reasons). The training `energy` is 0.99, not the paper's 0.9: each truncation removes 1 - energy of
    what is left, and 0.9 collapses a pretrained LM within tens of steps (README, TRP benchmark)."""

    output: str | None = None
    data: str | None = None  # default: the stdlib's "train" part
    eval_data: str | None = None  # default: held out from --data (stdlib: its "eval" part)
    text_field: str = "text"
    period: int = 5  # optimizer steps between truncations
    energy: float = 0.99  # fraction of squared singular values kept by each truncation
    nuclear_weight: float | None = None  # lambda of the nuclear-norm sub-gradient; 0 = off; None: per optimizer
    optimizer: str = "sgd"  # sgd (momentum 0.9, the paper's) | adamw
    final_rule: str = "threshold"  # threshold (the authors' rule) | energy
    final_threshold: float = 0.05  # keep singular values >= this (absolute), the authors' ValueThreshold(0.05)
    final_energy: float = 0.99  # energy kept by the final factorization when final_rule = "energy"
    targets: list[str] | None = None  # module-name patterns; None = every linear in the decoder blocks
    freeze_non_targets: bool = False
    svd: str = "auto"  # auto | exact | randomized (see methods/trp/svd.py)
    lr: float | None = None  # None: per optimizer
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
        from lowrank_cli.methods.trp.optim import OPTIMIZERS
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
        if self.nuclear_weight is not None and self.nuclear_weight < 0:
            raise UsageError(f"--nuclear-weight must be >= 0, got {self.nuclear_weight}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown --optimizer '{self.optimizer}' (choose {', '.join(OPTIMIZERS)})")
        if self.final_rule not in FINAL_RULES:
            raise UsageError(f"unknown --final-rule '{self.final_rule}' (choose {', '.join(FINAL_RULES)})")
        if self.final_threshold < 0:
            raise UsageError(f"--final-threshold must be >= 0, got {self.final_threshold}")
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
        self.resolved().loop_config({}).validate()

    def resolved(self) -> TRPOptions:
        """A copy with lr and nuclear_weight filled in from the optimizer's defaults where left None."""
        from lowrank_cli.methods.trp.optim import DEFAULTS

        d = DEFAULTS[self.optimizer]
        return replace(self, lr=d["lr"] if self.lr is None else self.lr,
                       nuclear_weight=d["nuclear_weight"] if self.nuclear_weight is None else self.nuclear_weight)

    def loop_config(self, fingerprint: dict):
        from lowrank_cli.train.loop import LoopConfig

        return LoopConfig(lr=self.lr, weight_decay=self.weight_decay, epochs=self.epochs,
                          max_steps=self.max_steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
                          warmup=self.warmup, max_grad_norm=self.max_grad_norm or None,
                          device="cpu" if self.device == "cpu" else "auto", seed=self.seed,
                          eval_every=self.eval_every, save_every=self.save_every, fingerprint=fingerprint)

    def fingerprint(self, model_fingerprint: str) -> dict:
        keep = ("period", "energy", "nuclear_weight", "optimizer", "targets", "freeze_non_targets", "svd", "data",
                "eval_data", "text_field", "max_seq_len", "max_eval_examples")
        return {"model": model_fingerprint, "method": "trp", "options": {k: getattr(self, k) for k in keep}}


def trp_train(model: str, opts: TRPOptions | None = None, progress: Progress | None = None,
              **overrides) -> TRPResult:
    """TRP-train MODEL and write the factorized result; see TRPOptions. UsageError (exit 2) on bad input."""
    opts = with_overrides(opts or TRPOptions(), overrides)
    opts.validate()
    opts = opts.resolved()
    return trp_flow.run(model, opts, progress or Progress())
