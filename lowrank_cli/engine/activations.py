"""Hidden states between decoder blocks, one tensor per batch, in memory or offloaded to disk.

For long calibration sets on big models the activations can outgrow host memory (StarCoder: 6144 floats a
token); with `offload_dir` each batch lives in its own file and only the batch being processed is loaded.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

__all__ = ["Activations"]


class Activations:
    """A list of [batch, seq, hidden] tensors; `offload_dir` keeps them on disk between uses."""

    def __init__(self, offload_dir: str | Path | None = None):
        self._items: list = []
        self.calls: list = []  # per block, per batch: the (args, kwargs) the block is called with
        self._dir: Path | None = None
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="acts-", dir=offload_dir))

    def new_like(self) -> Activations:
        """An empty store of the same kind, sharing the recorded block call arguments."""
        other = Activations(self._dir.parent if self._dir is not None else None)
        other.calls = self.calls
        return other

    def append(self, tensor) -> None:
        import torch

        tensor = tensor.detach()
        if self._dir is None:
            self._items.append(tensor)
        else:
            path = self._dir / f"{len(self._items):06d}.pt"
            torch.save(tensor.to("cpu"), path)
            self._items.append((path, tensor.device))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int):
        import torch

        item = self._items[i]
        if self._dir is None:
            return item
        path, device = item
        return torch.load(path, map_location=device, weights_only=True)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def nbytes(self) -> int:
        if self._dir is None:
            return sum(t.numel() * t.element_size() for t in self._items)
        return sum(p.stat().st_size for p, _ in self._items)

    def release(self) -> None:
        self._items = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
