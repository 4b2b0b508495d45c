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
    "StoreError",
    "StoreExistsError",
    "StoreNotFoundError",
    "UnsupportedArchitectureError",
    "VstoreError",
]


class VstoreError(Exception):
    """Base class of all vstore errors."""


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
    """A complete store exists and --overwrite was not given."""


class DiskSpaceError(VstoreError, OSError):
    """The estimated store size does not fit on the disk."""


class NeuronSetError(VstoreError, ValueError):
    """A neuron set does not match the model, or is malformed."""


class NativeExtensionError(VstoreError, ImportError):
    """The native extension vstore._C was asked for but is not built."""
