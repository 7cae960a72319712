"""`lowrank trp-train MODEL --data D -o OUT`: help text and examples.
Its flags are generated from the job's options dataclass
(`lowrank_cli/api/options/`, see `cli/commands.py`)."""

EPILOG = """\
[bold]Examples[/bold]

  # TRP on the demo model: truncate every 5 steps at 90% energy, nuclear weight 3e-4, factorize at 90%
  lowrank trp-train demo -o out/demo-trp --max-steps 200
  # MLP layers only, your text, a stronger low-rank pull
  lowrank trp-train HuggingFaceTB/SmolLM2-135M --data corpus/ --targets 'mlp.*' --energy 0.8 \\
      --nuclear-weight 1e-3 --final-energy 0.85 -o out/smol-trp --max-steps 2000 --device cuda
  # continue a run with checkpoints after a crash (same options + --resume)
  lowrank trp-train demo -o out/demo-trp --max-steps 2000 --save-every 200 --resume

[bold]Algorithm[/bold] (Trained Rank Pruning, Xu et al. 2018): ordinary training, except that every
--period optimizer steps each targeted weight is replaced by its truncated SVD keeping --energy of its
squared singular values (that step's forward/backward runs on the low-rank weights) and the nuclear-norm
sub-gradient --nuclear-weight * U V^T is added to its gradient. At the end each target is factorized at
its --final-energy rank; layers at or above break-even stay dense. The output is a factorized checkpoint
like `lowrank decompose` writes (trust_remote_code=True), with trp_ranks.jsonl/.png (rank of every layer
at every TRP step) and loss_curve.jsonl/.png.
"""

HELP = """Train a model toward low rank (Trained Rank Pruning), then factorize it.

Full-parameter training in float32 (bf16 autocast on GPUs that have it) through the shared training
loop; reports perplexity and parameters before and after, every layer's rank over training, and
TRP's time cost against plain training steps.
"""
