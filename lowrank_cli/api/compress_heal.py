"""`compress --heal-steps N`: a short LoRA healing fine-tune of candidates, merged back and measured.

Healed: the chosen candidate and up to two smaller ones that missed the budget (healing may bring them
within it, and then they win). Each is fine-tuned with LoRA for N steps on calibration-domain text (the
training part of the calibration source, disjoint from the eval and test text), the adapter merged back
(into the factors of a factorized candidate; into a GPTQ candidate by dequantize -> merge -> GPTQ with its
grid, `merge --requantize`), and the result measured on the very eval and test windows of the search.
So healing's gain is measured, not assumed; the healed variants join the frontier as candidates.
Candidates with a low-rank correction (gptq-lr) are not healed here: their adapter is the place to train.
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["heal_candidates", "HEAL_BATCH_SIZE"]

log = logging.getLogger("lowrank")
HEAL_BATCH_SIZE = 4
HEAL_LR = 1e-4  # a gentle rate: the candidate is already close to the input model
MAX_HEALED = 3


def _to_heal(chosen: dict, records: list[dict]) -> list[dict]:
    smaller = sorted((r for r in records if r["bytes"] < chosen["bytes"] and not r["passed"]
                      and r["family"] != "gptq-lr" and not r.get("pruned")), key=lambda r: -r["bytes"])
    picked = [chosen] if chosen["family"] != "gptq-lr" else []
    return (picked + smaller)[:MAX_HEALED]


def heal_candidates(job, tmp: Path, chosen: dict, records: list[dict]) -> list[dict]:
    """Healed copies of the candidates worth healing, measured like every candidate."""
    healed = []
    for record in _to_heal(chosen, records):
        healed.append(_heal_one(job, tmp, record))
    return healed


def _heal_one(job, tmp: Path, record: dict) -> dict:
    from lowrank_cli.api.finetune import FinetuneOptions, finetune
    from lowrank_cli.api.merge import MergeOptions, merge

    o, steps = job.opts, job.opts.heal_steps
    source = Path(record["folder"])
    adapter = tmp / f".heal-{record['label']}-adapter"
    target = tmp / f".candidate-{record['label']}-heal{steps}"
    log.info("healing %s: %d LoRA steps", record["label"], steps)
    finetune(str(source), FinetuneOptions(
        output=str(adapter), method="lora", data=o.calib, text_field=o.text_field, max_steps=steps,
        batch_size=HEAL_BATCH_SIZE, max_seq_len=o.calib_seq_len, lr=HEAL_LR, max_eval_examples=8,
        device=o.device, seed=o.seed), progress=job.progress)
    quantized = record["bits"] is not None
    merge(str(source), MergeOptions(output=str(target), adapter=str(adapter), requantize=quantized, calib=o.calib,
                                    calib_samples=o.calib_samples, calib_seq_len=o.calib_seq_len, device=o.device,
                                    max_shard_size=o.max_shard_size), progress=job.progress)
    nll = _measure(job, target)
    row = dict(record)
    row.update(label=f"{record['label']}+heal{steps}", healed=True, folder=str(target))
    return job._measured(row, target, nll)


def _measure(job, folder: Path) -> dict:
    """eval and test NLL of a written candidate, on the search's own windows (streamed, dequantized)."""
    from lowrank_cli.engine.sequential import Candidate, Unchanged, run_pipeline
    from lowrank_cli.engine.streamed import StreamedModel
    from lowrank_cli.io.checkpoint import Checkpoint
    from lowrank_cli.io.gptq_view import dequantizing

    streamed = StreamedModel(dequantizing(Checkpoint(folder)), device=job.opts.device, dtype=job.dtype)
    outcome = run_pipeline(streamed, job.windows.calib[:0], job._evalsets(), [], [Candidate("healed", Unchanged())],
                           batch_size=job.opts.batch_size)
    return outcome.nll["healed"]
