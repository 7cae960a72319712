"""`lowrank compress` and the pieces it is built from: the shared pipeline with several candidates, the
factors' Hessians, the low-rank correction of GPTQ's error and its PEFT adapter."""

from __future__ import annotations

import json

import pytest
import torch

from lowrank_cli.engine.sequential import Candidate, run_pipeline


def _streamed(path):
    from lowrank_cli.engine.streamed import StreamedModel
    from lowrank_cli.engine.targets import select_targets
    from lowrank_cli.io.checkpoint import Checkpoint

    streamed = StreamedModel(Checkpoint(path))
    return streamed, select_targets(streamed.model, streamed.blocks_name, None)


def _windows(n, seq=32, seed=0):
    return torch.randint(0, 500, (n, seq), generator=torch.Generator().manual_seed(seed))


# -- the pipeline ----------------------------------------------------------------------------------------------
def test_candidates_in_one_pass_equal_separate_passes(tiny_llama):
    """Sharing a read of the model changes nothing: each candidate's tensors and NLL are those of a pass of
    its own (the block is restored between candidates)."""
    from lowrank_cli.methods.decompose.modifier import Factorize
    from lowrank_cli.methods.quantize.grid import Grid
    from lowrank_cli.methods.quantize.modifier import Quantize

    streamed, targets = _streamed(tiny_llama)
    calib, evalw = _windows(4), {"eval": _windows(2, seed=1)}
    ranks = {t.name: 16 for t in targets if "mlp" in t.name}

    def make():
        return [Candidate("q", Quantize(Grid(4, 32, False))), Candidate("f", Factorize(ranks, "lord", 0.01))]

    def collect(cands):
        stores = {c.name: {} for c in cands}
        for c in cands:
            c.sink = stores[c.name].__setitem__
        return stores

    together = make()
    together_store = collect(together)
    shared = run_pipeline(streamed, calib, evalw, targets, together)
    for cand in make():
        store = collect([cand])
        alone = run_pipeline(streamed, calib, evalw, targets, [cand])
        assert alone.nll[cand.name]["eval"].total == pytest.approx(shared.nll[cand.name]["eval"].total, rel=1e-6)
        assert store[cand.name].keys() == together_store[cand.name].keys()
        for key, value in store[cand.name].items():
            assert torch.equal(value, together_store[cand.name][key]), key
    assert shared.nll["q"]["eval"].total != shared.nll["f"]["eval"].total


def test_shared_calibration_grams_equal_per_candidate_grams(tiny_llama):
    """Not sequential: one calibration stream through the original blocks serves every candidate, so the
    result equals a candidate run alone on the original model's Grams."""
    from lowrank_cli.methods.decompose.modifier import Profiler

    streamed, targets = _streamed(tiny_llama)
    calib = _windows(4)
    a, b = Profiler("lord", 0.01), Profiler("lord", 0.01)
    run_pipeline(streamed, calib, {}, targets, [Candidate("a", a), Candidate("b", b)], sequential=False)
    c = Profiler("lord", 0.01)
    run_pipeline(streamed, calib, {}, targets, [Candidate("c", c)], sequential=False)
    for t in targets:
        assert torch.allclose(a.tails[t.name], c.tails[t.name], rtol=1e-9, atol=1e-12)
        assert torch.equal(a.tails[t.name], b.tails[t.name])


