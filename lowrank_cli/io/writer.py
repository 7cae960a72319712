"""Write safetensors shards incrementally, as tensors become ready, and the shard index at the end.

Memory is bounded by `max_shard_bytes` of pending tensors: a shard is flushed to disk as soon as it is full,
so a crash late in a long run still leaves the finished shards behind in the temporary folder, and the whole
model never sits in memory at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lowrank_cli.errors import UsageError
from lowrank_cli.io.checkpoint import INDEX_FILE, SINGLE_FILE

__all__ = ["ShardWriter", "parse_size", "DEFAULT_SHARD_SIZE"]

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
    """Collect named tensors and write them as `model-XXXXX-of-YYYYY.safetensors` shards + index."""

    def __init__(self, folder: str | Path, max_shard_bytes: int = parse_size(DEFAULT_SHARD_SIZE),
                 metadata: dict | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, object] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0
        self.total_params = 0

    def add(self, name: str, tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise ValueError(f"tensor '{name}' written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        # contiguous + detached copy: a view into a larger buffer would drag that buffer into the file
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes
        self.total_params += tensor.numel()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        tmp_name = f"shard-{len(self._written):05d}.tmp"
        save_file(self._pending, str(self.folder / tmp_name), metadata=self.metadata)
        self._written.append((tmp_name, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

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
