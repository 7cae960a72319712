"""`lowrank.json`: what produced an output folder (command, options, versions, input, metrics).

Written last, into the temporary folder just before it is renamed into place, so its presence marks a
complete output.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import platform
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from importlib import metadata
from pathlib import Path

__all__ = ["MANIFEST", "SCHEMA", "versions", "write_manifest", "read_manifest", "recording_command_line"]

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


# the command line of the job running in this context (see recording_command_line)
_COMMAND_LINE: ContextVar[list[str] | None] = ContextVar("lowrank_command_line", default=None)


@contextlib.contextmanager
def recording_command_line(argv: Sequence[str]) -> Iterator[None]:
    """Outputs written inside this block record `argv` as the command line that produced them: the CLI gives
    sys.argv, a recipe step its equivalent `lowrank COMMAND ...` line. Outside any such block (the library
    called from Python) the manifest's argv is null: never the host program's own command line."""
    token = _COMMAND_LINE.set([str(a) for a in argv])
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def write_manifest(folder: Path, *, command: str, options: dict, input_info: dict, metrics: dict,
                   extra: dict | None = None, argv: Sequence[str] | None = None) -> Path:
    """Write lowrank.json. `argv`: the producing command line; by default the one the caller is recording
    (`recording_command_line`), else null."""
    doc = {
        "schema": SCHEMA,
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv) if argv is not None else _COMMAND_LINE.get(),
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