def test_candidates_sharing_grams_share_spectra(tiny_llama, monkeypatch):
    """On the shared calibration stream each layer's spectrum is computed once per block for all the candidates
    that factorize it, and each candidate's tensors are those of a pass of its own."""
    from lowrank_cli.methods.decompose import modifier as mod

    streamed, targets = _streamed(tiny_llama)
    calib, evalw = _windows(4), {"eval": _windows(2, seed=1)}
    calls = []
    real = mod.layer_spectrum
    monkeypatch.setattr(mod, "layer_spectrum", lambda *a, **k: calls.append(a[2]) or real(*a, **k))

    def make(rank):
        store = {}
        ranks = {t.name: rank for t in targets}
        return Candidate(f"r{rank}", mod.Factorize(ranks, "lord", 0.01), store.__setitem__), store

    (a, sa), (b, sb) = make(8), make(16)
    together = run_pipeline(streamed, calib, evalw, targets, [a, b], sequential=False)
    assert len(calls) == len(targets)  # not twice
    for rank, shared_store in ((8, sa), (16, sb)):
        cand, store = make(rank)
        alone = run_pipeline(streamed, calib, evalw, targets, [cand], sequential=False)
        assert store.keys() == shared_store.keys() and all(torch.equal(store[k], shared_store[k]) for k in store)
        assert alone.nll[cand.name]["eval"].total == pytest.approx(together.nll[cand.name]["eval"].total, rel=1e-9)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_true_sequential_or_one_forward_per_block(tiny_llama, true_sequential):
    """true_sequential=False measures all of a block's Grams on the block as it entered: block 0's Grams are the
    original model's, even for groups behind ones already quantized; true_sequential re-measures those. Block 1
    is measured on the quantized stream either way."""
    from lowrank_cli.engine.sequential import Modifier
    from lowrank_cli.methods.quantize.grid import Grid
    from lowrank_cli.methods.quantize.modifier import Quantize

    class Recording(Modifier):
        def __init__(self, inner=None):
            self.inner, self.seen = inner, {}

        def modify(self, block, group, grams):
            for t in group:
                self.seen[t.name] = grams.gram(t.local).clone()
            return self.inner.modify(block, group, grams) if self.inner else []

    streamed, targets = _streamed(tiny_llama)
    calib = _windows(4)
    original, quantized = Recording(), Recording(Quantize(Grid(2, 32, False)))
    run_pipeline(streamed, calib, {}, targets, [Candidate("o", original)])
    run_pipeline(streamed, calib, {}, targets, [Candidate("q", quantized)], true_sequential=true_sequential)
    first = [t.name for t in targets if t.block == 0]
    later = [name for name in first if not name.endswith(("q_proj", "k_proj", "v_proj"))]  # behind a quantized group
    for name in first:
        same = torch.equal(original.seen[name], quantized.seen[name])
        assert same if (not true_sequential or name not in later) else not same, name
    assert not any(torch.equal(original.seen[t.name], quantized.seen[t.name]) for t in targets if t.block == 1)


def test_pruned_candidate_stops_and_the_others_are_unchanged(tiny_llama):
    """A candidate `prune` stops after block 0 has no NLL and no tensors past that block; the candidate beside
    it gets exactly the NLL of a pass of its own; tracked reports carry the output error energy."""
    from lowrank_cli.methods.quantize.grid import Grid
    from lowrank_cli.methods.quantize.modifier import Quantize

    streamed, targets = _streamed(tiny_llama)
    calib, evalw = _windows(4), {"eval": _windows(2, seed=1)}
    keep, stop = Candidate("keep", Quantize(Grid(4, 32, False)), track_energy=True), \
        Candidate("stop", Quantize(Grid(2, 32, False)), track_energy=True)
    stored = {"keep": [], "stop": []}
    keep.sink, stop.sink = (lambda n, t: stored["keep"].append(n)), (lambda n, t: stored["stop"].append(n))
    asked = []

    def prune(cand, i):
        asked.append((cand.name, i))
        return cand.name == "stop"

    outcome = run_pipeline(streamed, calib, evalw, targets, [keep, stop], prune=prune)
    assert outcome.dropped == {"stop": 0} and set(outcome.nll) == {"keep"}
    assert ("stop", 1) not in asked and ("keep", streamed.num_blocks - 1) in asked
    assert stored["stop"] and all(n.startswith(streamed.block_prefix(0)) for n in stored["stop"])
    assert {r["name"] for r in outcome.layers["stop"]} == {t.name for t in targets if t.block == 0}
    assert all(r["output_energy"] > 0 for r in outcome.layers["keep"])
    alone = run_pipeline(streamed, calib, evalw, targets, [Candidate("keep", Quantize(Grid(4, 32, False)))])
    assert alone.nll["keep"]["eval"].total == pytest.approx(outcome.nll["keep"]["eval"].total, rel=1e-6)


def test_pass_ends_once_every_candidate_is_pruned(tiny_llama):
    from lowrank_cli.methods.quantize.grid import Grid
    from lowrank_cli.methods.quantize.modifier import Quantize

    streamed, targets = _streamed(tiny_llama)
    loaded = []
    load = streamed.load_block
    streamed.load_block = lambda i: loaded.append(i) or load(i)
    cands = [Candidate(f"c{b}", Quantize(Grid(b, 32, False))) for b in (2, 4)]
    outcome = run_pipeline(streamed, _windows(2), {"eval": _windows(1, seed=1)}, targets, cands,
                           prune=lambda cand, i: True)
    assert loaded == [0] and outcome.nll == {} and outcome.dropped == {"c2": 0, "c4": 0}


