"""`lowrank merge`: adapter deltas against PEFT, merged checkpoints reloaded with plain transformers against
the PeftModel, factorized bases kept factorized, --dense, and refused inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from lowrank_cli.cli.app import app

runner = CliRunner()
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 400, 17, 8, 255, 3, 11]])


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result


def randomize_adapter(model, seed=0, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "miss_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


def save_adapter(base, config, folder, seed=0, loader=None):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = (loader or AutoModelForCausalLM.from_pretrained)(base)
    peft_model = get_peft_model(model, config)
    randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(folder)
    return folder


def peft_logits(base, adapter, loader=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained((loader or AutoModelForCausalLM.from_pretrained)(base), adapter).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def plain_logits(folder, **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


# -- deltas against PEFT on a single layer, float64 ----------------------------------------------------


class One(torch.nn.Module):
    def __init__(self, n_in, n_out, bias=True):
        super().__init__()
        self.proj = torch.nn.Linear(n_in, n_out, bias=bias, dtype=torch.float64)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("kind,n_in,n_out,r", [("miss", 10, 12, 4), ("miss", 12, 6, 4), ("bat", 16, 24, 8),
                                               ("mini", 10, 12, 4), ("lora", 10, 12, 3), ("rslora", 10, 12, 3)])
def test_delta_matches_peft_forward(kind, n_in, n_out, r):
    from peft import LoraConfig, MissConfig, get_peft_model

    from lowrank_cli.methods.merge.plan import plan_folds

    torch.manual_seed(0)
    base = One(n_in, n_out)
    weight = base.proj.weight.detach().clone()
    if kind in ("lora", "rslora"):
        cfg = LoraConfig(r=r, lora_alpha=5, target_modules=["proj"], use_rslora=kind == "rslora")
    else:
        cfg = MissConfig(r=r, target_modules=["proj"], init_weights={"miss": True}.get(kind, kind), mini_r=2)
    model = get_peft_model(base, cfg)
    randomize_adapter(model)
    for p in model.parameters():
        p.data = p.data.double()
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k or "miss_" in k}
    state = {k.replace(".default", ""): v for k, v in state.items()}
    config = json.loads(json.dumps(cfg.to_dict(), default=str))
    from lowrank_cli.methods.merge.plan import apply_fold

    folds = plan_folds(config, {k: tuple(v.shape) for k, v in state.items()}, {"proj.weight": (n_out, n_in)})
    assert len(folds) == 1
    merged = apply_fold(folds[0], weight, [state[k] for k in folds[0].keys])
    x = torch.randn(5, n_in, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        got = torch.nn.functional.linear(x, merged, base.proj.bias)
    assert not torch.allclose(expected, torch.nn.functional.linear(x, weight, base.proj.bias))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_lora_scaling_and_patterns():
    from lowrank_cli.methods.merge.plan import plan_folds

    config = {"peft_type": "LORA", "lora_alpha": 16, "use_rslora": True, "alpha_pattern": {"v_proj": 4},
              "rank_pattern": {"v_proj": 2}}
    pre = "base_model.model.model.layers.0.self_attn."
    shapes = {pre + "q_proj.lora_A.weight": (4, 8), pre + "q_proj.lora_B.weight": (8, 4),
              pre + "v_proj.lora_A.weight": (2, 8), pre + "v_proj.lora_B.weight": (8, 2)}
    base = {"model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.0.self_attn.v_proj.weight": (8, 8)}
    folds = {f.target.split(".")[-2]: f for f in plan_folds(config, shapes, base)}
    assert folds["q_proj"].scaling == pytest.approx(16 / 2)
    assert folds["v_proj"].scaling == pytest.approx(4 / 2 ** 0.5)


# -- whole checkpoints: merged output reloaded with plain transformers == PeftModel ---------------------


def _configs():
    from peft import LoraConfig, MissConfig

    return {
        "lora-rslora": LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                  target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                                  rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3},
                                  modules_to_save=["lm_head"]),
        "miss": MissConfig(r=6, target_modules=["q_proj", "up_proj", "down_proj"]),  # partial column blocks
        "bat": MissConfig(r=8, init_weights="bat", target_modules=["k_proj", "o_proj", "gate_proj"]),
        "mini": MissConfig(r=8, init_weights="mini", mini_r=4, target_modules=["q_proj", "down_proj"]),
    }


@pytest.mark.parametrize("kind", ["lora-rslora", "miss", "bat", "mini"])
def test_merge_matches_peft_model(kind, tiny_llama, tmp_path):
    adapter = save_adapter(tiny_llama, _configs()[kind], tmp_path / "adapter")
    code, res = cli("merge", tiny_llama, "--adapter", adapter, "-o", tmp_path / "out", "--json")
    assert code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["output_format"] == "dense" and doc["folded"] > 0
    expected = peft_logits(tiny_llama, adapter)
    got = plain_logits(tmp_path / "out")
    assert not torch.allclose(expected, plain_logits(tiny_llama), atol=1e-3)  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "out" / "lowrank.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (tiny_llama / "config.json").read_text())


def test_merge_bfloat16_base_matches_peft_merge(tiny_llama, tmp_path):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(base)
    for f in tiny_llama.glob("tokenizer*"):
        shutil.copy2(f, base / f.name)
    adapter = save_adapter(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]),
                           tmp_path / "adapter", loader=lambda p: AutoModelForCausalLM.from_pretrained(p,
                                                                                           dtype=torch.bfloat16))
    assert cli("merge", base, "--adapter", adapter, "-o", tmp_path / "out")[0] == 0
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                                    adapter).merge_and_unload().state_dict()
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out" / "model.safetensors")
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        # both round the float32 sum once to bf16; at most one bf16 ulp apart
        torch.testing.assert_close(got[name].float(), ref[name].float(), rtol=8e-3, atol=1e-6)


def test_merge_fan_in_fan_out_conv1d(tmp_path, tokenizer_dir):
    from peft import LoraConfig
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512, n_positions=64)).save_pretrained(base)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, base / f.name)
    adapter = save_adapter(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                            fan_in_fan_out=True), tmp_path / "adapter")
    assert cli("merge", base, "--adapter", adapter, "-o", tmp_path / "out")[0] == 0
    torch.testing.assert_close(plain_logits(tmp_path / "out"), peft_logits(base, adapter), rtol=1e-4, atol=1e-4)


# -- factorized bases ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def factorized(tmp_path_factory, tokenizer_dir):
    """A factorized tiny llama written through lowrank_cli's own LowRankForCausalLM.save_pretrained."""
    from conftest import make_config
    from transformers import LlamaConfig

    from lowrank_cli.modeling.export import lowrank_class, lowrank_config

    folder = tmp_path_factory.mktemp("factorized")
    ranks = {f"model.layers.{i}.{m}": r for i in range(2) for m, r in
             (("self_attn.q_proj", 8), ("mlp.down_proj", 16), ("mlp.up_proj", 12))}
    cfg = LlamaConfig.from_dict(lowrank_config(make_config("llama").to_dict(), ranks, "svd"))
    torch.manual_seed(1)
    lowrank_class("llama")(cfg).save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, folder / f.name)
    return folder, ranks


