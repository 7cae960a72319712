"""The candidates `compress` weighs: families, their settings, and their exact size before any is built.

Families:
- `gptq`: GPTQ alone at each of `bits`;
- `factorize-gptq`: data-aware factorization keeping `keep` of the targeted parameters, then GPTQ of both
  factors (ranks in multiples of 32, which GPTQ packing needs);
- `gptq-lr`: GPTQ plus a rank-r correction of its error, W ~ Q + L R (CALDERA / LQER), the correction
  stored as a standard PEFT LoRA adapter;
- `factorize`: factorization alone, 16-bit.
Sizes are exact byte counts of the weight files (embeddings, scales and zero points included), computed
from shapes, so a size target prunes candidates before any is run. Pure: no model, no files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FAMILIES", "DEFAULT_FAMILIES", "Spec", "candidate_specs"]

FAMILIES = ("gptq", "factorize-gptq", "gptq-lr", "factorize")
# Factorization alone (16-bit) is larger than 8-bit GPTQ at every keep worth having; it is on the frontier
# plot when asked for (--families ...,factorize), not in the default search. gptq-lr (rank-32 correction) was
# dominated by GPTQ alone on both models measured (larger and worse: SmolLM2 3-bit 113 MiB eval +32% vs
# 4-bit 108 MiB +10%, 2-bit diverges; demo 3-bit 4.21 MiB +0.35% vs 4-bit 3.64 MiB +0.30%, 2-bit 3.89 MiB
# +3.4% vs 3-bit 3.32 MiB +0.6%) at three times a GPTQ candidate's cost: asked for, not searched by default.
DEFAULT_FAMILIES = ("gptq", "factorize-gptq")
DEFAULT_BITS = (8, 4, 3, 2)
DEFAULT_KEEPS = (0.9, 0.8)
FACTORIZED_BITS = (4, 3)  # factorization pays where it is combined with 3-4 bit quantization
CORRECTION_BITS = (3, 2)  # a low-rank correction earns its bytes below ~3 bits per weight
DEFAULT_CORRECTION_RANK = 32


@dataclass
class Spec:
    family: str
    bits: int | None = None  # None: 16-bit (factorize)
    keep: float | None = None  # kept fraction of the targeted parameters (factorizing families)
    rank: int | None = None  # correction rank (gptq-lr)
    bytes: int = 0  # exact size of the weight files, filled by the caller
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        parts = [self.family]
        if self.keep is not None:
            parts.append(f"keep{self.keep:g}")
        if self.bits is not None:
            parts.append(f"{self.bits}bit")
        if self.rank is not None:
            parts.append(f"r{self.rank}")
        return "-".join(parts)


def candidate_specs(families, bits=DEFAULT_BITS, keeps=DEFAULT_KEEPS,
                    correction_rank: int = DEFAULT_CORRECTION_RANK) -> list[Spec]:
    """Every candidate of the chosen families on the given grids (see the module docstring)."""
    specs: list[Spec] = []
    for family in families:
        if family == "gptq":
            specs += [Spec("gptq", bits=b) for b in bits]
        elif family == "factorize-gptq":
            specs += [Spec("factorize-gptq", bits=b, keep=k) for k in keeps for b in bits if b in FACTORIZED_BITS]
        elif family == "gptq-lr":
            specs += [Spec("gptq-lr", bits=b, rank=correction_rank) for b in bits if b in CORRECTION_BITS]
        elif family == "factorize":
            specs += [Spec("factorize", keep=k) for k in keeps]
        else:
            raise ValueError(f"unknown family {family!r}")
    return specs
