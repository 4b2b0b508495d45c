"""Shared pieces of the command line: consoles and small argument helpers."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
console_err = Console(stderr=True)

#: Library parameters whose flag is not ``--`` + the name with ``-`` for ``_``.
FLAGS = {"by_abs": "--abs", "use_cache": "--no-cache", "verify": "--no-verify", "progress": "--no-progress"}


def say(message: str) -> None:
    """A note or warning for the user, on standard error (the CLI's ``on_note``)."""
    console_err.print(message, highlight=False)


def add_common_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device`` and ``--trust-remote-code`` (shared by build, ablate and study)."""
    from ..models import ALIASES, DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"alias ({', '.join(ALIASES)}), .gguf, folder or hub id")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N")
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
