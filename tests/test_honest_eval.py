"""Honest evaluation: three disjoint token sets (calibration, eval, test), per-window NLL sums and the
noise of a perplexity (alone and paired with a base model)."""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from types import SimpleNamespace

import pytest
import torch

from lowrank_cli.api.common import SolverWindows, calibration_and_eval_windows, solver_windows
from lowrank_cli.data.sources import part_of
from lowrank_cli.eval.noise import ppl_noise


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _opts(**kw):
    base = dict(calib=None, calib_samples=4, calib_seq_len=64, eval_data=None, eval_tokens=256, seed=0,
                text_field="text")
    return SimpleNamespace(**{**base, **kw})


def _marked_corpus(path, n=600):
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    docs = [f"<d{i}> " + " ".join(random.Random(i).choice(words) for _ in range(12)) for i in range(n)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def _doc_ids(tokenizer, windows) -> set[int]:
    # a marker cut by a window edge matches nowhere (it needs both "<d" and ">"), so only whole ones count
    return {int(m) for row in windows for m in re.findall(r"<d(\d+)>", tokenizer.decode(row))}


def test_one_source_for_every_role_is_split_with_no_document_in_two_roles(tokenizer, tmp_path):
    f = tmp_path / "mine.jsonl"
    docs = _marked_corpus(f)
    opts = _opts(calib=str(f), eval_data=str(f), calib_samples=16, calib_seq_len=32, eval_tokens=512)
    w = solver_windows(tokenizer, opts)
    assert isinstance(w, SolverWindows)
    ids = {role: _doc_ids(tokenizer, getattr(w, role)) for role in ("calib", "eval", "test")}
    assert all(len(s) >= 5 for s in ids.values())
    assert not ids["calib"] & ids["eval"] and not ids["calib"] & ids["test"] and not ids["eval"] & ids["test"]
    for role, found in ids.items():  # and each role reads its own part of the documented split
        assert all(part_of(docs[i]) == role for i in found), role
    assert w.test.shape == w.eval.shape == (16, 32)  # test_tokens defaults to eval_tokens
    assert w.calib.shape == (16, 32)


def test_test_data_and_test_tokens_options(tokenizer, tmp_path):
    f = tmp_path / "mine.jsonl"
    docs = _marked_corpus(f)
    opts = _opts(eval_data=None, test_data=str(f), test_tokens=2048, calib_seq_len=32)
    w = solver_windows(tokenizer, opts)
    assert w.test.shape == (64, 32) and w.eval.shape == (8, 32)
    # used for one role only, the user's source is read whole: documents of the "train" part appear too
    found = _doc_ids(tokenizer, w.test)
    assert len(found) > 20 and "train" in {part_of(docs[i]) for i in found}


def test_builtin_parts_give_three_different_sets_and_old_callers_keep_working(tokenizer):
    opts = _opts()
    w = solver_windows(tokenizer, opts)
    assert w.calib.shape == (4, 64) and w.eval.shape == (4, 64) and w.test.shape == (4, 64)
    rows = [tuple(r.tolist()) for t in (w.calib, w.eval, w.test) for r in t]
    assert len(set(rows)) == len(rows)
    calib, evalw = calibration_and_eval_windows(tokenizer, opts)
    assert torch.equal(calib, w.calib) and torch.equal(evalw, w.eval)


def test_stdlib_mix_calibration_with_code_evaluation(tokenizer):
    # 16 x 128 tokens of this tiny tokenizer (~5,000 characters) span more than one code+prose pair
    w = solver_windows(tokenizer, _opts(calib="stdlib-mix", eval_data="stdlib", calib_samples=16,
                                        calib_seq_len=128, eval_tokens=512))
    text = tokenizer.decode(w.calib.flatten())
    assert text.count(" the ") > 10 and text.count("==") + text.count("self") + text.count("return") > 5
    assert w.eval.shape == w.test.shape == (4, 128)


# ---------------------------------------------------------------------------------- per-window NLL sums


@pytest.fixture(scope="module")
def llama_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def test_per_window_sums_add_up_and_match_each_window_alone(llama_model):
    from lowrank_cli.eval.perplexity import nll_full

    windows = torch.randint(0, 500, (5, 24), generator=torch.Generator().manual_seed(0))
    plain = nll_full(llama_model, windows, batch_size=2)
    rows = nll_full(llama_model, windows, batch_size=2, per_window=True)
    assert plain.per_window is None and len(rows.per_window) == 5
    assert rows.tokens == plain.tokens == 5 * 23
    assert rows.total == pytest.approx(plain.total, rel=1e-6)
    assert math.fsum(rows.per_window) == pytest.approx(rows.total, rel=1e-12)
    for i in range(5):
        alone = nll_full(llama_model, windows[i:i + 1])
        assert rows.per_window[i] == pytest.approx(alone.total, rel=1e-5)


def test_streamed_per_window_sums_equal_the_in_memory_ones(tiny_llama, llama_model):
    from lowrank_cli.engine.streamed import StreamedModel
    from lowrank_cli.eval.perplexity import nll_full, nll_streamed
    from lowrank_cli.io.checkpoint import Checkpoint

    windows = torch.randint(0, 500, (4, 24), generator=torch.Generator().manual_seed(1))
    full = nll_full(llama_model, windows, per_window=True)
    streamed = nll_streamed(StreamedModel(Checkpoint(tiny_llama)), windows, batch_size=2, per_window=True)
    assert streamed.tokens == full.tokens
    assert streamed.per_window == pytest.approx(full.per_window, rel=1e-4)
    assert streamed.total == pytest.approx(full.total, rel=1e-4)


# ---------------------------------------------------------------------------------------------- ppl_noise


def test_standard_error_equals_textbook_formula_for_equal_windows():
    sums = [random.Random(i).uniform(200, 400) for i in range(30)]
    t = 511
    found = ppl_noise(sums, t)
    per_token = [s / t for s in sums]
    assert found.perplexity == pytest.approx(math.exp(statistics.fmean(per_token)), rel=1e-12)
    # equal windows: the ratio estimator's error is the plain standard error of the mean per-token NLL
    assert found.relative_se == pytest.approx(statistics.stdev(per_token) / math.sqrt(30), rel=1e-10)
    assert found.ratio is None and found.ratio_relative_se is None


def test_standard_error_predicts_the_spread_of_independent_samples():
    rng = random.Random(0)
    t, n = 100, 40

    def sample():  # window difficulty varies a lot: per-token NLL ~ N(3, 0.5) per window
        return [t * rng.gauss(3.0, 0.5) for _ in range(n)]

    draws = [sample() for _ in range(400)]
    observed = statistics.stdev(math.log(ppl_noise(s, t).perplexity) for s in draws)
    predicted = statistics.fmean(ppl_noise(s, t).relative_se for s in draws)
    assert predicted == pytest.approx(observed, rel=0.15)
    assert predicted == pytest.approx(0.5 / math.sqrt(n), rel=0.1)


def test_paired_ratio_removes_the_shared_difficulty():
    rng = random.Random(1)
    t, n = 200, 32
    base = [t * rng.gauss(3.0, 0.6) for _ in range(n)]
    shifted = [b + t * 0.01 for b in base]  # 0.01 nats per token worse on every window: no noise at all
    found = ppl_noise(shifted, t, base)
    assert found.ratio == pytest.approx(math.exp(0.01), rel=1e-12)
    assert found.ratio_relative_se == pytest.approx(0.0, abs=1e-12)
    assert found.relative_se > 0.05  # while each model alone is noisy
    noisy = [b + t * rng.gauss(0.01, 0.02) for b in base]
    paired = ppl_noise(noisy, t, base)
    diffs = [(c - b) / t for c, b in zip(noisy, base, strict=True)]
    assert paired.ratio_relative_se == pytest.approx(statistics.stdev(diffs) / math.sqrt(n), rel=1e-10)
    assert paired.resolves(0.05) and not paired.resolves(0.001)


def test_blocks_pool_consecutive_windows():
    rng = random.Random(2)
    base = [rng.uniform(100, 300) for _ in range(12)]
    model = [b + rng.uniform(0, 20) for b in base]
    assert ppl_noise(model, 50, base, block=1) == ppl_noise(model, 50, base)
    pooled = ppl_noise(model, 50, base, block=4)
    assert pooled.perplexity == pytest.approx(ppl_noise(model, 50, base).perplexity, rel=1e-12)
    # three samples of 4 windows (200 tokens) each: the textbook standard error over those three
    per_token = [sum(d[i:i + 4]) / 200 for d in ([m - b for m, b in zip(model, base, strict=True)],)
                 for i in range(0, 12, 4)]
    assert pooled.ratio_relative_se == pytest.approx(statistics.stdev(per_token) / math.sqrt(3), rel=1e-10)
    with pytest.raises(ValueError):
        ppl_noise(model, 50, base, block=0)


def test_unequal_windows_and_bad_input():
    sums, tokens = [10.0, 40.0, 33.0], [5, 20, 11]
    found = ppl_noise(sums, tokens)
    assert found.perplexity == pytest.approx(math.exp(83.0 / 36), rel=1e-12)
    assert ppl_noise([5.0], 4).relative_se == math.inf
    with pytest.raises(ValueError):
        ppl_noise([], 4)
    with pytest.raises(ValueError):
        ppl_noise([1.0, 2.0], [3])
    with pytest.raises(ValueError):
        ppl_noise([1.0, 2.0], 3, [1.0])
