"""The perplexity-budget search: several kept fractions per streamed pass (`--search-width`).

Pure search logic against plain bisection on synthetic monotone perplexity curves, then the CLI end to end:
the chosen model is exactly what evaluating its keep alone gives, a wider search needs fewer passes, the
output reloads with plain transformers, bad widths exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowrank_cli.methods.decompose.search import Candidate, opening_keeps, search_keep, search_keep_batched
from tests.test_decompose import FAST, decompose

TOL = 0.01


def _toy(boundary: float, log: list, layers=lambda k: 3):
    """evaluate_many for a monotone model: passes iff keep >= boundary; records every call."""
    def evaluate_many(keeps):
        log.append(list(keeps))
        return [Candidate(k, k, 10 + (1 - k), k >= boundary, layers(k)) for k in keeps]
    return evaluate_many


BOUNDARIES = [0.07 + 0.0437 * i for i in range(21)]  # 0.07 .. 0.944


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_batched_search_finds_the_bisection_boundary_in_fewer_rounds(boundary):
    narrow, wide = [], []
    bisect = search_keep_batched(_toy(boundary, narrow), width=1, rounds=30, first=0.8, tolerance=TOL)
    batched = search_keep_batched(_toy(boundary, wide), width=3, rounds=30, first=0.8, tolerance=TOL)
    for found, log in ((bisect, narrow), (batched, wide)):
        assert found.best is not None and boundary <= found.best.keep <= boundary + TOL
        assert found.rounds == len(log) and all(0.05 < k < 1 for call in log for k in call)
        # the smallest passing kept fraction is the best; every tried keep is reported with its round
        assert found.best.kept_fraction == min(c.kept_fraction for c in found.tried if c.passed)
        assert [c.round for c in found.tried] == [r + 1 for r, call in enumerate(log) for _ in call]
    assert all(len(call) <= 3 for call in wide)
    assert len(wide) < len(narrow)


def test_batched_search_needs_about_half_the_rounds_of_bisection():
    rounds = {1: 0, 3: 0}
    for boundary in BOUNDARIES:
        for width in rounds:
            rounds[width] += search_keep_batched(_toy(boundary, []), width=width, rounds=30, tolerance=TOL).rounds
    assert rounds[3] <= 0.6 * rounds[1], rounds


def test_rounds_split_the_gap_evenly_and_the_last_one_spends_only_what_tolerance_needs():
    log = []
    found = search_keep_batched(_toy(0.705, log), width=3, rounds=10, first=0.8, tolerance=TOL)
    assert log == [pytest.approx([0.9, 0.8, 0.7]), pytest.approx([0.775, 0.75, 0.725]),
                   pytest.approx([0.716667, 0.708333])]  # a 0.025 gap needs 2 keeps, not 3
    assert found.best.keep == pytest.approx(0.708333) and found.rounds == 3


def test_width_one_is_the_old_bisection():
    """search_keep (one evaluation per step) visits first, then the midpoints of the (fail, pass) interval."""
    calls = []
    found = search_keep(lambda k: calls.append(k) or Candidate(k, k, 1.0, k >= 0.62, 3), steps=4, first=0.8)
    assert calls == pytest.approx([0.8, 0.425, 0.6125, 0.70625])
    assert found.best.keep == pytest.approx(0.70625) and found.rounds == 4


def _measured(truth, budget, log, report_increase=True):
    """evaluate_many where the measured increase is truth(keep); passes iff it is within the budget."""
    def evaluate_many(keeps):
        log.append(list(keeps))
        return [Candidate(k, k, 10 * (1 + truth(k)), truth(k) <= budget, 3,
                          increase=truth(k) if report_increase else None) for k in keeps]
    return evaluate_many


def _truth(k):  # a measured increase growing fast as keep shrinks; 5% is met from keep 0.684 up
    return 0.5 * (1 - k) ** 2


def test_a_predictor_within_2x_brackets_the_boundary_in_the_first_round():
    budget, boundary = 0.05, 1 - 0.1 ** 0.5
    for bias in (0.6, 1.0, 1.8):  # the predictor is off by this factor
        keeps = opening_keeps(0.8, 3, predict=lambda k, b=bias: b * _truth(k), budget=budget)
        assert len(keeps) == 3 and keeps == sorted(keeps, reverse=True)
        passed = [_truth(k) <= budget for k in keeps]
        assert passed[0] and not passed[-1], (bias, keeps)  # largest passes, smallest fails
        log = []
        found = search_keep_batched(_measured(_truth, budget, log), width=3, rounds=10, tolerance=TOL,
                                    predict=lambda k, b=bias: b * _truth(k), budget=budget)
        assert boundary <= found.best.keep <= boundary + TOL
        assert found.rounds <= 4 and log[0] == keeps
    # without a predictor: width keeps a step apart around the first guess
    assert opening_keeps(0.8, 3) == pytest.approx([0.9, 0.8, 0.7])
    assert opening_keeps(0.8, 1, predict=_truth, budget=budget) == [0.8]


@pytest.mark.parametrize("bias", [0.05, 20.0])
def test_a_badly_biased_predictor_is_rescaled_by_what_was_measured(bias):
    """Off by 20x, the opening misses the boundary; the next round rescales the predictor to the measured
    increase and brackets it, where spreading evenly over the untried range takes more rounds."""
    budget, boundary = 0.05, 1 - 0.1 ** 0.5
    runs = {}
    for report in (True, False):  # without measured increases the search can only spread evenly
        log = []
        runs[report] = search_keep_batched(_measured(_truth, budget, log, report), width=3, rounds=20,
                                           tolerance=TOL, predict=lambda k: bias * _truth(k), budget=budget)
        assert boundary <= runs[report].best.keep <= boundary + TOL
        first = [_truth(k) <= budget for k in log[0]]
        assert all(first) or not any(first)  # the opening did miss
    assert runs[True].rounds < runs[False].rounds, (runs[True].rounds, runs[False].rounds)


def test_once_bracketed_a_round_zooms_on_the_interpolated_boundary():
    """With the measured increases at both ends, the round after the bracket places its keeps a tolerance
    apart around the boundary interpolated in log(increase), and closes the gap there."""
    budget, boundary = 0.05, 1 - 0.1 ** 0.5
    runs, logs = {}, {}
    for report in (True, False):
        logs[report] = []
        runs[report] = search_keep_batched(_measured(_truth, budget, logs[report], report), width=3, rounds=20,
                                           first=0.8, budget=budget, tolerance=TOL)
        assert boundary <= runs[report].best.keep <= boundary + TOL
    zoom = logs[True][2]  # [0.9, 0.8, 0.7] all pass, [0.5375, 0.375, 0.2125] all fail, then the zoom
    assert logs[True][1] == pytest.approx([0.5375, 0.375, 0.2125])
    assert max(zoom) - min(zoom) <= 2 * TOL and min(zoom) < boundary < max(zoom)
    assert runs[True].rounds == 3 < runs[False].rounds


def test_invariants_no_factorization_never_passes_and_rounds_are_capped():
    # a keep that factorizes no layer "passes" the perplexity test but is never chosen; it bounds from above
    log = []
    none_above = search_keep_batched(_toy(0.0, log, layers=lambda k: 0 if k > 0.5 else 3), width=3, rounds=8)
    assert none_above.best is not None and none_above.best.factorized_layers > 0
    assert all(not c.passed for c in none_above.tried if c.factorized_layers == 0)
    assert min(none_above.tried, key=lambda c: c.keep).keep < 0.1  # went down, not up
    # nothing passes: every round spent, best None, closest reported
    log = []
    failing = search_keep_batched(_toy(2.0, log), width=3, rounds=2)
    assert failing.best is None and failing.rounds == len(log) == 2 and len(failing.tried) == 6
    assert failing.closest.keep == max(c.keep for c in failing.tried)
    with pytest.raises(ValueError):
        search_keep_batched(_toy(0.5, []), width=0)


# -- end to end ---------------------------------------------------------------------------------------------

def _tensors(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_chosen_model_equals_its_keep_evaluated_alone(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out, alone = tmp_path / "search", tmp_path / "alone"
    code, doc, result = decompose(str(tiny_llama), "-o", str(out), "--target-ppl-increase", "2%",
                                  "--search-width", "3", "--search-steps", "3", *FAST)
    assert code == 0, result.stderr
    chosen = [e for e in doc["evaluations"] if e["passed"] and e["perplexity"] == doc["perplexity"]["final"]]
    assert chosen and chosen[0]["kept_fraction"] == min(e["kept_fraction"] for e in doc["evaluations"]
                                                         if e["passed"])
    passes = [e["pass"] for e in doc["evaluations"]]
    assert passes == sorted(passes) and max(passes) <= 3 and max(passes.count(p) for p in passes) <= 3
    assert not list(out.glob(".candidate-*"))
    code, single, _ = decompose(str(tiny_llama), "-o", str(alone), "--params-ratio", repr(chosen[0]["keep"]),
                                *FAST)
    assert code == 0
    assert single["ranks"] == doc["ranks"]
    assert single["perplexity"]["final"] == pytest.approx(doc["perplexity"]["final"], rel=1e-6)
    assert single["perplexity"]["test_final"] == pytest.approx(doc["perplexity"]["test_final"], rel=1e-6)
    searched, direct = _tensors(out), _tensors(alone)
    assert searched.keys() == direct.keys()
    for name in searched:
        torch.testing.assert_close(searched[name], direct[name], rtol=1e-5, atol=1e-6)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert sum(p.numel() for p in remote.parameters()) == doc["params"]["model_after"]
    assert torch.isfinite(remote(input_ids=torch.randint(0, 512, (1, 16))).logits).all()


def test_wider_search_needs_fewer_passes_on_the_demo(tmp_path):
    """Same budget on the trained demo model: width 3 reaches the tolerance in fewer streamed passes."""
    runs = {}
    for width in ("1", "3"):
        code, doc, result = decompose("demo", "-o", str(tmp_path / width), "--target-ppl-increase", "5%",
                                      "--search-width", width, "--search-steps", "12", "--allocation", "error",
                                      "--calib-samples", "2", "--seq-len", "64", "--eval-tokens", "256",
                                      "--test-tokens", "64")
        assert code == 0, result.stderr
        runs[width] = doc
        manifest = json.loads((tmp_path / width / "lowrank.json").read_text())
        assert manifest["metrics"]["evaluations"] == doc["evaluations"]
    passes = {w: len({e["pass"] for e in d["evaluations"]}) for w, d in runs.items()}
    assert passes["3"] < passes["1"], passes
    assert all(len(d["evaluations"]) >= passes[w] for w, d in runs.items())


@pytest.mark.parametrize("width", ["0", "-1"])
def test_bad_search_width_exits_2_and_writes_nothing(width, tiny_llama, tmp_path):
    out = tmp_path / "out"
    code, doc, result = decompose(str(tiny_llama), "-o", str(out), "--search-width", width, *FAST)
    assert code == 2, result.stderr
    assert "--search-width" in doc["error"]["message"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_search_with_nothing_to_factorize_exits_2(tiny_llama, tmp_path):
    """Rank 48 is above every tiny_llama layer's break-even (32, 42, 21): no keep below 1 exists."""
    out = tmp_path / "out"
    code, doc, result = decompose(str(tiny_llama), "-o", str(out), "--rank-multiple", "48", *FAST)
    assert code == 2, result.stderr
    assert "no targeted layer saves parameters" in doc["error"]["message"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_dry_run_counts_the_candidates_streams(tiny_llama):
    docs = {w: decompose(str(tiny_llama), "--dry-run", "--search-width", w, *FAST)[1] for w in ("1", "3")}
    one, three = docs["1"]["memory"], docs["3"]["memory"]
    hidden, token_bytes = 64, 4
    per_candidate = (4 * 64 + 256 + 10240) * hidden * token_bytes  # calib + eval + test (default) tokens
    assert one["candidate_streams"] == 0 and three["candidate_streams"] == 2 * per_candidate
    assert three["total"] > one["total"]
    fixed = decompose(str(tiny_llama), "--dry-run", "--search-width", "3", "--params-ratio", "0.5", *FAST)[1]
    assert fixed["memory"]["candidate_streams"] == 0  # a fixed budget evaluates one candidate
