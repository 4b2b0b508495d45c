"""The store format (version 1): its name and version, the one dtype table, chunking and codecs.

Everything that decides how bytes lie on disk is here, so a reader, a writer and a migration agree
by construction. See ``docs/store-format.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import StoreError, UsageError

__all__ = [
    "DTYPES",
    "EXAMPLES_CHUNK",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ITEMSIZE",
    "ROWS_CHUNK",
    "STORAGE_DTYPES",
    "DtypeSpec",
    "check_attributes",
    "check_format_version",
    "chunk_rows_for",
    "codecs_for",
    "dtype_spec",
    "site_entries",
    "site_path",
]

FORMAT_NAME = "vstore"
FORMAT_VERSION = 1
TARGET_CHUNK_BYTES = 8 << 20
#: Rows per chunk of the ``rows/*`` columns (read at part creation, so a tool may change it).
ROWS_CHUNK = 1 << 16
EXAMPLES_CHUNK = 4096


@dataclass(frozen=True)
class DtypeSpec:
    """One logical activation dtype and how it is stored.

    Attributes
    ----------
    name
        Logical dtype (``float16``, ``bfloat16``, ``float32``): what the values are.
    storage
        NumPy dtype of the zarr array and of raw blocks (bfloat16 travels as ``uint16`` bits).
    torch
        Name of the matching ``torch`` dtype.
    """

    name: str
    storage: str
    torch: str

    @property
    def itemsize(self) -> int:
        return int(np.dtype(self.storage).itemsize)

    @property
    def raw(self) -> np.dtype[Any]:
        """The NumPy dtype of raw blocks."""
        return np.dtype(self.storage)


#: The one dtype table: logical dtype -> how it is stored.
DTYPES: dict[str, DtypeSpec] = {
    "float16": DtypeSpec("float16", "float16", "float16"),
    "bfloat16": DtypeSpec("bfloat16", "uint16", "bfloat16"),
    "float32": DtypeSpec("float32", "float32", "float32"),
}
STORAGE_DTYPES: dict[str, str] = {k: v.storage for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: v.itemsize for k, v in DTYPES.items()}


def check_format_version(version: object, where: str) -> None:
    """Refuse any ``format_version`` but the integer :data:`FORMAT_VERSION` (a string ``"1"`` included)."""
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        raise StoreError(f"{where}: store format version {version!r} is not supported (this vstore reads version "
                         f"{FORMAT_VERSION}, an integer)")


def check_attributes(m: dict[str, Any], where: str) -> None:
    """The store attributes the readers trust, checked once: a damaged field is a ``StoreError`` naming it."""

    def is_int(v: object, low: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    parts = m.get("parts")
    if not isinstance(parts, list):
        raise StoreError(f"{where}.parts is {type(parts).__name__}, expected a list")
    for i, p in enumerate(parts):
        if not isinstance(p, dict):
            raise StoreError(f"{where}.parts[{i}] is {type(p).__name__}, expected an object")
        for k in ("committed_rows", "committed_examples", "n_examples", "example_start"):
            if not is_int(p.get(k)):
                raise StoreError(f"{where}.parts[{i}].{k} is {p.get(k)!r}, expected an integer >= 0")
        for k in ("name", "state"):
            if not isinstance(p.get(k), str):
                raise StoreError(f"{where}.parts[{i}].{k} is {p.get(k)!r}, expected a string")
    layers = m.get("layers")
    if not isinstance(layers, list) or not all(is_int(x) for x in layers):
        raise StoreError(f"{where}.layers is {layers!r}, expected a list of layer indices")
    model = m.get("model")
    if not isinstance(model, dict) or not is_int(model.get("n_neurons")):
        raise StoreError(f"{where}.model.n_neurons is missing or not an integer >= 0")
    if not isinstance(m.get("dtype"), str) or m["dtype"] not in DTYPES:
        raise StoreError(f"{where}.dtype is {m.get('dtype')!r}, expected one of {', '.join(DTYPES)}")
    if not is_int(m.get("n_examples", 0)):
        raise StoreError(f"{where}.n_examples is {m.get('n_examples')!r}, expected an integer >= 0")
    if "chunk_rows" in m and not is_int(m["chunk_rows"], 1):
        raise StoreError(f"{where}.chunk_rows is {m['chunk_rows']!r}, expected an integer >= 1")
    for k in ("site", "pooling", "state"):
        if k in m and not isinstance(m[k], str):
            raise StoreError(f"{where}.{k} is {m[k]!r}, expected a string")
    if "sites" in m:
        _check_sites(m, where)


def site_entries(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The sites a store holds, first (the one in ``parts/NNNN/acts``) first.

    Each entry has ``name``, ``n_neurons`` (values per row), ``dtype`` and ``chunk_rows``. A store
    without a ``sites`` attribute (every store written before several sites per pass) holds one
    site: ``site`` (default ``act``), ``model.n_neurons`` wide, in the store's dtype.
    """
    if "sites" in m:
        return [dict(e) for e in m["sites"]]
    return [{"name": str(m.get("site", "act")), "n_neurons": int(m["model"]["n_neurons"]), "dtype": m["dtype"],
             "chunk_rows": m.get("chunk_rows")}]


