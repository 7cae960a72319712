"""Checkpoint reading, shard writing, the atomic output folder, MODEL resolution and sizes."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

from lowrank_cli.errors import UsageError
from lowrank_cli.io.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint
from lowrank_cli.io.output import OutputDir, check_output_target
from lowrank_cli.io.resolve import demo_path, resolve_model
from lowrank_cli.io.writer import ShardWriter, parse_size


def one_line_usage_error(excinfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, f"not a one-line message: {message!r}"
    assert excinfo.value.exit_code == 2
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


@pytest.fixture
def llama_copy(tiny_llama, tmp_path) -> Path:
    """A private copy of the session's tiny llama, free to damage."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def copy_side_files(ckpt: Checkpoint, out: Path) -> None:
    shutil.copy2(ckpt.path / "config.json", out / "config.json")
    for f in ckpt.side_files():
        shutil.copy2(f, out / f.name)


# ------------------------------------------------------------------------------------- write / read


def test_sharded_round_trip_is_bit_identical(tiny_llama, tmp_path):
    ckpt = Checkpoint(tiny_llama)
    assert len(ckpt.files) > 1, "the fixture is meant to be sharded"
    out = tmp_path / "out"
    out.mkdir()
    limit = 60_000
    writer = ShardWriter(out, max_shard_bytes=limit)
    for name in ckpt.names():
        writer.add(name, ckpt.get(name))
    weight_map = writer.close()

    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert not list(out.glob("*.tmp")) and not (out / SINGLE_FILE).exists()
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["weight_map"] == weight_map
    assert set(weight_map) == set(ckpt.tensors)
    assert index["metadata"]["total_size"] == ckpt.total_bytes() == writer.total_bytes
    assert index["metadata"]["total_parameters"] == ckpt.num_params()

    copy_side_files(ckpt, out)
    back = Checkpoint(out)
    for name, info in ckpt.tensors.items():
        assert (back.tensors[name].shape, back.tensors[name].dtype) == (info.shape, info.dtype)
    for shard in shards:  # a shard only exceeds the limit when one tensor alone does
        held = [t for t in back.tensors.values() if t.file == shard]
        assert sum(t.nbytes for t in held) <= limit or len(held) == 1

    original, reloaded = load_hf(tiny_llama), load_hf(out)
    a, b = original.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_single_shard_has_no_index(tiny_llama, tmp_path):
    ckpt = Checkpoint(tiny_llama)
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out)  # the 2GB default: everything fits in one file
    for name in ckpt.names():
        writer.add(name, ckpt.get(name))
    weight_map = writer.close()
    assert sorted(p.name for p in out.iterdir()) == [SINGLE_FILE]
    assert set(weight_map.values()) == {SINGLE_FILE} and set(weight_map) == set(ckpt.tensors)
    copy_side_files(ckpt, out)
    back = Checkpoint(out)
    assert back.files == [SINGLE_FILE]
    for name in ckpt.names():
        assert torch.equal(back.get(name), ckpt.get(name))


def test_writer_stores_views_compactly_and_rejects_duplicates(tmp_path):
    big = torch.arange(100_000, dtype=torch.float32).view(1000, 100)
    writer = ShardWriter(tmp_path)
    writer.add("row", big[3])
    writer.add("cols", big[:, :2])  # a non-contiguous view
    with pytest.raises(ValueError, match="twice"):
        writer.add("row", big[4])
    writer.close()
    assert (tmp_path / SINGLE_FILE).stat().st_size < 20_000  # not the 400 kB buffer behind the views
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / SINGLE_FILE)
    assert torch.equal(loaded["row"], big[3]) and torch.equal(loaded["cols"], big[:, :2])


