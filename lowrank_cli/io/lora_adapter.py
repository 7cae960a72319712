"""A standard PEFT LoRA adapter folder from factors computed elsewhere (no PeftModel needed to write it).

`PeftModel.from_pretrained(base, folder)` loads it: adapter_config.json (LoraConfig, lora_alpha = r, so the
scaling is 1 and the update is exactly B A) and adapter_model.safetensors with the keys
`base_model.model.<module>.lora_A.weight` (r x n) and `...lora_B.weight` (m x r).
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["write_lora_adapter", "ADAPTER_WEIGHTS"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_lora_adapter(folder: Path, factors: dict, *, base_name_or_path: str | None = None, dtype=None) -> Path:
    """`factors`: module name -> (B, A) with B m x r and A r x n. Modules of another rank than the most
    common one go into PEFT's rank_pattern / alpha_pattern (alpha = r everywhere: scaling 1)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if not factors:
        raise ValueError("no factors to write")
    ranks = {name: a.shape[0] for name, (_, a) in factors.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {name: r for name, r in ranks.items() if r != rank}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (b, a) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype or a.dtype).cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype or b.dtype).cpu().contiguous()
    # pattern keys are regexes PEFT matches as r"(.*\.)?(key)$": an escaped full name matches that module only
    exact = {re.escape(name): r for name, r in pattern.items()}
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=sorted(factors), bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_name_or_path, rank_pattern=exact,
                        alpha_pattern=dict(exact))
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder
