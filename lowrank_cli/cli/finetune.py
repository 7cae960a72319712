"""`lowrank finetune MODEL --method M --data D -o OUT`: help text and examples.
Its flags are generated from the job's options dataclass
(`lowrank_cli/api/options/`, see `cli/commands.py`)."""

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

HELP = """Fine-tune a model with a low-rank adapter: LoRA, LoRA-Pro, Bone or LoLDU.

Works on dense checkpoints, factorized ones from `lowrank decompose`, GPTQ ones from `lowrank
quantize`, and 4-bit loads (QLoRA). One training loop on accelerate: cosine schedule with warmup,
gradient clipping, bf16 on GPUs that have it, checkpoints that resume bit-exactly, an eval loss.
"""
