"""LoRA through PEFT (rsLoRA as an option): W x + s B A x with B = 0 at the start, s = alpha/r or alpha/sqrt(r)."""

from __future__ import annotations

from pathlib import Path

from lowrank_cli.methods.finetune.spec import AdapterSpec

__all__ = ["attach", "optimizer", "save", "lora_config"]


def lora_config(spec: AdapterSpec, **extra):
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=list(spec.targets), use_rslora=spec.rslora, bias="none",
                      task_type="CAUSAL_LM", **extra)


def attach(model, spec: AdapterSpec):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(spec))


def optimizer(model, spec: AdapterSpec, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
              eps: float = 1e-8):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def save(model, folder: Path, spec: AdapterSpec, *, base_name_or_path: str | None = None) -> None:
    if base_name_or_path is not None:
        model.peft_config["default"].base_model_name_or_path = base_name_or_path
    model.save_pretrained(str(folder))