def test_get_reads_one_tensor_in_the_asked_dtype(tiny_llama):
    ckpt = Checkpoint(tiny_llama)
    name = "model.layers.1.mlp.down_proj.weight"
    assert name in ckpt and "nope" not in ckpt
    t = ckpt.get(name, dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16 and tuple(t.shape) == ckpt.tensors[name].shape
    assert ckpt.tensors[name].nbytes == t.numel() * 4  # stored in float32
    assert ckpt.model_type == "llama" and ckpt.quantization is None
    assert set(ckpt.names("model.layers.0.")) < set(ckpt.names())
    with pytest.raises(KeyError):
        ckpt.get("model.layers.9.mlp.down_proj.weight")


# ----------------------------------------------------------------------------------- broken checkpoints


def test_truncated_shard(llama_copy):
    shard = max(llama_copy.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(UsageError) as excinfo:
        Checkpoint(llama_copy)
    one_line_usage_error(excinfo, "truncated", shard.name)


def _entry(offsets, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("content", [
    b"\xff" * 64,                                        # header length past the end of the file
    b"abc",                                              # shorter than the length field
    struct.pack("<Q", 12) + b"not json!!!!" + b"\0" * 8,  # length fine, header no JSON
    struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",          # header not UTF-8
    struct.pack("<Q", 2) + b"[]",                         # JSON, but not an object
    struct.pack("<Q", 26) + b'{"a": {"dtype": "F32"}}   ',  # an entry without offsets
], ids=["length", "short", "not-json", "not-utf8", "list", "no-offsets"])
def test_garbage_header_is_corrupt(tmp_path, tiny_llama, content):
    shutil.copy2(tiny_llama / "config.json", tmp_path / "config.json")
    (tmp_path / SINGLE_FILE).write_bytes(content)
    with pytest.raises(UsageError) as excinfo:
        Checkpoint(tmp_path)
    one_line_usage_error(excinfo, "corrupt", SINGLE_FILE)


def test_no_config(llama_copy):
    (llama_copy / "config.json").unlink()
    with pytest.raises(UsageError) as excinfo:
        Checkpoint(llama_copy)
    one_line_usage_error(excinfo, "config.json")


def test_config_not_json(llama_copy):
    (llama_copy / "config.json").write_text("{ not json")
    with pytest.raises(UsageError) as excinfo:
        Checkpoint(llama_copy)
    one_line_usage_error(excinfo, "config.json", "not valid JSON")


def test_only_pickled_weights(tiny_llama, tmp_path):
    shutil.copy2(tiny_llama / "config.json", tmp_path / "config.json")
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UsageError) as excinfo:
        Checkpoint(tmp_path)
    one_line_usage_error(excinfo, "safetensors")


def test_no_weights_at_all(tiny_llama, tmp_path):
    shutil.copy2(tiny_llama / "config.json", tmp_path / "config.json")
    with pytest.raises(UsageError) as excinfo:
        Checkpoint(tmp_path)
    one_line_usage_error(excinfo, "no safetensors")


def test_missing_shard_named_in_index(llama_copy):
    index = json.loads((llama_copy / INDEX_FILE).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (llama_copy / victim).unlink()
    with pytest.raises(UsageError) as excinfo:
        Checkpoint(llama_copy)
    one_line_usage_error(excinfo, "missing", victim)


@pytest.mark.parametrize("text", ["{ not json", '{"metadata": {}}', "[1, 2]", '{"weight_map": [1]}'])
def test_corrupt_index(llama_copy, text):
    (llama_copy / INDEX_FILE).write_text(text)
    with pytest.raises(UsageError) as excinfo:
        Checkpoint(llama_copy)
    one_line_usage_error(excinfo, "index")


# ----------------------------------------------------------------------------------------------- facts


def test_side_files(llama_copy):
    for name in ("README.md", "lowrank.json", "modeling_lowrank.py", ".hidden", "pytorch_model.bin",
                 "tf_model.h5", "special_tokens_map.json"):
        (llama_copy / name).write_text("x")
    (llama_copy / "subfolder").mkdir()
    side = [p.name for p in Checkpoint(llama_copy).side_files()]
    assert side == sorted(["README.md", "generation_config.json", "special_tokens_map.json",
                           "tokenizer.json", "tokenizer_config.json"])


def test_fingerprint_tracks_header_changes(llama_copy):
    from safetensors import safe_open
    from safetensors.torch import save_file

    first = Checkpoint(llama_copy).fingerprint()
    assert Checkpoint(llama_copy).fingerprint() == first  # stable across opens
    ckpt = Checkpoint(llama_copy)
    name = "model.layers.0.mlp.up_proj.weight"
    info = ckpt.tensors[name]
    shard = llama_copy / info.file
    with safe_open(str(shard), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}
        metadata = fh.metadata()
    size_before = shard.stat().st_size
    tensors[name] = tensors[name].reshape(tuple(reversed(info.shape)))  # same bytes, another shape
    ckpt.close()
    save_file(tensors, str(shard), metadata=metadata)
    assert shard.stat().st_size == size_before  # only the header's shape differs
    changed = Checkpoint(llama_copy)
    assert changed.tensors[name].shape == tuple(reversed(info.shape))
    assert changed.fingerprint() != first


# ------------------------------------------------------------------------------------------ OutputDir


def test_output_dir_commit_renames_into_place(tmp_path):
    target = tmp_path / "out"
    out = OutputDir(target)
    with out as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a.txt").write_text("new")
        assert not target.exists()  # nothing visible until commit
        assert out.commit() == target
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_dir_exception_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), OutputDir(target) as tmp:
        (tmp / "partial.safetensors").write_bytes(b"x" * 100)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_output_dir_without_commit_leaves_nothing(tmp_path):
    with OutputDir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_output_dir_refuses_non_empty_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(UsageError) as excinfo:
        OutputDir(target)
    one_line_usage_error(excinfo, "not empty", "--overwrite")
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_dir_accepts_empty_existing_target(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    out = OutputDir(target)
    with out as tmp:
        (tmp / "a.txt").write_text("x")
        out.commit()
    assert [p.name for p in target.iterdir()] == ["a.txt"]


def test_overwrite_replaces_only_after_commit(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")

    # a failed run with --overwrite keeps the old output
    with pytest.raises(RuntimeError), OutputDir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("fail")
    assert [p.name for p in target.iterdir()] == ["old.txt"]

    out = OutputDir(target, overwrite=True)
    with out as tmp:
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").read_text() == "old"  # still there while the new one is written
        out.commit()
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old-/.tmp- leftovers


def test_output_overlapping_the_input_is_refused(tmp_path):
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    for target in (model / "out", model, model / "sub" / "deeper"):
        with pytest.raises(UsageError) as excinfo:
            OutputDir(target, inputs=[model])
        one_line_usage_error(excinfo, "overlaps")
    with pytest.raises(UsageError):  # an input inside the output, too
        check_output_target(tmp_path, overwrite=True, inputs=[model])
    assert check_output_target(tmp_path / "elsewhere", overwrite=False, inputs=[model]) == \
        (tmp_path / "elsewhere").resolve()


def test_output_target_file_or_parent_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError) as excinfo:
        check_output_target(tmp_path / "file", overwrite=True)
    one_line_usage_error(excinfo, "is a file")
    with pytest.raises(UsageError) as excinfo:  # the parent cannot be created: a file is in the way
        check_output_target(tmp_path / "file" / "out", overwrite=False)
    one_line_usage_error(excinfo, "parent")


# ---------------------------------------------------------------------------------------- resolve_model


def test_resolve_local_folder(tiny_llama):
    assert resolve_model(str(tiny_llama)) == tiny_llama.resolve()


@pytest.mark.parametrize("spec", ["{tmp}/missing", "./definitely-missing-model-xyz", "a/b/c"])
def test_resolve_missing_path(tmp_path, spec):
    with pytest.raises(UsageError) as excinfo:
        resolve_model(spec.format(tmp=tmp_path))
    one_line_usage_error(excinfo, "does not exist")


def test_resolve_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UsageError) as excinfo:
        resolve_model(str(tmp_path / "model.safetensors"))
    one_line_usage_error(excinfo, "is a file")


def test_resolve_folder_without_config(tmp_path):
    with pytest.raises(UsageError) as excinfo:
        resolve_model(str(tmp_path))
    one_line_usage_error(excinfo, "config.json")


def test_resolve_demo(tmp_path, monkeypatch):
    # the demo model ships inside the package: it must be there
    assert (demo_path() / "config.json").is_file() and (demo_path() / "model.safetensors").is_file()
    assert resolve_model("demo") == demo_path()
    # a build without it answers with one line naming the demo
    import lowrank_cli.io.resolve as resolve

    monkeypatch.setattr(resolve, "demo_path", lambda: tmp_path / "missing")
    with pytest.raises(UsageError) as excinfo:
        resolve.resolve_model("demo")
    one_line_usage_error(excinfo, "demo")


def test_resolve_unknown_hub_id_offline_is_fast(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(UsageError) as excinfo:
        resolve_model("nobody-xyz/not-a-model")
    one_line_usage_error(excinfo, "nobody-xyz/not-a-model")
    assert time.perf_counter() - start < 10


# -------------------------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize("text, size", [
    ("500MB", 500_000_000), ("2GB", 2 * 10**9), ("1.5GB", 1_500_000_000), ("1GiB", 2**30),
    ("64KiB", 65_536), ("3MiB", 3 * 2**20), ("40KB", 40_000), (" 10 mb ", 10_000_000), ("100", 100),
    ("7B", 7), (4096, 4096),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["abc", "", "MB", "1.5", "-1GB", "0", "0KB", "infGB", "nanGB", 0, -5])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError) as excinfo:
        parse_size(text)
    one_line_usage_error(excinfo, "not a size")


def test_streaming_writer_bytes_match_safetensors_for_every_dtype(tmp_path):
    """The hand-written shard format (header + appended data) reads back exactly through safetensors."""
    import torch
    from safetensors.torch import load_file

    from lowrank_cli.io.writer import ShardWriter

    tensors = {
        "a.f32": torch.randn(3, 5),
        "b.bf16": torch.randn(7).to(torch.bfloat16),
        "c.f16": torch.randn(2, 2, 2).half(),
        "d.i64": torch.arange(6).view(2, 3),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
        "h.strided": torch.randn(4, 6).t(),  # non-contiguous input
    }
    writer = ShardWriter(tmp_path, max_shard_bytes=64)  # forces several shards
    for name, t in tensors.items():
        writer.add(name, t)
    weight_map = writer.close()
    assert len(set(weight_map.values())) > 1
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("*.tmp"))
    loaded = {}
    for file in set(weight_map.values()):
        loaded.update(load_file(tmp_path / file))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
