"""The VstoreError family: every error vstore raises on bad input derives from VstoreError.

Subclasses also inherit the matching builtin, so callers can catch either.
"""

from __future__ import annotations

__all__ = [
    "DataError",
    "DiskSpaceError",
    "ModelError",
    "NativeExtensionError",
    "NeuronSetError",
    "OutputError",
    "StoreError",
    "StoreExistsError",
    "StoreNotFoundError",
    "UnsupportedArchitectureError",
    "UsageError",
    "VstoreError",
    "disk_full",
]


class VstoreError(Exception):
    """Base class of all vstore errors."""


class UsageError(VstoreError, ValueError):
    """A bad argument to a library function.

    The message speaks of parameters (``top_k``, ``contrast``), never of command-line flags.
    ``params`` names the parameters the message mentions, so the command line can say
    ``--top-k`` where the library says ``top_k`` (see :meth:`for_cli`).
    """

    def __init__(self, message: str, *params: str) -> None:
        super().__init__(message)
        self.params = tuple(params)

    def for_cli(self, flags: dict[str, str] | None = None) -> str:
        """The message with every named parameter replaced by its flag (``top_k`` -> ``--top-k``).

        ``flags`` maps a parameter to its flag where the two differ in more than ``_`` -> ``-``
        (e.g. ``by_abs`` -> ``--abs``).
        """
        import re

        text = str(self)
        for p in sorted(self.params, key=len, reverse=True):
            flag = (flags or {}).get(p, "--" + p.replace("_", "-"))
            text = re.sub(rf"(?<![\w-]){re.escape(p)}(?![\w-])", flag, text)
        return text


class DataError(VstoreError, ValueError):
    """A story/text file is malformed; the message names file, line and field."""


class ModelError(VstoreError, LookupError):
    """A model cannot be found or loaded."""


class UnsupportedArchitectureError(ModelError):
    """The model's architecture has no known capture site."""


class StoreError(VstoreError, ValueError):
    """A store is malformed, incompatible, or in the wrong state."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store at the given path."""


class StoreExistsError(StoreError, FileExistsError):
    """A complete store exists and overwriting it was not asked for."""


class DiskSpaceError(VstoreError, OSError):
    """The store does not fit on the disk (estimated before a build, or met while writing)."""


def disk_full(error: BaseException, what: str, hint: str = "free space and run it again") -> DiskSpaceError | None:
    """``error`` as one clear :class:`DiskSpaceError` when it is a full disk, a quota or a file-size
    limit (``ENOSPC``, ``EDQUOT``, ``EFBIG``), naming ``what`` was being written; else None."""
    import errno
    import os

    if isinstance(error, OSError) and not isinstance(error, VstoreError) and error.errno in (
            errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        where = f" ({error.filename})" if error.filename else ""
        return DiskSpaceError(f"writing {what} failed: {os.strerror(error.errno or 0).lower()}{where}; {hint}")
    return None


class OutputError(VstoreError, OSError):
    """An output path that vstore will not write: a directory, device, FIFO or socket where a file goes."""


class NeuronSetError(VstoreError, ValueError):
    """A neuron set does not match the model, or is malformed."""


class NativeExtensionError(VstoreError, ImportError):
    """The native extension vstore._C was asked for but is not built."""