def test_output_energy_is_the_summed_squared_output_error():
    from lowrank_cli.engine.calibration import output_energy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 20, generator=g, dtype=torch.float64)
    w = torch.randn(12, 20, generator=g, dtype=torch.float64)
    changed = w + 0.05 * torch.randn(12, 20, generator=g, dtype=torch.float64)
    naive = float(((x @ w.T - x @ changed.T) ** 2).sum())
    assert output_energy(w.float(), changed.float(), x.T @ x) == pytest.approx(naive, rel=1e-4)


def test_calib_autocast_touches_the_calibration_stream_only(tiny_llama):
    """The shared calibration forward under bfloat16 autocast: the profile's curves move by rounding only
    (the first rank's tail within a few %), the evaluation streams are not touched (same NLL to the bit)."""
    from lowrank_cli.methods.decompose.modifier import Profiler

    streamed, targets = _streamed(tiny_llama)
    calib, evalw = _windows(4), {"eval": _windows(2, seed=1)}
    runs = {}
    for dtype in (None, torch.bfloat16):
        profiler = Profiler("lord", 0.01)
        outcome = run_pipeline(streamed, calib, evalw, targets, [Candidate("p", profiler)], sequential=False,
                               calib_autocast=dtype)
        runs[dtype] = profiler.tails, outcome.only()[0]["eval"]
    (tails, nll), (low_tails, low_nll) = runs[None], runs[torch.bfloat16]
    assert low_nll.total == nll.total and low_nll.per_window == nll.per_window
    moved = [float(low_tails[t.name][1] / tails[t.name][1] - 1) for t in targets]
    assert all(abs(m) < 0.05 for m in moved) and any(m != 0 for m in moved), moved


# -- the math ----------------------------------------------------------------------------------------------------
def test_factor_hessian_is_the_gram_of_the_factor_outputs():
    from lowrank_cli.methods.compress.modifiers import factor_hessian

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 24, generator=g, dtype=torch.float64)
    down = torch.randn(8, 24, generator=g, dtype=torch.float64)
    direct = (x @ down.T).T @ (x @ down.T)
    assert torch.allclose(factor_hessian(down, x.T @ x), direct, rtol=1e-12, atol=1e-9)


# -- the command ---------------------------------------------------------------------------------------------------
def _compress(src, out, *extra):
    from typer.testing import CliRunner

    from lowrank_cli.cli.app import app

    args = ["compress", str(src), "--calib-samples", "8", "--seq-len", "64", "--eval-tokens", "10240",
            "--test-tokens", "512", "--group-size", "32", "--json", *extra]
    if out is not None:
        args += ["-o", str(out)]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def compressed(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "small"
    result = _compress(tiny_llama, out, "--target-ppl-increase", "3%", "--bits", "8,4,2", "--keeps", "0.9",
                       # every candidate measured (the pruned run is compared with this one)
                       "--families", "gptq,factorize-gptq,gptq-lr", "--no-prune")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_compress_keeps_the_smallest_candidate_within_the_budget(compressed):
    out, doc = compressed
    frontier = json.loads((out / "frontier.json").read_text())
    rows = frontier["candidates"]
    labels = {r["label"] for r in rows}
    assert {"gptq-8bit", "gptq-4bit", "gptq-2bit", "factorize-gptq-keep0.9-4bit", "gptq-lr-2bit-r32"} <= labels
    limit = frontier["baseline"]["eval"] * 1.03
    for r in rows:
        assert r["passed"] == (r["eval_perplexity"] <= limit)
        assert r["tensor_bytes"] == r["predicted_bytes"]  # exact: the size is known before building
    chosen = next(r for r in rows if r["label"] == frontier["chosen"])
    assert chosen["passed"] and chosen["bytes"] == min(r["bytes"] for r in rows if r["passed"])
    assert doc["chosen"]["label"] == chosen["label"]
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "lowrank.json").read_text())
    assert manifest["command"] == "compress" and not list(out.glob(".candidate-*"))
    from lowrank_cli.engine.precision import fast_bfloat16

    # the default --sensitivity-dtype auto: bfloat16 where this CPU multiplies it fast, recorded either way; the
    # profile's Grams are kept for the candidates pass, so they take its products: float64 for gptq-lr
    assert manifest["precision"] == doc["precision"] == {
        "compute": "float32", "profile_gram_products": "float64",
        "sensitivity": "bfloat16" if fast_bfloat16("cpu") else "float32"}
    from lowrank_cli.io.finish import weight_file_bytes

    own = weight_file_bytes(out) + sum(weight_file_bytes(p) for p in out.iterdir() if p.is_dir())
    assert own == chosen["bytes"]


