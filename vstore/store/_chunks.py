"""Chunk files read and written directly, bypassing zarr's codec pipeline, where the layout allows.

An uncompressed array on a local file system (``bytes`` codec, little endian, optionally followed by
``crc32c``) stores each chunk as one file: the raw bytes, then the 4-byte checksum. Writing such a
file ourselves (atomically) and memory-mapping it for reading is byte-for-byte what zarr does, at
the speed of the disk. Any other layout goes through zarr.

Chunk files are written with ``O_DIRECT`` where the file system takes it and the block is aligned
(:data:`DIRECT_ALIGN`): the device reads the bytes from our buffer, so the writer spends no CPU
copying them into the page cache (on a virtual machine, filling fresh page-cache pages cost the
build's writer thread most of its time, taken from the model's forward). ``VSTORE_BUFFERED_WRITES=1``
turns this off; a file system that refuses ``O_DIRECT`` (tmpfs, some overlays) gets ordinary writes,
and so does a writer that waits for the write (``write_chunk_file(..., direct=False)``: a partial chunk).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..atomic import atomic_path
from ..errors import StoreError

__all__ = ["DIRECT_ALIGN", "ChunkReader", "aligned_zeros", "chunk_file", "chunks_digest", "crc32c",
           "direct_chunk_layout", "write_chunk_file"]

#: Address and length alignment of an ``O_DIRECT`` write (covers 512-byte and 4 KiB block devices).
DIRECT_ALIGN = 4096

Layout = tuple[Path, Callable[[tuple[int, ...]], str], bool]


def crc32c(data: Any) -> int:
    """CRC-32C of a bytes-like object (the checksum zarr's ``crc32c`` codec appends)."""
    try:
        import crc32c as _crc

        return int(_crc.crc32c(data))
    except ImportError:  # zarr's own dependency
        import google_crc32c

        return int(google_crc32c.value(bytes(data)))


def direct_chunk_layout(arr: zarr.Array) -> Layout | None:
    """How to read/write an array's chunk files directly.

    Returns ``(array folder, chunk-key encoder, has crc32c)`` when the array lives on a local file
    system and its chunks are stored raw (``bytes`` codec, little endian, optionally followed by
    ``crc32c``), else ``None`` (then use zarr).
    """
    try:
        from zarr.codecs import BytesCodec, Crc32cCodec
        from zarr.storage import LocalStore

        meta = arr.metadata
        sp = arr.store_path
        if not isinstance(sp.store, LocalStore) or not np.little_endian:
            return None
        codecs = tuple(meta.codecs)  # type: ignore[union-attr]
        if not codecs or not isinstance(codecs[0], BytesCodec):
            return None
        if np.dtype(arr.dtype).itemsize > 1 and (codecs[0].endian is None or codecs[0].endian.value != "little"):
            return None
        rest = codecs[1:]
        if rest and not (len(rest) == 1 and isinstance(rest[0], Crc32cCodec)):
            return None
        return Path(sp.store.root) / sp.path, meta.chunk_key_encoding.encode_chunk_key, bool(rest)  # type: ignore[union-attr]
    except Exception:  # any layout we do not recognise: go through zarr
        return None


def chunk_file(arr: zarr.Array, coords: tuple[int, ...]) -> Path | None:
    """The file holding chunk ``coords`` of an array on a local file system (whatever its codecs), else None."""
    try:
        from zarr.storage import LocalStore

        sp = arr.store_path
        if not isinstance(sp.store, LocalStore):
            return None
        return Path(sp.store.root) / sp.path / arr.metadata.chunk_key_encoding.encode_chunk_key(coords)  # type: ignore[union-attr]
    except Exception:  # a layout we do not recognise
        return None


def chunks_digest(arrays: list[tuple[zarr.Array, int]]) -> str | None:
    """A digest of the stored checksums of every committed chunk of ``arrays`` ((array, committed rows)).

    Every chunk file of a vstore array ends in its crc32c (the last codec), so the last 4 bytes of
    each file identify its content: a chunk rewritten, flipped or replaced changes the digest.
    None when an array is not on a local file system.
    """
    import hashlib

    h = hashlib.sha1()
    for arr, rows in arrays:
        step = int(arr.chunks[1])
        for layer in range(int(arr.shape[0])):
            for c in range(-(-rows // step) if step else 0):
                f = chunk_file(arr, (layer, c, 0))
                if f is None:
                    return None
                try:
                    with open(f, "rb") as fh:
                        fh.seek(-4, os.SEEK_END)
                        h.update(fh.read(4))
                except OSError:
                    h.update(b"missing")
    return h.hexdigest()


def aligned_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zeroed C-order array whose data starts on a :data:`DIRECT_ALIGN` boundary (for ``O_DIRECT``).

    Large buffers are anonymous memory maps (page-aligned, zero) marked for transparent huge pages
    where the kernel offers them: touching a chunk buffer's pages for the first time then costs a
    fault per 2 MiB instead of per 4 KiB (72 MB: 45 ms instead of 170 ms on a fresh VM process).
    """
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if nbytes >= 1 << 22:
        mm = mmap.mmap(-1, nbytes)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):
                mm.madvise(mmap.MADV_HUGEPAGE)
        return np.frombuffer(mm, dtype=dt, count=nbytes // dt.itemsize).reshape(shape)
    raw = np.zeros(nbytes + DIRECT_ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % DIRECT_ALIGN
    return raw[start : start + nbytes].view(dt).reshape(shape)


_no_direct: set[int] = set()  # devices whose file system refused O_DIRECT


def _direct_writes() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("VSTORE_BUFFERED_WRITES", "") in ("", "0")


def _write_direct(tmp: Path, data: np.ndarray, tail: bytes) -> bool:
    """Write ``data`` (then ``tail``) to the new file ``tmp`` with ``O_DIRECT``; False (nothing
    written) when the block is unaligned or the file system refuses it."""
    if (not _direct_writes() or data.nbytes == 0 or data.nbytes % DIRECT_ALIGN
            or data.ctypes.data % DIRECT_ALIGN):
        return False
    try:
        dev = os.stat(tmp.parent).st_dev
    except OSError:
        return False
    if dev in _no_direct:
        return False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o666)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            _no_direct.add(dev)
            return False
        raise
    view = memoryview(data.data).cast("B")
    done = 0
    try:
        while done < len(view):
            n = os.write(fd, view[done:])
            if n <= 0:
                raise OSError(errno.EIO, f"{tmp}: short write")
            done += n
            if done < len(view) and done % DIRECT_ALIGN:
                break  # a partial write off the block grid: the rest goes through the page cache
    except OSError as e:
        os.close(fd)
        if e.errno != errno.EINVAL or done:
            raise
        os.unlink(tmp)  # refused at the first write: this file system takes no O_DIRECT writes
        _no_direct.add(dev)
        return False
    os.close(fd)
    with open(tmp, "r+b") as f:
        f.seek(done)
        f.write(view[done:])
        f.write(tail)
    return True


def write_chunk_file(layout: Layout, coords: tuple[int, ...], block: np.ndarray, *, direct: bool = True,
                     filled: int | None = None) -> None:
    """Write one whole chunk (its raw bytes, then the checksum if the layout has one), atomically.

    ``direct=False`` writes through the page cache even where ``O_DIRECT`` is taken: a copy instead
    of a wait for the disk, for a writer that waits on the write anyway. ``filled`` (with
    ``direct=False``): only the block's first ``filled`` bytes are written, and the rest, which must
    be zero, is left a hole in the file (it reads as zeros; the checksum covers the whole block).
    """
    root, encode, crc = layout
    data = np.ascontiguousarray(block).view(np.uint8).reshape(-1)
    path = root / encode(coords)
    tail = crc32c(data.data).to_bytes(4, "little") if crc else b""
    end = data.nbytes if filled is None or direct else max(0, min(int(filled), data.nbytes))
    with atomic_path(path) as tmp:
        if not (direct and _write_direct(tmp, data, tail)):
            with open(tmp, "wb") as f:
                f.write(data[:end].data)
                if end < data.nbytes:
                    f.seek(data.nbytes)
                    if not tail:
                        f.truncate()
                f.write(tail)


class ChunkReader:
    """Reads row ranges of one layer of a ``(layer, row, neuron)`` array chunked ``(1, rows, N)``.

    Uncompressed chunks on a local file system are memory-mapped straight from their files
    (``MAP_POPULATE``: one system call, no copy out of the page cache) and their checksum verified;
    anything else is read through zarr.
    """

    def __init__(self, arr: zarr.Array, *, verify: bool = True) -> None:
        self.arr = arr
        self.chunk_rows = int(arr.chunks[1])
        self.n_neurons = int(arr.shape[2])
        self.dtype = np.dtype(arr.dtype)
        self.verify = verify
        self.direct = direct_chunk_layout(arr) if arr.chunks == (1, self.chunk_rows, self.n_neurons) else None
        self.chunk_bytes = self.chunk_rows * self.n_neurons * self.dtype.itemsize

    def read(self, layer: int, r0: int, r1: int) -> np.ndarray:
        """Committed rows ``r0:r1`` of layer position ``layer`` (raw storage dtype, C order; may be read-only).

        Raises
        ------
        StoreError
            A chunk of these rows is missing, truncated or fails its checksum (never read as zeros).
        """
        n = r1 - r0
        if self.direct is not None and r0 % self.chunk_rows == 0 and n <= self.chunk_rows:
            return self._read_direct(layer, r0 // self.chunk_rows, n)
        for c in range(r0 // self.chunk_rows, (r1 - 1) // self.chunk_rows + 1 if n > 0 else 0):
            f = chunk_file(self.arr, (layer, c, 0))
            if f is not None and not f.exists():
                raise StoreError(f"{f}: missing chunk: its rows are committed but the file is gone "
                                 "(run `vstore verify` on the store)")
        try:
            return np.ascontiguousarray(np.asarray(self.arr[layer, r0:r1]))
        except (ValueError, RuntimeError, OSError) as e:  # zarr's codecs: a bad checksum, a truncated chunk
            raise StoreError(f"{self.arr.store_path}: rows {r0}:{r1} of layer position {layer} cannot be read: {e} "
                             "(the chunk is corrupt; run `vstore verify` on the store)") from None

    def advise(self, layer: int, r0: int) -> None:
        """Ask the OS to start reading the chunk holding row ``r0`` (``POSIX_FADV_WILLNEED``)."""
        if self.direct is None or not hasattr(os, "posix_fadvise"):
            return
        root, encode, _ = self.direct
        try:
            fd = os.open(root / encode((layer, r0 // self.chunk_rows, 0)), os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _read_direct(self, layer: int, chunk: int, n: int) -> np.ndarray:
        assert self.direct is not None
        if self.chunk_bytes == 0:  # no neurons: nothing to map
            return np.zeros((n, self.n_neurons), dtype=self.dtype)
        root, encode, crc = self.direct
        path = root / encode((layer, chunk, 0))
        want = self.chunk_bytes + (4 if crc else 0)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"{path}: missing chunk: its rows are committed but the file is gone "
                             "(run `vstore verify` on the store)") from None
        try:
            size = os.fstat(fd).st_size
            if size != want:
                raise StoreError(f"{path}: truncated or padded chunk: {size} bytes, expected {want} "
                                 "(the chunk is corrupt; run `vstore verify` on the store)")
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, want, flags=flags, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        if crc and self.verify:
            stored = int.from_bytes(mm[self.chunk_bytes : self.chunk_bytes + 4], "little")
            if crc32c(memoryview(mm)[: self.chunk_bytes]) != stored:
                mm.close()
                raise StoreError(f"{path}: checksum mismatch (the chunk is corrupt)")
        # the array keeps the mapping alive; it is unmapped when the block is dropped
        return np.frombuffer(mm, dtype=self.dtype, count=n * self.n_neurons).reshape(n, self.n_neurons)