def site_path(m: dict[str, Any], site: str) -> str:
    """The array of ``site`` inside a part: ``acts`` for the first site, ``sites/<name>`` for the others."""
    return "acts" if site == site_entries(m)[0]["name"] else f"sites/{site}"


def _check_sites(m: dict[str, Any], where: str) -> None:
    sites = m["sites"]
    if not isinstance(sites, list) or not sites:
        raise StoreError(f"{where}.sites is {sites!r}, expected a non-empty list of sites")
    names = []
    for i, e in enumerate(sites):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"].isidentifier():
            raise StoreError(f"{where}.sites[{i}] is {e!r}, expected an object with a site name")
        n, c = e.get("n_neurons"), e.get("chunk_rows")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise StoreError(f"{where}.sites[{i}].n_neurons is {n!r}, expected an integer >= 0")
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise StoreError(f"{where}.sites[{i}].chunk_rows is {c!r}, expected an integer >= 1")
        if e.get("dtype") not in DTYPES:
            raise StoreError(f"{where}.sites[{i}].dtype is {e.get('dtype')!r}, expected one of {', '.join(DTYPES)}")
        names.append(e["name"])
    if len(set(names)) != len(names):
        raise StoreError(f"{where}.sites names a site twice: {names}")
    if m.get("site") != names[0] or m.get("dtype") != sites[0]["dtype"]:
        raise StoreError(f"{where}.sites[0] is {names[0]!r} in {sites[0]['dtype']}, but site/dtype say "
                         f"{m.get('site')!r} in {m.get('dtype')!r}")


def dtype_spec(name: str, param: str = "dtype") -> DtypeSpec:
    """The :class:`DtypeSpec` of logical dtype ``name`` (``UsageError`` naming ``param`` otherwise)."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise UsageError(f"{param}: expected one of {', '.join(DTYPES)}, got {name!r}", param) from None


def chunk_rows_for(n_neurons: int, dtype: str) -> int:
    """Rows per chunk so a chunk of one layer holds about 8 MiB (within 4-16 MiB)."""
    per_row = max(1, n_neurons * ITEMSIZE[dtype])
    rows = max(1, TARGET_CHUNK_BYTES // per_row)
    return int(rows - rows % 256) if rows >= 512 else int(rows)


def codecs_for(compressor: str) -> list[Any]:
    """The zarr codecs after ``bytes`` for ``none`` (crc32c only) or ``zstd-N`` (zstd, then crc32c)."""
    import zarr.codecs as zc

    if compressor == "none":
        return [zc.Crc32cCodec()]
    if compressor.startswith("zstd"):
        level = compressor.partition("-")[2] or "1"
        if not level.lstrip("-").isdigit():
            raise StoreError(f"unknown compressor {compressor!r}; use 'none' or 'zstd-N'")
        return [zc.ZstdCodec(level=int(level)), zc.Crc32cCodec()]
    raise StoreError(f"unknown compressor {compressor!r}; use 'none' or 'zstd-N'")
