"""What a decompose run will do and cost, from config and headers alone (for --dry-run and the log)."""

from __future__ import annotations

from lowrank_cli.methods.decompose.targets import Target

__all__ = ["plan_summary", "estimate_peak_bytes"]


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
                        seq_len: int, batch_size: int, fisher: bool) -> dict[str, int]:
    """Host (or device) memory of the largest phase, by component."""
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
    acts = (calib_tokens + eval_tokens) * hidden * compute_bytes * 2  # inputs and outputs of a block
    if fisher:
        acts += calib_tokens * hidden * compute_bytes * (num_blocks + 1)  # stored boundaries
    logits = batch_size * seq_len * vocab * 4 * 2
    return {"block": block_bytes, "embeddings_and_head": outer, "gram": gram, "activations": acts,
            "logits": logits, "total": max(block_bytes + gram, outer + logits) + acts}
