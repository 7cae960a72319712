"""`lowrank merge MODEL`: help text and examples.
Its flags are generated from the job's options dataclass
(`lowrank_cli/api/options/`, see `cli/commands.py`)."""

EPILOG = """\
[bold]Examples[/bold]

  # fold a LoRA / MiSS (Bone) / LoLDU-exported adapter into its base
  lowrank merge demo --adapter out/demo-lora -o out/demo-merged
  # a factorized base stays factorized: an adapter trained on it (targets NAME.up / NAME.down)
  # folds into the factors, ranks and modeling file unchanged
  lowrank merge out/demo-lord --adapter out/demo-lord-lora -o out/demo-lord-tuned
  # multiply a factorized checkpoint's factors back: a standard checkpoint, no remote code
  lowrank merge out/demo-lord --dense -o out/demo-lord-dense

  # a GPTQ base: dequantize, merge, and quantize again with the base's bits and group size
  lowrank merge out/demo-gptq --adapter out/demo-gptq-lora --requantize -o out/demo-gptq-tuned

The base is streamed tensor by tensor: memory holds one tensor and the adapter, never the model.
A GPTQ base is refused unless --requantize (which runs GPTQ again on calibration text).
"""

HELP = """Fold an adapter into its base model, or a factorized model's factors back into dense weights.

The output keeps the base's format (dense stays dense, factorized stays factorized) unless --dense.
"""
