"""Token-weighted gradient accumulation: batch 2 == batch 1 x accumulation 2 == 2 processes x batch 1, on
prompt/completion data whose completions differ a lot in length (loss on the completions only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accum_worker import train_adapter

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def uneven_qa(tmp_path_factory):
    """Completions of 1 to ~40 tokens: a mean of micro-batch means would weigh them very differently."""
    words = ["alpha", "beta", "gamma", "delta", "import", "return", "class", "while"]
    records = []
    for i in range(24):
        w = words[i % len(words)]
        completion = f" {w}" if i % 2 else " " + " ".join(f"{w}{j}" for j in range(12))
        records.append({"prompt": f"say {w} {i}:", "completion": completion})
    path = tmp_path_factory.mktemp("qa") / "uneven.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _labelled_lengths(tiny_llama, uneven_qa):
    from transformers import AutoTokenizer

    from lowrank_cli.train.data import build_datasets

    data = build_datasets(AutoTokenizer.from_pretrained(tiny_llama), str(uneven_qa), max_seq_len=64, seed=0)
    return [sum(t != -100 for t in e["labels"][1:]) for e in data.train]


def _assert_same(a: dict, b: dict, atol=1e-4):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_batch_two_equals_batch_one_times_accumulation_two(tiny_llama, uneven_qa):
    lengths = _labelled_lengths(tiny_llama, uneven_qa)
    assert max(lengths) >= 5 * min(lengths)  # the case the old mean-of-means weighting got wrong
    big = train_adapter(str(tiny_llama), str(uneven_qa), batch_size=2, grad_accum=1)
    accum = train_adapter(str(tiny_llama), str(uneven_qa), batch_size=1, grad_accum=2)
    _assert_same(big["state"], accum["state"])
    assert [r["loss"] for r in big["curve"]] == pytest.approx([r["loss"] for r in accum["curve"]], abs=1e-5)
    # the comparison is not vacuous: training moved the adapter far more than the tolerance
    start = big["initial"]
    assert max(float((start[n] - big["state"][n]).abs().max()) for n in start) > 1e-2


def test_two_processes_match_one_process_with_accumulation(tiny_llama, uneven_qa, tmp_path):
    """2 CPU processes (gloo) x batch 1 x accumulation 2 == 1 process x batch 2 x accumulation 2 (the same
    examples in each window): the window's label count is summed across processes before the gradient is
    divided by it, and DDP's averaging is undone."""
    target = tmp_path / "adapter.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "accum_worker.py"), str(tiny_llama), str(uneven_qa), "1", "2", str(target)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    launched = torch.load(target, weights_only=True)
    assert launched["processes"] == 2
    single = train_adapter(str(tiny_llama), str(uneven_qa), batch_size=2, grad_accum=2)
    _assert_same(launched["state"], single["state"])
