"""The end of every output folder, in one order: the tensors the pipeline did not touch, config, the
input's side files (tokenizer, generation config), verification, manifest. Then `OutputDir.commit()`
renames the folder into place: the manifest is written last, so its presence marks a complete folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from lowrank_cli.io.manifest import write_manifest
from lowrank_cli.io.verify import verify_checkpoint

__all__ = ["copy_outer_tensors", "write_config", "complete_folder", "finish_folder", "weight_file_bytes"]


def copy_outer_tensors(ckpt, blocks_name: str, sink: Callable) -> None:
    """Embeddings, final norm, LM head: every tensor outside the decoder blocks, as the input has it."""
    for name in ckpt.names():
        if not name.startswith(blocks_name + "."):
            sink(name, ckpt.get(name))


def weight_file_bytes(folder: Path) -> int:
    """Bytes of the weight files on disk (shards and their index): what a checkpoint costs to store."""
    return sum(p.stat().st_size for p in Path(folder).iterdir()
               if p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json"))


def write_config(folder: Path, config: dict) -> None:
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def complete_folder(folder: Path, ckpt, config: dict) -> None:
    """config.json and the input's side files, then verification against the config."""
    folder = Path(folder)
    write_config(folder, config)
    for side in ckpt.side_files():
        shutil.copy2(side, folder / side.name)
    verify_checkpoint(folder)


def finish_folder(folder: Path, ckpt, config: dict, *, command: str, options: dict, input_info: dict,
                  metrics: dict, extra: dict | None = None) -> None:
    """`complete_folder`, then the manifest (last)."""
    complete_folder(folder, ckpt, config)
    write_manifest(folder, command=command, options=options, input_info=input_info, metrics=metrics,
                   extra=extra)
