"""`DecomposeOptions`: every knob of a decompose run."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from lowrank_cli.api.options import common
from lowrank_cli.api.options.fields import (
    DATA_PANEL,
    OUTPUT_PANEL,
    RUNTIME_PANEL,
    option,
    parse_fraction,
    parse_patterns,
)
from lowrank_cli.errors import UsageError

__all__ = ["DecomposeOptions", "METHODS", "ALLOCATIONS", "FORMATS"]

METHODS = ("lord", "svd")
ALLOCATIONS = ("fisher", "error", "uniform")
FORMATS = ("factorized", "dense")
BUDGET, METHOD = "Budget", "Method"


@dataclass
class DecomposeOptions:
    """Every knob of a decompose run; defaults are the recommended setting."""

    output: str | None = common.output()
    # a fraction, 0.01 = 1%; the default budget when none is given
    target_ppl_increase: float | None = option(
        None, parse=functools.partial(parse_fraction, flag="--target-ppl-increase"), panel=BUDGET,
        help="Largest allowed perplexity increase on held-out text, e.g. 1% or 0.01. Searches for the smallest "
        "model that meets it.")
    params_ratio: float | None = option(None, panel=BUDGET, help="Fraction of the targeted layers' parameters "
                                        "to keep, in (0, 1].")
    rank: int | None = option(None, panel=BUDGET, help="One rank for every targeted layer.")
    method: str = option("lord", panel=METHOD, help="lord: factors minimizing the output error ||(W - W')X|| "
                         "on calibration text; svd: weights only.")
    # module-name patterns; None = every linear in the decoder blocks
    targets: list[str] | None = option(
        None, parse=parse_patterns, panel=METHOD, help="Comma-separated module-name patterns "
        "(globs; a bare name like c_fc matches it in every block). Default: every linear layer inside the "
        "decoder blocks.")
    allocation: str = option("fisher", panel=METHOD, help="fisher: ranks where the loss cares least (one "
                             "streamed backward pass); error: by output error alone; uniform: the same fraction "
                             "in every layer.")
    # ranks rounded to this (tensor-core and kernel friendly)
    rank_multiple: int = option(8, panel=METHOD, help="Round ranks to a multiple of this.")
    # None: by the kept fraction (SEQUENTIAL_BELOW in api/decompose.py, where it measured a gain)
    sequential: bool | None = option(None, negatable=True, panel=METHOD, show_default=False, help="Calibrate "
                                     "each layer on the outputs of the already compressed layers before it. "
                                     "Default: for kept fractions below 0.75, where it measured a gain; above, "
                                     "every layer takes the input model's Grams, kept from the first pass.")
    true_sequential: bool = option(True, negatable=True, panel=METHOD, help="With --sequential: measure each "
                                   "input group's Gram after the groups before it in the block are factorized "
                                   "(q/k/v, then o, gate/up, down); --no-true-sequential measures a block's Grams "
                                   "in one forward (fewer block forwards).")
    damp: float = option(0.01, panel=METHOD, help="Gram damping, a fraction of its mean diagonal.")
    # float32 chunk products (summed in float64) measured the same models as float64 ones on SmolLM2 (test, eval
    # and prose perplexity equal to 3 decimals at kept 0.6, 0.8 and 0.9: benchmarks/decompose_quality.py
    # lord-fisher-noseq vs -noseq-f32) and cost about half; float64 stays available
    gram_products: str = option("float32", panel=METHOD, help="Precision of each calibration chunk's Gram "
                                "product before it is summed in float64, for the factors written: float32 "
                                "(measured the same models as float64 on SmolLM2, about twice as fast) or "
                                "float64. The allocation's error curves always take float32 products.")
    search_steps: int = option(6, panel=BUDGET, help="Streamed passes over the model the perplexity search "
                               "may spend (each evaluates --search-width kept fractions).")
    # one read of the blocks serves every candidate of a pass, but each candidate still costs its own
    # factorization and forwards: a pass of width w takes nearly w times a single evaluation's compute
    search_width: int = option(3, panel=BUDGET, help="Kept fractions the perplexity search evaluates in one "
                               "streamed pass (1: bisection, one per pass). Each one holds its own calibration "
                               "(with sequential calibration) and evaluation activations for the whole pass, "
                               "about (calib-samples x seq-len + eval-tokens + test-tokens) x hidden values "
                               "of the compute dtype (--dry-run counts them), and its own compute: wider needs "
                               "fewer passes, not less work.")
    # stdlib-mix (code and English documentation) measured better for both kinds of text than code alone
    # (benchmarks/calib_mix.py, SmolLM2, keep 0.8: code ppl +39% vs +28%, prose +40% vs +74%)
    calib: str | None = option("stdlib-mix", panel=DATA_PANEL, help="Calibration text (same forms as --data). "
                               "Default: stdlib-mix, the stdlib's code and English documentation (a part disjoint "
                               "from the eval and test text); a code model may prefer --calib stdlib.")
    calib_samples: int = option(16, panel=DATA_PANEL, help="Calibration windows.")
    calib_seq_len: int = option(512, flags=("--seq-len",), panel=DATA_PANEL,
                                help="Tokens per calibration and evaluation window.")
    eval_data: str | None = option(
        None, flags=("--data", "--eval-data"), panel=DATA_PANEL, help="Evaluation text for the budget. "
        "Default: held-out stdlib code. If it is the same source as --calib, documents are split so the two "
        "never overlap.")
    # 1% (the default budget) stands above the measured noise from about 9,800 eval tokens on
    # (lowrank_cli/api/options/compress.py eval_tokens_needed, benchmarks/eval_noise.py)
    eval_tokens: int = option(10240, panel=DATA_PANEL, help="Evaluation tokens (10240 resolve a 1% budget "
                              "above the measured noise).")
    test_data: str | None = common.test_data()
    test_tokens: int = common.test_tokens(10240)
    text_field: str = common.text_field()
    format: str = option("factorized", panel=OUTPUT_PANEL, help="factorized: two matrices per layer, loads "
                         "with trust_remote_code=True; dense: products multiplied back, a standard checkpoint.")
    max_shard_size: str = common.max_shard_size()
    overwrite: bool = common.overwrite()
    dry_run: bool = option(False, panel=OUTPUT_PANEL, help="Read config and headers only; print the plan and "
                           "estimates; write nothing.")
    device: str = common.device()
    dtype: str = common.dtype()
    sensitivity_dtype: str = common.sensitivity_dtype()
    batch_size: int = common.batch_size()
    offload_dir: str | None = option(None, panel=RUNTIME_PANEL, help="Keep calibration activations on disk "
                                     "here (long calibration sets).")
    seed: int = common.seed()

    def budget_kind(self) -> str:
        given = [k for k in ("target_ppl_increase", "params_ratio", "rank") if getattr(self, k) is not None]
        if len(given) > 1:
            raise UsageError("give only one budget: --target-ppl-increase, --params-ratio or --rank "
                             f"(got {', '.join('--' + g.replace('_', '-') for g in given)})")
        return given[0] if given else "target_ppl_increase"

    def validate(self) -> None:
        kind = self.budget_kind()
        if self.method not in METHODS:
            raise UsageError(f"unknown --method '{self.method}' (choose {', '.join(METHODS)})")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"unknown --allocation '{self.allocation}' (choose {', '.join(ALLOCATIONS)})")
        if self.format not in FORMATS:
            raise UsageError(f"unknown --format '{self.format}' (choose {', '.join(FORMATS)})")
        if kind == "target_ppl_increase" and self.target_ppl_increase is not None and not (
                0 <= self.target_ppl_increase < 1):
            raise UsageError(f"--target-ppl-increase must be in [0%, 100%), got "
                             f"{self.target_ppl_increase:.4g} ({self.target_ppl_increase * 100:.4g}%)")
        if kind == "params_ratio" and not (0 < self.params_ratio <= 1):
            raise UsageError(f"--params-ratio must be in (0, 1], got {self.params_ratio}")
        if kind == "rank" and self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if self.rank_multiple < 1:
            raise UsageError("--rank-multiple must be at least 1")
        for name in ("calib_samples", "eval_tokens", "test_tokens", "search_steps", "search_width",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.calib_seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2, got {self.calib_seq_len}")
        if self.gram_products not in ("float64", "float32"):
            raise UsageError(f"unknown --gram-products '{self.gram_products}' (choose float64, float32)")
        if self.damp < 0:
            raise UsageError("--damp must be >= 0")
        common.check_sensitivity_dtype(self.sensitivity_dtype)
        from lowrank_cli.io.writer import parse_size

        parse_size(self.max_shard_size)  # a bad size fails now, not after the compression work
        if not self.dry_run and not self.output:
            raise UsageError("an output folder is required: -o/--output OUT")
