"""Which base tensor each adapter tensor changes, and how: read from the adapter's config and tensor shapes
alone (no weights, no files), so a wrong adapter is refused before anything is read or written.

Keys follow `PeftModel.save_pretrained` (peft 0.21, `get_peft_model_state_dict`): `base_model.model.` +
the module path + `.lora_A.weight` / `.lora_B.weight` (LoRA), `.lora_embedding_A` / `.lora_embedding_B` (LoRA on an
embedding), `.miss_block` (MiSS; `.bone_block` in PEFT <= 0.18 Bone adapters, same math); any other key is a
`modules_to_save` copy that replaces the base tensor of the same name, or (`X.base_layer.weight`, saved with
LoRA on an embedding) the base weight an adapter's delta is then added to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from lowrank_cli.errors import UsageError
from lowrank_cli.methods.merge.deltas import lora_scaling

__all__ = ["Fold", "plan_folds", "apply_fold", "ADAPTER_TYPES"]

PREFIX = "base_model.model."
ADAPTER_TYPES = ("LORA", "MISS", "BONE")
_LORA_PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "EA", ".lora_embedding_B": "EB"}
_MISS_PARTS = (".miss_block", ".bone_block")
_UNSUPPORTED_PARTS = {".lora_magnitude_vector": "DoRA (use_dora)", ".lora_B.bias": "lora_bias",
                      "trainable_tokens_delta": "trainable_token_indices"}


@dataclass(frozen=True)
class Fold:
    """One base tensor's change. kind: lora | lora_embedding | miss | mini | bat | replace."""

    target: str  # base tensor name, e.g. model.layers.0.mlp.up_proj.weight
    kind: str
    keys: tuple[str, ...]  # adapter tensors in the order apply_fold takes them
    scaling: float = 1.0
    fan_in_fan_out: bool = False
    mini_r: int = 1
    replaces_base: bool = False  # the last key is a saved copy of the base weight the delta is added to


