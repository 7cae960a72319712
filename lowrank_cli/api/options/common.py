"""Fields several jobs share, written once so their flag, help and panel agree everywhere. Each function
returns a new dataclass field (one per options class)."""

from __future__ import annotations

from typing import Any

from lowrank_cli.api.options.fields import (
    CHECKPOINT_PANEL,
    DATA_PANEL,
    OUTPUT_PANEL,
    RUNTIME_PANEL,
    TRAIN_PANEL,
    option,
)
from lowrank_cli.errors import UsageError

__all__ = ["output", "overwrite", "max_shard_size", "device", "dtype", "seed", "batch_size", "text_field",
           "test_data", "test_tokens", "sensitivity_dtype", "check_sensitivity_dtype",
           "offload_dir", "epochs", "max_steps", "train_batch_size", "grad_accum", "warmup", "weight_decay",
           "max_grad_norm", "eval_every", "save_every", "resume", "checkpoint_dir"]


def output(required: bool = False) -> Any:
    return option(None, flags=("--output", "-o"), help="Output folder (must not exist or be empty).",
                  panel=OUTPUT_PANEL, required=required)


def overwrite() -> Any:
    return option(False, help="Replace a non-empty output folder, once the new one is complete.",
                  panel=OUTPUT_PANEL)


def max_shard_size() -> Any:
    return option("2GB", help="Largest safetensors shard.", panel=OUTPUT_PANEL)


def device() -> Any:
    return option("cpu", help="cpu, cuda or cuda:N.", panel=RUNTIME_PANEL)


def dtype() -> Any:
    return option("auto", help="Compute dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, "
                  "float16.", panel=RUNTIME_PANEL)


def sensitivity_dtype() -> Any:
    return option("auto", panel=RUNTIME_PANEL, help="Precision of the Fisher sensitivity pass, which only "
                  "steers the rank allocation: auto (bfloat16 where the device multiplies it fast: CPUs with "
                  "AMX-BF16 or AVX512-BF16, CUDA devices with bfloat16; else float32), float32 or bfloat16. "
                  "Never touches the written weights or the reported perplexities.")


def check_sensitivity_dtype(value: str) -> None:
    """UsageError for a --sensitivity-dtype this project does not offer."""
    from lowrank_cli.engine.precision import STEERING_CHOICES

    if value not in STEERING_CHOICES:
        raise UsageError(f"unknown --sensitivity-dtype '{value}' (choose {', '.join(STEERING_CHOICES)})")


def seed() -> Any:
    return option(0, help="Seed for data order and sampling. Some GPU kernels stay non-deterministic.",
                  panel=RUNTIME_PANEL)


def batch_size() -> Any:
    return option(1, min=1, help="Windows per forward pass.", panel=RUNTIME_PANEL)


def text_field() -> Any:
    return option("text", help="Field/column holding the text in .jsonl, .parquet and datasets.",
                  panel=DATA_PANEL)


def test_data() -> Any:
    return option(None, panel=DATA_PANEL, help="Test text: what the result reports, never looked at while "
                  "choosing. Default: the test part of the eval source (disjoint from eval and calibration).")


def test_tokens(default: int = 4096) -> Any:
    return option(default, panel=DATA_PANEL, help="Test tokens.")


def offload_dir(help: str) -> Any:
    return option(None, help=help, panel=RUNTIME_PANEL)


# -- training (finetune, trp-train): the shared loop's knobs ---------------------------------------------


def epochs() -> Any:
    return option(None, help="Passes over the data (default 1).", panel=TRAIN_PANEL)


def max_steps() -> Any:
    return option(None, help="Optimizer steps (overrides --epochs).", panel=TRAIN_PANEL)


def train_batch_size() -> Any:
    return option(4, help="Examples per micro-batch (per GPU).", panel=TRAIN_PANEL)


def grad_accum() -> Any:
    return option(1, help="Micro-batches per optimizer step.", panel=TRAIN_PANEL)


def warmup() -> Any:
    return option(0.03, help="Linear warmup before the cosine decay: steps if >= 1, else a fraction of the run.",
                  panel=TRAIN_PANEL)


def weight_decay() -> Any:
    return option(0.0, help="AdamW weight decay.", panel=TRAIN_PANEL)


def max_grad_norm() -> Any:
    return option(1.0, help="Clip the gradient norm (0: off).", panel=TRAIN_PANEL)


def eval_every() -> Any:
    return option(None, help="Steps between eval losses (always before and after).", panel=TRAIN_PANEL)


def save_every() -> Any:
    return option(None, help="Steps between training checkpoints.", panel=CHECKPOINT_PANEL)


def resume() -> Any:
    return option(False, help="Continue from the newest checkpoint of the same run (same model, data and "
                  "options).", panel=CHECKPOINT_PANEL)


def checkpoint_dir() -> Any:
    return option(None, help="Where training checkpoints go (kept after the run). Default: .OUT.checkpoints "
                  "next to OUT, removed once OUT is complete.", panel=CHECKPOINT_PANEL)


def loop_config(opts, *, lr: float, device: str, fingerprint: dict):
    """The training loop's settings from the training fields every training job shares (the ones above)."""
    from lowrank_cli.train.loop import LoopConfig

    return LoopConfig(lr=lr, weight_decay=opts.weight_decay, epochs=opts.epochs, max_steps=opts.max_steps,
                      batch_size=opts.batch_size, grad_accum=opts.grad_accum, warmup=opts.warmup,
                      max_grad_norm=opts.max_grad_norm or None, device=device, seed=opts.seed,
                      eval_every=opts.eval_every, save_every=opts.save_every, fingerprint=fingerprint)
