"""The activation store: a Zarr v3 group that every stage after the build reads.

``_format``
    the format version, the one dtype table, chunking and codecs;
``_store``
    :class:`Store`, opening a store for reading (``"r"``) or writing (``"r+"``);
``_writer``
    :class:`PartWriter`, appending rows to one part;
``_chunks``
    chunk files written and memory-mapped directly where the layout allows (:class:`ChunkReader`);
``_cache``
    the statistics cache under ``stats/`` (writing needs ``"r+"``).

The format is documented in ``docs/store-format.md``; it stays readable by plain zarr-python.
"""

from ._cache import clear_cache, read_cached, store_digest, write_cached
from ._chunks import ChunkReader, chunk_file, chunks_digest, crc32c, direct_chunk_layout, write_chunk_file
from ._format import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    ITEMSIZE,
    STORAGE_DTYPES,
    DtypeSpec,
    check_format_version,
    chunk_rows_for,
    codecs_for,
    dtype_spec,
)
from ._meta import meta_lock
from ._store import PartInfo, Store, is_store, is_url
from ._writer import PartWriter

__all__ = [
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ITEMSIZE",
    "STORAGE_DTYPES",
    "ChunkReader",
    "DtypeSpec",
    "PartInfo",
    "PartWriter",
    "Store",
    "check_format_version",
    "chunk_file",
    "chunk_rows_for",
    "chunks_digest",
    "clear_cache",
    "codecs_for",
    "crc32c",
    "direct_chunk_layout",
    "dtype_spec",
    "is_store",
    "is_url",
    "meta_lock",
    "read_cached",
    "store_digest",
    "write_cached",
    "write_chunk_file",
]
