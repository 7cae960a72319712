"""`FinetuneOptions`: every knob of a finetune run."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from lowrank_cli.api.options import common
from lowrank_cli.api.options.fields import DATA_PANEL, RUNTIME_PANEL, TRAIN_PANEL, option, parse_patterns
from lowrank_cli.errors import UsageError
from lowrank_cli.methods.finetune.spec import METHODS, AdapterSpec, default

__all__ = ["FinetuneOptions", "BONE_VARIANTS", "LORA_PRO_MODES"]

log = logging.getLogger("lowrank")

BONE_VARIANTS = ("bat", "miss")
LORA_PRO_MODES = ("efficient", "full")
METHOD = "Method"


@dataclass
class FinetuneOptions:
    """Every knob of a finetune run; defaults are a sensible LoRA setting."""

    output: str | None = common.output()
    method: str = option("lora", panel=METHOD, help="lora: PEFT LoRA; lora-pro: LoRA with the gradient "
                         "adjusted to approximate full fine-tuning (an optimizer, same adapter); bone: Block "
                         "Affine (see --bone-variant); loldu: LDU-initialized, diagonal-only training, exported "
                         "as a LoRA adapter.")
    rank: int = option(8, flags=("--rank", "-r"), panel=METHOD, help="Adapter rank (bone: block size).")
    # None: the method's default (methods/finetune/spec.py DEFAULTS, with the measurements behind them)
    alpha: float | None = option(None, panel=METHOD, help="Scaling numerator: alpha/rank (alpha/sqrt(rank) with "
                                 "--rslora). Default 16; loldu 8 (sigma = 1 at rank 8, measured).")
    dropout: float = option(0.0, panel=METHOD, help="Dropout on the adapter's input.")
    rslora: bool = option(False, panel=METHOD, help="Rank-stabilized scaling alpha/sqrt(rank).")
    # patterns; None = every linear in the decoder blocks
    targets: list[str] | None = option(
        None, parse=parse_patterns, panel=METHOD, help="Comma-separated module-name patterns (globs; "
        "a bare name like q_proj matches it in every block). Default: every linear layer inside the decoder "
        "blocks (not lm_head). In a factorized model a layer's two factors are both adapted.")
    bone_variant: str = option("bat", panel=METHOD, help="bat: the 2024 paper's Block Affine W_ij T + T; miss: "
                               "the later MiSS shared-shard form.")
    lora_pro_mode: str = option("efficient", panel=METHOD, help="efficient: AdamW on the adjusted gradients "
                                "(LoRA-sized state); full: the paper's Adam moments of the equivalent full "
                                "gradient (m x n state per layer).")
    # default: the stdlib's "train" part (held-out: its "eval" part)
    data: str | None = option(None, panel=DATA_PANEL, help="Training data: .jsonl/.json/.parquet records, text "
                              "files, a glob, a folder, a datasets hub id, or 'stdlib' (default).")
    # default: 1 record in 10 of --data, by a stable hash
    eval_data: str | None = option(None, panel=DATA_PANEL, help="Held-out data for the eval loss (same forms). "
                                   "Default: 1 record in 10 of --data by a stable hash.")
    text_field: str = common.text_field()
    max_seq_len: int = option(512, panel=DATA_PANEL, help="Tokens per example: longer text is cut into pieces, "
                              "longer prompt/chat examples truncated.")
    packing: bool = option(False, panel=DATA_PANEL, help="Join examples into full --max-seq-len blocks (no "
                           "padding).")
    # None: eval_examples() sizes it to the run
    max_eval_examples: int | None = option(None, panel=DATA_PANEL, help="Held-out examples evaluated. Default: "
                                           "an eighth of what a --max-steps run trains on (8 to 256); 256 for "
                                           "--epochs runs.")
    # None: the method's default (spec.py DEFAULTS: 2e-4; loldu 1e-3)
    lr: float | None = option(None, panel=TRAIN_PANEL, help="Peak learning rate. Default 2e-4; loldu 1e-3.")
    epochs: float | None = common.epochs()  # default 1 when max_steps is not set
    max_steps: int | None = common.max_steps()
    batch_size: int = common.train_batch_size()
    grad_accum: int = common.grad_accum()
    warmup: float = common.warmup()  # >= 1: steps; < 1: fraction of the run
    weight_decay: float = common.weight_decay()
    max_grad_norm: float = common.max_grad_norm()
    eval_every: int | None = common.eval_every()
    seed: int = common.seed()
    save_every: int | None = common.save_every()
    resume: bool = common.resume()
    checkpoint_dir: str | None = common.checkpoint_dir()  # default: OUT's hidden sibling .OUT.checkpoints
    load_in_4bit: bool = option(False, panel=RUNTIME_PANEL, help="Load the base in 4-bit NF4 (bitsandbytes): "
                                "QLoRA.")
    device: str = common.device()
    dtype: str = common.dtype()
    overwrite: bool = common.overwrite()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown --method '{self.method}' (choose {', '.join(METHODS)})")
        if not self.output:
            raise UsageError("an output folder is required: -o/--output OUT")
        if self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        from lowrank_cli.train.loop import sharded_launch

        if self.method == "lora-pro" and sharded_launch():
            raise UsageError(f"lora-pro needs each layer's whole A and B on every process; {sharded_launch()} "
                             "shards them: launch with plain data parallelism (DDP) instead")
        if self.alpha is not None and self.alpha <= 0:
            raise UsageError(f"--alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.bone_variant not in BONE_VARIANTS:
            raise UsageError(f"unknown --bone-variant '{self.bone_variant}' (choose {', '.join(BONE_VARIANTS)})")
        if self.lora_pro_mode not in LORA_PRO_MODES:
            raise UsageError(f"unknown --lora-pro-mode '{self.lora_pro_mode}' "
                             f"(choose {', '.join(LORA_PRO_MODES)})")
        if self.max_seq_len < 2:
            raise UsageError(f"--max-seq-len must be at least 2, got {self.max_seq_len}")
        if self.max_eval_examples is not None and self.max_eval_examples < 1:
            raise UsageError("--max-eval-examples must be at least 1")
        if self.max_grad_norm < 0:
            raise UsageError(f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        if self.resume and self.save_every is None:
            log.debug("--resume without --save-every: the resumed run writes no further checkpoints")
        self.loop_config({}).validate()

    def eval_examples(self) -> int:
        """--max-eval-examples, or by default an eighth of the training examples a --max-steps run sees
        (8 to 256): the held-out loss is measured before and after training (and every --eval-every steps),
        and on a short run 256 examples would cost many times the training itself."""
        if self.max_eval_examples is not None:
            return self.max_eval_examples
        if not self.max_steps:
            return 256
        seen = self.max_steps * self.batch_size * self.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
        return max(8, min(256, seen // 8))

    def learning_rate(self) -> float:
        """--lr, or the method's default."""
        return self.lr if self.lr is not None else default(self.method, "lr")

    def adapter_spec(self, targets: list[str]) -> AdapterSpec:
        alpha = self.alpha if self.alpha is not None else default(self.method, "alpha")
        return AdapterSpec(method=self.method, targets=targets, rank=self.rank, alpha=alpha,
                           dropout=self.dropout, rslora=self.rslora, bone_variant=self.bone_variant,
                           lora_pro_mode=self.lora_pro_mode)

    def loop_config(self, fingerprint: dict):
        return common.loop_config(self, lr=self.learning_rate(), device=self.device, fingerprint=fingerprint)

    def fingerprint(self, model_fingerprint: str) -> dict:
        """What a resumed run must share with the run that wrote the checkpoint."""
        keep = ("method", "rank", "alpha", "dropout", "rslora", "targets", "bone_variant", "lora_pro_mode",
                "data", "eval_data", "text_field", "max_seq_len", "packing", "max_eval_examples",
                "load_in_4bit", "dtype")
        return {"model": model_fingerprint, "options": {k: getattr(self, k) for k in keep}}
