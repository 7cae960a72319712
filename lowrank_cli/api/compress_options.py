"""Options and result of `lowrank compress` (the flow: `lowrank_cli.api.compress`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lowrank_cli.errors import UsageError
from lowrank_cli.methods.compress.plan import DEFAULT_FAMILIES, FAMILIES
from lowrank_cli.result import Result

__all__ = ["CompressOptions", "CompressResult", "FRONTIER_JSON", "FRONTIER_PNG"]

FRONTIER_JSON, FRONTIER_PNG = "frontier.json", "frontier.png"


@dataclass
class CompressOptions:
    """Every knob of a compress run; defaults are the recommended setting."""

    output: str | None = None
    target_ppl_increase: float | None = None  # fraction (0.05 = 5%); the default budget (1%) when no target
    target_size: str | None = None  # bytes ("60MB") or a fraction of the input's weight bytes ("0.3")
    families: list[str] | None = None  # default: gptq, factorize-gptq, gptq-lr
    bits: list[int] | None = None  # GPTQ bit widths tried (default 8, 4, 3, 2)
    keeps: list[float] | None = None  # kept fractions tried by the factorizing families (default 0.9, 0.8)
    correction_rank: int = 32  # rank of gptq-lr's low-rank correction
    group_size: int = 128
    sym: bool = False
    act_order: bool = True
    damp: float = 0.01
    allocation: str = "error"  # factorizing families: error (output error curves) or uniform
    heal_steps: int = 0  # LoRA healing steps on the chosen candidate (0: none)
    calib: str | None = None
    calib_samples: int = 16
    calib_seq_len: int = 512
    eval_data: str | None = None
    eval_tokens: int = 4096
    test_data: str | None = None
    test_tokens: int = 4096
    text_field: str = "text"
    sequential: bool = False  # each candidate calibrated on its own changed upstream (slower; K x the passes)
    max_shard_size: str = "2GB"
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 1
    offload_dir: str | None = None
    overwrite: bool = False
    dry_run: bool = False
    seed: int = 0

    def budget_kind(self) -> str:
        if self.target_ppl_increase is not None and self.target_size is not None:
            raise UsageError("give one target: --target-ppl-increase (smallest model within a quality budget) "
                             "or --target-size (best quality within a size), not both")
        return "target_size" if self.target_size is not None else "target_ppl_increase"

    def validate(self) -> None:
        self.budget_kind()
        if self.target_ppl_increase is not None and not 0 < self.target_ppl_increase < 1:
            raise UsageError(f"--target-ppl-increase must be in (0%, 100%), got {self.target_ppl_increase:.4g}")
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
        if self.allocation not in ("error", "uniform"):
            raise UsageError(f"unknown --allocation '{self.allocation}' (choose error, uniform)")
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


@dataclass
class CompressResult(Result):
    model: str
    output: str | None
    dry_run: bool
    budget: dict  # kind and value, and the resolved limit (perplexity or bytes)
    chosen: dict | None  # the winning candidate's record
    candidates: list  # every candidate: family, settings, bytes, bits per weight, eval/test perplexity, seconds
    baseline: dict  # eval and test perplexity of the input, its weight bytes
    timings_s: dict = field(default_factory=dict)

    def summary(self):
        rows = [("model", self.model), ("budget", _budget_text(self.budget))]
        if self.dry_run:
            rows.append(("dry run", "nothing written"))
            rows += [(f"  {c['label']}", f"{c['bytes'] / 2**20:.1f} MiB, {c['bits_per_weight']:.2f} bits/weight")
                     for c in self.candidates]
            rows.append(("est. cost", f"{self.baseline['cost']['token_forwards']:,} token-forwards "
                                      f"({self.baseline['cost']['vs_one_pass']:.1f} x one profile pass)"))
            return rows
        c = self.chosen
        rows += [("output", self.output), ("chosen", c["label"]),
                 ("size", f"{self.baseline['bytes'] / 2**20:.1f} MiB -> {c['bytes'] / 2**20:.1f} MiB "
                          f"({c['bytes'] / self.baseline['bytes']:.3f})"),
                 ("perplexity (eval)", f"{self.baseline['eval']:.4f} -> {c['eval_perplexity']:.4f}"),
                 ("perplexity (test)", f"{self.baseline['test']:.4f} -> {c['test_perplexity']:.4f}"),
                 ("candidates", f"{len(self.candidates)} ({sum(x['passed'] for x in self.candidates)} passed)"),
                 ("time", f"{sum(self.timings_s.values()):.1f} s")]
        return rows


def _budget_text(budget: dict) -> str:
    if budget["kind"] == "target_size":
        return f"size <= {budget['limit_bytes'] / 2**20:.1f} MiB"
    return f"eval perplexity <= +{budget['value'] * 100:.3g}%"


