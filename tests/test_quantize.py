"""`lowrank quantize`: the GPTQ solver against a direct float64 reference, packing, the streamed pass, the
checkpoint format (reloaded through transformers + optimum + gptqmodel when installed) and bad input."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from lowrank_cli.methods.quantize.gptq import gptq_quantize, output_error
from lowrank_cli.methods.quantize.grid import Grid, rtn_quantize
from lowrank_cli.methods.quantize.packing import pack, pack_bits, unpack, unpack_bits

HAS_KERNELS = all(importlib.util.find_spec(m) is not None for m in ("optimum", "gptqmodel"))
needs_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="optimum + gptqmodel not installed (extra 'gptq')")


def _reference_grid(w, bits: int, sym: bool):
    """Scale and zero point per row of `w`, written naively from the grid's specification (one row at a
    time, plain Python floats), independent of the unit's own find_params: the range [min, max] widened
    to include 0; symmetric: zero point 2^(bits-1) and scale 2 max|w| / (2^bits - 1); asymmetric: scale
    (max - min) / (2^bits - 1), zero = round(-min / scale), and a zero point below 1 (not storable in
    GPTQ v1) replaced by 1 with scale max / (2^bits - 2); scales rounded to float16 as stored."""
    maxq = 2 ** bits - 1
    scales, zeros = [], []
    for row in w.tolist():
        lo, hi = min(min(row), 0.0), max(max(row), 0.0)
        if sym:
            hi = max(-lo, hi)
            lo = -hi
        if lo == 0.0 and hi == 0.0:
            lo, hi = -1.0, 1.0
        scale = (hi - lo) / maxq
        if sym:
            zero = float((maxq + 1) // 2)
        else:
            zero = float(round(-lo / scale))
            if zero < 1:
                scale, zero = hi / (maxq - 1), 1.0
        scale = float(torch.tensor(max(scale, torch.finfo(torch.float16).tiny)).to(torch.float16))
        scales.append(scale)
        zeros.append(zero)
    return scales, zeros


def _reference_round(col, scales, zeros, maxq: int):
    """(integer levels, dequantized values) of one column, row by row."""
    rows = zip(col.tolist(), scales, zeros, strict=True)
    q = [min(max(float(round(x / s)) + z, 0.0), float(maxq)) for x, s, z in rows]
    deq = [s * (v - z) for v, s, z in zip(q, scales, zeros, strict=True)]
    return torch.tensor(q, dtype=torch.float64), torch.tensor(deq, dtype=torch.float64)


def reference_gptq(W, H, grid: Grid, damp: float, act_order: bool):
    """The algorithm of the GPTQ paper written directly: float64, one column at a time, the inverse
    Hessian of the remaining columns updated explicitly (no Cholesky trick, no lazy batches)."""
    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    gs = cols if grid.group_size == -1 else grid.group_size
    Q = torch.zeros_like(W)
    for j in range(cols):
        if j % gs == 0:
            scales, zeros = _reference_grid(W[:, j:j + gs], grid.bits, grid.sym)
        q, deq = _reference_round(W[:, j], scales, zeros, grid.maxq)
        Q[:, j] = q
        err = (W[:, j] - deq) / Hinv[j, j]
        W[:, j:] -= err.unsqueeze(1) * Hinv[j, j:].unsqueeze(0)
        # remove column j from the inverse Hessian (Schur complement): the paper's update
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q[:, torch.argsort(perm)]


def _layer(rows=48, cols=96, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    # correlated inputs with uneven scales, like real activations
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, cols)
    X = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mix
    return W, X.T @ X


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, -1])  # 64 does not divide 96: a shorter last group
@pytest.mark.parametrize("act_order", [False, True])
def test_solver_equals_direct_float64_reference(sym, group_size, act_order):
    W, H = _layer()
    grid = Grid(4, group_size, sym)
    ours = gptq_quantize(W, H, grid, damp=0.01, act_order=act_order, block_size=16, dtype=torch.float64)
    ref = reference_gptq(W, H, grid, 0.01, act_order)
    mismatch = (ours.q.double() != ref).double().mean().item()
    assert mismatch < 1e-3  # identical up to an exact tie in rounding


@pytest.mark.parametrize("act_order", [False, True])
def test_float32_solver_matches_float64_output_error(act_order):
    """The default float32 working precision: a few codes flip at rounding ties, the output error does not move."""
    W, H = _layer(rows=64, cols=128, tokens=600, seed=3)
    grid = Grid(4, 32, True)
    fast = gptq_quantize(W, H, grid, act_order=act_order)
    exact = gptq_quantize(W, H, grid, act_order=act_order, dtype=torch.float64)
    assert (fast.q != exact.q).double().mean().item() < 0.01
    assert fast.scales.dtype == torch.float64
    assert output_error(W, fast.dequantize(), H) == pytest.approx(output_error(W, exact.dequantize(), H), rel=1e-3)


def test_group_index_and_shorter_last_group():
    W, H = _layer(cols=96)
    qw = gptq_quantize(W, H, Grid(4, 64, True))
    assert qw.scales.shape == (2, 48)
    assert torch.equal(qw.g_idx.long(), torch.arange(96) // 64)
    qa = gptq_quantize(W, H, Grid(4, 32, True), act_order=True)
    perm = torch.argsort(torch.diag(H), descending=True)
    assert torch.equal(qa.g_idx[perm].long(), torch.arange(96) // 32)  # groups contiguous in act order


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_beats_round_to_nearest_on_output_error(bits):
    W, H = _layer(seed=bits)
    grid = Grid(bits, 32, True)
    g = output_error(W, gptq_quantize(W, H, grid).dequantize(), H)
    r = output_error(W, rtn_quantize(W, grid).dequantize(), H)
    assert g < 0.9 * r


def test_dead_inputs_get_zero_weight():
    W, H = _layer()
    H[5, :] = 0
    H[:, 5] = 0
    qw = gptq_quantize(W, H, Grid(4, 32, True))
    assert torch.all(qw.dequantize()[:, 5] == 0)


def test_asymmetric_zero_points_stay_storable():
    W = torch.rand(32, 64, dtype=torch.float64)  # all >= 0: min/max would put the zero point at 0
    qw = rtn_quantize(W, Grid(4, 32, False))
    assert int(qw.zeros.min()) >= 1
    assert torch.allclose(qw.dequantize(), W, atol=float(qw.scales.max()) / 2 + 1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    values = torch.randint(0, 2**bits, (96, 40))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_bits(packed, bits), values)
    # the layout: value j of each run of 32 at bit offset j * bits of a little-endian stream
    stream = [(int(w) & 0xFFFFFFFF) >> b & 1 for w in packed[:bits, 0] for b in range(32)]
    for j in range(32):
        assert sum(stream[j * bits + k] << k for k in range(bits)) == int(values[j, 0])


@pytest.mark.parametrize("bits", [3, 4])
def test_layer_pack_unpack(bits):
    W, H = _layer(rows=64, cols=96)
    qw = gptq_quantize(W, H, Grid(bits, 32, False), act_order=True)
    tensors = pack(qw)
    assert tensors["qweight"].shape == (96 * bits // 32, 64)
    assert tensors["qzeros"].shape == (3, 64 * bits // 32)
    assert tensors["scales"].dtype == torch.float16
    back = unpack(tensors, bits, 32, False)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.dequantize(), qw.dequantize())  # scales are float16-exact by construction


def test_real_layer_data_gptq_below_rtn():
    """A layer of the bundled demo model (trained in float) on real calibration text."""
    from lowrank_cli.api.common import load_tokenizer, text_windows
    from lowrank_cli.engine.calibration import InputGrams, run_stored
    from lowrank_cli.engine.streamed import StreamedModel
    from lowrank_cli.io.checkpoint import Checkpoint
    from lowrank_cli.io.resolve import resolve_model

    path = resolve_model("demo")
    streamed = StreamedModel(Checkpoint(path))
    windows = text_windows(load_tokenizer(path), None, part="calib", seq_len=128, max_tokens=1024, seed=0)
    acts = streamed.capture(windows, 4)
    block = streamed.load_block(0)
    with InputGrams(block, ["mlp.c_fc", "mlp.c_proj"]) as grams:
        run_stored(block, acts, 0, keep=False)
    for local in ("mlp.c_fc", "mlp.c_proj"):
        W, H = block.get_submodule(local).weight.detach(), grams.gram(local)
        for bits in (3, 4):
            grid = Grid(bits, 128, True)
            g = output_error(W, gptq_quantize(W, H, grid).dequantize(), H)
            r = output_error(W, rtn_quantize(W, grid).dequantize(), H)
            assert g < 0.7 * r, (local, bits, g, r)


# -- the command ---------------------------------------------------------------------------------------------
def _quantize(src, out, *extra):
    from typer.testing import CliRunner

    from lowrank_cli.cli.app import app

    return CliRunner().invoke(app, ["quantize", str(src), "-o", str(out), "--calib-samples", "8", "--seq-len",
                                    "64", "--eval-tokens", "256", "--json", *extra])


def _dequantized_model(folder):
    from lowrank_cli.modeling.export import load_model

    return load_model(folder, dequantize=True, dtype=torch.float32)


@pytest.fixture(scope="module")
def quantized_llama(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "llama-gptq"
    result = _quantize(tiny_llama, out, "--group-size", "32")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_quantize_writes_gptq_checkpoint(quantized_llama, tiny_llama):
    out, doc = quantized_llama
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == ("gptq", 4, 32,
                                                                                               False, True)
    from lowrank_cli.io.checkpoint import Checkpoint

    ckpt = Checkpoint(out)
    layers = [n[: -len(".qweight")] for n in ckpt.names() if n.endswith(".qweight")]
    assert len(layers) == 2 * 7 and not any(n.endswith("proj.weight") for n in ckpt.names())
    assert ckpt.tensors[f"{layers[0]}.scales"].dtype == "F16"
    manifest = json.loads((out / "lowrank.json").read_text())
    assert manifest["command"] == "quantize" and len(manifest["layers"]) == 14
    assert doc["error"]["gptq"] < doc["error"]["rtn"]
    assert doc["size"]["after"] < doc["size"]["before"] / 2
    # the perplexity the command reports is the dequantized model's, measured on the same windows
    from lowrank_cli.api.evaluate import evaluate

    again = evaluate(str(out), seq_len=64, max_tokens=256, streaming=True)
    assert again.perplexity == pytest.approx(doc["perplexity"]["final"], rel=2e-3)


def test_eval_runs_without_gptq_kernels(quantized_llama, monkeypatch):
    from lowrank_cli.api.evaluate import evaluate
    from lowrank_cli.modeling import export

    out, _ = quantized_llama
    monkeypatch.setattr(export, "gptq_kernels_available", lambda: False)
    full = evaluate(str(out), seq_len=64, max_tokens=256)
    streamed = evaluate(str(out), seq_len=64, max_tokens=256, streaming=True)
    assert full.perplexity == pytest.approx(streamed.perplexity, rel=1e-4)


@needs_kernels
def test_reloads_through_transformers_and_gptqmodel(quantized_llama):
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from transformers import AutoModelForCausalLM

    out, _ = quantized_llama
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    kinds = {type(m).__name__ for m in model.model.layers.modules()}
    assert "Linear" not in kinds  # every block linear is a GPTQ kernel module
    ids = torch.randint(0, 500, (1, 24))
    with torch.no_grad():
        a = model(ids).logits.float()
        b = _dequantized_model(out)(ids).logits.float()
    assert (a - b).abs().max() < 0.05 * b.abs().max()  # float16 kernels vs float32 dequantized weights
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


@needs_kernels
@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bit_widths_reload(tiny_llama, tmp_path, bits):
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"q{bits}"
    result = _quantize(tiny_llama, out, "--bits", str(bits), "--group-size", "32", "--sym", "--no-act-order",
                       "--skip-eval")
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    ids = torch.randint(0, 500, (1, 24))
    with torch.no_grad():
        a = model(ids).logits.float()
        b = _dequantized_model(out)(ids).logits.float()
    assert (a - b).abs().max() < 0.05 * b.abs().max()


@needs_kernels
def test_gpt_bigcode_output_loads_with_remote_code(tiny_bigcode, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bigcode-gptq"
    assert _quantize(tiny_bigcode, out, "--group-size", "32").exit_code == 0
    assert (out / "modeling_lowrank.py").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", trust_remote_code=True)
    ids = torch.randint(0, 500, (1, 24))
    with torch.no_grad():
        a = model(ids).logits.float()
        b = _dequantized_model(out)(ids).logits.float()
    assert (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.slow
def test_factorized_checkpoint_both_factors_quantized(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from lowrank_cli.cli.app import app
    from lowrank_cli.io.checkpoint import Checkpoint
    from lowrank_cli.modeling.export import ranks_of

    lord = tmp_path / "lord"
    r = CliRunner().invoke(app, ["decompose", str(tiny_llama), "-o", str(lord), "--rank", "32",
                                 "--rank-multiple", "32", "--calib-samples", "4", "--seq-len", "64",
                                 "--eval-tokens", "256", "--json"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "lord-gptq"
    result = _quantize(lord, out, "--group-size", "32")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    ranks = ranks_of(config)
    assert ranks and config["quantization_config"]["bits"] == 4
    names = Checkpoint(out).names()
    for module in ranks:
        assert f"{module}.up.qweight" in names and f"{module}.down.qweight" in names
    model = _dequantized_model(out)
    ids = torch.randint(0, 500, (1, 24))
    with torch.no_grad():
        b = model(ids).logits.float()
    if HAS_KERNELS:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", trust_remote_code=True)
        with torch.no_grad():
            a = loaded(ids).logits.float()
        assert (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.parametrize(("args", "message"), [
    (["--bits", "5"], "--bits 5 is not supported"),
    (["--group-size", "0"], "--group-size must be positive or -1"),
    (["--method", "awq"], "unknown --method"),
])
def test_bad_options_exit_2_and_write_nothing(tiny_llama, tmp_path, args, message):
    out = tmp_path / "out"
    result = _quantize(tiny_llama, out, *args)
    assert result.exit_code == 2
    assert message in json.loads(result.stdout)["error"]["message"]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_already_quantized_input_is_refused(quantized_llama, tmp_path):
    out, _ = quantized_llama
    result = _quantize(out, tmp_path / "again")
    assert result.exit_code == 2 and "already quantized" in json.loads(result.stdout)["error"]["message"]


def test_short_calibration_text_is_refused(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x + 1\n" * 4)
    result = _quantize(tiny_llama, tmp_path / "out", "--calib", str(short), "--seq-len", "16")
    assert result.exit_code == 2
    assert "calibration text too short" in json.loads(result.stdout)["error"]["message"]
    assert not (tmp_path / "out").exists()


def test_unpackable_layer_width_is_refused(tmp_path, tokenizer_dir):
    from tests.conftest import build_checkpoint

    src = build_checkpoint(tmp_path / "odd", "llama", tokenizer_dir, hidden=48)  # 48 % 32 != 0
    result = _quantize(src, tmp_path / "out")
    assert result.exit_code == 2
    assert "not a multiple of 32" in json.loads(result.stdout)["error"]["message"]


def test_float32_products_accumulate_close_to_float64():
    from lowrank_cli.engine import calibration

    x = torch.randn(3000, 40) * torch.linspace(0.01, 10, 40)
    exact = calibration.accumulate_gram(None, x)
    fast = calibration.accumulate_gram(None, x, torch.float32)
    assert fast.dtype == torch.float64
    assert torch.allclose(fast, exact, rtol=1e-5, atol=1e-5 * float(exact.diagonal().mean()))


@pytest.mark.slow
@needs_kernels
def test_group_size_not_dividing_the_width_loads_and_runs(tiny_llama, tmp_path):
    """SmolLM2's case (576-wide layers, group 128): gptqmodel's int4 CPU kernel refuses it at the first
    forward, so the checkpoint names the torch kernel, which reads the shorter last group from g_idx."""
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "uneven"
    result = _quantize(tiny_llama, out, "--group-size", "128", "--skip-eval")  # 64-wide inputs: one short group
    assert result.exit_code == 0, result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["backend"] == "torch" and qc["group_size"] == 128
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    ids = torch.randint(0, 500, (1, 24))
    with torch.no_grad():
        a = model(ids).logits.float()
        b = _dequantized_model(out)(ids).logits.float()
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_dry_run_predicts_the_written_size_exactly(quantized_llama, tiny_llama, tmp_path):
    """--dry-run reads headers only and writes nothing; its size is the written checkpoint's tensor bytes."""
    from typer.testing import CliRunner

    from lowrank_cli.cli.app import app
    from lowrank_cli.io.checkpoint import Checkpoint

    out, _ = quantized_llama
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama), "--group-size", "32", "--seq-len", "64", "--dry-run",
                                      "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["dry_run"] and doc["output"] is None and list(tmp_path.iterdir()) == []
    assert doc["size"]["after"] == Checkpoint(out).total_bytes()