def _pattern_key(patterns, name: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern that matches a suffix of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _module_of(key: str, suffix: str) -> str:
    return key[len(PREFIX):-len(suffix)] if key.startswith(PREFIX) else key[:-len(suffix)]


def _miss_kind(config: dict, shape: tuple) -> str:
    init = config.get("init_weights", True)
    if init == "bat" or len(shape) == 3:
        return "bat"
    return "mini" if init == "mini" else "miss"


def _check_config(config: dict) -> str:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in ADAPTER_TYPES:
        raise UsageError(f"adapter type {config.get('peft_type')!r} cannot be merged (supported: LoRA, "
                         "LoRA-Pro and LoLDU exports, MiSS/Bone)")
    if peft_type == "LORA":
        for flag, what in (("use_dora", "DoRA"), ("lora_bias", "lora_bias"), ("target_parameters",
                           "target_parameters"), ("layer_replication", "layer_replication"),
                           ("trainable_token_indices", "trainable_token_indices")):
            if config.get(flag):
                raise UsageError(f"LoRA adapters with {what} cannot be merged by lowrank; use PEFT's "
                                 "merge_and_unload on a model that fits in memory")
    return peft_type


def plan_folds(config: dict, adapter_shapes: dict[str, tuple], base_shapes: dict[str, tuple],
               factorized: set[str] | frozenset = frozenset()) -> list[Fold]:
    """The folds an adapter asks for, checked against the base's tensor names and shapes.

    `factorized`: module names the base stores as NAME.up / NAME.down (only for a better error message).
    Raises UsageError naming the first adapter tensor that does not fit the base.
    """
    peft_type = _check_config(config)
    if not adapter_shapes:
        raise UsageError("the adapter holds no tensors")
    lora: dict[str, dict[str, str]] = {}
    folds: list[Fold] = []
    for key in sorted(adapter_shapes):
        for part, what in _UNSUPPORTED_PARTS.items():
            if part in key:
                raise UsageError(f"adapter tensor '{key}' belongs to {what}, which lowrank cannot merge")
        lora_part = next((p for p in _LORA_PARTS if key.endswith(p)), None)
        miss_part = next((p for p in _MISS_PARTS if key.endswith(p)), None)
        if lora_part and peft_type == "LORA":
            lora.setdefault(_module_of(key, lora_part), {})[_LORA_PARTS[lora_part]] = key
        elif miss_part and peft_type in ("MISS", "BONE"):
            module = _module_of(key, miss_part)
            kind = _miss_kind(config, adapter_shapes[key])
            folds.append(Fold(f"{module}.weight", kind, (key,), mini_r=int(config.get("mini_r") or 1)))
        elif lora_part or miss_part or ".lora_" in key or ".miss_" in key:
            raise UsageError(f"adapter tensor '{key}' does not belong to a {peft_type} adapter")
        else:  # modules_to_save, or a saved base layer: a full copy of a base tensor
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            folds.append(Fold(name.replace(".base_layer.", "."), "replace", (key,)))

    alpha, alphas = float(config.get("lora_alpha", 8)), dict(config.get("alpha_pattern") or {})
    rslora, fifo = bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out"))
    for module, parts in sorted(lora.items()):
        embedding = "EA" in parts or "EB" in parts
        a, b = (parts.get("EA"), parts.get("EB")) if embedding else (parts.get("A"), parts.get("B"))
        if a is None or b is None:
            raise UsageError(f"adapter for '{module}' has only one of its two LoRA factors")
        r = adapter_shapes[a][0]
        key = _pattern_key(alphas, module)
        scaling = lora_scaling(alpha if key is None else float(alphas[key]), r, rslora)
        folds.append(Fold(f"{module}.weight", "lora_embedding" if embedding else "lora", (a, b), scaling,
                          fan_in_fan_out=fifo and not embedding))

    copies = {f.target: f for f in folds if f.kind == "replace"}
    deltas = [f for f in folds if f.kind != "replace"]
    for i, fold in enumerate(deltas):
        copy = copies.pop(fold.target, None)
        if copy is not None:
            _check_fits(copy, adapter_shapes, base_shapes, factorized)
            deltas[i] = replace(fold, keys=fold.keys + copy.keys, replaces_base=True)
    folds = deltas + list(copies.values())
    seen: set[str] = set()
    for fold in folds:
        _check_fits(fold, adapter_shapes, base_shapes, factorized)
        if fold.target in seen:
            raise UsageError(f"the adapter changes '{fold.target}' twice")
        seen.add(fold.target)
    return sorted(folds, key=lambda f: f.target)


def _delta_shape(fold: Fold, shapes: dict[str, tuple], base: tuple) -> tuple | None:
    s = [tuple(shapes[k]) for k in fold.keys]
    if fold.kind in ("lora", "lora_embedding"):
        (r_a, n), (m, r_b) = s[0][:2], s[1][:2]
        if len(s[0]) != 2 or len(s[1]) != 2 or r_a != r_b:
            return None
        return (n, m) if fold.kind == "lora_embedding" or fold.fan_in_fan_out else (m, n)
    if fold.kind == "miss":
        return (s[0][1], base[1]) if len(s[0]) == 2 and len(base) == 2 else None
    if fold.kind == "mini":
        ok = len(s[0]) == 2 and len(base) == 2 and s[0][1] == fold.mini_r and base[0] % fold.mini_r == 0
        return base if ok else None
    if fold.kind == "bat":
        t = s[0]
        ok = len(t) == 3 and len(base) == 2 and t[1] == t[2] and base[0] == t[0] * t[1] and base[1] % t[1] == 0
        return base if ok else None
    return s[0]  # replace


def _check_fits(fold: Fold, shapes: dict[str, tuple], base: dict[str, tuple], factorized) -> None:
    if fold.target not in base:
        module = fold.target.rsplit(".", 1)[0]
        hint = ""
        if module in factorized:
            hint = f" (this base is factorized: adapters must target '{module}.up' / '{module}.down')"
        raise UsageError(f"the adapter does not fit this base: it changes '{fold.target}', which the base "
                         f"does not have{hint}")
    want = tuple(base[fold.target])
    got = _delta_shape(fold, shapes, want)
    if got != want:
        raise UsageError(f"the adapter does not fit this base: '{fold.target}' is {list(want)} in the base, "
                         f"the adapter's {fold.kind} tensors {[list(shapes[k]) for k in fold.keys]} do not "
                         "match it")


def apply_fold(fold: Fold, weight, tensors: list, dtype=None):
    """The merged tensor: `weight` plus the fold's delta, computed in float32 (float64 stays float64) and
    returned in `dtype` (default: `weight`'s dtype). `tensors`: the adapter tensors named by `fold.keys`."""
    import torch

    from lowrank_cli.methods.merge import deltas

    dtype = dtype or weight.dtype
    if fold.kind == "replace":
        return tensors[0].to(dtype).clone()
    if fold.replaces_base:
        weight, tensors = tensors[-1].to(weight.dtype), tensors[:-1]
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(compute)
    t = [x.to(compute) for x in tensors]
    if fold.kind == "lora":
        delta = deltas.lora_delta(t[0], t[1], fold.scaling, fold.fan_in_fan_out)
    elif fold.kind == "lora_embedding":
        delta = deltas.lora_embedding_delta(t[0], t[1], fold.scaling)
    elif fold.kind == "miss":
        delta = deltas.miss_delta(t[0], w.shape)
    elif fold.kind == "mini":
        delta = deltas.mini_delta(t[0], fold.mini_r, w.shape)
    elif fold.kind == "bat":
        delta = deltas.bat_delta(t[0], w)
    else:  # pragma: no cover - plan_folds makes only the kinds above
        raise ValueError(f"unknown fold kind {fold.kind!r}")
    return (w + delta).to(dtype)
