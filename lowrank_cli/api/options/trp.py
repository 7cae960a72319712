"""`TRPOptions`: every knob of a trp-train run."""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_cli.api.options import common
from lowrank_cli.api.options.fields import DATA_PANEL, TRAIN_PANEL, option, parse_patterns
from lowrank_cli.errors import UsageError

__all__ = ["TRPOptions"]

TRP = "TRP"


@dataclass
class TRPOptions:
    """Every knob of a trp-train run; TRP defaults follow the official code/README (period 5, energy 0.9,
    nuclear weight 3e-4); training defaults suit fine-tuning a pretrained LM (lr 1e-4)."""

    output: str | None = common.output()
    period: int = option(5, panel=TRP, help="Optimizer steps between truncations.")
    # fraction of squared singular values kept by each truncation
    energy: float = option(0.9, panel=TRP, help="Fraction of the squared singular values each truncation keeps, "
                           "in (0, 1].")
    nuclear_weight: float = option(3e-4, panel=TRP, help="Nuclear-norm weight lambda (sub-gradient added on "
                                   "truncation steps); 0: off.")
    final_energy: float = option(0.9, panel=TRP, help="Energy kept by the final factorization, in (0, 1].")
    # module-name patterns; None = every linear in the decoder blocks
    targets: list[str] | None = option(
        None, parse=parse_patterns, panel=TRP, help="Comma-separated module-name patterns (globs; a "
        "bare name like c_fc matches it in every block). Default: every linear layer inside the decoder blocks.")
    freeze_non_targets: bool = option(False, panel=TRP, help="Train only the targeted layers (default: every "
                                      "parameter, as the paper does).")
    svd: str = option("auto", panel=TRP, help="auto: randomized SVD for layers with min(m, n) >= 2048, exact "
                      "below; exact; randomized.")  # see methods/trp/svd.py
    data: str | None = option(None, panel=DATA_PANEL, help="Training data: .jsonl/.json/.parquet records, text "
                              "files, a glob, a folder, a datasets hub id, or 'stdlib' (default).")
    eval_data: str | None = option(None, panel=DATA_PANEL, help="Held-out data for the eval loss and the "
                                   "perplexities. Default: held out from --data by a stable hash (stdlib: its "
                                   "eval part).")
    text_field: str = common.text_field()
    max_seq_len: int = option(512, panel=DATA_PANEL, help="Tokens per example and per perplexity window.")
    eval_tokens: int = option(4096, panel=DATA_PANEL, help="Held-out tokens for the perplexities before and "
                              "after.")
    max_eval_examples: int = option(256, panel=DATA_PANEL, help="Held-out examples for the eval loss.")
    lr: float = option(1e-4, panel=TRAIN_PANEL, help="Peak learning rate (AdamW).")
    epochs: float | None = common.epochs()
    max_steps: int | None = common.max_steps()
    batch_size: int = common.train_batch_size()
    grad_accum: int = common.grad_accum()
    warmup: float = common.warmup()
    weight_decay: float = common.weight_decay()
    max_grad_norm: float = common.max_grad_norm()
    eval_every: int | None = common.eval_every()
    seed: int = common.seed()
    save_every: int | None = common.save_every()
    resume: bool = common.resume()
    checkpoint_dir: str | None = common.checkpoint_dir()  # default: OUT's hidden sibling .OUT.checkpoints
    max_shard_size: str = common.max_shard_size()
    device: str = common.device()
    overwrite: bool = common.overwrite()

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
