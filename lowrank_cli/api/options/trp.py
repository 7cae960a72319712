"""`TRPOptions`: every knob of a trp-train run."""

from __future__ import annotations

from dataclasses import dataclass, replace

from lowrank_cli.api.options import common
from lowrank_cli.api.options.fields import DATA_PANEL, TRAIN_PANEL, option, parse_patterns
from lowrank_cli.errors import UsageError

__all__ = ["TRPOptions", "FINAL_RULES"]

TRP = "TRP"


FINAL_RULES = ("threshold", "energy")


@dataclass
class TRPOptions:
    """Every knob of a trp-train run. TRP follows the paper's code: SGD with momentum 0.9, a truncation
    every 5 steps, the nuclear weight 3e-4, the final factorization by a singular-value threshold (0.05).
    `lr` and `nuclear_weight` left None take the optimizer's defaults (`methods/trp/optim.py`, with the
    reasons). The training `energy` is 0.99, not the paper's 0.9: each truncation removes 1 - energy of
    what is left, and 0.9 collapses a pretrained LM within tens of steps (README, TRP benchmark)."""

    output: str | None = common.output()
    period: int = option(5, panel=TRP, help="Optimizer steps between truncations.")
    # fraction of squared singular values kept by each truncation
    energy: float = option(0.99, panel=TRP, help="Fraction of the squared singular values each truncation keeps, "
                           "in (0, 1]. The paper's 0.9 collapses a pretrained LM.")
    # None: per optimizer (methods/trp/optim.py DEFAULTS)
    nuclear_weight: float | None = option(None, panel=TRP, help="Nuclear-norm weight lambda (sub-gradient added "
                                          "on truncation steps); 0: off. Default per optimizer: sgd 3e-4 (the "
                                          "paper's), adamw 0.")
    final_rule: str = option("threshold", panel=TRP, help="Rank of the final factorization: threshold (singular "
                             "values >= --final-threshold, the authors' rule) or energy (--final-energy).")
    final_threshold: float = option(0.05, panel=TRP, help="Smallest singular value kept by --final-rule threshold "
                                    "(absolute).")
    final_energy: float = option(0.99, panel=TRP, help="Energy kept by --final-rule energy, in (0, 1].")
    optimizer: str = option("sgd", panel=TRAIN_PANEL, help="sgd (momentum 0.9, the paper's) or adamw.")
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
    # None: per optimizer (methods/trp/optim.py DEFAULTS)
    lr: float | None = option(None, panel=TRAIN_PANEL, help="Peak learning rate. Default per optimizer: sgd "
                              "1e-3, adamw 1e-4.")
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
        return common.loop_config(self, lr=self.lr, device="cpu" if self.device == "cpu" else "auto",
                                  fingerprint=fingerprint)

    def fingerprint(self, model_fingerprint: str) -> dict:
        keep = ("period", "energy", "nuclear_weight", "optimizer", "targets", "freeze_non_targets", "svd", "data",
                "eval_data", "text_field", "max_seq_len", "max_eval_examples")
        return {"model": model_fingerprint, "method": "trp", "options": {k: getattr(self, k) for k in keep}}