def _load_factorized(path):
    from lowrank_cli.modeling.export import load_model

    return load_model(path)


def test_factorized_base_stays_factorized(factorized, tmp_path):
    from peft import LoraConfig

    base, ranks = factorized
    adapter = save_adapter(base, LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down", "k_proj"]),
                           tmp_path / "adapter", loader=_load_factorized)
    code, res = cli("merge", base, "--adapter", adapter, "-o", tmp_path / "out", "--json")
    assert code == 0, res.output
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["lowrank"]["ranks"] == ranks and (tmp_path / "out" / "modeling_lowrank.py").is_file()
    expected = peft_logits(base, adapter, loader=_load_factorized)
    torch.testing.assert_close(plain_logits(tmp_path / "out", trust_remote_code=True), expected,
                               rtol=1e-4, atol=1e-4)

    # ... and --dense multiplies it back into a checkpoint plain transformers loads without remote code
    code, res = cli("merge", tmp_path / "out", "--dense", "-o", tmp_path / "dense", "--json")
    assert code == 0, res.output
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "lowrank" not in cfg and "auto_map" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert not (tmp_path / "dense" / "modeling_lowrank.py").exists()
    torch.testing.assert_close(plain_logits(tmp_path / "dense"), expected, rtol=1e-4, atol=1e-4)
    # adapter + --dense in one pass gives the same model
    assert cli("merge", base, "--adapter", adapter, "--dense", "-o", tmp_path / "both")[0] == 0
    torch.testing.assert_close(plain_logits(tmp_path / "both"), expected, rtol=1e-4, atol=1e-4)


