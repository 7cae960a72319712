"""Low-rank corrections (W ~ base + L R per module) stored as a standard PEFT LoRA adapter.

PEFT's LoRA computes base(x) + lora_B(lora_A(x)) * scaling with scaling = lora_alpha / r, lora_A an r x n and
lora_B an m x r `nn.Linear` weight. So a correction L (m x r) @ R (r x n) is lora_A = R, lora_B = L with
lora_alpha = r (scaling exactly 1). The folder is what `PeftModel.save_pretrained` writes:
`adapter_config.json` (written by peft's own `LoraConfig.save_pretrained`) and `adapter_model.safetensors`
with keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`. It loads with
`PeftModel.from_pretrained(base, folder)`, over a dense base or a GPTQ one (peft wraps gptqmodel's quantized
linears), with no remote code; training it further is plain (Q)LoRA.

Modules with different ranks: `r` / `lora_alpha` hold the most common rank, `rank_pattern` / `alpha_pattern`
the others (keyed by the escaped full module name, which peft matches as a regex on the name's end).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ADAPTER_WEIGHTS", "write_lora_adapter", "read_lora_adapter"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _check(factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, int]:
    if not factors:
        raise ValueError("no factors to store")
    ranks = {}
    for name, (up, down) in factors.items():
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0] or up.shape[1] == 0:
            raise ValueError(f"{name}: need L (m x r) and R (r x n) with r >= 1, got {tuple(up.shape)} and "
                             f"{tuple(down.shape)}")
        ranks[name] = int(up.shape[1])
    return ranks


def write_lora_adapter(folder: str | Path, factors: dict[str, tuple[Tensor, Tensor]], base_name_or_path: str,
                       *, dtype: torch.dtype = torch.float32, task_type: str = "CAUSAL_LM") -> Path:
    """Write {module name: (L, R)} as a PEFT LoRA adapter folder (created if missing); returns the folder.

    Args:
        folder: Where adapter_config.json and adapter_model.safetensors go.
        factors: Full module names as in the base model's `named_modules()` (e.g.
            "model.layers.0.self_attn.q_proj") to (L m x r, R r x n); W_effective = W_base + L @ R.
        base_name_or_path: Recorded as the adapter's base model (a path or a hub id).
        dtype: Stored dtype of the factors (float32 keeps a float16 base's correction exact; peft runs
            float32 adapters over float16 bases).
        task_type: peft's task type (CAUSAL_LM: `PeftModel.from_pretrained` gives a causal LM).

    Raises:
        ValueError: On an empty mapping or factors whose shapes do not chain.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranks = _check(factors)
    common = Counter(ranks.values()).most_common(1)[0][0]
    others = {re.escape(name): r for name, r in ranks.items() if r != common}
    config = LoraConfig(r=common, lora_alpha=common, target_modules=sorted(factors), lora_dropout=0.0,
                        bias="none", task_type=task_type, rank_pattern=dict(others), alpha_pattern=dict(others),
                        base_model_name_or_path=str(base_name_or_path), inference_mode=True)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tensors = {}
    for name, (up, down) in sorted(factors.items()):
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = down.detach().to("cpu", dtype).contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = up.detach().to("cpu", dtype).contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


def read_lora_adapter(folder: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """{module name: (L, R)} back from an adapter folder written by `write_lora_adapter` (or by peft, when
    its scaling is 1: lora_alpha == r for every module, no rsLoRA), in the stored dtype.

    Raises:
        ValueError: If an adapter's scaling is not 1 (L R would not be the stored product).
    """
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("use_rslora") or config.get("lora_alpha") != config.get("r") \
            or config.get("alpha_pattern", {}) != config.get("rank_pattern", {}):
        raise ValueError(f"{folder}: the adapter's scaling is not 1 (lora_alpha != r); read it with peft")
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    names = sorted({k[len(_PREFIX):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})
    return {n: (tensors[f"{_PREFIX}{n}.lora_B.weight"], tensors[f"{_PREFIX}{n}.lora_A.weight"]) for n in names}
