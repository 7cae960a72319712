"""The streamed engine against transformers' own forward: same losses, one block in memory at a time."""

from __future__ import annotations

import pytest
import torch
from conftest import build_checkpoint

from lowrank_cli.engine.activations import Activations
from lowrank_cli.engine.streamed import StreamedModel, resolve_dtype
from lowrank_cli.errors import UsageError
from lowrank_cli.eval.perplexity import nll_full, nll_streamed
from lowrank_cli.io.checkpoint import Checkpoint

SEQ = 24



@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, tokenizer_dir):
    return build_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", tokenizer_dir)


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory, tokenizer_dir):
    return build_checkpoint(tmp_path_factory.mktemp("deep"), "llama", tokenizer_dir, layers=8)


@pytest.fixture(params=["llama", "gpt_bigcode", "qwen2"])
def checkpoint(request, tiny_llama, tiny_bigcode, tiny_qwen2):
    return {"llama": tiny_llama, "gpt_bigcode": tiny_bigcode, "qwen2": tiny_qwen2}[request.param]


@pytest.fixture(scope="module")
def windows():
    # 5 windows with batch_size=2: the last batch is a partial one
    return torch.randint(0, 512, (5, SEQ), generator=torch.Generator().manual_seed(1))


def load_hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def reference_nll(model, windows) -> float:
    """Summed NLL from transformers' own loss: mean over seq-1 tokens per window, weighted back."""
    total = 0.0
    with torch.no_grad():
        for w in windows:
            w = w.unsqueeze(0)
            total += float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
    return total


def block_bytes(ckpt: Checkpoint, streamed: StreamedModel) -> list[int]:
    return [sum(t.nbytes for n, t in ckpt.tensors.items() if n.startswith(streamed.block_prefix(i)))
            for i in range(streamed.num_blocks)]


def outer_bytes(ckpt: Checkpoint, streamed: StreamedModel) -> int:
    """Embeddings, final norm and head as the engine loads them (a tied head counts once more)."""
    inner = streamed.blocks_name + "."
    total = sum(t.nbytes for n, t in ckpt.tensors.items() if not n.startswith(inner))
    head = [n for n in streamed._outer_names if n not in ckpt]
    if head:
        emb = streamed.model.get_input_embeddings()
        emb_bytes = emb.weight.numel() * 4  # float32 checkpoints
        total += emb_bytes * len(head)
    return total


def all_meta(streamed: StreamedModel) -> bool:
    return all(p.device.type == "meta" for p in streamed.model.parameters())


def test_streamed_equals_full_and_transformers_loss(checkpoint, windows):
    ckpt = Checkpoint(checkpoint)
    streamed = StreamedModel(ckpt)
    assert all_meta(streamed)  # the skeleton holds no weights
    got = nll_streamed(streamed, windows, batch_size=2)
    model = load_hf(checkpoint)
    full = nll_full(model, windows, batch_size=2)
    reference = reference_nll(model, windows)

    assert got.tokens == full.tokens == windows.shape[0] * (SEQ - 1)
    assert got.total == pytest.approx(full.total, rel=1e-4)
    assert got.total == pytest.approx(reference, rel=1e-4)
    assert full.total == pytest.approx(reference, rel=1e-4)
    assert 4 < got.mean < 9  # a random model over 512 tokens: about log(512) = 6.2
    assert got.perplexity == pytest.approx(full.perplexity, rel=1e-4)

    # every weight went back to meta, and the accounting agrees
    assert all_meta(streamed) and streamed.resident_bytes == 0
    largest = max(block_bytes(ckpt, streamed))
    assert 0 < streamed.peak_resident_bytes <= (largest + outer_bytes(ckpt, streamed)) * 1.1


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batch_size_does_not_change_the_result(tiny_llama, windows, batch_size):
    base = nll_streamed(StreamedModel(Checkpoint(tiny_llama)), windows, batch_size=2)
    other = nll_streamed(StreamedModel(Checkpoint(tiny_llama)), windows, batch_size=batch_size)
    assert other.tokens == base.tokens
    assert other.total == pytest.approx(base.total, rel=1e-5)