def test_dense_equals_factorized(factorized, tmp_path):
    base, _ = factorized
    code, res = cli("merge", base, "--dense", "-o", tmp_path / "dense", "--json")
    assert code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["densified"] == 6 and doc["params"]["after"] > doc["params"]["before"]
    model = _load_factorized(base)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    torch.testing.assert_close(plain_logits(tmp_path / "dense"), expected, rtol=1e-5, atol=1e-5)


# -- refused inputs: one line, exit 2, nothing written ---------------------------------------------------


def _refused(tmp_path, *args, match):
    out = tmp_path / "refused"
    code, res = cli("merge", *args, "-o", out)
    assert code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], res.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".refused*"))


def test_refuses_adapter_for_another_base(tiny_llama, tiny_bigcode, tmp_path):
    from peft import LoraConfig

    adapter = save_adapter(tiny_bigcode, LoraConfig(r=4, target_modules=["c_attn"]), tmp_path / "bigcode-lora")
    _refused(tmp_path, tiny_llama, "--adapter", adapter, match="transformer.h.0.attn.c_attn.weight")


def test_refuses_shape_mismatch(tiny_llama, tmp_path, tokenizer_dir):
    from conftest import build_checkpoint
    from peft import LoraConfig

    wider = build_checkpoint(tmp_path / "wider", "llama", tokenizer_dir, hidden=32)
    adapter = save_adapter(wider, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "lora")
    _refused(tmp_path, tiny_llama, "--adapter", adapter, match="model.layers.0.self_attn.q_proj.weight")


def test_refuses_dense_adapter_on_factorized_base(factorized, tiny_llama, tmp_path):
    from peft import LoraConfig

    base, _ = factorized
    adapter = save_adapter(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "lora")
    _refused(tmp_path, base, "--adapter", adapter, match="must target")


def test_refuses_no_adapter_and_output_inside_input(tiny_llama, tmp_path):
    _refused(tmp_path, tiny_llama, "--adapter", tiny_llama, match="not a PEFT adapter")
    _refused(tmp_path, tiny_llama, "--adapter", tmp_path / "missing", match="not a folder")
    _refused(tmp_path, tiny_llama, "--dense", match="not a factorized")
    _refused(tmp_path, tiny_llama, match="nothing to merge")
    code, res = cli("merge", tiny_llama, "--dense", "-o", tiny_llama / "inside")
    assert code == 2 and "overlaps the input" in res.stderr and not (tiny_llama / "inside").exists()


