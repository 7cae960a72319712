"""Bone through PEFT MiSS: the forward against the paper's block formula, merge, reload, training."""

from __future__ import annotations

import pytest
import torch

from lowrank_cli.errors import UsageError
from lowrank_cli.methods.finetune import bone
from lowrank_cli.methods.finetune.spec import AdapterSpec

R = 4


def _tiny_llama(seed=0, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _targets(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]


def _ids(seed=0):
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))


def _block_affine(w, t):
    """The paper's W'_ij = W_ij (I + T_i) + T_i, written block by block (i: row block of out, j: of in)."""
    out = w.clone()
    eye = torch.eye(R, dtype=w.dtype)
    for i in range(w.shape[0] // R):
        for j in range(w.shape[1] // R):
            blk = w[i * R:(i + 1) * R, j * R:(j + 1) * R]
            out[i * R:(i + 1) * R, j * R:(j + 1) * R] = blk @ (eye + t[i]) + t[i]
    return out


def _randomise(peft_model):
    blocks = {}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "miss_block" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                blocks[name] = p.detach().clone()
    return blocks


def test_bat_forward_merge_and_reload_follow_the_block_affine_formula(tmp_path):
    from peft import PeftModel

    model = _tiny_llama()
    targets = _targets(model)
    reference = _tiny_llama()  # the same base, adapted by hand with the paper's formula
    spec = AdapterSpec(method="bone", targets=targets, rank=R, bone_variant="bat")
    peft_model = bone.attach(model, spec)
    blocks = _randomise(peft_model)
    with torch.no_grad():
        for name in targets:
            t = next(v for k, v in blocks.items() if f"{name}.miss_block" in k)
            assert t.shape == (reference.get_submodule(name).weight.shape[0] // R, R, R)
            lin = reference.get_submodule(name)
            lin.weight.copy_(_block_affine(lin.weight, t))
        ids = _ids()
        expected = reference(input_ids=ids).logits
        adapted = peft_model(input_ids=ids).logits
    torch.testing.assert_close(adapted, expected, rtol=1e-10, atol=1e-10)
    assert (adapted - _tiny_llama()(input_ids=ids).logits).abs().max() > 1e-3  # the adapter does something

    bone.save(peft_model, tmp_path, spec, base_name_or_path="tiny")
    reloaded = PeftModel.from_pretrained(_tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, rtol=1e-10, atol=1e-10)
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-9, atol=1e-9)


def test_miss_variant_adds_the_shared_shard_to_every_column_block():
    model = _tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    reference = _tiny_llama()
    peft_model = bone.attach(model, AdapterSpec(method="bone", targets=[name], rank=R, bone_variant="miss"))
    (shard,) = _randomise(peft_model).values()  # r x out
    with torch.no_grad():
        lin = reference.get_submodule(name)
        lin.weight.add_(shard.T.repeat(1, lin.weight.shape[1] // R))
        ids = _ids(3)
        torch.testing.assert_close(peft_model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_loss_falls_with_bat():
    model = bone.attach(_tiny_llama(dtype=torch.float32),
                        AdapterSpec(method="bone", targets=_targets(_tiny_llama()), rank=R))
    assert all(("miss_block" in n) == p.requires_grad for n, p in model.named_parameters())
    opt = bone.optimizer(model, AdapterSpec(method="bone"), lr=1e-2)
    ids = _ids()
    losses = []
    model.train()
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.3, losses


def test_bat_dims_not_divisible_by_rank_is_a_one_line_usage_error():
    model = _tiny_llama()
    line = r"model\.layers\.0\.self_attn\.q_proj \(32x32\).*--rank 4 divides every target"
    with pytest.raises(UsageError, match=line) as err:
        bone.attach(model, AdapterSpec(method="bone", targets=_targets(model), rank=5))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="unknown Bone variant"):
        bone.attach(model, AdapterSpec(method="bone", targets=_targets(model), rank=4, bone_variant="x"))
    bone.attach(model, AdapterSpec(method="bone", targets=_targets(model), rank=5, bone_variant="miss"))  # pads