def test_a_deep_model_keeps_one_block_resident(deep_llama, windows):
    ckpt = Checkpoint(deep_llama)
    streamed = StreamedModel(ckpt)
    assert streamed.num_blocks == 8
    seen = []
    got = nll_streamed(streamed, windows, batch_size=2,
                       progress=lambda i, n: seen.append((i, n, streamed.resident_bytes)))
    assert [s[:2] for s in seen] == [(i, 8) for i in range(1, 9)]
    assert all(r == 0 for _, _, r in seen)  # nothing left behind after each block
    blocks = block_bytes(ckpt, streamed)
    assert sum(blocks) + outer_bytes(ckpt, streamed) == ckpt.total_bytes()  # untied: all accounted
    peak = streamed.peak_resident_bytes
    assert peak <= (max(blocks) + outer_bytes(ckpt, streamed)) * 1.1
    assert peak < 0.35 * ckpt.total_bytes(), (peak, ckpt.total_bytes())
    assert got.total == pytest.approx(nll_full(load_hf(deep_llama), windows, 2).total, rel=1e-4)


def test_block_by_block_matches_the_hf_hidden_states(tiny_llama, windows):
    """The public step API: capture, load/run/free each block, then the head."""
    streamed = StreamedModel(Checkpoint(tiny_llama))
    ids = windows[:2]
    acts = streamed.capture(ids, batch_size=2)
    model = load_hf(tiny_llama)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(acts) == 1 and torch.allclose(acts[0], hidden[0])
    for i in range(streamed.num_blocks):
        block = streamed.load_block(i)
        assert all(p.device.type == "cpu" for p in block.parameters())
        acts = streamed.run_block(i, acts)
        streamed.free_block(i)
        assert all(p.device.type == "meta" for p in block.parameters())
        if i < streamed.num_blocks - 1:  # the last entry has the final norm applied
            assert torch.allclose(acts[0], hidden[i + 1], atol=1e-5)
    total, count = streamed.head_nll(acts, ids, batch_size=2)
    assert count == 2 * (SEQ - 1)
    assert total == pytest.approx(reference_nll(model, ids), rel=1e-4)


def test_bfloat16_really_computes_in_bfloat16(tiny_llama, windows):
    ckpt = Checkpoint(tiny_llama)
    streamed = StreamedModel(ckpt, dtype=torch.bfloat16)
    block = streamed.load_block(0)
    assert {p.dtype for p in block.parameters()} == {torch.bfloat16}
    assert streamed.resident_bytes == sum(p.numel() * 2 for p in block.parameters())
    assert streamed.resident_bytes * 2 == block_bytes(ckpt, streamed)[0]  # half the float32 bytes
    streamed.free_block(0)
    got = nll_streamed(streamed, windows, batch_size=2)
    full = nll_full(load_hf(tiny_llama, torch.bfloat16), windows, batch_size=2)
    assert got.total == pytest.approx(full.total, rel=1e-3)


def test_offloaded_activations_give_identical_results(checkpoint, windows, tmp_path):
    in_memory = nll_streamed(StreamedModel(Checkpoint(checkpoint)), windows, batch_size=2)
    offload = tmp_path / "offload"
    streamed = StreamedModel(Checkpoint(checkpoint), offload_dir=str(offload))
    acts = streamed.capture(windows, batch_size=2)
    assert len(list(offload.rglob("*.pt"))) == 3  # 5 windows in batches of 2, on disk
    acts.release()
    offloaded = nll_streamed(streamed, windows, batch_size=2)
    assert offloaded.total == in_memory.total and offloaded.tokens == in_memory.tokens
    assert list(offload.iterdir()) == []  # every temporary activation folder is removed


def test_activations_store(tmp_path):
    for where in (None, tmp_path / "acts"):
        store = Activations(where)
        tensors = [torch.randn(2, 3, 4), torch.randn(1, 3, 4)]
        for t in tensors:
            store.append(t.requires_grad_())
        assert len(store) == 2
        assert all(torch.equal(a, b) and not a.requires_grad for a, b in zip(store, tensors, strict=True))
        assert store.nbytes() >= sum(t.numel() * 4 for t in tensors)
        store.calls = [["call"]]
        other = store.new_like()
        assert len(other) == 0 and other.calls is store.calls
        if where is not None:
            assert len(list(where.rglob("*.pt"))) == 2
        store.release()
        other.release()
        assert len(store) == 0
        if where is not None:
            assert list(where.iterdir()) == []


def test_missing_tensor_is_a_usage_error(tiny_llama, tmp_path, windows):
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = shutil.copytree(tiny_llama, tmp_path / "model")
    ckpt = Checkpoint(folder)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = folder / ckpt.tensors[name].file
    with safe_open(str(shard), framework="pt") as fh:
        kept = {k: fh.get_tensor(k).clone() for k in fh.keys() if k != name}
    save_file(kept, str(shard), metadata={"format": "pt"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="up_proj"):
        nll_streamed(StreamedModel(Checkpoint(folder)), windows[:1])


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype(None, "cuda:0") == torch.bfloat16
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    with pytest.raises(UsageError, match="--dtype"):
        resolve_dtype("float8")
