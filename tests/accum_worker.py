"""Train one LoRA adapter through the shared loop; used in-process by test_accumulation.py and as the
script of its 2-process launch (`torchrun --nproc_per_node 2 accum_worker.py MODEL DATA BATCH ACCUM OUT`)."""

from __future__ import annotations

import sys

STEPS = 3


def train_adapter(model_path: str, data_path: str, batch_size: int, grad_accum: int) -> dict:
    """Trainable LoRA tensors after STEPS optimizer steps of SGD (no momentum: a step is the gradient itself,
    so any change of the gradient's weighting shows in the weights)."""
    import torch
    from transformers import AutoTokenizer

    from lowrank_cli.methods.finetune import lora
    from lowrank_cli.methods.finetune.spec import AdapterSpec
    from lowrank_cli.modeling.export import load_model
    from lowrank_cli.train.data import build_datasets, collate_fn
    from lowrank_cli.train.loop import LoopConfig, train

    tok = AutoTokenizer.from_pretrained(model_path)
    data = build_datasets(tok, data_path, max_seq_len=64, seed=0)
    net = load_model(model_path, dtype=torch.float32)
    net.requires_grad_(False)
    torch.manual_seed(0)
    spec = AdapterSpec(method="lora", targets=[f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
                       + [f"model.layers.{i}.mlp.down_proj" for i in range(2)], rank=4, alpha=8.0)
    net = lora.attach(net, spec)
    with torch.no_grad():  # B = 0 at init would leave A untouched for a step: start both moving at once
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    initial = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=2.0)
    cfg = LoopConfig(max_steps=STEPS, batch_size=batch_size, grad_accum=grad_accum, warmup=0, device="cpu",
                     seed=3, max_grad_norm=None, eval_at_start=False)
    out = train(net, opt, data.train, config=cfg, collate=collate_fn(tok.pad_token_id))
    state = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    return {"state": state, "initial": initial, "is_main": out.is_main_process, "processes": out.num_processes,
            "curve": out.curve}


if __name__ == "__main__":
    import torch

    model, data, batch, accum, target = sys.argv[1:6]
    result = train_adapter(model, data, int(batch), int(accum))
    if result["is_main"]:
        torch.save({"state": result["state"], "processes": result["processes"]}, target)
