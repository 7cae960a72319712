"""Write safetensors shards incrementally, as tensors become ready, and the shard index at the end.

Memory is bounded by `max_shard_bytes` of pending tensors: a shard is flushed to disk as soon as it is full,
so a crash late in a long run still leaves the finished shards behind in the temporary folder, and the whole
model never sits in memory at once.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

from lowrank_cli.errors import UsageError
from lowrank_cli.io.checkpoint import INDEX_FILE, SINGLE_FILE

__all__ = ["ShardWriter", "parse_size", "DEFAULT_SHARD_SIZE"]

_ST_DTYPE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
             "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def torch_uint8():
    import torch

    return torch.uint8

DEFAULT_SHARD_SIZE = "2GB"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """'500MB' -> 500_000_000 (decimal units as in transformers; KiB/MiB/GiB binary). A size that is not
    a positive number of bytes is a UsageError (it comes from --max-shard-size)."""
    size = None
    if isinstance(text, int):
        size = text
    else:
        s = str(text).strip().upper()
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if s.endswith(u)), None)
        try:
            size = int(float(s[: -len(unit)].strip()) * _UNITS[unit]) if unit else int(s)
        except (ValueError, OverflowError):  # "abc", "nanGB", "infGB"
            size = None
    if size is None or size <= 0:
        raise UsageError(f"not a size: '{text}' (use e.g. 500MB, 2GB)")
    return size


class ShardWriter:
    """Write named tensors as `model-XXXXX-of-YYYYY.safetensors` shards + index, one tensor in memory.

    A safetensors file starts with a header listing every tensor's offsets, so it cannot be written before
    its last tensor is known. Holding a whole shard in memory would make peak memory grow with the shard
    size (the whole model, for models under `max_shard_bytes`). Instead each tensor's bytes are appended to
    the shard's data file as it arrives; when the shard is full the header is written and the data copied
    behind it in chunks. Memory: one tensor plus a copy buffer. Disk: the shard written twice.
    """

    def __init__(self, folder: str | Path, max_shard_bytes: int = parse_size(DEFAULT_SHARD_SIZE),
                 metadata: dict | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
        self._entries: dict[str, dict] = {}  # the open shard's header entries
        self._data = None  # the open shard's data file
        self._data_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self._seen: set[str] = set()
        self.total_bytes = 0
        self.total_params = 0

    def add(self, name: str, tensor) -> None:
        if name in self._seen:
            raise ValueError(f"tensor '{name}' written twice")
        dtype = _ST_DTYPE.get(str(tensor.dtype).removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"cannot store dtype {tensor.dtype} of '{name}' in safetensors")
        nbytes = tensor.numel() * tensor.element_size()
        if self._entries and self._data_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        if self._data is None:
            self._data = open(self.folder / f"shard-{len(self._written):05d}.data", "wb")  # noqa: SIM115
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if nbytes:
            self._data.write(memoryview(flat.view(torch_uint8()).numpy()))
        self._entries[name] = {"dtype": dtype, "shape": list(tensor.shape),
                               "data_offsets": [self._data_bytes, self._data_bytes + nbytes]}
        self._data_bytes += nbytes
        self._seen.add(name)
        self.total_bytes += nbytes
        self.total_params += tensor.numel()

    def flush(self) -> None:
        """Close the open shard: header, then its data copied behind it."""
        if self._data is None:
            return
        self._data.close()
        index = len(self._written)
        data_path = self.folder / f"shard-{index:05d}.data"
        tmp_name = f"shard-{index:05d}.tmp"
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned
        with open(self.folder / tmp_name, "wb") as out, open(data_path, "rb") as src:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(src, out, 16 * 2**20)
        data_path.unlink()
        self._written.append((tmp_name, list(self._entries)))
        self._entries, self._data, self._data_bytes = {}, None, 0

    def close(self) -> dict[str, str]:
        """Flush, give shards their final names, write the index (several shards only); the weight map."""
        self.flush()
        count = len(self._written)
        weight_map: dict[str, str] = {}
        for i, (tmp_name, names) in enumerate(self._written):
            final = SINGLE_FILE if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / tmp_name, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes, "total_parameters": self.total_params},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map
