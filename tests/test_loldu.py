"""LoLDU: the LDU factors, an exact no-op start, exact LoRA export, r trainables per layer, training."""

from __future__ import annotations

import json

import pytest
import torch

from lowrank_cli.errors import UsageError
from lowrank_cli.methods.finetune import loldu
from lowrank_cli.methods.finetune.spec import AdapterSpec

F64 = torch.float64


@pytest.mark.parametrize("shape", [(9, 6), (6, 9), (7, 7)])
def test_ldu_factors_reconstruct_and_match_torch_lu(shape):
    w = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    k = min(shape)
    pl, d, u = loldu.ldu_factors(w, k)
    torch.testing.assert_close((pl * d) @ u, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.diagonal(u), torch.ones(k, dtype=F64))  # U~ has a unit diagonal
    p, lower, upper = torch.linalg.lu(w)
    r = k - 2
    pl_r, d_r, u_r = loldu.ldu_factors(w, r)
    torch.testing.assert_close(pl_r, p @ lower[:, :r], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_r, torch.diagonal(upper)[:r])
    torch.testing.assert_close(u_r, upper[:r] / torch.diagonal(upper)[:r, None])


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _targets(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]


def _ids(seed=0):
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))


def _train(model, opt, steps):
    losses = []
    model.train()
    for _ in range(steps):
        ids = _ids(0)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_initial_model_is_the_base_and_only_r_per_layer_trains():
    model = _tiny_llama()
    ids = _ids(1)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    targets = _targets(model)
    spec = AdapterSpec(method="loldu", targets=targets, rank=4, alpha=1.0)
    loldu.attach(model, spec)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(after, before)  # exactly the base: the update branch is sigma (z - D_r) = 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 4 * len(targets)
    layers = loldu.loldu_layers(model)
    assert sorted(layers) == sorted(targets)
    for layer in layers.values():
        m, n = layer.out_features, layer.in_features
        for name, buf in layer.named_buffers(recurse=False):
            assert 4 in buf.shape and buf.numel() <= 4 * max(m, n), name  # P L_r m x r, U_r r x n, D_r: no m x m
        assert [tuple(p.shape) for p in layer.base.parameters()] == [(m, n)]  # W0 itself, frozen


def test_exported_lora_adapter_on_the_untouched_base_gives_the_trained_logits(tmp_path):
    from peft import PeftModel

    model = _tiny_llama()
    spec = AdapterSpec(method="loldu", targets=_targets(model), rank=4, alpha=1.0)
    loldu.attach(model, spec)
    opt = loldu.optimizer(model, spec, lr=5e-2)
    losses = _train(model, opt, 12)
    assert losses[-1] < losses[0] - 0.05, losses  # loss falls (56 trainable numbers in all)
    ids = _ids(2)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    loldu.save(model, tmp_path, spec, base_name_or_path="tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4
    meta = json.loads((tmp_path / "loldu.json").read_text())
    assert meta["sigma"] == pytest.approx(0.25) and len(meta["layers"]) == len(spec.targets)
    base = _tiny_llama()  # same seed: the original W0, never modified
    with torch.no_grad():
        untouched = base(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        reloaded = peft_model(input_ids=ids).logits
    assert (trained - untouched).abs().max() > 1e-2  # training changed the model ...
    torch.testing.assert_close(reloaded, trained, rtol=1e-4, atol=1e-4)  # ... and the adapter carries it


def test_weight_decay_pulls_z_towards_d_not_zero():
    model = _tiny_llama()
    spec = AdapterSpec(method="loldu", targets=_targets(model)[:1], rank=4, alpha=1.0)
    loldu.attach(model, spec)
    layer = next(iter(loldu.loldu_layers(model).values()))
    opt = loldu.optimizer(model, spec, lr=0.1, weight_decay=0.5)
    with torch.no_grad():
        layer.z.add_(1.0)
    layer.z.grad = torch.zeros_like(layer.z)
    opt.step()
    torch.testing.assert_close(layer.z.detach(), layer.d + 0.95)


def test_zero_pivot_and_bad_targets_are_usage_errors():
    model = _tiny_llama()
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        model.get_submodule(name).weight[:, 0] = 0
    with pytest.raises(UsageError, match="zero LU pivot at position 1"):
        loldu.attach(model, AdapterSpec(method="loldu", targets=[name], rank=4))
    assert model.get_submodule(name).__class__ is torch.nn.Linear  # nothing was changed
    with pytest.raises(UsageError, match="larger than"):
        loldu.attach(model, AdapterSpec(method="loldu", targets=["model.layers.0.self_attn.k_proj"], rank=17))
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(UsageError, match="tied"):
        loldu.attach(model, AdapterSpec(method="loldu", targets=["lm_head"], rank=4))
    with pytest.raises(UsageError, match="no module"):
        loldu.attach(model, AdapterSpec(method="loldu", targets=["model.nope"], rank=4))


def test_factorized_layers_take_loldu_on_up_and_down():
    from lowrank_cli.modeling.lowrank_modeling import LowRankLinear

    torch.manual_seed(0)
    host = torch.nn.Sequential(LowRankLinear(12, 10, rank=6))
    x = torch.randn(3, 12)
    with torch.no_grad():
        before = host(x)
    with pytest.raises(UsageError, match="factorized"):
        loldu.attach(host, AdapterSpec(method="loldu", targets=["0"], rank=2))
    loldu.attach(host, AdapterSpec(method="loldu", targets=["0.up", "0.down"], rank=2))
    with torch.no_grad():
        torch.testing.assert_close(host(x), before, rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in host.parameters() if p.requires_grad) == 4


def test_dropout_touches_only_the_update():
    torch.manual_seed(0)
    host = torch.nn.Sequential(torch.nn.Linear(12, 10))
    x = torch.randn(5, 12)
    with torch.no_grad():
        before = host(x)
    loldu.attach(host, AdapterSpec(method="loldu", targets=["0"], rank=3, alpha=1.0, dropout=0.5))
    layer = host[0]
    host.train()
    with torch.no_grad():
        torch.testing.assert_close(host(x), before, rtol=1e-5, atol=1e-6)  # z = D_r: nothing to drop yet
        layer.z.add_(0.3)
        host.eval()
        a, b = layer.lora_factors()
        torch.testing.assert_close(host(x), before + x @ (b @ a).T, rtol=1e-5, atol=1e-5)
        host.train()
        assert not torch.allclose(host(x), before + x @ (b @ a).T, atol=1e-4)  # the update's input is dropped
