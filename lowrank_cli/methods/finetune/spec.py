"""What every fine-tuning method module receives: the adapter's shape, independent of the training loop.

Each method module (`lora`, `lora_pro`, `bone`, `loldu`) exposes the same three functions:

    attach(model, spec) -> model          # adapter added; only adapter parameters require grad
    optimizer(model, spec, *, lr, weight_decay, betas, eps) -> torch.optim.Optimizer
    save(model, folder, spec, *, base_name_or_path) -> None   # a folder PeftModel.from_pretrained loads

The loop never branches on the method: it calls these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AdapterSpec", "METHODS", "DEFAULTS", "default"]

METHODS = ("lora", "lora-pro", "bone", "loldu")

# Per-method defaults of `finetune` (lr, alpha), used where the user gives none.
#   lora, lora-pro, bone: lr 2e-4, alpha 16 (scaling 2 at rank 8), the usual PEFT LoRA setting.
#   loldu: trains r numbers per layer (the LDU diagonal z, initialised to the pivots D_r) and its update is
#     sigma P L_r diag(z - D_r) U_r with sigma = alpha / r. Under AdamW z moves by ~lr per step whatever the
#     gradient's scale, so the weight-space step is ~sigma * lr: the official sigma = 1/r with the shared
#     lr 2e-4 was a near no-op. Measured on the demo (benchmarks/finetune_methods.py worker, 30 steps of
#     4 x 256 tokens of stdlib prose, rank 8, every block linear; held-out loss drop, LoRA at its defaults:
#     0.0391): lr 2e-4 / alpha 1: 0.0018; 1e-3 / 1: 0.0082; 1e-2 / 1: 0.0276; 1e-3 / 8: 0.0270;
#     3e-3 / 8: 0.0284; 1e-2 / 8: 0.0270; 1e-3 / 16: 0.0284; 1e-2 / 16: 0.0268. On the stdlib code the demo
#     was trained on (seq 512, 256 held-out examples) nothing generalises (LoRA: -0.0016) and every LoLDU
#     step raises the held-out loss in proportion to sigma * lr: 1e-3 / 1: +0.0003; 3e-4 / 8: +0.0019;
#     1e-3 / 8: +0.0084; 3e-3 / 8: +0.0192. Chosen: lr 1e-3 (the official demo's) with alpha 8 (sigma 1 at
#     rank 8): 69% of LoRA's drop on new data with 0.1% of its trainables (128 against 116,736),
#     half the in-domain drift of 3e-3.
DEFAULTS = {
    "lora": {"lr": 2e-4, "alpha": 16.0},
    "lora-pro": {"lr": 2e-4, "alpha": 16.0},
    "bone": {"lr": 2e-4, "alpha": 16.0},
    "loldu": {"lr": 1e-3, "alpha": 8.0},
}


def default(method: str, key: str) -> float:
    """The default `key` ("lr" or "alpha") of `method`."""
    return DEFAULTS[method][key]


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
