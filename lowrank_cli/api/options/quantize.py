"""`QuantizeOptions`: every knob of a quantize run."""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_cli.api.options import common
from lowrank_cli.api.options.fields import DATA_PANEL, OUTPUT_PANEL, RUNTIME_PANEL, option
from lowrank_cli.errors import UsageError

__all__ = ["QuantizeOptions", "METHODS", "BITS"]

METHODS = ("gptq", "rtn")
BITS = (2, 3, 4, 8)
GRID = "Quantization"


@dataclass
class QuantizeOptions:
    """Every knob of a quantize run; defaults are the recommended setting (GPTQ 4-bit, group 128)."""

    output: str | None = common.output()
    bits: int = option(4, panel=GRID, help="Bits per weight: 2, 3, 4 or 8.")
    # input columns sharing a scale; -1 = one scale per output channel
    group_size: int = option(128, panel=GRID, help="Input columns sharing one scale and zero point; -1 = one "
                             "per output channel. Need not divide the layer width (the last group is shorter).")
    # Asymmetric grids and act-order measured best (benchmarks/quantize_quality.py: SmolLM2 4-bit g128 code
    # ppl 9.89 vs 11.08 for symmetric without act-order); every GPTQ loader reads both. Marlin-class GPU
    # kernels want sym=True.
    sym: bool = option(False, negatable=True, panel=GRID, help="Symmetric grid (zero point in the middle; what "
                       "Marlin-class GPU kernels want) or asymmetric (min/max of each group; more accurate).")
    act_order: bool = option(True, negatable=True, panel=GRID, help="Quantize columns in decreasing order of "
                             "input energy (desc_act; more accurate).")
    damp: float = option(0.01, panel=GRID, help="Hessian damping, a fraction of its mean diagonal.")
    true_sequential: bool = option(True, negatable=True, panel=GRID, help="Measure each input group's Hessian "
                                   "after the groups before it in the block are quantized (q/k/v, then o, "
                                   "gate/up, down); --no-true-sequential measures a block's Hessians in one "
                                   "forward (fewer block forwards).")
    method: str = option("gptq", panel=GRID, help="gptq: error-feedback solve on calibration text; rtn: round "
                         "to nearest (no data).")
    # code alone measured at least as good as stdlib-mix on both kinds of text for GPTQ (benchmarks/calib_mix.py,
    # SmolLM2 4-bit: code ppl +10% vs +18%, prose +17% vs +17%)
    calib: str | None = option(None, panel=DATA_PANEL, help="Calibration text (same forms as --data). Default: "
                               "stdlib code, a part disjoint from the eval and test text (measured at least as "
                               "good as stdlib-mix on code and on prose for GPTQ).")
    calib_samples: int = option(128, panel=DATA_PANEL, help="Calibration windows.")
    calib_seq_len: int = option(512, flags=("--seq-len",), panel=DATA_PANEL,
                                help="Tokens per calibration and evaluation window.")
    eval_data: str | None = option(None, flags=("--data", "--eval-data"), panel=DATA_PANEL,
                                   help="Evaluation text for the before/after perplexity. Default: held-out "
                                   "stdlib code.")
    # 0: a pipeline that evaluates later (lowrank eval) skips both perplexity passes; GPTQ itself is unchanged
    eval_tokens: int = option(4096, panel=DATA_PANEL, help="Evaluation tokens (0: measure no perplexity, "
                              "baseline or quantized; the fastest).")
    test_data: str | None = common.test_data()
    test_tokens: int = common.test_tokens()
    skip_eval: bool = option(False, panel=DATA_PANEL, help="Skip the baseline perplexity pass (the quantized "
                             "perplexity is still measured).")
    text_field: str = common.text_field()
    max_shard_size: str = common.max_shard_size()
    overwrite: bool = common.overwrite()
    dry_run: bool = option(False, panel=OUTPUT_PANEL, help="Read config and headers only; print the plan (layers, "
                           "exact output size, peak memory on --device) and write nothing.")
    device: str = common.device()
    dtype: str = common.dtype()
    batch_size: int = common.batch_size()
    offload_dir: str | None = option(None, panel=RUNTIME_PANEL, help="Keep calibration activations on disk "
                                     "here.")
    seed: int = common.seed()

    def validate(self) -> None:
        if self.bits not in BITS:
            raise UsageError(f"--bits {self.bits} is not supported (choose {', '.join(map(str, BITS))})")
        if self.group_size != -1 and self.group_size < 1:
            raise UsageError(f"--group-size must be positive or -1 (per channel), got {self.group_size}")
        if self.method not in METHODS:
            raise UsageError(f"unknown --method '{self.method}' (choose {', '.join(METHODS)})")
        if not 0 <= self.damp < 1:
            raise UsageError(f"--damp must be in [0, 1), got {self.damp}")
        if self.eval_tokens < 0:
            raise UsageError(f"--eval-tokens must be 0 (no perplexity) or more, got {self.eval_tokens}")
        for name in ("calib_samples", "test_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.calib_seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2, got {self.calib_seq_len}")
        from lowrank_cli.io.writer import parse_size

        parse_size(self.max_shard_size)
        if not self.output and not self.dry_run:
            raise UsageError("an output folder is required: -o/--output OUT")
