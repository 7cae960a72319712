"""Measured memory: a streamed pass over a ~340 MB checkpoint keeps about one block in memory.

Both the build and the measurement run in fresh subprocesses, so nothing the test session has allocated
blurs the figures. The measure is the process's anonymous RSS (`RssAnon`): the safetensors shards are
mmapped, and their file-backed pages count in VmRSS but are page cache the kernel can drop at will under
memory pressure, so they are not memory the process holds. A background thread samples RssAnon every 2 ms
during the pass.

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

# Written tensor by tensor with the project's ShardWriter (no transformers import, no init pass: a few
# seconds instead of ~15 on a busy machine); names and config are those of transformers' LlamaForCausalLM.
BUILD = f"""
import json, sys
from pathlib import Path
import torch
from lowrank_cli.io.writer import ShardWriter

out = Path(sys.argv[1])
out.mkdir()
layers, hidden, inter, vocab = {LAYERS}, {HIDDEN}, {INTERMEDIATE}, 512
config = {{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
          "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 12,
          "num_key_value_heads": 12, "vocab_size": vocab, "max_position_embeddings": 128,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
          "dtype": "float32"}}
(out / "config.json").write_text(json.dumps(config))
torch.manual_seed(0)
writer = ShardWriter(out, max_shard_bytes=100 * 10**6)
writer.add("model.embed_tokens.weight", torch.randn(vocab, hidden) * 0.02)
for i in range(layers):
    p = f"model.layers.{{i}}."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        writer.add(p + f"self_attn.{{name}}.weight", torch.randn(hidden, hidden) * 0.02)
    writer.add(p + "mlp.gate_proj.weight", torch.randn(inter, hidden) * 0.02)
    writer.add(p + "mlp.up_proj.weight", torch.randn(inter, hidden) * 0.02)
    writer.add(p + "mlp.down_proj.weight", torch.randn(hidden, inter) * 0.02)
    writer.add(p + "input_layernorm.weight", torch.ones(hidden))
    writer.add(p + "post_attention_layernorm.weight", torch.ones(hidden))
writer.add("model.norm.weight", torch.ones(hidden))
writer.add("lm_head.weight", torch.randn(vocab, hidden) * 0.02)
writer.close()
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


def measure(dtype_name):
    dtype = getattr(torch, dtype_name)
    gc.collect()
    base = anon()
    state["peak"], state["samples"] = base, 0
    after_block = []
    start = time.perf_counter()
    ckpt = Checkpoint(path)
    streamed = StreamedModel(ckpt, dtype=dtype)
    nll = nll_streamed(streamed, windows, batch_size=1,
                       progress=lambda i, n: after_block.append(sample() - base))
    seconds = time.perf_counter() - start
    time.sleep(0.02)
    pass_peak, samples = max(state["peak"], sample()), state["samples"]
    size = torch.tensor([], dtype=dtype).element_size()
    blocks = [sum(t.numel for n, t in ckpt.tensors.items() if n.startswith(streamed.block_prefix(i)))
              * size for i in range(streamed.num_blocks)]
    figures = {
        "dtype": dtype_name, "baseline": base, "peak_growth": pass_peak - base,
        "after_each_block": after_block, "block_bytes": max(blocks), "checkpoint_bytes": ckpt.total_bytes(),
        "engine_peak_resident_bytes": streamed.peak_resident_bytes, "samples": samples,
        "seconds": seconds, "tokens": nll.tokens, "mean_nll": nll.mean,
    }
    del ckpt, streamed
    gc.collect()
    figures["after_pass"] = sample() - base
    # The probe: does the sampler see an allocation of one block? (it must, or the figures mean nothing)
    # Freed heap memory is handed back first, or the probe could reuse pages that are resident already.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    state["peak"] = before_probe = sample()
    probe = torch.ones(max(blocks) // 4)
    time.sleep(0.05)
    figures["probe_seen"] = max(state["peak"], sample()) - before_probe
    figures["probe_bytes"] = probe.numel() * 4
    del probe
    return figures


figures = measure(dtype_name)
state["stop"] = True
thread.join()
print(json.dumps(figures))
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
    assert (folder / "model" / "model.safetensors.index.json").is_file()
    return folder / "model"


MiB = 2**20


DTYPES = ("float32", "bfloat16")


@pytest.fixture(scope="module")
def measured(big_checkpoint, tmp_path_factory) -> dict:
    """One fresh process per dtype (glibc's heap state depends on what a process did before, so two
    passes in one process blur each other), run side by side: each measures only itself."""
    procs = {dtype: subprocess.Popen([sys.executable, "-c", MEASURE, str(big_checkpoint), dtype],
                                     cwd=tmp_path_factory.mktemp("run"), env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
             for dtype in DTYPES}
    results = {}
    for dtype, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]
        results[dtype] = json.loads(out.strip().splitlines()[-1])
    return results


def test_the_checkpoint_is_big_and_sharded(big_checkpoint):
    shards = list(big_checkpoint.glob("*.safetensors"))
    assert len(shards) >= 3 and sum(p.stat().st_size for p in shards) > 300 * 10**6


@pytest.mark.parametrize("dtype", DTYPES)
def test_streamed_pass_keeps_about_one_block_in_memory(measured, dtype):
    m = measured[dtype]
    block, ckpt = m["block_bytes"], m["checkpoint_bytes"]
    growth = m["peak_growth"]
    print(f"\n[{dtype}] checkpoint {ckpt / MiB:.0f} MiB, one block {block / MiB:.1f} MiB "
          f"({LAYERS} blocks); anonymous RSS: baseline {m['baseline'] / MiB:.0f} MiB, peak growth "
          f"{growth / MiB:.1f} MiB = {growth / block:.2f} blocks = {growth / ckpt:.1%} of the checkpoint; "
          f"after the pass {m['after_pass'] / MiB:+.1f} MiB; engine's own peak count "
          f"{m['engine_peak_resident_bytes'] / MiB:.1f} MiB; probe {m['probe_seen'] / MiB:.1f} of "
          f"{m['probe_bytes'] / MiB:.1f} MiB seen; {m['samples']} samples over {m['seconds']:.2f} s")

    assert m["tokens"] == 2 * 31 and 4 < m["mean_nll"] < 9
    assert m["engine_peak_resident_bytes"] == block
    assert growth < 3 * block, f"peak growth {growth / MiB:.1f} MiB is over 3 blocks ({block / MiB:.1f} MiB)"
    assert growth < 0.35 * ckpt
    # nothing piles up block after block, and nothing stays behind
    assert max(m["after_each_block"]) < 2 * block
    assert m["after_each_block"][-1] - m["after_each_block"][0] < block
    assert m["after_pass"] < block
    # and the figures are real: the sampler ran, and it sees an allocation of one block
    assert m["samples"] > 20
    assert m["probe_seen"] >= 0.9 * m["probe_bytes"], "the sampler does not see allocations"
