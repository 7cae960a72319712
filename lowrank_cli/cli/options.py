"""Option types shared by several commands (one definition, same help everywhere)."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["JSON", "DEVICE", "DTYPE", "SEED", "DATA", "TEXT_FIELD", "SEQ_LEN", "MAX_TOKENS",
           "BATCH_SIZE", "MODEL", "OUTPUT", "OVERWRITE", "EPOCHS", "MAX_STEPS", "TRAIN_BATCH_SIZE", "GRAD_ACCUM",
           "WARMUP", "WEIGHT_DECAY", "MAX_GRAD_NORM", "EVAL_EVERY", "SAVE_EVERY", "RESUME", "CHECKPOINT_DIR"]

MODEL_PANEL, DATA_PANEL, OUT_PANEL, RUN_PANEL = "Model", "Data", "Output", "Runtime"

MODEL = Annotated[str, typer.Argument(
    help="A local HF checkpoint folder, a hub id (e.g. bigcode/starcoder), or 'demo' (the bundled model).",
    show_default=False)]
OUTPUT = Annotated[str, typer.Option("--output", "-o", help="Output folder (must not exist or be empty).",
                                     rich_help_panel=OUT_PANEL, show_default=False)]
OVERWRITE = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder, once the "
                                         "new one is complete.", rich_help_panel=OUT_PANEL)]
JSON = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout (errors too); "
                                    "no progress bars.", rich_help_panel=OUT_PANEL)]
DEVICE = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.", rich_help_panel=RUN_PANEL)]
DTYPE = Annotated[str, typer.Option("--dtype", help="Compute dtype: auto (float32 on CPU, bfloat16 on "
                                    "GPU), float32, bfloat16, float16.", rich_help_panel=RUN_PANEL)]
SEED = Annotated[int, typer.Option("--seed", help="Seed for data order and sampling. Some GPU kernels stay "
                                   "non-deterministic.", rich_help_panel=RUN_PANEL)]
BATCH_SIZE = Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.",
                                         rich_help_panel=RUN_PANEL)]
DATA = Annotated[str | None, typer.Option(
    "--data", help="Evaluation text: a file, glob, folder, .jsonl, .parquet, a datasets hub id, 'stdlib' "
    "(default: held-out stdlib code) or 'stdlib-prose'.", rich_help_panel=DATA_PANEL, show_default=False)]
TEXT_FIELD = Annotated[str, typer.Option("--text-field", help="Field/column holding the text in "
                                         ".jsonl, .parquet and datasets.", rich_help_panel=DATA_PANEL)]
SEQ_LEN = Annotated[int, typer.Option("--seq-len", help="Tokens per window.", rich_help_panel=DATA_PANEL)]
MAX_TOKENS = Annotated[int, typer.Option("--max-tokens", min=1, help="Evaluation tokens in all.",
                                         rich_help_panel=DATA_PANEL)]

# -- training (finetune, trp-train): the shared loop's knobs ----------------------------------------------
TRAIN_PANEL, CKPT_PANEL = "Training", "Checkpoints"
EPOCHS = Annotated[float | None, typer.Option("--epochs", help="Passes over the data (default 1).",
                                              rich_help_panel=TRAIN_PANEL, show_default=False)]
MAX_STEPS = Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps (overrides --epochs).",
                                               rich_help_panel=TRAIN_PANEL, show_default=False)]
TRAIN_BATCH_SIZE = Annotated[int, typer.Option("--batch-size", help="Examples per micro-batch (per GPU).",
                                               rich_help_panel=TRAIN_PANEL)]
GRAD_ACCUM = Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.",
                                         rich_help_panel=TRAIN_PANEL)]
WARMUP = Annotated[float, typer.Option("--warmup", help="Linear warmup before the cosine decay: steps if >= 1, "
                                       "else a fraction of the run.", rich_help_panel=TRAIN_PANEL)]
WEIGHT_DECAY = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.",
                                             rich_help_panel=TRAIN_PANEL)]
MAX_GRAD_NORM = Annotated[float, typer.Option("--max-grad-norm", help="Clip the gradient norm (0: off).",
                                              rich_help_panel=TRAIN_PANEL)]
EVAL_EVERY = Annotated[int | None, typer.Option("--eval-every", help="Steps between eval losses (always before "
                                                "and after).", rich_help_panel=TRAIN_PANEL, show_default=False)]
SAVE_EVERY = Annotated[int | None, typer.Option("--save-every", help="Steps between training checkpoints.",
                                                rich_help_panel=CKPT_PANEL, show_default=False)]
RESUME = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint of the same run "
                                      "(same model, data and options).", rich_help_panel=CKPT_PANEL)]
CHECKPOINT_DIR = Annotated[str | None, typer.Option(
    "--checkpoint-dir", help="Where training checkpoints go (kept after the run). Default: .OUT.checkpoints next "
    "to OUT, removed once OUT is complete.", rich_help_panel=CKPT_PANEL, show_default=False)]
