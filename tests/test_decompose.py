"""`lowrank decompose` end to end on tiny checkpoints: outputs reload with plain transformers and match
the project's own loader; budgets, dry-run and bad input behave as documented."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lowrank_cli.cli.app import app

runner = CliRunner()
FAST = ["--calib-samples", "4", "--seq-len", "64", "--eval-tokens", "256"]


def decompose(*args):
    result = runner.invoke(app, ["decompose", *args, "--json"])
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stdout + result.stderr
    return result.exit_code, json.loads(lines[0]), result


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bigcode"])
def test_factorized_output_reloads_with_trust_remote_code(fixture, request, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowrank_cli.modeling.export import load_model

    src = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    code, doc, result = decompose(str(src), "-o", str(out), "--params-ratio", "0.6", *FAST)
    assert code == 0, result.stderr
    assert doc["params"]["targeted_after"] < doc["params"]["targeted_before"]
    assert doc["params"]["model_after"] == doc["params"]["model_before"] - (
        doc["params"]["targeted_before"] - doc["params"]["targeted_after"])
    config = json.loads((out / "config.json").read_text())
    assert config["lowrank"]["ranks"] == doc["ranks"] and doc["ranks"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lowrank.LowRankForCausalLM"
    assert (out / "lowrank.json").is_file() and (out / "tokenizer.json").is_file()

    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    ours = load_model(out, dtype=torch.float32)
    n_params = sum(p.numel() for p in remote.parameters())
    assert n_params == doc["params"]["model_after"]
    ids = torch.randint(0, 512, (2, 24))
    torch.testing.assert_close(logits_of(remote, ids), logits_of(ours, ids))
    # the factors, multiplied back, are what the evaluation measured: re-evaluating gives the same ppl
    ev = runner.invoke(app, ["eval", str(out), "--seq-len", "64", "--max-tokens", "256", "--json"])
    assert json.loads(ev.stdout)["perplexity"] == pytest.approx(doc["perplexity"]["final"], rel=1e-4)


def test_dense_format_is_a_standard_checkpoint(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    fact, dense = tmp_path / "f", tmp_path / "d"
    assert decompose(str(tiny_llama), "-o", str(fact), "--rank", "16", *FAST)[0] == 0
    code, doc, _ = decompose(str(tiny_llama), "-o", str(dense), "--rank", "16", "--format", "dense", *FAST)
    assert code == 0
    config = json.loads((dense / "config.json").read_text())
    assert "lowrank" not in config and "auto_map" not in config
    assert not (dense / "modeling_lowrank.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    assert all(type(m).__name__ != "LowRankLinear" for m in plain.modules())
    factored = AutoModelForCausalLM.from_pretrained(fact, trust_remote_code=True, dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 20))
    torch.testing.assert_close(logits_of(plain, ids), logits_of(factored, ids), atol=1e-4, rtol=1e-4)


def test_rank_budget_and_break_even(tiny_llama, tmp_path):
    # hidden 64 / intermediate 128: break-even ranks are 32 (64x64), 42 (128x64) and 16 (k/v: 32x64 -> 21)
    code, doc, _ = decompose(str(tiny_llama), "-o", str(tmp_path / "o"), "--rank", "24", *FAST)
    assert code == 0
    assert doc["ranks"] and set(doc["ranks"].values()) == {24}
    assert any("k_proj" in n for n in doc["dense_layers"])  # 24 >= 21.3: factorizing saves nothing


def test_rank_above_every_break_even_is_refused(tiny_llama, tmp_path):
    """A rank at which no layer saves parameters would write an uncompressed copy: exit 2, nothing written."""
    code, doc, _ = decompose(str(tiny_llama), "-o", str(tmp_path / "o"), "--rank", "64", *FAST)
    assert code == 2 and "saves nothing" in doc["error"]["message"]
    assert not (tmp_path / "o").exists()


def test_dry_run_writes_nothing(tiny_bigcode, tmp_path):
    out = tmp_path / "out"
    code, doc, _ = decompose(str(tiny_bigcode), "-o", str(out), "--rank", "8", "--dry-run", "--seq-len", "64")
    assert code == 0 and doc["dry_run"] is True
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    assert {row["layer"] for row in doc["plan"]} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert doc["memory"]["total"] > 0


def test_dry_run_counts_the_fisher_pass_head_copy(tiny_bigcode):
    """A bfloat16 Fisher pass over float32 weights holds a bfloat16 copy of the head: the plan counts it."""
    plans = {}
    for dtype in ("float32", "bfloat16"):
        code, doc, _ = decompose(str(tiny_bigcode), "--params-ratio", "0.5", "--dry-run", "--seq-len", "64",
                                 "--sensitivity-dtype", dtype)
        assert code == 0
        plans[dtype] = doc["memory"]
    assert plans["float32"]["fisher_head_copy"] == 0
    assert plans["bfloat16"]["fisher_head_copy"] == 512 * 64 * 2  # vocabulary x hidden x 2 bytes
    assert plans["bfloat16"]["total"] - plans["float32"]["total"] in (0, 512 * 64 * 2)  # unless another phase peaks


def test_dry_run_plans_for_a_device_this_machine_lacks(tiny_bigcode, monkeypatch):
    """A GPU run can be sized from a laptop: the plan uses the device's compute dtype (bfloat16)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, cpu, _ = decompose(str(tiny_bigcode), "--rank", "8", "--dry-run", "--seq-len", "64")
    code_gpu, gpu, _ = decompose(str(tiny_bigcode), "--rank", "8", "--dry-run", "--seq-len", "64", "--device",
                                 "cuda")
    assert code == code_gpu == 0
    assert (cpu["memory"]["device"], cpu["memory"]["compute_dtype"]) == ("cpu", "float32")
    assert (gpu["memory"]["device"], gpu["memory"]["compute_dtype"]) == ("cuda", "bfloat16")
    assert gpu["memory"]["block"] * 2 == cpu["memory"]["block"]  # half the bytes per weight
    assert gpu["memory"]["gram"] == cpu["memory"]["gram"]  # Grams stay float64 on every device


