"""Shared pieces of the command line: consoles and small argument helpers."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.table import Table

#: The width a console that is not a terminal lays out at: wide enough that no table is cut to "…".
LOG_WIDTH = 4000


class LogConsole(Console):
    """A rich console that lays tables out at their full width when it is not writing to a terminal.

    Piped, under ``nohup`` or in CI, a log has no width: rich's default of 80 columns (or the width of
    whatever terminal the other streams are on) would squeeze tables into "…" cells. A terminal keeps its
    own width, and an explicit ``COLUMNS`` wins in both cases.
    """

    @property
    def size(self) -> ConsoleDimensions:
        if self._width is None and not self.is_terminal and not (self._environ.get("COLUMNS") or "").isdigit():
            return ConsoleDimensions(LOG_WIDTH, super().size.height)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


console = LogConsole()
console_err = LogConsole(stderr=True)

#: Library parameters whose flag is not ``--`` + the name with ``-`` for ``_``.
FLAGS = {"by_abs": "--abs", "use_cache": "--no-cache", "verify": "--no-verify", "progress": "--no-progress"}


def say(message: str) -> None:
    """A note or warning for the user, on standard error (the CLI's ``on_note``)."""
    console_err.print(message, highlight=False)


def add_common_model_args(p: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """``--model``, ``--device`` and ``--trust-remote-code`` (shared by build, ablate and study).

    With ``defaults=False`` both default to ``None`` (the study's config supplies them).
    """
    from ..models import ALIASES, DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL if defaults else None,
                   help=f"alias ({', '.join(ALIASES)}), .gguf, folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu" if defaults else None, help="torch device: cpu (default), cuda, cuda:N")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")


def delta_matrix(title: str, groups: list[str], columns: list[str], matrix: list[list[Any]], fmt: str) -> Table:
    """A table of changes: one row per ablated group, one column per measured value or language."""
    t = Table(title=title)
    t.add_column("group")
    for c in columns:
        t.add_column(c, justify="right")
    for g, row in zip(groups, matrix, strict=True):
        t.add_row(g, *("-" if x is None else format(x, fmt) for x in row))
    return t


def bytes_on_disk(path: str | Path) -> int:
    """The bytes of every file under ``path`` (their sizes, as ``du --apparent-size -b`` adds them)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def table_console() -> Console:
    """The console tables print to: standard output, at full width when it is not a terminal (a pipe,
    a log, CI), so that no column collapses to an ellipsis."""
    return console if console.is_terminal else Console(width=4000)