def test_pruning_stops_candidates_over_the_threshold_and_chooses_among_the_rest(compressed, tiny_llama, tmp_path,
                                                                                monkeypatch):
    """The random tiny model barely reacts to quantization (2-bit: about +0.1% predicted), so the threshold is
    lowered to 1% of the budget to make pruning happen: the pruned candidates are exactly those predicted over
    it, they are listed with their estimate and no folder, and the choice is the smallest candidate of the
    unpruned run that was not pruned and passed. (Whether predictions track real increases is measured on
    real models: README, "Pick the smallest model".)"""
    from lowrank_cli.api import compress_job

    monkeypatch.setattr(compress_job, "PRUNE_FACTOR", 0.01)
    full_out, _ = compressed
    out = tmp_path / "pruned"
    result = _compress(tiny_llama, out, "--target-ppl-increase", "3%", "--bits", "8,4,2", "--keeps", "0.9",
                       "--families", "gptq,factorize-gptq,gptq-lr")
    assert result.exit_code == 0, result.output
    measured = {r["label"]: r for r in json.loads((full_out / "frontier.json").read_text())["candidates"]}
    rows = json.loads((out / "frontier.json").read_text())["candidates"]
    threshold = 0.01 * 0.03
    pruned = {r["label"] for r in rows if r["pruned"]}
    assert pruned == {label for label, r in measured.items() if r["predicted_increase"] > threshold}
    assert pruned and len(pruned) < len(rows), [(r["label"], r["predicted_increase"]) for r in rows]
    for r in rows:
        if r["pruned"]:
            assert r["eval_perplexity"] is None and not r["passed"]
            assert threshold < r["predicted_increase"] <= measured[r["label"]]["predicted_increase"] * (1 + 1e-9)
            assert 0 <= r["pruned"]["after_block"] < r["pruned"]["of_blocks"]
        else:  # measured exactly as in the unpruned run
            assert r["eval_perplexity"] == pytest.approx(measured[r["label"]]["eval_perplexity"], rel=1e-9)
            assert r["predicted_increase"] == pytest.approx(measured[r["label"]]["predicted_increase"], rel=1e-6)
    expected = min((r for label, r in measured.items() if label not in pruned and r["passed"]),
                   key=lambda r: r["bytes"])
    assert json.loads(result.stdout)["chosen"]["label"] == expected["label"]
    assert not list(out.glob(".candidate-*")) and (out / "frontier.png").exists()


def test_compressed_output_reads_back_with_its_reported_test_perplexity(compressed):
    """The written checkpoint, read back (dequantized, streamed), gives the eval perplexity the search saw."""
    from lowrank_cli.api.evaluate import evaluate

    out, doc = compressed
    if (out / "correction").is_dir():
        pytest.skip("the chosen candidate carries a PEFT correction: read back in the adapter test")
    again = evaluate(str(out), seq_len=64, max_tokens=10240, streaming=True)
    # the same eval windows; the pipeline ran float32 weights, the folder holds float16 ones
    assert again.perplexity == pytest.approx(doc["chosen"]["eval_perplexity"], rel=1e-2)


