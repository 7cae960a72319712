"""`lowrank compress`: the smallest checkpoint within a quality budget (or the best one within a size),
searched across quantization, factorization and their combinations.

Flow (two streamed passes over the model, one block in memory at a time):
  1. plan: every candidate of the chosen families (methods/compress/plan.py) with its exact size in bytes;
     a size target drops the ones that cannot fit before any is run;
  2. profile: the original model over calibration text (its Grams -> each layer's error-versus-rank
     curve, for the factorizing families' rank allocation) and over the eval and test text (baselines);
     with the default Fisher allocation, one streamed backward pass weighs each curve by the loss's
     sensitivity to that layer's output (as decompose does);
  3. candidates: one pass in which every candidate is built block by block from the original model's
     Grams (one calibration stream serves them all; `--sequential` gives each its own), carried over the
     eval and test text, and written to its own folder;
  4. choice on eval perplexity only (test is what is reported), then optionally a short LoRA healing
     fine-tune of the chosen candidate (`--heal-steps`), measured like the rest;
  5. the winner's folder is moved into place with frontier.json, frontier.png and lowrank.json.
"""

from __future__ import annotations

from lowrank_cli.api.compress_job import CompressJob
from lowrank_cli.api.compress_result import FRONTIER_JSON, FRONTIER_PNG, CompressResult
from lowrank_cli.api.options.compress import CompressOptions
from lowrank_cli.api.solver import open_input
from lowrank_cli.errors import UsageError
from lowrank_cli.utils.progress import Progress

__all__ = ["CompressOptions", "CompressResult", "compress", "FRONTIER_JSON", "FRONTIER_PNG"]


def compress(model: str, opts: CompressOptions | None = None, progress: Progress | None = None,
             **overrides) -> CompressResult:
    """Search the candidates for MODEL; see CompressOptions. Raises UsageError (2) or BudgetNotMet (3)."""
    opts, path, ckpt = open_input(model, opts or CompressOptions(), overrides,
                                  refuse_quantized="compress starts from a full-precision dense checkpoint")
    if ckpt.config.get("lowrank"):
        raise UsageError(f"'{model}' is already factorized; compress starts from a full-precision dense checkpoint")
    job = CompressJob(model, path, ckpt, opts, progress or Progress())
    return job.plan_only() if opts.dry_run else job.run()


