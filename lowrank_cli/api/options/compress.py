"""`CompressOptions`: every knob of a compress run."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from lowrank_cli.api.options import common
from lowrank_cli.api.options.fields import DATA_PANEL, OUTPUT_PANEL, RUNTIME_PANEL, option, parse_fraction
from lowrank_cli.errors import UsageError
from lowrank_cli.methods.compress.plan import DEFAULT_FAMILIES, FAMILIES

__all__ = ["CompressOptions"]

TARGET, SEARCH = "Target", "Search"
ALLOCATIONS = ("fisher", "error", "uniform")


# How much a measured perplexity increase moves between disjoint eval sets (benchmarks/eval_noise.py,
# SmolLM2, held-out stdlib code, disjoint sets of 4096 tokens, paired with the base): 0.45 x the increase
# for GPTQ 4-bit (+10%), 1.5 x for RTN 8-bit (+0.06%), shrinking about as 1/sqrt(tokens) (0.45, 0.30, 0.23 x
# at 4096, 8192, 16384 tokens). Interpolated in log-log between the two: spread(b, N) = 0.45 b (b / 0.1)^-0.235
# sqrt(4096 / N). A budget b stands above the noise when twice the spread of an increase of that size stays
# below it: N >= 4096 * 0.81 * (b / 0.1)^-0.47 eval tokens (about 9,800 for 1%, 4,600 for 5%).


# spread(b) grows as b^(1 - 0.235): what the post-pass check uses to carry a larger increase's noise to b
NOISE_EXPONENT = 0.765


def eval_tokens_needed(budget: float) -> int:
    """Eval tokens that resolve a perplexity budget `budget` (a fraction) at two standard deviations."""
    return int(4096 * 0.81 * (budget / 0.1) ** -0.47) + 1


def parse_list(text: Any, cast=str, flag: str = "value") -> list | None:
    """'8,4,3' -> [8, 4, 3] (a list given by the library passes through)."""
    if text is None or isinstance(text, list):
        return text
    try:
        return [cast(p.strip()) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes a comma-separated list, got '{text}'") from None


@dataclass
class CompressOptions:
    """Every knob of a compress run; defaults are the recommended setting."""

    output: str | None = common.output()
    # a fraction (0.05 = 5%); the default budget (1%) when no target is given
    target_ppl_increase: float | None = option(
        None, parse=functools.partial(parse_fraction, flag="--target-ppl-increase"), panel=TARGET,
        help="Largest allowed eval perplexity increase, e.g. 1% or 0.01 (default 1%): the smallest candidate "
        "within it wins.")
    target_size: str | None = option(None, panel=TARGET, help="Largest weight size: bytes (60MB, 1.5GB) or a "
                                     "fraction of the input's (0.3, 30%): the best eval perplexity within it wins.")
    families: list[str] | None = option(
        None, parse=functools.partial(parse_list, flag="--families"), panel=SEARCH,
        help="Comma-separated: gptq, factorize-gptq, gptq-lr, factorize. Default: the first two.")
    bits: list[int] | None = option(None, parse=functools.partial(parse_list, cast=int, flag="--bits"),
                                    panel=SEARCH, help="GPTQ bit widths tried (default 8,4,3,2).")
    keeps: list[float] | None = option(
        None, parse=functools.partial(parse_list, cast=float, flag="--keeps"), panel=SEARCH,
        help="Kept fractions of the targeted parameters tried by the factorizing families (default 0.9,0.8).")
    correction_rank: int = option(32, panel=SEARCH, help="Rank of gptq-lr's low-rank correction.")
    group_size: int = option(128, panel=SEARCH, help="GPTQ group size (-1: per channel).")
    sym: bool = option(False, negatable=True, panel=SEARCH, help="Symmetric GPTQ grid.")
    act_order: bool = option(True, negatable=True, panel=SEARCH, help="GPTQ activation order.")
    damp: float = option(0.01, panel=SEARCH, help="Gram damping, a fraction of its mean diagonal.")
    # fisher measured best on SmolLM2 (factorize keep 0.9: see README, "Pick the smallest model")
    allocation: str = option("fisher", panel=SEARCH, help="Ranks of the factorizing families: fisher (error curves "
                             "weighed by the loss's sensitivity, one backward pass), error (output error curves) "
                             "or uniform.")
    # each candidate calibrated on its own changed upstream: one calibration stream per candidate (slower)
    sequential: bool = option(False, negatable=True, panel=SEARCH, help="Calibrate each candidate on its own "
                              "compressed upstream (slower). Default: every candidate from the input's Grams.")
    # see PRUNE_FACTOR in api/compress_job.py for the measurement behind the threshold
    prune: bool = option(True, negatable=True, panel=SEARCH, help="Stop a candidate mid-pass once the predicted "
                         "perplexity increase of its blocks so far (output error weighed by Fisher sensitivity) is "
                         "far over the budget; --no-prune measures every candidate (the full frontier map).")
    heal_steps: int = option(0, panel=SEARCH, help="LoRA healing steps on the chosen candidate and smaller near "
                             "misses (0: none); measured like every candidate.")
    # as quantize: GPTQ decides most candidates, and code calibration measured best for it (see quantize)
    calib: str | None = option(None, panel=DATA_PANEL, help="Calibration text. Default: stdlib code, a part "
                               "disjoint from the eval and test text; for a general-text model give --calib "
                               "stdlib-mix and --eval-data stdlib-prose.")
    calib_samples: int = option(16, panel=DATA_PANEL, help="Calibration windows.")
    calib_seq_len: int = option(512, flags=("--seq-len",), panel=DATA_PANEL, help="Tokens per window.")
    eval_data: str | None = option(None, flags=("--data", "--eval-data"), panel=DATA_PANEL,
                                   help="Eval text (what the choice reads). Default: held-out stdlib code.")
    # enough for a 1% budget to stand above the measured noise (eval_tokens_needed(0.01) = 9,8xx)
    eval_tokens: int = option(10240, panel=DATA_PANEL, help="Eval tokens: 10240 resolve budgets down to about 1% "
                              "(measured noise); fewer than a budget needs are refused.")
    test_data: str | None = common.test_data()
    test_tokens: int = common.test_tokens(10240)
    text_field: str = common.text_field()
    max_shard_size: str = common.max_shard_size()
    overwrite: bool = common.overwrite()
    dry_run: bool = option(False, panel=OUTPUT_PANEL, help="Print the candidates, their exact sizes and the cost "
                           "estimate; run and write nothing.")
    device: str = common.device()
    dtype: str = common.dtype()
    sensitivity_dtype: str = common.sensitivity_dtype()
    batch_size: int = common.batch_size()
    offload_dir: str | None = option(None, panel=RUNTIME_PANEL, help="Keep activations on disk here.")
    seed: int = common.seed()

    def budget_kind(self) -> str:
        if self.target_ppl_increase is not None and self.target_size is not None:
            raise UsageError("give one target: --target-ppl-increase (smallest model within a quality budget) "
                             "or --target-size (best quality within a size), not both")
        return "target_size" if self.target_size is not None else "target_ppl_increase"

    def validate(self) -> None:
        self.budget_kind()
        if self.target_ppl_increase is not None and not 0 < self.target_ppl_increase < 1:
            raise UsageError(f"--target-ppl-increase must be in (0%, 100%), got {self.target_ppl_increase:.4g}")
        budget = self.target_ppl_increase if self.target_ppl_increase is not None else 0.01
        if self.budget_kind() == "target_ppl_increase" and self.eval_tokens < eval_tokens_needed(budget):
            raise UsageError(f"--target-ppl-increase {budget * 100:.3g}% is below the noise of {self.eval_tokens} eval "
                             f"tokens (measured: it needs {eval_tokens_needed(budget)}); raise --eval-tokens or "
                             "the budget")
        unknown = [f for f in (self.families or []) if f not in FAMILIES]
        if unknown:
            raise UsageError(f"unknown family '{unknown[0]}' (choose from {', '.join(FAMILIES)})")
        if self.families is not None and not self.families:
            raise UsageError("--families names no family")
        bad_bits = [b for b in (self.bits or []) if b not in (2, 3, 4, 8)]
        if bad_bits:
            raise UsageError(f"--bits {bad_bits[0]} is not supported (choose from 2, 3, 4, 8)")
        bad_keeps = [k for k in (self.keeps or []) if not 0 < k < 1]
        if bad_keeps:
            raise UsageError(f"--keeps {bad_keeps[0]} must be a fraction in (0, 1)")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"unknown --allocation '{self.allocation}' (choose {', '.join(ALLOCATIONS)})")
        common.check_sensitivity_dtype(self.sensitivity_dtype)
        for name in ("calib_samples", "eval_tokens", "test_tokens", "batch_size", "correction_rank"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.heal_steps < 0:
            raise UsageError("--heal-steps must be >= 0")
        if self.group_size != -1 and self.group_size < 1:
            raise UsageError(f"--group-size must be positive or -1, got {self.group_size}")
        if not self.dry_run and not self.output:
            raise UsageError("an output folder is required: -o/--output OUT")
        if self.heal_steps:
            _require_heal_extras()

    def chosen_families(self) -> list[str]:
        return list(self.families or DEFAULT_FAMILIES)


def _require_heal_extras() -> None:
    from importlib.util import find_spec

    if find_spec("peft") is None:
        raise UsageError("--heal-steps needs peft (pip install 'lowrank-cli[peft]')")
