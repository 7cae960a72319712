"""rich progress bars on stderr (terminal only; the runner decides)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as _RichProgress

from lowrank_cli.utils.progress import Progress

__all__ = ["RichProgress"]


class _Task:
    def __init__(self, bars: _RichProgress, task_id):
        self.bars, self.task_id = bars, task_id

    def advance(self, n: int = 1) -> None:
        self.bars.advance(self.task_id, n)

    def close(self) -> None:
        self.bars.remove_task(self.task_id)


class RichProgress(Progress):
    def __init__(self):
        self.console = Console(stderr=True)
        self.bars = _RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=self.console, transient=True)
        self.started = False

    def task(self, description: str, total: int | None):
        if not self.started:
            self.bars.start()
            self.started = True
        return _Task(self.bars, self.bars.add_task(description, total=total))

    def close(self) -> None:
        if self.started:
            self.bars.stop()