def test_float32_gram_products_stay_close_to_float64(tiny_llama, tmp_path):
    """The float32 path (for GPUs without fast float64): same ranks, perplexity within 0.1%."""
    runs = {}
    for products in ("float64", "float32"):
        code, doc, _ = decompose(str(tiny_llama), "-o", str(tmp_path / products), "--params-ratio", "0.7",
                                 "--gram-products", products, *FAST)
        assert code == 0, doc
        runs[products] = doc
    assert runs["float32"]["ranks"] == runs["float64"]["ranks"]
    assert runs["float32"]["perplexity"]["final"] == pytest.approx(runs["float64"]["perplexity"]["final"], rel=1e-3)


def test_kept_grams_give_the_same_model_without_a_calibration_stream(tiny_llama, tmp_path, monkeypatch):
    """--no-sequential: the profile keeps the original model's Grams (GramStore) and the compress passes use
    them instead of carrying the calibration windows again; the written tensors are the same as when nothing
    fits the store (every pass measures them). The store's products are the factors' (--gram-products float64
    here: a profile without a store takes float32 ones)."""
    from safetensors.torch import load_file

    from lowrank_cli.engine import streamed as streamed_mod

    captured = []
    real_capture = streamed_mod.StreamedModel.capture
    monkeypatch.setattr(streamed_mod.StreamedModel, "capture",
                        lambda self, windows, *a, **k: captured.append(windows.shape) or real_capture(self, windows,
                                                                                                      *a, **k))
    args = ["--params-ratio", "0.5", "--no-sequential", "--gram-products", "float64", "--calib-samples", "6",
            "--seq-len", "64", "--eval-tokens", "256"]
    code, kept, _ = decompose(str(tiny_llama), "-o", str(tmp_path / "kept"), *args)
    assert code == 0, kept
    calib_shape = (6, 64)
    assert captured.count(calib_shape) == 1  # the profile pass only
    assert kept["precision"]["profile_gram_products"] == "float64"
    captured.clear()
    monkeypatch.setattr("lowrank_cli.api.solver.GRAM_STORE_SHARE", 0.0)  # nothing fits: measured every pass
    code, measured, _ = decompose(str(tiny_llama), "-o", str(tmp_path / "measured"), *args)
    assert code == 0, measured
    assert captured.count(calib_shape) == 2  # the profile pass and the compress pass
    assert measured["precision"]["profile_gram_products"] == "float32"
    assert kept["ranks"] == measured["ranks"]
    a, b = load_file(tmp_path / "kept" / "model.safetensors"), load_file(tmp_path / "measured" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("ratio", "flag", "sequential"), [("0.8", None, False), ("0.5", None, True),
                                                           ("0.8", "--sequential", True),
                                                           ("0.5", "--no-sequential", False)])
