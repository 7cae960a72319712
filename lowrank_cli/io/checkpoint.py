"""Read an HF checkpoint folder lazily: config.json, the shard index and safetensors headers.

Nothing here loads a weight until `get()` asks for that one tensor (through `safe_open`, which mmaps the
file), so opening a 30 GB checkpoint costs a few header reads. Every shard header is checked against the
file size on open, which catches truncated downloads before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path

from lowrank_cli.errors import UsageError

__all__ = ["Checkpoint", "TensorInfo", "read_header", "WEIGHT_SUFFIXES", "INDEX_FILE", "SINGLE_FILE"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")
_FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "file", "nbytes")

    def __init__(self, name: str, dtype: str, shape: list[int], file: str, nbytes: int):
        self.name, self.dtype, self.shape, self.file, self.nbytes = name, dtype, tuple(shape), file, nbytes

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def float_dtype(self):
        """The torch dtype of a floating-point tensor (to write a result back in its checkpoint's precision);
        None for integer and other dtypes."""
        import torch

        name = _FLOAT_DTYPES.get(self.dtype)
        return getattr(torch, name) if name else None


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, validated against the file's size."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than 8 bytes")
            (length,) = struct.unpack("<Q", raw)
            if length > size - 8 or length > 100_000_000:
                raise ValueError("header length past the end of the file")
            header = json.loads(fh.read(length))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"corrupt safetensors file '{path}': {exc}") from exc
    if not isinstance(header, dict) or not all(
            _entry_ok(v) for k, v in header.items() if k != "__metadata__"):
        raise UsageError(f"corrupt safetensors file '{path}': the header is not a table of tensors")
    for name, meta in header.items():
        if name != "__metadata__":
            _check_span(path, name, meta)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise UsageError(
            f"truncated safetensors file '{path}': {size} bytes, its header needs {8 + length + end}"
        )
    return header


def _check_span(path: Path, name: str, meta: dict) -> None:
    """A tensor's shape and dtype must fill its byte span exactly (safetensors itself fails later, on first
    read, without naming the file)."""
    width = _DTYPE_BYTES.get(meta["dtype"])
    if width is None:  # a dtype this table does not know (sub-byte floats, ...): safetensors checks it
        return
    numel = 1
    for dim in meta["shape"]:
        numel *= dim
    start, end = meta["data_offsets"]
    if numel * width != end - start:
        raise UsageError(f"corrupt safetensors file '{path}': tensor '{name}' is {meta['dtype']} "
                         f"{meta['shape']} ({numel * width} bytes) but its byte span holds {end - start}")


def _entry_ok(meta) -> bool:
    """A header entry as safetensors writes it: dtype, shape and [start, end] byte offsets."""
    if not isinstance(meta, dict):
        return False
    offsets, shape = meta.get("data_offsets"), meta.get("shape")
    return (isinstance(meta.get("dtype"), str) and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1])


class Checkpoint:
    """A checkpoint folder opened for lazy, tensor-by-tensor reading."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise UsageError(f"model folder '{self.path}' has no config.json")
        try:
            self.config: dict = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"'{cfg_file}' is not valid JSON ({exc.msg})") from exc
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        self._headers: dict[str, bytes] = {}
        for file in self.files:
            header = read_header(self.path / file)
            self._headers[file] = json.dumps(header, sort_keys=True).encode()
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                start, end = meta["data_offsets"]
                self.tensors[name] = TensorInfo(name, meta["dtype"], meta["shape"], file, end - start)
        self._handles: dict[str, object] = {}

    def _weight_files(self) -> list[str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise UsageError(f"corrupt shard index '{index}'") from exc
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise UsageError(f"'{self.path}' is missing shard file(s): {', '.join(missing[:3])}")
            return files
        if (self.path / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        others = sorted(p.name for p in self.path.glob("*.safetensors"))
        if others:
            return others
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise UsageError(f"'{self.path}' holds only pickled (.bin/.pt) weights; lowrank reads "
                             "safetensors (re-save the model with save_pretrained)")
        raise UsageError(f"'{self.path}' holds no safetensors weights")

    # -- reading ------------------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.tensors if n.startswith(prefix)]

    def get(self, name: str, dtype=None, device=None):
        """One tensor, read on demand (a copy: the mmap'd file is never written through)."""
        from safetensors import safe_open

        info = self.tensors.get(name)
        if info is None:
            raise KeyError(name)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = safe_open(str(self.path / info.file), framework="pt")
            self._handles[info.file] = handle
        tensor = handle.get_tensor(name)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if device is not None:
            tensor = tensor.to(device)
        return tensor

    def close(self) -> None:
        self._handles.clear()

    # -- facts --------------------------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "?")

    @property
    def quantization(self) -> dict | None:
        return self.config.get("quantization_config")

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model has positions for (config.json), or None if it does not say."""
        for key in ("max_position_embeddings", "n_positions", "seq_length"):
            value = self.config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    def num_params(self, names: Iterable[str] | None = None) -> int:
        names = self.tensors if names is None else names
        return sum(self.tensors[n].numel for n in names)

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def fingerprint(self) -> str:
        """An identity of the weights for `--resume` and recipe step skipping: a hash of every shard header
        (names, dtypes, shapes, offsets), the config, and weight bytes: every tensor of up to
        `_FULL_TENSOR_BYTES` whole, and `_SAMPLES` evenly spaced windows of `_WINDOW` bytes of each larger one.
        Two fine-tunes of one architecture differ in nearly every weight, so they differ here; an edit of a
        few scattered weights of a large tensor may not show. Cost: at most 64 KiB read per tensor, whatever
        its size (a 300-tensor 7B model: about 20 MB in some 5,000 small reads)."""
        digest = hashlib.sha256()
        for file in self.files:
            digest.update(file.encode())
            digest.update(self._headers[file])
            digest.update(str((self.path / file).stat().st_size).encode())
            _hash_weight_samples(digest, self.path / file)
        digest.update(json.dumps(self.config, sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def side_files(self) -> list[Path]:
        """Files to carry into an output folder unchanged: tokenizer, generation config, README, ...

        Weights, the shard index, config.json (rewritten by the writer), our manifest and our modeling file
        (rewritten when the output needs it) are excluded."""
        skip = {INDEX_FILE, "config.json", "lowrank.json", "modeling_lowrank.py"}
        return sorted(
            p for p in self.path.iterdir()
            if p.is_file() and p.name not in skip and not p.name.endswith(WEIGHT_SUFFIXES)
            and not p.name.startswith(".")
        )


_WINDOW = 4096
_SAMPLES = 16
_FULL_TENSOR_BYTES = _WINDOW * _SAMPLES


def _hash_weight_samples(digest, path: Path) -> None:
    """Feed `digest` with the bytes of every tensor of a safetensors file, sampled past 64 KiB a tensor."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        base = 8 + length
        spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
        for start, end in spans:
            size = end - start
            if size <= _FULL_TENSOR_BYTES:
                fh.seek(base + start)
                digest.update(fh.read(size))
                continue
            step = (size - _WINDOW) // (_SAMPLES - 1)
            for i in range(_SAMPLES):
                fh.seek(base + start + i * step)
                digest.update(fh.read(_WINDOW))
