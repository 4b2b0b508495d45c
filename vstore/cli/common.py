"""Shared pieces of the command line: consoles and small argument helpers."""

from __future__ import annotations

import argparse

from rich.console import Console

console = Console()
console_err = Console(stderr=True)


def add_common_model_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--trust-remote-code`` (shared by build and ablate)."""
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"
