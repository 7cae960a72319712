"""An output folder that appears atomically, or not at all, and that only one run writes.

Everything is written into a hidden sibling `.NAME.tmp-PID`; `commit()` renames it into place. A run that
fails or is interrupted (Ctrl-C, SIGTERM) removes its temporary folder, so a folder named OUT is always
complete. With `overwrite=True` an existing OUT is replaced only once the new one is complete.

- Missing parent folders are created (`-o a/b/c`), and the parent is proven writable before any compute:
  `check_output_target` creates the lock file there.
- A lock file `.NAME.lock` (pid and start time of the holder) is taken by `check_output_target`, before any
  compute, and released at commit, on failure, or when the command ends (`release_locks`): a second run
  aimed at the same output stops at once with exit 2. A lock whose holder is dead is taken over.
- Whoever holds the lock removes the `.NAME.tmp-*` / `.NAME.old-*` folders that killed runs (SIGKILL, power
  loss) left behind, and says so.
- `commit()` looks at the target again: if something appeared there while the run computed and overwrite
  is off, nothing there is touched; the new result is renamed to `NAME.new-PID` and a UsageError (exit 2)
  names that folder.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from lowrank_cli.errors import UsageError

__all__ = ["OutputDir", "check_output_target", "release_locks", "normalize_modes"]

log = logging.getLogger("lowrank")

# output target -> (its lock file, the parent folders this run created), for the locks this process holds
_HELD: dict[Path, tuple[Path, list[Path]]] = {}


def check_output_target(target: str | Path, *, overwrite: bool, inputs: list[Path] = ()) -> Path:
    """Validate an output path before any work: refuse a non-empty folder (unless overwrite), a file, a
    folder inside/equal to an input, a parent that cannot be written, or an output another run is writing.
    Creates missing parent folders and takes the output's lock (kept until commit or `release_locks`)."""
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
    created = [p for p in reversed(out.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the parent folder of output '{target}': {exc.strerror or exc}") from exc
    try:
        _lock(out, target, created)
    except UsageError:
        _remove_empty(created)
        raise
    return out


def _remove_empty(folders: list[Path]) -> None:
    """Undo `mkdir -p` for a run that wrote nothing: the folders it created, deepest first, if still empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _holder_alive(info: dict) -> bool:
    """True if the process that wrote this lock still runs (same pid and same start time: pids get reused)."""
    import psutil

    try:
        proc = psutil.Process(int(info["pid"]))
        return abs(proc.create_time() - float(info["started"])) < 1.0
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def _read_lock(lock: Path) -> dict | None:
    """The holder recorded in a lock file; None while its holder is still writing it (a fresh empty file);
    {} for an unreadable old one (treated as dead)."""
    try:
        info = json.loads(lock.read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        try:
            fresh = time.time() - lock.stat().st_mtime < 5
        except OSError:
            fresh = False
        return None if fresh else {}


def _lock(out: Path, shown: str | Path, created: list[Path]) -> None:
    if out in _HELD:
        return
    import psutil

    lock = _lock_path(out)
    me = {"pid": os.getpid(), "started": psutil.Process().create_time()}
    for _attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            info = _read_lock(lock)
            if info is None or _holder_alive(info):
                pid = info["pid"] if info else "?"
                raise UsageError(f"output '{shown}' is being written by another lowrank run (pid {pid}); "
                                 "wait for it to finish or choose another folder") from None
            lock.unlink(missing_ok=True)  # its holder died: take it over
            continue
        except OSError as exc:
            raise UsageError(f"cannot write to the folder of output '{shown}' ({out.parent}): "
                             f"{exc.strerror or exc}") from exc
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        _HELD[out] = (lock, created)
        _remove_stale_temporaries(out)
        return
    raise UsageError(f"could not take the lock '{lock}' of output '{shown}'; remove it if no run is writing")


def _remove_stale_temporaries(out: Path) -> None:
    """Holding the lock, no other run writes OUT: its leftover temporary folders are from killed runs."""
    mine = {f".{out.name}.tmp-{os.getpid()}", f".{out.name}.old-{os.getpid()}"}
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
    for stale in out.parent.iterdir():
        prefix = next((p for p in prefixes if stale.name.startswith(p)), None)
        if prefix is None or stale.name in mine or not stale.is_dir() or not stale.name[len(prefix):].isdigit():
            continue  # not a leftover of this output (or ours)
        shutil.rmtree(stale, ignore_errors=True)
        log.warning("removed '%s', left by an interrupted run (pid %s)", stale, stale.name[len(prefix):])


def _release(out: Path, *, written: bool) -> None:
    held = _HELD.pop(out, None)
    if held is not None:
        lock, created = held
        lock.unlink(missing_ok=True)
        if not written:
            _remove_empty(created)


def release_locks() -> None:
    """Release every output lock this process holds (the CLI calls it when a command ends)."""
    for out in list(_HELD):
        _release(out, written=out.exists())


atexit.register(release_locks)


def normalize_modes(folder: Path) -> None:
    """Give every file under `folder` the mode a plain `open()` would (0666 less the umask): some writers
    (`tempfile.mkstemp`, used by libraries for atomic writes) create files 0600 that other users of a shared
    machine then cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    for path in [folder, *folder.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM back for a few renames, then deliver them to the handlers that were in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in received[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


class OutputDir:
    """Context manager: `with OutputDir(out, overwrite=...) as tmp: ...write into tmp...; commit()`."""

    def __init__(self, target: str | Path, *, overwrite: bool = False, inputs: list[Path] = ()):
        self.shown = target
        self.overwrite = overwrite
        self.target = check_output_target(target, overwrite=overwrite, inputs=inputs)
        self.tmp = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}"
        self.committed = False

    def __enter__(self) -> Path:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> Path:
        normalize_modes(self.tmp)
        target = self.target
        with _signals_deferred():  # never stop between moving the old folder away and the new one in
            return self._commit(target)

    def _commit(self, target: Path) -> Path:
        try:
            if self._occupied() and not self.overwrite:
                self._keep_aside()
            if target.exists():
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
                os.replace(self.tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                try:
                    os.replace(self.tmp, target)
                except OSError:  # a non-empty folder appeared between the check and the rename
                    if not self._occupied():
                        raise
                    self._keep_aside()
        finally:
            _release(target, written=True)
        self.committed = True
        return target

    def _occupied(self) -> bool:
        """Something is at the target that an overwrite-less commit must not replace."""
        return self.target.exists() and (not self.target.is_dir() or any(self.target.iterdir()))

    def _keep_aside(self) -> None:
        kept = self.target.parent / f"{self.target.name}.new-{os.getpid()}"
        os.replace(self.tmp, kept)
        self.committed = True  # the result lives on under its own name
        raise UsageError(f"output '{self.shown}' was created by someone else while this run computed; it was "
                         f"left untouched and the new result is in '{kept}' (use --overwrite to replace)")

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
        _release(self.target, written=self.committed)
