"""`lowrank trp-train MODEL --data D -o OUT`: help text and examples.
Its flags are generated from the job's options dataclass
(`lowrank_cli/api/options/`, see `cli/commands.py`)."""

EPILOG = """\
[bold]Examples[/bold]

  # TRP as the paper runs it (SGD momentum 0.9, lr 1e-3, lambda 3e-4, truncate every 5 steps), final
  # factorization by the authors' singular-value threshold 0.05
  lowrank trp-train demo -o out/demo-trp --max-steps 60
  # AdamW instead (lr 1e-4, lambda 0 by default), MLP layers only, final rank by energy
  lowrank trp-train HuggingFaceTB/SmolLM2-135M --data corpus/ --targets 'mlp.*' --optimizer adamw \\
      --final-rule energy --final-energy 0.99 -o out/smol-trp --max-steps 2000 --device cuda
  # continue a run with checkpoints after a crash (same options + --resume)
  lowrank trp-train demo -o out/demo-trp --max-steps 2000 --save-every 200 --resume

[bold]Algorithm[/bold] (Trained Rank Pruning, Xu et al. 2018): ordinary training, except that every
--period optimizer steps each targeted weight is replaced by its truncated SVD keeping --energy of its
squared singular values (that step's forward/backward runs on the low-rank weights) and the nuclear-norm
sub-gradient --nuclear-weight * U V^T is added to its gradient. Each truncation removes 1 - energy of
what is left, so the paper's 0.9 (CIFAR, from scratch) collapses a pretrained LM in tens of steps: the
default is 0.99. At the end each target is factorized at the rank --final-rule gives: threshold (default,
the authors' code) keeps the singular values >= --final-threshold, which costs little because the
trained weights are already low-rank; energy keeps --final-energy. Layers at or above break-even stay
dense. The output is a factorized checkpoint like `lowrank decompose` writes (trust_remote_code=True),
with trp_ranks.jsonl/.png (rank of every layer at every TRP step) and loss_curve.jsonl/.png.
"""

HELP = """Train a model toward low rank (Trained Rank Pruning), then factorize it.

Full-parameter training in float32 (bf16 autocast on GPUs that have it) through the shared training
loop; reports perplexity and parameters before and after, every layer's rank over training, and
TRP's time cost against plain training steps.
"""
