"""Shared pieces of the command line: consoles and small argument helpers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console()
console_err = Console(stderr=True)


def add_common_model_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--trust-remote-code`` (shared by build and ablate)."""
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:N")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    import os
    import tempfile

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
    os.replace(tmp, p)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"
