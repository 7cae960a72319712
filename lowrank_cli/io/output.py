"""An output folder that appears atomically, or not at all.

Everything is written into a hidden sibling `.NAME.tmp-PID`; `commit()` renames it into place. A run that
fails or is interrupted removes its temporary folder, so a folder named OUT is always complete. With
`overwrite=True` an existing OUT is replaced only once the new one is complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lowrank_cli.errors import UsageError

__all__ = ["OutputDir", "check_output_target"]


def check_output_target(target: str | Path, *, overwrite: bool, inputs: list[Path] = ()) -> Path:
    """Validate an output path before any work: refuse a non-empty folder (unless overwrite), a file, or a
    folder inside/equal to an input."""
    out = Path(target).expanduser().resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise UsageError(f"output '{target}' overlaps the input '{src}'; choose another folder")
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"output '{target}' exists and is a file")
        if any(out.iterdir()) and not overwrite:
            raise UsageError(f"output folder '{target}' exists and is not empty (use --overwrite)")
    if not out.parent.exists():
        raise UsageError(f"the parent folder of output '{target}' does not exist")
    return out


class OutputDir:
    """Context manager: `with OutputDir(out, overwrite=...) as tmp: ...write into tmp...; commit()`."""

    def __init__(self, target: str | Path, *, overwrite: bool = False, inputs: list[Path] = ()):
        self.target = check_output_target(target, overwrite=overwrite, inputs=inputs)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}"
        self.committed = False

    def __enter__(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> Path:
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)
        self.committed = True
        return self.target

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
