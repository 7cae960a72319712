"""Low-rank corrections stored as a PEFT LoRA adapter: peft's own key layout, PeftModel.from_pretrained over a
dense base and over a GPTQ base (gptqmodel kernels) gives the logits of W + L R."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from lowrank_cli.io.lora_adapter import read_lora_adapter, write_lora_adapter

pytest.importorskip("peft")
HAS_KERNELS = all(importlib.util.find_spec(m) is not None for m in ("optimum", "gptqmodel"))

# ranks differ between modules on purpose: rank_pattern / alpha_pattern must keep every scaling at 1
SHAPES = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.down_proj": 6, "model.layers.1.mlp.up_proj": 4}


def _factors(model, scale: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, r in SHAPES.items():
        w = model.get_submodule(name).weight
        m, n = w.shape
        up = torch.randn(m, r, generator=g) / r ** 0.5
        down = torch.randn(r, n, generator=g) * scale * float(w.detach().float().std())
        out[name] = (up, down)
    return out


def _with_products(model, factors):
    with torch.no_grad():
        for name, (up, down) in factors.items():
            lin = model.get_submodule(name)
            lin.weight += (up.double() @ down.double()).to(lin.weight.dtype)
    return model


def _dense(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_keys_and_config_are_peft_s_own(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    factors = _factors(_dense(tiny_llama), 0.5)
    folder = write_lora_adapter(tmp_path / "adapter", factors, str(tiny_llama))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert list(config["rank_pattern"].values()) == [6] and config["alpha_pattern"] == config["rank_pattern"]
    assert config["base_model_name_or_path"] == str(tiny_llama)
    # what peft itself would save for the same targets and ranks
    reference = get_peft_model(_dense(tiny_llama), LoraConfig(
        r=4, lora_alpha=4, target_modules=sorted(SHAPES), rank_pattern=config["rank_pattern"],
        alpha_pattern=config["alpha_pattern"]))
    expected = get_peft_model_state_dict(reference)
    from safetensors.torch import load_file

    ours = load_file(folder / "adapter_model.safetensors")
    assert set(ours) == set(expected)
    assert all(ours[k].shape == expected[k].shape for k in ours)
    back = read_lora_adapter(folder)
    assert set(back) == set(factors)
    for name, (up, down) in factors.items():
        assert torch.equal(back[name][0], up) and torch.equal(back[name][1], down)


def test_dense_base_plus_adapter_equals_corrected_weights(tiny_llama, tmp_path):
    from peft import PeftModel

    factors = _factors(_dense(tiny_llama), 0.5)
    folder = write_lora_adapter(tmp_path / "adapter", factors, str(tiny_llama))
    loaded = PeftModel.from_pretrained(_dense(tiny_llama), folder).eval()
    for name in SHAPES:
        assert loaded.base_model.model.get_submodule(name).scaling["default"] == 1.0
    reference = _with_products(_dense(tiny_llama), factors)
    plain = _dense(tiny_llama)
    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b, c = loaded(ids).logits, reference(ids).logits, plain(ids).logits
    assert (a - b).abs().max() < 1e-4 * b.abs().max()
    assert (c - b).abs().max() > 100 * (a - b).abs().max()  # the correction is there and matters


def test_bad_factors():
    with pytest.raises(ValueError):
        write_lora_adapter("/nonexistent/never", {}, "x")
    with pytest.raises(ValueError):
        write_lora_adapter("/nonexistent/never", {"a": (torch.zeros(4, 2), torch.zeros(3, 5))}, "x")


@pytest.fixture(scope="module")
def gptq_llama(tiny_llama, tmp_path_factory):
    from typer.testing import CliRunner

    from lowrank_cli.cli.app import app

    out = tmp_path_factory.mktemp("q") / "llama-gptq"
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama), "-o", str(out), "--calib-samples", "8",
                                      "--seq-len", "64", "--skip-eval", "--group-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.skipif(not HAS_KERNELS, reason="optimum + gptqmodel not installed (extra 'gptq')")
def test_gptq_base_plus_adapter_equals_dequantized_plus_products(gptq_llama, tmp_path):
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lowrank_cli.modeling.export import load_model

    dequantized = load_model(gptq_llama, dequantize=True, dtype=torch.float32)
    factors = _factors(dequantized, 0.5)
    folder = write_lora_adapter(tmp_path / "adapter", factors, str(gptq_llama))
    base = AutoModelForCausalLM.from_pretrained(gptq_llama, device_map="cpu")
    loaded = PeftModel.from_pretrained(base, folder).eval()
    wrapped = {type(loaded.base_model.model.get_submodule(n)).__name__ for n in SHAPES}
    assert wrapped == {"GPTQLoraLinear"}  # peft's GPTQ dispatch: LoRA over gptqmodel's quantized linear
    reference = _with_products(dequantized, factors)
    plain = load_model(gptq_llama, dequantize=True, dtype=torch.float32)
    ids = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = loaded(ids).logits.float()
        b = reference(ids).logits.float()
        c = plain(ids).logits.float()
    gap = (a - b).abs().max()
    assert gap < 0.02 * b.abs().max()  # float16 kernels vs float32 dequantized weights (measured: 0.5%)
    assert (c - b).abs().max() > 5 * gap  # and the adapter's effect is far above that tolerance
