"""`lowrank compress MODEL`: help text and examples. Its flags are generated from the job's options
dataclass (`lowrank_cli/api/options/compress.py`, see `cli/commands.py`)."""

EPILOG = """\
[bold]Examples[/bold]

  # the smallest checkpoint whose eval perplexity stays within 5% of the input's
  lowrank compress demo --target-ppl-increase 5% -o out/demo-small
  # the best quality within 40% of the input's weight bytes (or --target-size 60MB)
  lowrank compress demo --target-size 40% -o out/demo-40
  # see the candidates, their exact sizes and the cost, without running them
  lowrank compress demo --target-ppl-increase 1% --dry-run
  # only GPTQ and factorize-then-GPTQ, at 3 and 4 bits
  lowrank compress demo --families gptq,factorize-gptq --bits 3,4 -o out/demo-fq

[bold]Families[/bold]: gptq (GPTQ alone), factorize-gptq (factorization keeping --keeps of the
targeted parameters, then GPTQ of both factors), gptq-lr (GPTQ + a rank --correction-rank correction
of its error, stored as a PEFT LoRA adapter in correction/), factorize (factorization alone, 16-bit).
The choice reads eval perplexity and bytes only; test perplexity (disjoint text) is what is reported.
Writes the winner plus frontier.json and frontier.png. Exit code 3 when no candidate meets the target.
"""

HELP = """The smallest checkpoint within a quality budget, across quantization and factorization.

Builds the candidates (GPTQ at several bit widths, factorization then GPTQ; on request GPTQ with a \
low-rank correction, factorization alone) in one streamed pass from one calibration pass, stops those \
predicted far over a perplexity budget, measures the rest on eval and test text, and keeps the smallest \
whose eval perplexity meets the target.
"""
