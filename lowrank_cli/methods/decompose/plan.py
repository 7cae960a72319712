"""What a decompose run will do and cost, from config and headers alone (for --dry-run and the log)."""

from __future__ import annotations

from lowrank_cli.methods.decompose.targets import Target

__all__ = ["plan_summary", "estimate_peak_bytes", "estimate_output_bytes"]


def plan_summary(targets: list[Target], ranks: dict | None = None) -> list[dict]:
    """Targets grouped by (layer kind, shape): count, break-even rank and, if known, the ranks."""
    rows: dict = {}
    for t in targets:
        row = rows.setdefault((t.local, t.m, t.n), {"layer": t.local, "shape": [t.m, t.n],
                                                    "break_even_rank": int(t.break_even), "count": 0})
        row["count"] += 1
        if ranks is not None:
            row.setdefault("ranks", []).append(ranks.get(t.name))
    return list(rows.values())


def estimate_peak_bytes(ckpt, blocks_name: str, num_blocks: int, targets: list[Target], *, hidden: int,
                        vocab: int, compute_bytes: int, calib_tokens: int, eval_tokens: int,
                        seq_len: int, batch_size: int, fisher: bool, candidates: int = 1,
                        own_calib: bool = True, head_copy_bytes: int = 0, kept_grams: int = 0) -> dict[str, int]:
    """Host (or device) memory of the largest phase, by component.

    `kept_grams`: host bytes of the original model's Grams kept from the profile for the compress passes
    (GramStore; held from the profile to the end).

    `head_copy_bytes`: bytes per entry of the low-precision copy of the head weight the Fisher pass makes
    when it runs in another dtype than the compute dtype (0: none; methods/decompose/sensitivity.py).

    `candidates`: models evaluated in one streamed pass (the search's width); each holds its own evaluation
    streams and, when `own_calib` (sequential calibration of a data-aware method), its own calibration
    stream, for the whole pass. The Fisher pass's stored block boundaries live only before that pass."""
    block_bytes = 0
    for i in range(num_blocks):
        prefix = f"{blocks_name}.{i}."
        numel = sum(info.numel for name, info in ckpt.tensors.items() if name.startswith(prefix))
        block_bytes = max(block_bytes, numel * compute_bytes)
    outer = sum(info.numel for name, info in ckpt.tensors.items()
                if not name.startswith(blocks_name + ".")) * compute_bytes
    widest = max((t.n for t in targets), default=0)
    tallest = max((min(t.m, t.n) for t in targets), default=0)
    gram = widest * widest * 8 * 2 + tallest * tallest * 8 * 2  # Gram + its decomposition workspace
    token = hidden * compute_bytes
    acts = (calib_tokens + eval_tokens) * token * 2  # inputs and outputs of a block
    # the profile + Fisher phase keeps a calibration stream at every block boundary; a compress pass over
    # several candidates keeps the other candidates' streams: the larger of the two phases counts
    boundaries = calib_tokens * token * (num_blocks + 1) if fisher else 0
    others = (candidates - 1) * (eval_tokens + (calib_tokens if own_calib else 0)) * token
    acts += max(boundaries, others)
    logits = batch_size * seq_len * vocab * 4 * 2
    head_copy = vocab * hidden * head_copy_bytes if fisher else 0
    return {"block": block_bytes, "embeddings_and_head": outer, "gram": gram, "activations": acts,
            "candidate_streams": others, "logits": logits, "fisher_head_copy": head_copy, "kept_grams": kept_grams,
            "total": max(block_bytes + gram, outer + logits + head_copy) + acts + kept_grams}


def estimate_output_bytes(ckpt, targets: list[Target], *, keep: float | None = None, rank: int | None = None,
                          multiple: int = 8) -> dict[str, int | str]:
    """Size of the written checkpoint: exact for --rank, an estimate for --params-ratio (allocation moves
    parameters between layers but keeps their total), the input's size as an upper bound for a perplexity
    budget (the search decides)."""
    total = ckpt.total_bytes()
    targeted_bytes = sum(ckpt.tensors[t.name + ".weight"].nbytes for t in targets if t.name + ".weight" in ckpt)
    if rank is not None:
        after = 0
        for t in targets:
            info = ckpt.tensors.get(t.name + ".weight")
            size = info.nbytes // max(info.numel, 1) if info else 4
            r = max(multiple, rank // multiple * multiple)
            after += (r * (t.m + t.n) if r * (t.m + t.n) < t.m * t.n else t.m * t.n) * size
        return {"bytes": total - targeted_bytes + after, "kind": "exact"}
    if keep is not None:
        return {"bytes": int(total - targeted_bytes * (1 - keep)), "kind": "estimate"}
    return {"bytes": total, "kind": "upper bound"}
