"""Every GPTQ checkpoint lowrank writes loads where users load it (issue 12 item 7): each bit width it offers x
each architecture family it writes differently (Llama: the native class; GPTBigCode: modeling_lowrank.py, whose
guard must cover whichever gptqmodel kernel the bit width selects), through transformers + gptqmodel and
through lowrank's own loader (what `lowrank eval` uses). Logits are checked against the dequantized float32
model, so a load that "works" but computes garbage fails too."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from typer.testing import CliRunner

from lowrank_cli.cli.app import app

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) is not None for m in ("optimum", "gptqmodel")),
    reason="optimum + gptqmodel not installed (extra 'gptq')")

BITS = (2, 3, 4, 8)


def quantize(src, out, bits: int, calib_samples: int = 4):
    # the user's defaults (asymmetric, act-order); a small calibration set keeps it quick
    result = CliRunner().invoke(app, ["quantize", str(src), "-o", str(out), "--bits", str(bits), "--group-size",
                                      "32", "--calib-samples", str(calib_samples), "--seq-len", "64", "--skip-eval",
                                      "--json"])
    assert result.exit_code == 0, result.output
    return out


def close_to_dequantized(model, folder):
    from lowrank_cli.modeling.export import load_model

    reference = load_model(folder, dequantize=True, dtype=torch.float32)
    ids = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits.float()
        want = reference(ids).logits.float()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # float16 kernels vs float32 weights


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("arch", ["llama", "gpt_bigcode"])
def test_every_bit_width_and_architecture_loads(arch, bits, request, tmp_path):
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from transformers import AutoModelForCausalLM

    from lowrank_cli.modeling.export import load_model

    src = request.getfixturevalue({"llama": "tiny_llama", "gpt_bigcode": "tiny_bigcode"}[arch])
    out = quantize(src, tmp_path / f"{arch}-{bits}", bits)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == bits
    plain = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", trust_remote_code=True)
    ours = load_model(out, dtype=torch.float16)  # `lowrank eval`'s loader
    for model in (plain, ours):
        assert any("qweight" in m._buffers for m in model.modules())  # gptqmodel kernels, not dequantized
        close_to_dequantized(model, out)


@pytest.mark.slow
def test_three_bit_demo_evaluates(tmp_path):
    """The reported case: `quantize demo --bits 3`, then `lowrank eval` on it."""
    out = quantize("demo", tmp_path / "q3", 3, calib_samples=32)  # 2048 tokens for 1024-wide layers
    result = CliRunner().invoke(app, ["eval", str(out), "--max-tokens", "256", "--seq-len", "128", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["status"] == "ok" and 1 < doc["perplexity"] < 1000
