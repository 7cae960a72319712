"""Which linear layers a weight-changing job touches: every nn.Linear inside the decoder blocks by default
(less the ones no method should change, see `NEVER`), or the ones whose module names match `--targets`
patterns. One module for decompose, quantize, compress, trp-train and finetune."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from lowrank_cli.errors import UsageError

__all__ = ["Target", "select_targets", "parse_patterns", "by_block", "matches", "NEVER"]

# Mixture-of-experts routers (Mixtral `block_sparse_moe.gate`, Qwen-MoE `mlp.gate` and
# `shared_expert_gate`, DeepSeek/OLMoE `router`) are tiny and decide which expert runs: an
# approximation there reroutes tokens instead of perturbing them, so llm-compressor's recipes ignore them
# too. Llama's `mlp.gate_proj` is an ordinary projection and stays a target.
NEVER = ("*.gate", "*.shared_expert_gate", "*.router", "*.router.*")


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
        """The rank at which up (m x r) + down (r x n) hold as many parameters as W."""
        return self.m * self.n / (self.m + self.n)


def parse_patterns(text: str | None) -> list[str] | None:
    """'q_proj,*.mlp.*' -> ['q_proj', '*.mlp.*']; None/'' -> None (the default: every block linear)."""
    if not text:
        return None
    return [p.strip() for p in text.split(",") if p.strip()]


def matches(name: str, pattern: str) -> bool:
    """A bare layer name ("c_fc", "mlp.down_proj") matches that suffix in every block."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _check_pattern(pattern: str, linears: list[str], inside: list[str], prefix: str) -> None:
    if not any(matches(n, pattern) for n in linears):
        example = ", ".join(inside[:4])
        raise UsageError(f"--targets pattern '{pattern}' matches no linear layer (names look like: {example})")
    outside = [n for n in linears if matches(n, pattern) and not n.startswith(prefix)]
    if outside:
        raise UsageError(f"--targets '{pattern}' matches '{outside[0]}' outside the decoder blocks; "
                         "only block linears can be changed")


def select_targets(model, blocks_name: str, patterns: list[str] | None) -> list[Target]:
    """Targets in forward order of the blocks. `model` may live on the meta device. Explicit patterns may
    name a layer of `NEVER`; the default never does."""
    import torch.nn as nn

    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    prefix = blocks_name + "."
    inside = [n for n in linears if n.startswith(prefix)]
    if not inside:
        raise UsageError("the model has no nn.Linear layers inside its decoder blocks to change")
    if patterns:
        for pattern in patterns:
            _check_pattern(pattern, list(linears), inside, prefix)
        chosen = [n for n in inside if any(matches(n, p) for p in patterns)]
    else:
        chosen = [n for n in inside if not any(matches(n, p) for p in NEVER)]
    targets = []
    for name in chosen:
        mod = linears[name]
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
