"""What every fine-tuning method module receives: the adapter's shape, independent of the training loop.

Each method module (`lora`, `lora_pro`, `bone`, `loldu`) exposes the same three functions:

    attach(model, spec) -> model          # adapter added; only adapter parameters require grad
    optimizer(model, spec, *, lr, weight_decay, betas, eps) -> torch.optim.Optimizer
    save(model, folder, spec, *, base_name_or_path) -> None   # a folder PeftModel.from_pretrained loads

The loop never branches on the method: it calls these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AdapterSpec", "METHODS"]

METHODS = ("lora", "lora-pro", "bone", "loldu")


@dataclass
class AdapterSpec:
    method: str
    targets: list[str] = field(default_factory=list)  # full module names, resolved before attach()
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False  # LoRA scaling alpha/sqrt(r) instead of alpha/r
    bone_variant: str = "bat"  # bat: the 2024 paper's Block Affine (W_ij T_i + T_i); miss: later MiSS shard
    lora_pro_mode: str = "efficient"  # efficient: AdamW on adjusted grads; full: paper's m x n Adam moments
