"""Training-checkpoint state without pickle: RNG streams and callback states as safetensors + JSON.

A checkpoint folder may come from anywhere (a shared disk, a download), and unpickling runs whatever code
the file names. So the files written here are plain data: tensors in safetensors, everything else in JSON,
and loading never calls `pickle`/`torch.load`. (accelerate's own files in the folder, optimizer.bin and
scheduler.bin, are read by accelerate with `torch.load(weights_only=True)` and its numpy allow-list.)

    save_rng_states(folder / "rng_state_0.safetensors")      load_rng_states(...)
    save_callback_states([cb.state_dict() ...], folder)      load_callback_states(folder) -> list[dict]
"""

from __future__ import annotations

import json
from pathlib import Path

from lowrank_cli.errors import UsageError

__all__ = ["save_rng_states", "load_rng_states", "save_callback_states", "load_callback_states",
           "rng_file", "CALLBACKS_JSON", "CALLBACKS_TENSORS", "PICKLED_STATE_FILES"]

CALLBACKS_JSON = "callbacks.json"
CALLBACKS_TENSORS = "callbacks.safetensors"
# what lowrank wrote before it stopped pickling: never loaded, only recognised to explain a refusal
PICKLED_STATE_FILES = ("callbacks.pt", "rng_state_*.pt")
_TENSOR_KEY = "__tensor__"


def rng_file(folder: Path, process_index: int) -> Path:
    return Path(folder) / f"rng_state_{process_index}.safetensors"


def save_rng_states(path: Path) -> None:
    """Python's, numpy's, torch's (and CUDA's, when in use) RNG states of this process."""
    import random

    import numpy as np
    import torch
    from safetensors.torch import save_file

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    meta = {"python": json.dumps([version, list(internal), gauss]),
            "numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)])}
    save_file(tensors, str(path), metadata=meta)


def load_rng_states(path: Path) -> None:
    import random

    import numpy as np
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        version, internal, gauss = json.loads(meta["python"])
        kind, pos, has_gauss, cached = json.loads(meta["numpy"])
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                             float(cached)))
        torch.set_rng_state(tensors["torch"].to(torch.uint8))
    except Exception as exc:  # any malformed content is the same user-facing fact
        raise UsageError(f"--resume: corrupt RNG state file '{path}' ({type(exc).__name__}: {exc})") from exc
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_callback_states(states: list[dict], folder: Path) -> None:
    """JSON, with any tensors moved into a safetensors file and referenced by key."""
    from safetensors.torch import save_file

    tensors: dict = {}
    doc = _encode(states, tensors)
    (Path(folder) / CALLBACKS_JSON).write_text(json.dumps(doc))
    if tensors:
        save_file(tensors, str(Path(folder) / CALLBACKS_TENSORS))


def load_callback_states(folder: Path) -> list[dict] | None:
    """The saved callback states, or None when the folder has none."""
    file = Path(folder) / CALLBACKS_JSON
    if not file.is_file():
        return None
    tensors = {}
    if (Path(folder) / CALLBACKS_TENSORS).is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(Path(folder) / CALLBACKS_TENSORS))
    try:
        return _decode(json.loads(file.read_text()), tensors)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--resume: corrupt callback state '{file}'") from exc


def _encode(value, tensors: dict):
    import torch

    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {_TENSOR_KEY: key}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"callback state keys must be strings, got {list(value)[:3]}")
        return {k: _encode(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"callback state holds a {type(value).__name__}; use tensors, numbers, strings, lists, dicts")


def _decode(value, tensors: dict):
    if isinstance(value, dict):
        if set(value) == {_TENSOR_KEY}:
            return tensors[value[_TENSOR_KEY]]
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value
