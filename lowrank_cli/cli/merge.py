"""`lowrank merge MODEL`."""

from __future__ import annotations

from typing import Annotated

import typer

from lowrank_cli.cli import options as opt
from lowrank_cli.cli.runner import run

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

REQUANT = "Requantize (GPTQ bases)"


def merge_command(
    model: opt.MODEL,
    output: opt.OUTPUT = None,
    adapter: Annotated[str | None, typer.Option(
        "--adapter", help="A PEFT adapter folder (adapter_config.json + adapter_model.safetensors): LoRA "
        "(rsLoRA, rank/alpha patterns), LoRA-Pro and LoLDU exports, MiSS/Bone (default, bat, mini).",
        show_default=False)] = None,
    dense: Annotated[bool, typer.Option(
        "--dense", help="Write a standard checkpoint: each factor pair of a factorized MODEL multiplied back "
        "(after folding the adapter, if one is given).")] = False,
    requantize: Annotated[bool, typer.Option(
        "--requantize", help="For a GPTQ base: dequantize, merge, then quantize again (GPTQ) with the base's "
        "bits, group size, symmetry and act-order.", rich_help_panel=REQUANT)] = False,
    calib: Annotated[str | None, typer.Option(
        "--calib", help="Calibration text for --requantize (same forms as eval --data). Default: stdlib code.",
        rich_help_panel=REQUANT, show_default=False)] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Calibration windows (--requantize).",
                                               rich_help_panel=REQUANT)] = 128,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window (--requantize).",
                                         rich_help_panel=REQUANT)] = 512,
    device: opt.DEVICE = "cpu",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard.",
                                                rich_help_panel="Output")] = "2GB",
    overwrite: opt.OVERWRITE = False,
    json_out: opt.JSON = False,
) -> None:
    """Fold an adapter into its base model, or a factorized model's factors back into dense weights.

    The output keeps the base's format (dense stays dense, factorized stays factorized) unless --dense.
    """

    def job(progress):
        from lowrank_cli.api.merge import MergeOptions, merge

        opts = MergeOptions(output=output, adapter=adapter, dense=dense, requantize=requantize, calib=calib,
                            calib_samples=calib_samples, calib_seq_len=seq_len, device=device,
                            max_shard_size=max_shard_size, overwrite=overwrite)
        return merge(model, opts, progress)

    run("merge", job, json_mode=json_out)
