"""`lowrank quantize MODEL`."""

from __future__ import annotations

from typing import Annotated

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.runner import run

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

GRID, DATA = "Quantization", "Data"


def quantize_command(
    model: opt.MODEL,
    output: opt.OUTPUT,
    bits: Annotated[int, typer.Option("--bits", help="Bits per weight: 2, 3, 4 or 8.", rich_help_panel=GRID)] = 4,
    group_size: Annotated[int, typer.Option("--group-size", help="Input columns sharing one scale and zero "
                                            "point; -1 = one per output channel. Need not divide the layer "
                                            "width (the last group is shorter).", rich_help_panel=GRID)] = 128,
    sym: Annotated[bool, typer.Option("--sym/--no-sym", help="Symmetric grid (zero point in the middle; what "
                                      "Marlin-class GPU kernels want) or asymmetric (min/max of each group; "
                                      "more accurate).", rich_help_panel=GRID)] = False,
    act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="Quantize columns in "
                                            "decreasing order of input energy (desc_act; more accurate).",
                                            rich_help_panel=GRID)] = True,
    damp: Annotated[float, typer.Option("--damp", help="Hessian damping, a fraction of its mean diagonal.",
                                        rich_help_panel=GRID)] = 0.01,
    method: Annotated[str, typer.Option("--method", help="gptq: error-feedback solve on calibration text; "
                                        "rtn: round to nearest (no data).", rich_help_panel=GRID)] = "gptq",
    calib: Annotated[str | None, typer.Option(
        "--calib", help="Calibration text (same forms as --data). Default: a stdlib part disjoint from the "
        "evaluation text.", rich_help_panel=DATA, show_default=False)] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Calibration windows.",
                                               rich_help_panel=DATA)] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration and evaluation window.",
                                         rich_help_panel=DATA)] = 512,
    data: Annotated[str | None, typer.Option(
        "--data", "--eval-data", help="Evaluation text for the before/after perplexity. Default: held-out "
        "stdlib code.", rich_help_panel=DATA, show_default=False)] = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Evaluation tokens.",
                                             rich_help_panel=DATA)] = 4096,
    skip_eval: Annotated[bool, typer.Option("--skip-eval", help="Skip the baseline perplexity pass (the "
                                            "quantized perplexity is still measured).",
                                            rich_help_panel=DATA)] = False,
    text_field: opt.TEXT_FIELD = "text",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard.",
                                                rich_help_panel="Output")] = "2GB",
    overwrite: opt.OVERWRITE = False,
    device: opt.DEVICE = "cpu",
    dtype: opt.DTYPE = "auto",
    batch_size: opt.BATCH_SIZE = 1,
    offload_dir: Annotated[str | None, typer.Option(
        "--offload-dir", help="Keep calibration activations on disk here.", rich_help_panel="Runtime",
        show_default=False)] = None,
    seed: opt.SEED = 0,
    json_out: opt.JSON = False,
) -> None:
    """Quantize a checkpoint's linear layers with GPTQ (dense or factorized), streamed block by block.

    Each block is quantized on the outputs of the already-quantized blocks before it; only one decoder
    block is in memory at a time. Reports the perplexity before and after and each layer's output error
    against round-to-nearest.
    """

    def job(progress):
        from lowrank_cli.api.quantize import QuantizeOptions, quantize

        opts = QuantizeOptions(
            output=output, bits=bits, group_size=group_size, sym=sym, act_order=act_order, damp=damp,
            method=method, calib=calib, calib_samples=calib_samples, calib_seq_len=seq_len, eval_data=data,
            eval_tokens=eval_tokens, skip_eval=skip_eval, text_field=text_field, max_shard_size=max_shard_size,
            overwrite=overwrite, device=device, dtype=dtype, batch_size=batch_size, offload_dir=offload_dir,
            seed=seed)
        return quantize(model, opts, progress)

    run("quantize", job, json_mode=json_out)