def test_sequential_by_default_only_below_the_measured_threshold(tiny_llama, tmp_path, ratio, flag, sequential):
    """Without --sequential/--no-sequential a compress pass calibrates sequentially only when a kept fraction it
    evaluates is below SEQUENTIAL_BELOW (0.75); the choice is recorded with each evaluation and in lowrank.json."""
    from lowrank_cli.api.decompose import SEQUENTIAL_BELOW

    out = tmp_path / "o"
    code, doc, _ = decompose(str(tiny_llama), "-o", str(out), "--params-ratio", ratio, *([flag] if flag else []),
                             *FAST)
    assert code == 0, doc
    (evaluation,) = doc["evaluations"]
    assert evaluation["sequential"] is sequential
    if flag is None:
        assert (evaluation["kept_fraction"] < SEQUENTIAL_BELOW) is sequential
    manifest = json.loads((out / "lowrank.json").read_text())
    assert manifest["metrics"]["evaluations"][0]["sequential"] is sequential


def test_targets_select_layers(tiny_bigcode, tmp_path):
    code, doc, _ = decompose(str(tiny_bigcode), "-o", str(tmp_path / "o"), "--params-ratio", "0.5",
                             "--targets", "mlp.*", *FAST)
    assert code == 0
    assert doc["ranks"] and all(".mlp." in n for n in doc["ranks"])
    assert doc["params"]["targeted_layers"] == 4


