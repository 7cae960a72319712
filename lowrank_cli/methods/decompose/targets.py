"""Which linear layers to factorize: every nn.Linear inside the decoder blocks by default, or the ones
whose module names match `--targets` patterns."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from lowrank_cli.errors import UsageError
from lowrank_cli.methods.decompose.allocate import break_even_rank

__all__ = ["Target", "select_targets", "parse_patterns", "by_block"]


@dataclass(frozen=True)
class Target:
    name: str  # full module name, e.g. model.layers.3.mlp.down_proj
    block: int  # index of the decoder block holding it
    local: str  # name inside the block, e.g. mlp.down_proj
    m: int  # out features
    n: int  # in features
    bias: bool

    @property
    def params(self) -> int:
        return self.m * self.n

    @property
    def break_even(self) -> float:
        return break_even_rank(self.m, self.n)


def parse_patterns(text: str | None) -> list[str] | None:
    """'q_proj,*.mlp.*' -> ['q_proj', '*.mlp.*']; None/'' -> None (the default: every block linear)."""
    if not text:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]


def _matches(name: str, pattern: str) -> bool:
    # A bare layer name ("c_fc", "mlp.down_proj") matches that suffix in every block.
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def select_targets(model, blocks_name: str, patterns: list[str] | None) -> list[Target]:
    """Targets in forward order of the blocks. `model` may live on the meta device."""
    import torch.nn as nn

    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    prefix = blocks_name + "."
    inside = [(n, m) for n, m in linears if n.startswith(prefix)]
    if not inside:
        raise UsageError("the model has no nn.Linear layers inside its decoder blocks to factorize")
    chosen = inside
    if patterns:
        for pattern in patterns:
            if not any(_matches(n, pattern) for n, _ in linears):
                example = ", ".join(n for n, _ in inside[:4])
                raise UsageError(f"--targets pattern '{pattern}' matches no linear layer "
                                 f"(names look like: {example})")
            outside = [n for n, _ in linears if _matches(n, pattern) and not n.startswith(prefix)]
            if outside:
                raise UsageError(f"--targets '{pattern}' matches '{outside[0]}' outside the decoder blocks; "
                                 "only block linears can be factorized")
        chosen = [(n, m) for n, m in inside if any(_matches(n, p) for p in patterns)]
    targets = []
    for name, mod in chosen:
        block, _, local = name[len(prefix):].partition(".")
        targets.append(Target(name=name, block=int(block), local=local, m=mod.out_features,
                              n=mod.in_features, bias=mod.bias is not None))
    return targets


def by_block(targets: list[Target]) -> dict[int, list[Target]]:
    """Targets grouped by the index of their decoder block, in forward order within each block."""
    out: dict[int, list[Target]] = {}
    for t in targets:
        out.setdefault(t.block, []).append(t)
    return out
