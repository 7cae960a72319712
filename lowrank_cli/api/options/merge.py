"""`MergeOptions`: every knob of a merge run."""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_cli.api.options import common
from lowrank_cli.api.options.fields import option
from lowrank_cli.errors import UsageError

__all__ = ["MergeOptions"]

REQUANT = "Requantize (GPTQ bases)"


@dataclass
class MergeOptions:
    output: str | None = common.output()
    # a PEFT adapter folder (save_pretrained output)
    adapter: str | None = option(None, help="A PEFT adapter folder (adapter_config.json + "
                                 "adapter_model.safetensors): LoRA (rsLoRA, rank/alpha patterns), LoRA-Pro and "
                                 "LoLDU exports, MiSS/Bone (default, bat, mini).")
    dense: bool = option(False, help="Write a standard checkpoint: each factor pair of a factorized MODEL "
                         "multiplied back (after folding the adapter, if one is given).")
    # GPTQ base: dequantize -> merge -> quantize again with the base's grid
    requantize: bool = option(False, panel=REQUANT, help="For a GPTQ base: dequantize, merge, then quantize "
                              "again (GPTQ) with the base's bits, group size, symmetry and act-order.")
    calib: str | None = option(None, panel=REQUANT, help="Calibration text for --requantize (same forms as eval "
                               "--data). Default: stdlib code.")
    calib_samples: int = option(128, panel=REQUANT, help="Calibration windows (--requantize).")
    calib_seq_len: int = option(512, flags=("--seq-len",), panel=REQUANT,
                                help="Tokens per calibration window (--requantize).")
    device: str = common.device()  # --requantize: where GPTQ runs
    max_shard_size: str = common.max_shard_size()
    overwrite: bool = common.overwrite()

    def validate(self) -> None:
        if not self.adapter and not self.dense:
            raise UsageError("nothing to merge: give --adapter DIR, --dense, or both")
        if not self.output:
            raise UsageError("an output folder is required: -o/--output OUT")
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise UsageError("--calib-samples must be at least 1 and --seq-len at least 2")
        from lowrank_cli.io.writer import parse_size

        parse_size(self.max_shard_size)
