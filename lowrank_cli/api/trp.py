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

from lowrank_cli.api import trp_flow
from lowrank_cli.api.common import with_overrides
from lowrank_cli.api.options.trp import FINAL_RULES, TRPOptions
from lowrank_cli.api.trp_flow import TRPResult
from lowrank_cli.utils.progress import Progress

__all__ = ["TRPOptions", "TRPResult", "trp_train", "FINAL_RULES"]


def trp_train(model: str, opts: TRPOptions | None = None, progress: Progress | None = None,
              **overrides) -> TRPResult:
    """TRP-train MODEL and write the factorized result; see TRPOptions. UsageError (exit 2) on bad input."""
    opts = with_overrides(opts or TRPOptions(), overrides)
    opts.validate()
    opts = opts.resolved()
    return trp_flow.run(model, opts, progress or Progress())
