"""Which layers get an adapter: `--targets` patterns (as in decompose) -> full module names.

A "layer" is a linear inside the decoder blocks (never lm_head or embeddings):
- an `nn.Linear` (bitsandbytes' Linear4bit/Linear8bitLt are subclasses),
- a GPTQ-packed linear (a module with a `qweight` buffer and in/out features; PEFT wraps those),
- a factorized layer X from `lowrank decompose` (X.down then X.up, both nn.Linear): patterns match the
  name X, and X resolves to its two children `X.down` and `X.up`, each adapted on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_cli.errors import UsageError
from lowrank_cli.methods.decompose.targets import _matches, parse_patterns

__all__ = ["Layer", "resolve_targets", "parse_patterns", "adaptable_layers", "module_names"]


@dataclass(frozen=True)
class Layer:
    name: str  # the layer a pattern matches (X for a factorized layer)
    modules: tuple[str, ...]  # the modules that get adapters (X.down, X.up for a factorized layer)
    shapes: tuple[tuple[int, int], ...]  # (out, in) per module
    kind: str  # linear | quantized | factorized


def _is_linear(module) -> bool:
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return True
    buffers = getattr(module, "_buffers", {})
    return "qweight" in buffers and hasattr(module, "in_features") and hasattr(module, "out_features")


def _is_factorized(module) -> bool:
    import torch.nn as nn

    return (not isinstance(module, nn.Linear) and _is_linear(getattr(module, "down", None) or object())
            and _is_linear(getattr(module, "up", None) or object()) and len(list(module.children())) == 2)


def adaptable_layers(model) -> list[Layer]:
    """Every linear-like layer inside the decoder blocks, in module order."""
    import torch.nn as nn

    from lowrank_cli.engine.streamed import find_blocks

    blocks_name, _ = find_blocks(model)
    prefix = blocks_name + "."
    layers, inside_factorized = [], set()
    for name, module in model.named_modules():
        if not name.startswith(prefix) or name in inside_factorized:
            continue
        if _is_factorized(module):
            down, up = module.down, module.up
            inside_factorized |= {f"{name}.down", f"{name}.up"}
            layers.append(Layer(name, (f"{name}.down", f"{name}.up"),
                                ((down.out_features, down.in_features), (up.out_features, up.in_features)),
                                "factorized"))
        elif _is_linear(module):
            kind = "linear" if type(module) is nn.Linear else "quantized"
            layers.append(Layer(name, (name,), ((module.out_features, module.in_features),), kind))
    if not layers:
        raise UsageError("the model has no linear layers inside its decoder blocks to adapt")
    return layers


def resolve_targets(model, patterns: list[str] | str | None, *, rank: int | None = None) -> list[Layer]:
    """The layers `patterns` select (default: all of them); UsageError when a pattern matches nothing or
    `rank` exceeds min(out, in) of a targeted module."""
    if isinstance(patterns, str):
        patterns = parse_patterns(patterns)
    layers = adaptable_layers(model)
    chosen = layers
    if patterns:
        for pattern in patterns:
            if not any(_matches(layer.name, pattern) for layer in layers):
                outside = [n for n, _ in model.named_modules() if n and _matches(n, pattern)]
                if outside:
                    raise UsageError(f"--targets '{pattern}' matches '{outside[0]}', which is no linear layer "
                                     "inside the decoder blocks; only those can be adapted")
                example = ", ".join(layer.name for layer in layers[:4])
                raise UsageError(f"--targets pattern '{pattern}' matches no linear layer "
                                 f"(names look like: {example})")
        chosen = [layer for layer in layers if any(_matches(layer.name, p) for p in patterns)]
    if rank is not None:
        for layer in chosen:
            for module, (out_f, in_f) in zip(layer.modules, layer.shapes, strict=True):
                if rank > min(out_f, in_f):
                    raise UsageError(f"--rank {rank} is larger than the layer '{module}' ({out_f}x{in_f}, "
                                     f"at most rank {min(out_f, in_f)}); lower --rank or leave it out of "
                                     "--targets")
    return chosen


def module_names(layers: list[Layer]) -> list[str]:
    return [m for layer in layers for m in layer.modules]
