"""Measured memory: a streamed pass over a ~340 MB checkpoint keeps about one block in memory.

Both the build and the measurement run in fresh subprocesses, so nothing the test session has allocated
blurs the figures. The measure is the process's anonymous RSS (`RssAnon`): the safetensors shards are
mmapped, and their file-backed pages count in VmRSS but are page cache the kernel can drop at will (see
shared/design/dependencies.md §6). A background thread samples RssAnon every 2 ms during the pass.

Two passes: float32 (the checkpoint's own dtype: weights are used straight from the mmap) and bfloat16
(every block is converted, so each block's weights are real anonymous allocations that must be freed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _has_rss_anon() -> bool:
    try:
        return "RssAnon:" in Path("/proc/self/status").read_text()
    except OSError:
        return False


if not _has_rss_anon():
    pytest.skip("needs /proc/self/status with RssAnon (Linux)", allow_module_level=True)

LAYERS, HIDDEN, INTERMEDIATE = 12, 768, 2048

BUILD = f"""
import sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
torch.manual_seed(0)
config = LlamaConfig(hidden_size={HIDDEN}, intermediate_size={INTERMEDIATE}, num_hidden_layers={LAYERS},
                     num_attention_heads=12, num_key_value_heads=12, vocab_size=512,
                     max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
AutoModelForCausalLM.from_config(config).save_pretrained(sys.argv[1], max_shard_size="100MB")
"""

MEASURE = """
import gc, json, sys, threading, time


def anon():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024


path, dtype_name = sys.argv[1], sys.argv[2]
# Everything imported first: the baseline is the imported program, not the model.
import torch
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
import accelerate, safetensors.torch
from lowrank_cli.engine.streamed import StreamedModel
from lowrank_cli.eval.perplexity import nll_streamed
from lowrank_cli.io.checkpoint import Checkpoint

torch.set_num_threads(1)
MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]  # imports the modeling module
dtype = getattr(torch, dtype_name)
windows = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
torch.ones(4, 4) @ torch.ones(4, 4)

state = {"peak": 0, "samples": 0, "stop": False}


def sample():
    value = anon()
    state["peak"] = max(state["peak"], value)
    state["samples"] += 1
    return value


def sampler():
    while not state["stop"]:
        sample()
        time.sleep(0.002)


thread = threading.Thread(target=sampler, daemon=True)
thread.start()
time.sleep(0.05)
gc.collect()
base = anon()
state["peak"] = base
after_block = []

start = time.perf_counter()
ckpt = Checkpoint(path)
streamed = StreamedModel(ckpt, dtype=dtype)
nll = nll_streamed(streamed, windows, batch_size=1,
                   progress=lambda i, n: after_block.append(sample() - base))
seconds = time.perf_counter() - start
time.sleep(0.02)
pass_peak = max(state["peak"], sample())
gc.collect()
after = sample() - base

size = torch.tensor([], dtype=dtype).element_size()
blocks = [sum(t.numel for n, t in ckpt.tensors.items() if n.startswith(streamed.block_prefix(i))) * size
          for i in range(streamed.num_blocks)]

# The probe: does the sampler see an allocation of one block? (it must, or the figures mean nothing)
state["peak"] = before_probe = sample()
probe = torch.ones(max(blocks) // 4)
time.sleep(0.05)
probe_seen = max(state["peak"], sample()) - before_probe
del probe
state["stop"] = True
thread.join()

print(json.dumps({
    "dtype": dtype_name, "baseline": base, "peak_growth": pass_peak - base, "after_pass": after,
    "after_each_block": after_block, "block_bytes": max(blocks), "checkpoint_bytes": ckpt.total_bytes(),
    "engine_peak_resident_bytes": streamed.peak_resident_bytes, "probe_bytes": max(blocks) // 4 * 4,
    "probe_seen": probe_seen, "samples": state["samples"], "seconds": seconds, "tokens": nll.tokens,
    "mean_nll": nll.mean,
}))
"""


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env


def _python(code: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("big")
    _python(BUILD, str(folder / "model"), cwd=folder)
    return folder / "model"


MiB = 2**20


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_pass_keeps_about_one_block_in_memory(big_checkpoint, dtype, tmp_path):
    shards = list(big_checkpoint.glob("*.safetensors"))
    assert len(shards) >= 3 and sum(p.stat().st_size for p in shards) > 300 * 10**6

    out = _python(MEASURE, str(big_checkpoint), dtype, cwd=tmp_path)
    m = json.loads(out.strip().splitlines()[-1])
    block, ckpt = m["block_bytes"], m["checkpoint_bytes"]
    growth = m["peak_growth"]
    print(f"\n[{dtype}] checkpoint {ckpt / MiB:.0f} MiB, one block {block / MiB:.1f} MiB "
          f"({LAYERS} blocks); anonymous RSS: baseline {m['baseline'] / MiB:.0f} MiB, peak growth "
          f"{growth / MiB:.1f} MiB = {growth / block:.2f} blocks = {growth / ckpt:.1%} of the checkpoint; "
          f"after the pass {m['after_pass'] / MiB:+.1f} MiB; engine's own peak count "
          f"{m['engine_peak_resident_bytes'] / MiB:.1f} MiB; probe {m['probe_seen'] / MiB:.1f} of "
          f"{m['probe_bytes'] / MiB:.1f} MiB seen; {m['samples']} samples over {m['seconds']:.2f} s")

    assert m["tokens"] == 2 * 31 and 4 < m["mean_nll"] < 9
    assert m["samples"] > 20
    assert m["probe_seen"] >= 0.9 * m["probe_bytes"], "the sampler does not see allocations"
    assert growth < 3 * block, f"peak growth {growth / MiB:.1f} MiB is over 3 blocks ({block / MiB:.1f} MiB)"
    assert growth < 0.35 * ckpt
    # nothing piles up block after block, and nothing stays behind
    assert max(m["after_each_block"]) < 2 * block
    assert m["after_each_block"][-1] - m["after_each_block"][0] < block
    assert m["after_pass"] < block
