"""Rich progress bars for the command line: the :class:`vstore.progress.Progress` the CLI passes in.

This is the only place that reads ``VSTORE_NO_PROGRESS`` and the only place that draws a bar.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..progress import Progress as ProgressProtocol
from ..progress import Task

__all__ = ["RichProgress", "make_progress"]


class _RichTask:
    def __init__(self, bar: Progress, task_id: Any) -> None:
        self.bar, self.id = bar, task_id

    def advance(self, n: float = 1) -> None:
        self.bar.advance(self.id, n)

    def describe(self, text: str) -> None:
        self.bar.update(self.id, note=text)


class RichProgress:
    """One rich bar per task, on standard error; byte tasks show speed, item tasks time remaining."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._bars: dict[int, Progress] = {}

    def task(self, label: str, total: float, *, unit: str = "items", done: float = 0) -> Task:
        columns: list[ProgressColumn] = [TextColumn(f"[bold]{label}"), BarColumn()]
        if unit == "bytes":
            columns += [DownloadColumn(), TransferSpeedColumn()]
        else:
            columns += [MofNCompleteColumn(), TextColumn(unit), TimeRemainingColumn()]
        columns.append(TextColumn("{task.fields[note]}"))
        bar = Progress(*columns, console=self.console, transient=unit == "bytes")
        t = _RichTask(bar, bar.add_task(label, total=float(total), completed=int(done), note=""))
        self._bars[id(t)] = bar
        bar.start()
        return t

    def finish(self, task: Task) -> None:
        bar = self._bars.pop(id(task), None)
        if bar is not None:
            bar.stop()


def make_progress(enabled: bool = True) -> ProgressProtocol | None:
    """A :class:`RichProgress`, or None when ``enabled`` is false or ``VSTORE_NO_PROGRESS=1``."""
    if not enabled or os.environ.get("VSTORE_NO_PROGRESS") == "1":
        return None
    return RichProgress()