@pytest.mark.parametrize(("args", "message"), [
    (["--target-ppl-increase", "5%", "--target-size", "0.3"], "give one target"),
    (["--target-ppl-increase", "1%", "--eval-tokens", "4096"], "is below the noise of 4096 eval tokens"),
    (["--families", "gptq,awq"], "unknown family 'awq'"),
    (["--bits", "5"], "--bits 5 is not supported"),
    (["--keeps", "1.5"], "--keeps 1.5 must be a fraction"),
    (["--target-size", "lots"], "--target-size 'lots'"),
    (["--sensitivity-dtype", "half"], "unknown --sensitivity-dtype 'half' (choose auto, float32, bfloat16)"),
])
def test_bad_input_exits_2_and_writes_nothing(tiny_llama, tmp_path, args, message):
    out = tmp_path / "out"
    result = _compress(tiny_llama, out, *args)
    assert result.exit_code == 2, result.output
    assert message in json.loads(result.stdout)["error"]["message"]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_size_target_nothing_fits_exits_3_before_any_work(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = _compress(tiny_llama, out, "--target-size", "1KB")
    assert result.exit_code == 3, result.output
    assert "no candidate fits" in json.loads(result.stdout)["error"]["message"]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_dry_run_lists_candidates_with_their_sizes(tiny_llama):
    result = _compress(tiny_llama, None, "--dry-run", "--bits", "4,3", "--families", "gptq,factorize-gptq,gptq-lr")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    sizes = [c["bytes"] for c in doc["candidates"]]
    # gptq x2, factorize-gptq x 2 keeps x 2 bits, gptq-lr at 3 bits (it tries 2 and 3 only)
    assert sizes == sorted(sizes) and len(sizes) == 7
    assert doc["baseline"]["cost"]["candidates"] == 7
    gptq4 = next(c for c in doc["candidates"] if c["label"] == "gptq-4bit")
    assert gptq4["bits_per_weight"] < 16


def test_heal_steps_add_measured_healed_candidates(tiny_llama, tmp_path):
    out = tmp_path / "healed"
    result = _compress(tiny_llama, out, "--families", "gptq", "--bits", "4", "--heal-steps", "2",
                       "--target-ppl-increase", "50%")
    assert result.exit_code == 0, result.output
    rows = {r["label"]: r for r in json.loads((out / "frontier.json").read_text())["candidates"]}
    assert set(rows) == {"gptq-4bit", "gptq-4bit+heal2"}
    healed, plain = rows["gptq-4bit+heal2"], rows["gptq-4bit"]
    assert healed["healed"] and not plain["healed"]
    assert healed["eval_perplexity"] != plain["eval_perplexity"]  # measured, not copied
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4  # a quantized candidate is requantized after healing


def test_budget_below_the_measurement_noise_exits_2(tiny_llama, tmp_path, monkeypatch):
    """After the pass: the noise of the candidates near the budget (here all of them) is above it. (The
    up-front rule on eval tokens, which would refuse this budget first, is switched off here.)"""
    from lowrank_cli.api.options import compress as compress_options

    monkeypatch.setattr(compress_options, "eval_tokens_needed", lambda budget: 1)
    out = tmp_path / "out"
    result = _compress(tiny_llama, out, "--families", "gptq", "--bits", "2", "--target-ppl-increase", "0.0001%",
                       "--no-prune")  # pruned, the candidate would have no measured noise to judge by
    assert result.exit_code == 2, result.output
    assert "eval tokens resolve (paired standard error" in json.loads(result.stdout)["error"]["message"]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_candidates_report_paired_noise(compressed):
    out, _ = compressed
    rows = json.loads((out / "frontier.json").read_text())["candidates"]
    for r in rows:
        assert 0 <= r["eval_increase_se"] < 1 and 0 <= r["test_increase_se"] < 1
    # coarser grids disturb more, so their increases are measured less precisely
    se = {r["label"]: r["eval_increase_se"] for r in rows}
    assert se["gptq-8bit"] < se["gptq-2bit"]


def test_correction_adapter_is_applied_when_the_output_is_read_back(tiny_llama, tmp_path):
    """A gptq-lr winner is a GPTQ folder plus correction/: `lowrank eval` (dequantizing, streamed) and the
    loader (transformers + gptqmodel + PEFT) both apply Q + L R, giving the perplexity compress measured."""
    from lowrank_cli.api.evaluate import evaluate
    from lowrank_cli.io.lora_adapter import read_lora_adapter

    out = tmp_path / "lr"
    result = _compress(tiny_llama, out, "--families", "gptq-lr", "--bits", "2", "--target-ppl-increase", "90%")
    assert result.exit_code == 0, result.output
    factors = read_lora_adapter(out / "correction")
    assert factors and all(up.shape[1] == 32 for up, _ in factors.values())
    chosen = json.loads(result.stdout)["chosen"]
    streamed = evaluate(str(out), seq_len=64, max_tokens=10240, streaming=True)
    assert streamed.perplexity == pytest.approx(chosen["eval_perplexity"], rel=1e-3)
    full = evaluate(str(out), seq_len=64, max_tokens=10240)
    assert full.perplexity == pytest.approx(chosen["eval_perplexity"], rel=2e-2)
    # the dequantizing view serves Q + L R: exactly the GPTQ weight plus the adapter's product
    from lowrank_cli.io.checkpoint import Checkpoint
    from lowrank_cli.io.gptq_view import DequantizedCheckpoint

    name, (up, down) = next(iter(factors.items()))
    corrected = DequantizedCheckpoint(Checkpoint(out)).get(f"{name}.weight", dtype=torch.float64)
    import shutil

    shutil.move(out / "correction", tmp_path / "aside")
    plain = DequantizedCheckpoint(Checkpoint(out)).get(f"{name}.weight", dtype=torch.float64)
    assert torch.allclose(corrected - plain, up.double() @ down.double(), atol=1e-9)
    assert (up.double() @ down.double()).abs().max() > 0


def test_fisher_allocation_matches_decompose(tiny_llama, tmp_path):
    """compress's default allocation is decompose's: the same Fisher sensitivities weigh the same error
    curves, so a keep gives both the same ranks; and it differs from the unweighted error allocation."""
    from lowrank_cli.api.common import load_tokenizer, solver_windows
    from lowrank_cli.api.compress_job import CompressJob
    from lowrank_cli.api.decompose import _Job as DecomposeJob
    from lowrank_cli.api.options.compress import CompressOptions
    from lowrank_cli.api.options.decompose import DecomposeOptions
    from lowrank_cli.api.solver import open_input
    from lowrank_cli.methods.decompose.allocate import allocate_ranks
    from lowrank_cli.utils.progress import Progress

    data = dict(calib="stdlib", calib_samples=4, calib_seq_len=64, eval_tokens=512, test_tokens=256)

    def compress_job(allocation):
        opts, path, ckpt = open_input(str(tiny_llama), CompressOptions(
            output=str(tmp_path / "c"), families=["factorize"], keeps=[0.9], allocation=allocation,
            target_size="0.9", **data), {}, refuse_quantized="")
        job = CompressJob(str(tiny_llama), path, ckpt, opts, Progress())
        job.windows = solver_windows(load_tokenizer(path), opts)
        torch.manual_seed(0)
        job._profile()
        return job

    fisher = compress_job("fisher")
    opts, path, ckpt = open_input(str(tiny_llama), DecomposeOptions(
        output=str(tmp_path / "d"), params_ratio=0.6, rank_multiple=8, **data), {}, refuse_quantized="")
    dec = DecomposeJob(str(tiny_llama), path, ckpt, opts, Progress())
    dec.windows = solver_windows(load_tokenizer(path), opts)
    torch.manual_seed(0)
    dec.curves, _, sens = dec._profile()

    mine = {c.name: c.sensitivity for c in fisher.curves}
    assert set(mine) == set(sens) and len(set(mine.values())) > 1
    for name, value in sens.items():
        assert mine[name] == pytest.approx(value, rel=1e-5)
    # (compress ranks in multiples of 32, too coarse for this tiny model's layers to show a difference)
    assert allocate_ranks(fisher.curves, 0.6, 8) == allocate_ranks(dec.curves, 0.6, 8)
    error = compress_job("error")
    assert all(c.sensitivity == 1.0 for c in error.curves)
    assert allocate_ranks(error.curves, 0.6, 8) != allocate_ranks(fisher.curves, 0.6, 8)


def test_noise_of_a_larger_increase_is_carried_down_to_the_budget():
    """The post-pass rule agrees with the up-front one: a +10% candidate's noise is carried to a 5% budget
    with the measured law (spread ~ increase^0.765) before it is compared; the same noise on a +5%
    candidate refuses the budget."""
    from types import SimpleNamespace

    from lowrank_cli.api.compress_job import CompressJob
    from lowrank_cli.errors import UsageError

    def check(increase):
        job = SimpleNamespace(budget={"kind": "target_ppl_increase", "value": 0.05},
                              baseline={"eval_tokens": 5120})
        CompressJob._check_resolution(job, [{"eval_increase": increase, "eval_increase_se": 0.009}])
        return job.budget["eval_noise"]

    assert check(0.10) == pytest.approx(3 * 0.009 * 0.5 ** 0.765)  # 1.6% < 2.5%: resolved
    with pytest.raises(UsageError, match="below what 5120 eval tokens resolve"):
        check(0.05)  # 2.7% > 2.5%
