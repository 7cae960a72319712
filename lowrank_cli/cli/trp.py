"""`lowrank trp-train MODEL --data D -o OUT`."""

from __future__ import annotations

from typing import Annotated

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.runner import run

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

TRP, DATA, TRAIN, CKPT = "TRP", "Data", "Training", "Checkpoints"


def trp_command(
    model: opt.MODEL,
    output: opt.OUTPUT = None,
    period: Annotated[int, typer.Option("--period", help="Optimizer steps between truncations.",
                                        rich_help_panel=TRP)] = 5,
    energy: Annotated[float, typer.Option("--energy", help="Fraction of the squared singular values each "
                                          "truncation keeps, in (0, 1].", rich_help_panel=TRP)] = 0.99,
    nuclear_weight: Annotated[float | None, typer.Option(
        "--nuclear-weight", help="Nuclear-norm weight lambda (sub-gradient added on truncation steps); 0: "
        "off. Default per optimizer: sgd 3e-4 (the paper's), adamw 0.", rich_help_panel=TRP,
        show_default=False)] = None,
    final_rule: Annotated[str, typer.Option("--final-rule", help="Rank of the final factorization: threshold "
                                            "(singular values >= --final-threshold, the authors' rule) or "
                                            "energy (--final-energy).", rich_help_panel=TRP)] = "threshold",
    final_threshold: Annotated[float, typer.Option("--final-threshold", help="Smallest singular value kept "
                                                   "by --final-rule threshold (absolute).",
                                                   rich_help_panel=TRP)] = 0.05,
    final_energy: Annotated[float, typer.Option("--final-energy", help="Energy kept by --final-rule energy, in "
                                                "(0, 1].", rich_help_panel=TRP)] = 0.99,
    targets: Annotated[str | None, typer.Option(
        "--targets", help="Comma-separated module-name patterns (globs; a bare name like c_fc matches it in "
        "every block). Default: every linear layer inside the decoder blocks.", rich_help_panel=TRP,
        show_default=False)] = None,
    freeze_non_targets: Annotated[bool, typer.Option(
        "--freeze-non-targets", help="Train only the targeted layers (default: every parameter, as the "
        "paper does).", rich_help_panel=TRP)] = False,
    svd: Annotated[str, typer.Option("--svd", help="auto: randomized SVD for layers with min(m, n) >= 2048, "
                                     "exact below; exact; randomized.", rich_help_panel=TRP)] = "auto",
    data: Annotated[str | None, typer.Option(
        "--data", help="Training data: .jsonl/.json/.parquet records, text files, a glob, a folder, a "
        "datasets hub id, or 'stdlib' (default).", rich_help_panel=DATA, show_default=False)] = None,
    eval_data: Annotated[str | None, typer.Option(
        "--eval-data", help="Held-out data for the eval loss and the perplexities. Default: held out from "
        "--data by a stable hash (stdlib: its eval part).", rich_help_panel=DATA, show_default=False)] = None,
    text_field: opt.TEXT_FIELD = "text",
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", help="Tokens per example and per perplexity "
                                             "window.", rich_help_panel=DATA)] = 512,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Held-out tokens for the perplexities "
                                             "before and after.", rich_help_panel=DATA)] = 4096,
    max_eval_examples: Annotated[int, typer.Option("--max-eval-examples", help="Held-out examples for the "
                                                   "eval loss.", rich_help_panel=DATA)] = 256,
    optimizer: Annotated[str, typer.Option("--optimizer", help="sgd (momentum 0.9, the paper's) or adamw.",
                                           rich_help_panel=TRAIN)] = "sgd",
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate. Default per optimizer: sgd 1e-3, "
                                             "adamw 1e-4.", rich_help_panel=TRAIN, show_default=False)] = None,
    epochs: opt.EPOCHS = None,
    max_steps: opt.MAX_STEPS = None,
    batch_size: opt.TRAIN_BATCH_SIZE = 4,
    grad_accum: opt.GRAD_ACCUM = 1,
    warmup: opt.WARMUP = 0.03,
    weight_decay: opt.WEIGHT_DECAY = 0.0,
    max_grad_norm: opt.MAX_GRAD_NORM = 1.0,
    eval_every: opt.EVAL_EVERY = None,
    seed: opt.SEED = 0,
    save_every: opt.SAVE_EVERY = None,
    resume: opt.RESUME = False,
    checkpoint_dir: opt.CHECKPOINT_DIR = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard.",
                                                rich_help_panel="Output")] = "2GB",
    device: opt.DEVICE = "cpu",
    overwrite: opt.OVERWRITE = False,
    json_out: opt.JSON = False,
) -> None:
    """Train a model toward low rank (Trained Rank Pruning), then factorize it.

    Full-parameter training in float32 (bf16 autocast on GPUs that have it) through the shared training
    loop; reports perplexity and parameters before and after, every layer's rank over training, and
    TRP's time cost against plain training steps.
    """

    def job(progress):
        from lowrank_cli.api.trp import TRPOptions, trp_train
        from lowrank_cli.methods.decompose.targets import parse_patterns

        opts = TRPOptions(
            output=output, data=data, eval_data=eval_data, text_field=text_field, period=period, energy=energy,
            nuclear_weight=nuclear_weight, optimizer=optimizer, final_rule=final_rule,
            final_threshold=final_threshold, final_energy=final_energy, targets=parse_patterns(targets),
            freeze_non_targets=freeze_non_targets, svd=svd, lr=lr, weight_decay=weight_decay, epochs=epochs,
            max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, max_seq_len=max_seq_len,
            warmup=warmup, max_grad_norm=max_grad_norm, eval_every=eval_every,
            max_eval_examples=max_eval_examples, eval_tokens=eval_tokens, save_every=save_every, resume=resume,
            checkpoint_dir=checkpoint_dir, max_shard_size=max_shard_size, device=device, overwrite=overwrite,
            seed=seed)
        return trp_train(model, opts, progress)

    run("trp-train", job, json_mode=json_out)
