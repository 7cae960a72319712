"""`lowrank decompose MODEL`: help text and examples.
Its flags are generated from the job's options dataclass
(`lowrank_cli/api/options/`, see `cli/commands.py`)."""

EPILOG = """\
[bold]Examples[/bold]

  # smallest model within 1% of the original perplexity
  lowrank decompose bigcode/starcoder --target-ppl-increase 1% \\
      -o out/starcoder-lord --device cuda
  # keep 80% of the targeted layers' parameters; MLP layers only
  lowrank decompose demo --params-ratio 0.8 --targets 'mlp.*' -o out/demo-80
  # see the plan (targets, break-even ranks, memory) without writing
  lowrank decompose demo --rank 64 --dry-run
  # a standard checkpoint (products multiplied back) for tools without remote code
  lowrank decompose demo --params-ratio 0.8 --format dense -o out/demo-dense

[bold]Budgets[/bold] (one of): --target-ppl-increase (default 1%), --params-ratio, --rank.
"Params ratio" is the fraction of the targeted layers' parameters kept; model-level counts
(embeddings included) are reported too. Exit code 3 when no compressed model meets the budget.
"""

HELP = """Compress a checkpoint's linear layers into low-rank factor pairs (LoRD).

Each targeted layer W becomes up @ down at the rank that minimizes the error of its outputs on
calibration text; ranks are spread across layers where the loss cares least. The model streams
from disk one decoder block at a time, so memory tracks one block, not the model.
"""
