"""The group attributes shared by concurrent writers: a lock on the store folder and a fresh read.

Shards of one build (``vstore build --shard I/N``) are separate processes writing one store; each
owns its part, but all of them advance counters in the same ``zarr.json``. Every change of the
attributes is therefore a read-modify-write of the file as it is on disk, under an exclusive
``flock`` on the store folder (held for the few milliseconds of one write). Stores that are not on a
local file system have no such lock: one writer at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["meta_lock", "read_meta_file"]


@contextlib.contextmanager
def meta_lock(path: Path | None) -> Iterator[None]:
    """An exclusive advisory lock on the store folder ``path`` (nothing for a remote store: None)."""
    if path is None or not path.is_dir():
        yield
        return
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def read_meta_file(path: Path | None, name: str) -> dict[str, Any] | None:
    """The ``name`` attributes of the group at ``path`` as they are on disk now (None: unreadable)."""
    if path is None:
        return None
    try:
        attrs = json.loads((path / "zarr.json").read_text(encoding="utf-8")).get("attributes", {})
    except (OSError, ValueError):
        return None
    got = attrs.get(name)
    return dict(got) if isinstance(got, dict) else None
