"""`lowrank finetune MODEL --method M --data D -o OUT`."""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.runner import run

EPILOG = """\
[bold]Examples[/bold]

  # LoRA on your instructions (prompt/completion jsonl: loss on the completions only)
  lowrank finetune demo --data train.jsonl -o out/demo-lora --max-steps 200
  # LoRA-Pro (optimizer-side, cost close to LoRA) on chat data, with checkpoints every 100 steps
  lowrank finetune Qwen/Qwen2.5-0.5B --method lora-pro --data chats.jsonl -o out/qwen-lorapro \\
      --save-every 100 --device cuda
  # continue that run after a crash (same options + --resume)
  lowrank finetune Qwen/Qwen2.5-0.5B --method lora-pro --data chats.jsonl -o out/qwen-lorapro \\
      --save-every 100 --device cuda --resume
  # QLoRA over a LoRD-factorized model
  lowrank finetune out/starcoder-lord --load-in-4bit --data code/ -o out/sc-qlora --device cuda
  # several GPUs, FSDP or DeepSpeed: the same command under accelerate
  accelerate launch -m lowrank_cli finetune MODEL --data d.jsonl -o OUT --device cuda

[bold]Data[/bold]: jsonl records with "text" (--text-field), "prompt"+"completion", or chat "messages"
(the tokenizer's chat template; loss on the assistant turns); plain text files, globs, folders;
default: stdlib code. Held out for the eval loss: --eval-data, else 1 record in 10 by a stable hash.

[bold]Output[/bold]: an adapter folder that PeftModel.from_pretrained(base, OUT) loads (lora-pro and
loldu write plain LoRA adapters), the tokenizer, lowrank.json, loss_curve.jsonl and loss_curve.png.
Training checkpoints (--save-every) go to .OUT.checkpoints next to OUT (or --checkpoint-dir) and the
default folder is removed once OUT is complete.
"""

METHOD, DATA, TRAIN, CKPT = "Method", "Data", "Training", "Checkpoints"


def finetune_command(
    model: opt.MODEL,
    output: opt.OUTPUT = None,
    method: Annotated[str, typer.Option(
        "--method", help="lora: PEFT LoRA; lora-pro: LoRA with the gradient adjusted to approximate full "
        "fine-tuning (an optimizer, same adapter); bone: Block Affine (see --bone-variant); loldu: "
        "LDU-initialized, diagonal-only training, exported as a LoRA adapter.", rich_help_panel=METHOD)] = "lora",
    rank: Annotated[int, typer.Option("--rank", "-r", help="Adapter rank (bone: block size).",
                                      rich_help_panel=METHOD)] = 8,
    alpha: Annotated[float | None, typer.Option("--alpha", help="Scaling numerator: alpha/rank (alpha/sqrt(rank) "
                                                "with --rslora). Default 16; loldu 8 (sigma = alpha/r = 1 at "
                                                "rank 8; the paper's 1 barely trains).",
                                                rich_help_panel=METHOD, show_default=False)] = None,
    dropout: Annotated[float, typer.Option("--dropout", help="Dropout on the adapter's input.",
                                           rich_help_panel=METHOD)] = 0.0,
    rslora: Annotated[bool, typer.Option("--rslora", help="Rank-stabilized scaling alpha/sqrt(rank).",
                                         rich_help_panel=METHOD)] = False,
    targets: Annotated[str | None, typer.Option(
        "--targets", help="Comma-separated module-name patterns (globs; a bare name like q_proj matches it "
        "in every block). Default: every linear layer inside the decoder blocks (not lm_head). In a "
        "factorized model a layer's two factors are both adapted.", rich_help_panel=METHOD,
        show_default=False)] = None,
    bone_variant: Annotated[str, typer.Option(
        "--bone-variant", help="bat: the 2024 paper's Block Affine W_ij T + T; miss: the later MiSS "
        "shared-shard form.", rich_help_panel=METHOD)] = "bat",
    lora_pro_mode: Annotated[str, typer.Option(
        "--lora-pro-mode", help="efficient: AdamW on the adjusted gradients (LoRA-sized state); full: the "
        "paper's Adam moments of the equivalent full gradient (m x n state per layer).",
        rich_help_panel=METHOD)] = "efficient",
    data: Annotated[str | None, typer.Option(
        "--data", help="Training data: .jsonl/.json/.parquet records, text files, a glob, a folder, a "
        "datasets hub id, or 'stdlib' (default).", rich_help_panel=DATA, show_default=False)] = None,
    eval_data: Annotated[str | None, typer.Option(
        "--eval-data", help="Held-out data for the eval loss (same forms). Default: 1 record in 10 of "
        "--data by a stable hash.", rich_help_panel=DATA, show_default=False)] = None,
    text_field: opt.TEXT_FIELD = "text",
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", help="Tokens per example: longer text is "
                                             "cut into pieces, longer prompt/chat examples truncated.",
                                             rich_help_panel=DATA)] = 512,
    packing: Annotated[bool, typer.Option("--packing", help="Join examples into full --max-seq-len "
                                          "blocks (no padding).", rich_help_panel=DATA)] = False,
    max_eval_examples: Annotated[int, typer.Option("--max-eval-examples", help="Held-out examples "
                                                   "evaluated.", rich_help_panel=DATA)] = 256,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate. Default per method: 2e-4; loldu "
                                             "1e-3 (it trains r numbers per layer).", rich_help_panel=TRAIN,
                                             show_default=False)] = None,
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
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="Load the base in 4-bit NF4 "
                                               "(bitsandbytes): QLoRA.", rich_help_panel=opt.RUN_PANEL)] = False,
    device: opt.DEVICE = "cpu",
    dtype: opt.DTYPE = "auto",
    overwrite: opt.OVERWRITE = False,
    json_out: opt.JSON = False,
) -> None:
    """Fine-tune a model with a low-rank adapter: LoRA, LoRA-Pro, Bone or LoLDU.

    Works on dense checkpoints, factorized ones from `lowrank decompose`, GPTQ ones from `lowrank
    quantize`, and 4-bit loads (QLoRA). One training loop on accelerate: cosine schedule with warmup,
    gradient clipping, bf16 on GPUs that have it, checkpoints that resume bit-exactly, an eval loss.
    """

    def job(progress):
        from lowrank_cli.api.finetune import FinetuneOptions, finetune
        from lowrank_cli.methods.finetune.targets import parse_patterns

        opts = FinetuneOptions(
            output=output, method=method, data=data, eval_data=eval_data, text_field=text_field, rank=rank,
            alpha=alpha, dropout=dropout, rslora=rslora, targets=parse_patterns(targets), lr=lr, epochs=epochs,
            max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, max_seq_len=max_seq_len,
            packing=packing, warmup=warmup, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed,
            save_every=save_every, resume=resume, checkpoint_dir=checkpoint_dir, eval_every=eval_every,
            max_eval_examples=max_eval_examples, load_in_4bit=load_in_4bit, bone_variant=bone_variant,
            lora_pro_mode=lora_pro_mode, device=device, dtype=dtype, overwrite=overwrite)
        # some quantization back-ends print banners on stdout when first imported; stdout carries only
        # the result (one JSON object with --json)
        with contextlib.redirect_stdout(sys.stderr):
            return finetune(model, opts, progress)

    run("finetune", job, json_mode=json_out)