def test_refuses_quantized_base(tiny_llama, tmp_path):
    from peft import LoraConfig

    adapter = save_adapter(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "lora")
    fake = tmp_path / "gptq"
    shutil.copytree(tiny_llama, fake)
    cfg = json.loads((fake / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (fake / "config.json").write_text(json.dumps(cfg))
    _refused(tmp_path, fake, "--adapter", adapter, match="quantized (gptq)")


# -- GPTQ bases: refused, or dequantize -> merge -> requantize ------------------------------------------


@pytest.fixture(scope="module")
def gptq_llama(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "llama-gptq8"
    code, res = cli("quantize", tiny_llama, "-o", out, "--bits", "8", "--group-size", "32", "--sym",
                    "--no-act-order", "--calib-samples", "8", "--seq-len", "64", "--eval-tokens", "128", "--json")
    assert code == 0, res.output
    return out


@pytest.mark.slow
def test_gptq_base_requantized(gptq_llama, tiny_llama, tmp_path):
    from peft import LoraConfig

    from lowrank_cli.api.merge import read_adapter
    from lowrank_cli.io.checkpoint import Checkpoint
    from lowrank_cli.io.gptq_view import DequantizedCheckpoint
    from lowrank_cli.methods.merge.plan import apply_fold, plan_folds

    adapter = save_adapter(tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
                           tmp_path / "lora")
    _refused(tmp_path, gptq_llama, "--adapter", adapter, match="--requantize")
    out = tmp_path / "requantized"
    code, res = cli("merge", gptq_llama, "--adapter", adapter, "--requantize", "-o", out, "--calib-samples", "8",
                    "--seq-len", "64", "--json")
    assert code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["output_format"] == "gptq" and doc["requantize"]["bits"] == 8
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (8, 32, True, False)  # the base's grid
    manifest = json.loads((out / "lowrank.json").read_text())
    assert manifest["command"] == "merge" and manifest["requantize"]["options"]["bits"] == 8
    assert not list(tmp_path.glob(".requantized*"))  # the scratch folder is gone
    # each merged weight is the dequantized base plus the adapter's delta, up to 8-bit rounding
    base, got = DequantizedCheckpoint(Checkpoint(gptq_llama)), DequantizedCheckpoint(Checkpoint(out))
    adapter_obj = read_adapter(str(adapter))
    folds = plan_folds(adapter_obj.config, adapter_obj.shapes, {n: i.shape for n, i in base.tensors.items()})
    assert len(folds) == 4
    for fold in folds:
        w = base.get(fold.target, dtype=torch.float32)
        want = apply_fold(fold, w, adapter_obj.tensors(fold.keys))
        delta = want - w
        err = got.get(fold.target, dtype=torch.float32) - want
        assert float(err.norm() / delta.norm()) < 0.1, fold.target


@pytest.mark.slow
@pytest.mark.parametrize("method", ["loldu", "bone"])
def test_merge_finetune_outputs(method, tiny_llama, tmp_path):
    """Adapters as `lowrank finetune` writes them (LoLDU exported as LoRA; Bone = MiSS bat) fold exactly."""
    from lowrank_cli.api.finetune import FinetuneOptions, finetune

    adapter = tmp_path / "adapter"
    finetune(str(tiny_llama), FinetuneOptions(output=str(adapter), method=method, max_steps=3, batch_size=2,
                                              max_seq_len=32, max_eval_examples=2, rank=8, lr=1e-2))
    code, res = cli("merge", tiny_llama, "--adapter", adapter, "-o", tmp_path / "out")
    assert code == 0, res.output
    expected = peft_logits(tiny_llama, adapter)
    assert not torch.allclose(expected, plain_logits(tiny_llama), atol=1e-3)
    torch.testing.assert_close(plain_logits(tmp_path / "out"), expected, rtol=1e-4, atol=1e-4)


def test_merge_pickled_adapter(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "gate_proj"]))
    randomize_adapter(model, seed=3)
    model.save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    assert cli("merge", tiny_llama, "--adapter", tmp_path / "adapter", "-o", tmp_path / "out")[0] == 0
    torch.testing.assert_close(plain_logits(tmp_path / "out"), peft_logits(tiny_llama, tmp_path / "adapter"),
                               rtol=1e-4, atol=1e-4)
