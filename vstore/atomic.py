"""Atomic writes: the one way vstore writes a file or folder that someone else may read.

:func:`atomic_path` yields a temporary path beside the target; when the block succeeds the temporary
is renamed onto the target (one ``rename``: readers see the old content or the new, never half of
it); when it fails the temporary is removed. Every writer of the package goes through it: chunk
files, cached statistics, neuron sets, results, imported stories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ._faults import fault_point
from .errors import OutputError

__all__ = ["PARTIAL_SUFFIX", "atomic_path", "write_atomic", "write_json_atomic"]

#: Suffix of every temporary a writer leaves behind when it is killed before its rename.
PARTIAL_SUFFIX = ".partial"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _kind(path: Path) -> str:
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


@contextlib.contextmanager
def atomic_path(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces ``path`` when the block ends without error.

    Parameters
    ----------
    path
        The target file (or folder, with ``directory``). Its parent is created if missing.
    directory
        The block writes a folder: an existing target folder is removed just before the rename
        (folders cannot be renamed over one another).

    Yields
    ------
    Path
        ``.<name>.<pid>.<random>.partial`` in the target's folder; nothing exists there yet.

    Raises
    ------
    OutputError
        The target exists and is not what is written there (a folder, device, FIFO, socket or
        symbolic link where a file goes, or a file where a folder goes): it is never replaced.
    """
    target = Path(path)
    if target.exists() or target.is_symlink():
        kind = _kind(target)
        if kind != ("a folder" if directory else "a file"):
            raise OutputError(f"{target} is {kind}; vstore writes only {'folders' if directory else 'regular files'} "
                              "there (choose another path)")
    if target.parent.exists() and not target.parent.is_dir():
        raise OutputError(f"{target.parent} is not a folder; cannot write {target.name} in it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    try:
        yield tmp
        fault_point("before-rename")
        if directory and target.exists():
            _remove(target)
        os.replace(tmp, target)
        fault_point("after-rename")
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_json_atomic(path: str | Path, obj: Any, *, allow_nan: bool = False) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    text = json.dumps(obj, ensure_ascii=False, indent=1, allow_nan=allow_nan)
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))
