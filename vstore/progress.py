"""Progress reporting: the library calls a :class:`Progress`; the command line draws it.

Library functions take ``progress: Progress | None``. They open one task per long piece of work
(:meth:`Progress.task`) and advance it; they never draw anything themselves, so a notebook, a
server or a test can plug in its own reporter. The command line passes a rich progress bar
(``vstore.cli.progress``). Notes and warnings for the user go to a :data:`Note` callback (by default
one line on standard error).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Protocol

__all__ = ["NULL_TASK", "Note", "Progress", "Task", "note_to_stderr", "task"]

#: A callback that receives one-line notes and warnings for the user.
Note = Callable[[str], None]


def note_to_stderr(message: str) -> None:
    """The default :data:`Note`: the message as one line on standard error."""
    print(message, file=sys.stderr, flush=True)


class Task(Protocol):
    """One running piece of work."""

    def advance(self, n: float = 1) -> None:
        """``n`` more units are done."""

    def describe(self, text: str) -> None:
        """What is happening now (a sub-step, a rate, bytes written); shown beside the bar."""


class Progress(Protocol):
    """A reporter that can show several tasks, one after another."""

    def task(self, label: str, total: float, *, unit: str = "items", done: float = 0) -> Task:
        """Start a task of ``total`` units (``bytes``, ``items``, ``examples``) of which ``done`` are done."""

    def finish(self, task: Task) -> None:
        """The task ended (successfully or not)."""


class _NullTask:
    def advance(self, n: float = 1) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


#: A task that reports nothing (what a library function uses without a reporter).
NULL_TASK: Task = _NullTask()


@contextlib.contextmanager
def task(progress: Progress | None, label: str, total: float, *, unit: str = "items",
         done: float = 0) -> Iterator[Task]:
    """A task of ``progress`` for the duration of the block (:data:`NULL_TASK` without a reporter)."""
    if not progress:  # None (or False, as older callers pass)
        yield NULL_TASK
        return
    t = progress.task(label, total, unit=unit, done=done)
    try:
        yield t
    finally:
        progress.finish(t)
