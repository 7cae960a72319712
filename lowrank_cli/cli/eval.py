"""`lowrank eval MODEL`: help text and examples.
Its flags are generated from the job's options dataclass
(`lowrank_cli/api/options/`, see `cli/commands.py`)."""

EPILOG = """\
[bold]Examples[/bold]

  lowrank eval demo
  lowrank eval ./my-model --data notes.jsonl --text-field body --seq-len 1024 --max-tokens 16384
  lowrank eval bigcode/starcoder --streaming --device cuda --json

[bold]Protocol[/bold]: the text is tokenized into non-overlapping windows of --seq-len tokens (up to
--max-tokens); perplexity = exp(token-weighted mean NLL of every token after the first in each window).
"""

HELP = """Measure perplexity on held-out text.

By default the text is the held-out part of this Python's standard library source: real code,
present on every machine, disjoint from the calibration text the other commands use.
"""
