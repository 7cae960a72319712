"""Turn a MODEL argument into a local checkpoint folder: a path, the bundled demo, or a hub id."""

from __future__ import annotations

import os
from pathlib import Path

from lowrank_cli.errors import UsageError

__all__ = ["DEMO", "demo_path", "resolve_model"]

DEMO = "demo"
# Only what a causal LM checkpoint needs; never *.bin/*.pt/*.h5 duplicates of the weights.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken", "tokenizer*"]


def demo_path() -> Path:
    """The bundled demo model (a small GPTBigCode trained on stdlib code, see scripts/DEMO_MODEL.md)."""
    return Path(__file__).resolve().parent.parent / "demo_model"


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec.strip("/") and spec.count("/") != 1


def resolve_model(spec: str) -> Path:
    """A local folder holding config.json for MODEL = path | "demo" | hub id.

    Hub ids go through huggingface_hub and its cache, so a model that was downloaded once resolves offline.
    """
    if spec == DEMO:
        path = demo_path()
        if not (path / "config.json").is_file():
            raise UsageError("the bundled demo model is missing from this installation")
        return path
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"model '{spec}' is a file; expected a checkpoint folder")
        if not (path / "config.json").is_file():
            raise UsageError(f"model folder '{spec}' has no config.json")
        return path.resolve()
    if _looks_like_path(spec) or spec.count("/") > 1:
        raise UsageError(f"model path '{spec}' does not exist")
    return _from_hub(spec)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:  # offline, unknown id, gated repo, bad id syntax: all one answer for the user
        reason = type(exc).__name__
        raise UsageError(
            f"model '{repo_id}' is not a local folder and could not be fetched from the Hugging Face hub "
            f"({reason}; offline or unknown id?)"
        ) from exc
    path = Path(local)
    if not (path / "config.json").is_file():
        raise UsageError(f"hub model '{repo_id}' has no config.json")
    return path
