"""`lowrank.json`: what produced an output folder (command, options, versions, input, metrics).

Written last, into the temporary folder just before it is renamed into place, so its presence marks a
complete output.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

__all__ = ["MANIFEST", "SCHEMA", "versions", "write_manifest", "read_manifest"]

MANIFEST = "lowrank.json"
SCHEMA = "lowrank.manifest/v1"
_PACKAGES = ("lowrank-cli", "torch", "transformers", "safetensors", "accelerate", "huggingface_hub",
             "tokenizers", "peft", "optimum", "gptqmodel", "bitsandbytes")


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_manifest(folder: Path, *, command: str, options: dict, input_info: dict, metrics: dict,
                   extra: dict | None = None) -> Path:
    doc = {
        "schema": SCHEMA,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "options": options,
        "input": input_info,
        "metrics": metrics,
        "versions": versions(),
        **(extra or {}),
    }
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
