"""`lowrank quantize MODEL`: help text and examples.
Its flags are generated from the job's options dataclass
(`lowrank_cli/api/options/`, see `cli/commands.py`)."""

EPILOG = """\
[bold]Examples[/bold]

  # 4-bit GPTQ, groups of 128 input columns, asymmetric, act-order (the defaults)
  lowrank quantize demo -o out/demo-gptq4
  # symmetric, natural column order: what the fastest GPU kernels (Marlin) want
  lowrank quantize demo --sym --no-act-order -o out/demo-gptq4-sym
  # a factorized checkpoint from decompose: both factors of every layer are quantized
  lowrank quantize out/demo-lord -o out/demo-lord-gptq4 --bits 4 --group-size 64
  # round-to-nearest on the same grid, for comparison
  lowrank quantize demo --method rtn -o out/demo-rtn4

The output is a standard GPTQ checkpoint (quantization_config quant_method "gptq", int32-packed qweight and
qzeros, float16 scales, g_idx): transformers loads it with optimum + gptqmodel installed
(pip install "lowrank-cli[gptq]"); `lowrank eval` runs it with or without them. GPTBigCode (StarCoder)
outputs load with trust_remote_code=True (transformers' own class fails on any quantized GPTBigCode).
"""

HELP = """Quantize a checkpoint's linear layers with GPTQ (dense or factorized), streamed block by block.

Each block is quantized on the outputs of the already-quantized blocks before it; only one decoder
block is in memory at a time. Reports the perplexity before and after and each layer's output error
against round-to-nearest.
"""
