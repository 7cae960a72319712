"""`lowrank eval MODEL`."""

from __future__ import annotations

from typing import Annotated

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.runner import run

EPILOG = """\
[bold]Examples[/bold]

  lowrank eval demo
  lowrank eval ./my-model --data notes.jsonl --text-field body --seq-len 1024 --max-tokens 16384
  lowrank eval bigcode/starcoder --streaming --device cuda --json

[bold]Protocol[/bold]: the text is tokenized into non-overlapping windows of --seq-len tokens (up to
--max-tokens); perplexity = exp(token-weighted mean NLL of every token after the first in each window).
"""


def eval_command(
    model: opt.MODEL,
    data: opt.DATA = None,
    text_field: opt.TEXT_FIELD = "text",
    seq_len: opt.SEQ_LEN = 512,
    max_tokens: opt.MAX_TOKENS = 8192,
    batch_size: opt.BATCH_SIZE = 1,
    streaming: Annotated[bool, typer.Option(
        "--streaming", help="Hold one decoder block in memory at a time (models larger than memory).",
        rich_help_panel="Runtime")] = False,
    device: opt.DEVICE = "cpu",
    dtype: opt.DTYPE = "auto",
    seed: opt.SEED = 0,
    json_out: opt.JSON = False,
) -> None:
    """Measure perplexity on held-out text.

    By default the text is the held-out part of this Python's standard library source: real code,
    present on every machine, disjoint from the calibration text the other commands use.
    """

    def job(progress):
        from lowrank_cli.api.evaluate import evaluate

        return evaluate(model, data=data, text_field=text_field, seq_len=seq_len, max_tokens=max_tokens,
                        batch_size=batch_size, device=device, dtype=dtype, streaming=streaming,
                        seed=seed, progress=progress)

    run("eval", job, json_mode=json_out)