@pytest.mark.parametrize("args, needle", [
    (["--target-ppl-increase", "-1%"], "target-ppl-increase"),
    (["--target-ppl-increase", "100%"], "target-ppl-increase"),
    (["--target-ppl-increase", "abc"], "percentage"),
    (["--params-ratio", "0"], "params-ratio"),
    (["--params-ratio", "1.5"], "params-ratio"),
    (["--params-ratio", "0.5", "--rank", "8"], "only one budget"),
    (["--rank", "8", "--targets", "nothing_like_this"], "matches no linear"),
    (["--rank", "0"], "rank"),
    (["--rank", "8", "--method", "magic"], "method"),
    (["--params-ratio", "0.5", "--sensitivity-dtype", "float16"], "unknown --sensitivity-dtype 'float16'"),
])
def test_bad_input_exits_2_and_writes_nothing(args, needle, tiny_llama, tmp_path):
    out = tmp_path / "out"
    code, doc, result = decompose(str(tiny_llama), "-o", str(out), *args, *FAST)
    assert code == 2, result.stderr
    assert needle in doc["error"]["message"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_sensitivity_dtype_is_one_line_on_stderr(tiny_llama, tmp_path):
    result = runner.invoke(app, ["decompose", str(tiny_llama), "-o", str(tmp_path / "out"), "--params-ratio", "0.5",
                                 "--sensitivity-dtype", "fp8", *FAST])
    assert result.exit_code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--sensitivity-dtype 'fp8'" in lines[0] and "auto, float32, bfloat16" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_sensitivity_dtype_steers_only_and_is_recorded(tiny_llama, tmp_path):
    """bfloat16 (forced) and float32 sensitivity passes: each recorded in the result and lowrank.json, the
    Fisher weights within a few %, and the same ranks (hence the same weights and perplexities) on a tiny
    model; the profile's curves and the factors took the --gram-products default, float32."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        code, doc, result = decompose(str(tiny_llama), "-o", str(out), "--params-ratio", "0.6",
                                      "--sensitivity-dtype", dtype, *FAST)
        assert code == 0, result.stderr
        manifest = json.loads((out / "lowrank.json").read_text())
        assert doc["precision"] == manifest["precision"] == {
            "compute": "float32", "factor_gram_products": "float32", "sensitivity": dtype,
            "profile_gram_products": "float32"}
        assert manifest["options"]["sensitivity_dtype"] == dtype
        runs[dtype] = doc, manifest
    (f32, m32), (bf16, m16) = runs["float32"], runs["bfloat16"]
    assert m32["sensitivity"].keys() == m16["sensitivity"].keys()
    for name, value in m32["sensitivity"].items():
        assert m16["sensitivity"][name] == pytest.approx(value, rel=0.03), name
    assert bf16["ranks"] == f32["ranks"]
    assert bf16["perplexity"]["test_final"] == pytest.approx(f32["perplexity"]["test_final"], rel=1e-6)


def test_model_without_linear_layers_exits_2(tmp_path, tokenizer_dir):
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512)).save_pretrained(tmp_path / "g")
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, tmp_path / "g" / f.name)
    code, doc, _ = decompose(str(tmp_path / "g"), "-o", str(tmp_path / "o"), "--rank", "8", *FAST)
    assert code == 2 and "no nn.Linear" in doc["error"]["message"]


def test_nonempty_output_refused(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, doc, _ = decompose(str(tiny_llama), "-o", str(out), "--rank", "8", *FAST)
    assert code == 2 and "not empty" in doc["error"]["message"]
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_unreachable_budget_exits_3_and_writes_nothing(tmp_path):
    # A trained model loses quality under any compression, so a 0% budget cannot be met.
    out = tmp_path / "out"
    code, doc, result = decompose("demo", "-o", str(out), "--target-ppl-increase", "0%", "--search-steps",
                                  "2", "--allocation", "error", *FAST)
    assert code == 3, result.stderr
    assert doc["error"]["type"] == "budget" and "closest" in doc["error"]["message"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_input_is_never_modified(tiny_bigcode, tmp_path):
    before = {p.name: p.read_bytes() for p in tiny_bigcode.iterdir()}
    assert decompose(str(tiny_bigcode), "-o", str(tmp_path / "o"), "--rank", "8", *FAST)[0] == 0
    assert {p.name: p.read_bytes() for p in tiny_bigcode.iterdir()} == before


def test_verification_catches_a_broken_output(tiny_llama, tmp_path):
    import shutil

    from lowrank_cli.errors import RuntimeFailure
    from lowrank_cli.io.verify import verify_checkpoint

    out = tmp_path / "out"
    assert decompose(str(tiny_llama), "-o", str(out), "--rank", "8", *FAST)[0] == 0
    verify_checkpoint(out)  # the real output passes
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    config = json.loads((broken / "config.json").read_text())
    name = next(iter(config["lowrank"]["ranks"]))
    config["lowrank"]["ranks"][name] = 16  # the config now disagrees with the stored factors
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeFailure, match="verification failed"):
        verify_checkpoint(broken)


def test_search_bisects_to_the_smallest_passing_candidate():
    from lowrank_cli.methods.decompose.search import Candidate, first_guess, search_keep

    calls = []

    def evaluate(keep):  # a monotone toy: passes when keep >= 0.62
        calls.append(keep)
        return Candidate(keep, keep, 10 + (1 - keep), keep >= 0.62, factorized_layers=3)

    found = search_keep(evaluate, steps=8, first=0.8, tolerance=0.01)
    assert found.best is not None and 0.62 <= found.best.keep < 0.64
    assert len(calls) <= 8
    none = search_keep(lambda k: Candidate(k, k, 99.0, False, 3), steps=3)
    assert none.best is None and len(none.tried) == 3 and none.closest.perplexity == 99.0
    # a candidate that factorizes nothing never counts as a pass
    empty = search_keep(lambda k: Candidate(k, 1.0, 1.0, True, 0), steps=2)
    assert empty.best is None
    assert first_guess(lambda k: 1 - k, 0.2, lo=0.3, hi=0.95, points=14) == pytest.approx(0.8, abs=0.05)


def test_perplexity_budget_on_the_demo_removes_parameters(tmp_path):
    """The headline job on the bundled (trained) model: a 5% budget is met by a smaller model."""
    out = tmp_path / "out"
    code, doc, result = decompose("demo", "-o", str(out), "--target-ppl-increase", "5%", "--search-steps", "3",
                                  *FAST)
    assert code == 0, result.stderr
    assert doc["params"]["model_after"] < doc["params"]["model_before"]
    assert doc["perplexity"]["final"] <= doc["perplexity"]["baseline"] * 1.05
    assert 1 <= len({e["pass"] for e in doc["evaluations"]}) <= 3  # --search-steps counts streamed passes
    assert len(doc["evaluations"]) <= 3 * 3  # of at most --search-width (3) candidates each
    assert any(e["passed"] for e in doc["evaluations"])
    manifest = json.loads((out / "lowrank.json").read_text())
    assert manifest["metrics"]["perplexity"]["final"] == doc["perplexity"]["final"]
    assert not list(out.glob(".candidate-*"))  # the losing candidates are gone
