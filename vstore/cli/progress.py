"""Progress for the command line: the :class:`vstore.progress.Progress` the CLI passes in.

On a terminal, rich bars (:class:`RichProgress`); anywhere else (piped, ``nohup``, CI), one plain line
per task every ``VSTORE_PROGRESS_EVERY`` seconds (default 30; :class:`PlainProgress`), so a log shows
that a long stage is alive and how far it is. This is the only place that reads
``VSTORE_NO_PROGRESS`` and the only place that draws a bar.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

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

__all__ = ["PlainProgress", "RichProgress", "make_progress"]

#: Seconds between two plain progress lines of one task (``VSTORE_PROGRESS_EVERY`` overrides).
PLAIN_EVERY = 30.0


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


def duration(seconds: float) -> str:
    """'41 s', '2 min', '1.5 h': a duration as a log line shows it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _amount(n: float, unit: str) -> str:
    if unit == "bytes":
        from .common import human_bytes

        return human_bytes(n)
    return f"{n:,.0f}"


class _PlainTask:
    def __init__(self, owner: PlainProgress, label: str, total: float, unit: str, done: float) -> None:
        self.owner, self.label, self.total, self.unit = owner, label, float(total), unit
        self.done = self.start_done = float(done)
        self.t0 = self.last = owner.clock()
        self.note = ""

    def line(self, now: float) -> str:
        el = now - self.t0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total > 0 else ""
        if self.unit == "bytes":
            amount = f"{_amount(self.done, 'bytes')}/{_amount(self.total, 'bytes')}"
        else:
            amount = f"{_amount(self.done, self.unit)}/{_amount(self.total, self.unit)} {self.unit}"
        rate = (self.done - self.start_done) / el if el > 0 else 0.0
        eta = f", ETA {duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        note = f"; {self.note}" if self.note else ""
        return f"{self.label}: {amount}{pct}, {duration(el)}{eta}{note}"

    def advance(self, n: float = 1) -> None:
        with self.owner.lock:
            self.done += n
            now = self.owner.clock()
            if now - self.last >= self.owner.every:
                self.last = now
                self.owner.write(self.line(now))

    def describe(self, text: str) -> None:
        self.note = text


class PlainProgress:
    """Plain progress lines for a log: one when a task starts, one every ``every`` seconds, one at the end.

    ``<stage>: 1,234/5,678 examples (22%), 41 s, ETA 2 min; <what the stage describes>``
    """

    def __init__(self, stream: TextIO | None = None, every: float = PLAIN_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.every, self.clock = stream, every, clock
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)

    def task(self, label: str, total: float, *, unit: str = "items", done: float = 0) -> Task:
        t = _PlainTask(self, label, total, unit, done)
        self.write(t.line(t.t0))
        return t

    def finish(self, task: Task) -> None:
        if isinstance(task, _PlainTask):
            with self.lock:
                self.write(task.line(self.clock()) + " (end)")


def make_progress(enabled: bool = True) -> ProgressProtocol | None:
    """Rich bars on a terminal, plain lines (:class:`PlainProgress`) when standard error is not one;
    None when ``enabled`` is false or ``VSTORE_NO_PROGRESS=1``."""
    if not enabled or os.environ.get("VSTORE_NO_PROGRESS") == "1":
        return None
    isatty = getattr(sys.stderr, "isatty", None)
    if isatty is None or not isatty():
        try:
            every = float(os.environ.get("VSTORE_PROGRESS_EVERY", PLAIN_EVERY))
        except ValueError:
            every = PLAIN_EVERY
        return PlainProgress(every=max(0.0, every))
    return RichProgress()
