"""`EvalOptions`: every knob of an eval run."""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_cli.api.options import common
from lowrank_cli.api.options.fields import DATA_PANEL, RUNTIME_PANEL, option

__all__ = ["EvalOptions"]


@dataclass
class EvalOptions:
    """Perplexity under the documented protocol: non-overlapping windows of seq_len tokens, up to max_tokens."""

    data: str | None = option(None, panel=DATA_PANEL, help="Evaluation text: a file, glob, folder, .jsonl, "
                              ".parquet, a datasets hub id, 'stdlib' (default: held-out stdlib code) or "
                              "'stdlib-prose'.")
    text_field: str = common.text_field()
    seq_len: int = option(512, panel=DATA_PANEL, help="Tokens per window.")
    max_tokens: int = option(8192, min=1, panel=DATA_PANEL, help="Evaluation tokens in all.")
    batch_size: int = common.batch_size()
    streaming: bool = option(False, panel=RUNTIME_PANEL, help="Hold one decoder block in memory at a time "
                             "(models larger than memory).")
    device: str = common.device()
    dtype: str = common.dtype()
    seed: int = common.seed()
