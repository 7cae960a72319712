"""Progress reporting that the library can call without knowing about terminals.

The library takes a `Progress` and calls `progress.task(description, total)` -> a handle with
`advance(n=1)` and `close()`. The CLI passes a rich-backed implementation on a terminal; everywhere else the
default writes nothing (pipes, --json, tests): structured figures go to the result object instead.
"""

from __future__ import annotations

import logging

__all__ = ["Progress", "NullProgress", "LogProgress"]


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """Interface; also usable as a no-op."""

    def task(self, description: str, total: int | None):
        return _NullTask()


NullProgress = Progress


class _LogTask:
    def __init__(self, log: logging.Logger, description: str, total: int | None):
        self.log, self.description, self.total, self.done = log, description, total, 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.log.debug("%s %d/%s", self.description, self.done, self.total or "?")

    def close(self) -> None:
        pass


class LogProgress(Progress):
    """Sparse DEBUG lines instead of bars (off a terminal with -v)."""

    def __init__(self, log: logging.Logger | None = None):
        self.log = log or logging.getLogger("lowrank")

    def task(self, description: str, total: int | None):
        return _LogTask(self.log, description, total)