def test_eval_tokens_zero_measures_nothing_and_writes_the_same_weights(quantized_llama, tiny_llama, tmp_path):
    """--eval-tokens 0 (a pipeline that evaluates later): no perplexity, the same calibration windows,
    so the same quantized tensors as a run that evaluates."""
    from safetensors.torch import load_file

    out = tmp_path / "q0"
    result = _quantize(tiny_llama, out, "--group-size", "32", "--eval-tokens", "0")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["perplexity"]["final"] is None and doc["perplexity"]["eval_tokens"] == 0
    evaluated, _ = quantized_llama
    ours, theirs = load_file(out / "model.safetensors"), load_file(evaluated / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("act_order", [False, True])
def test_layers_sharing_an_input_solve_as_one_stack(act_order):
    """q/k/v (and gate/up) read one input: GPTQ on their row-stacked weights is each layer's own GPTQ."""
    from lowrank_cli.methods.quantize.modifier import quantize_layer, quantize_layers

    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 64, generator=g, dtype=torch.float64)
    gram = x.T @ x
    weights = [torch.randn(rows, 64, generator=g) for rows in (48, 16, 32)]
    together = quantize_layers(weights, gram, Grid(4, 32, False), method="gptq", damp=0.01, act_order=act_order)
    for w, (qw, deq, report) in zip(weights, together, strict=True):
        alone_qw, alone_deq, alone_report = quantize_layer(w, gram, Grid(4, 32, False), method="gptq", damp=0.01,
                                                           act_order=act_order)
        assert qw.q.shape == w.shape
        assert (qw.q == alone_qw.q).float().mean() > 0.999  # a level may flip on a last-bit rounding tie
        assert torch.allclose(qw.scales, alone_qw.scales) and torch.equal(qw.g_idx, alone_qw.g_idx)
        assert (deq - alone_deq).abs().max() <= qw.scales.max() + 1e-12  # at most one level apart anywhere
        assert report["output_error"] == pytest.approx(alone_report["output_error"], rel=1e-3)
