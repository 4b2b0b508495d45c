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

Reading, a chunk in the page cache is memory-mapped (no copy); one that is not (a store just built,
or evicted) can be read ahead with ``O_DIRECT`` into huge pages (:meth:`ChunkReader.read_ahead`): a
few large requests to the device instead of the page cache's many small ones.
``VSTORE_BUFFERED_READS=1`` turns this off.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import sys
import threading
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
_HUGE_PAGE = 2 << 20

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

    Large buffers (4 MiB and more) are private anonymous memory maps started on a huge-page boundary
    and marked for transparent huge pages where the kernel offers them: touching a page for the
    first time then costs a fault per 2 MiB instead of per 4 KiB, and ``O_DIRECT`` moves a 2 MiB
    page in one piece of a request.
    """
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if nbytes >= 1 << 22:
        return _huge_zeros(nbytes).view(dt).reshape(shape)
    raw = np.zeros(nbytes + DIRECT_ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % DIRECT_ALIGN
    return raw[start : start + nbytes].view(dt).reshape(shape)


def _huge_zeros(nbytes: int) -> np.ndarray:
    """``nbytes`` zero bytes (uint8) of a private anonymous map, from a huge-page boundary."""
    # private: a shared anonymous map is shmem, which gets no transparent huge pages; and aligned by
    # hand: the kernel aligns only some lengths
    mm = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            mm.madvise(mmap.MADV_HUGEPAGE)
    start = -np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data % _HUGE_PAGE
    return np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=start)


class _ReadBuffers:
    """Buffers for chunks read with ``O_DIRECT``, each handed out again once no array refers to it
    (so a block stays valid however long its consumer keeps it): a buffer used again costs no page
    faults, and the device's copy into it no waiting on them."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        # per buffer, the reference counts of it and of its memory's first array while it is free,
        # measured when it was made (what getrefcount counts differs between Python versions)
        self.bufs: list[tuple[np.ndarray, tuple[int, int]]] = []
        self.lock = threading.Lock()

    def get(self, nbytes: int) -> np.ndarray:
        """A buffer of at least ``nbytes`` (uint8, on a :data:`DIRECT_ALIGN` boundary)."""
        with self.lock:
            for buf, free in self.bufs:
                # in use: something refers to `buf` (a memoryview) or to its first array (every NumPy
                # view of `buf` does: NumPy collapses bases)
                if buf.nbytes >= nbytes and _counts(buf) == free:
                    return buf
            buf = aligned_zeros((nbytes,), np.uint8)
            if len(self.bufs) < self.keep:
                self.bufs.append((buf, (0, 0)))
                free = _counts(buf)  # counted as the loop above counts it: a local and the list's tuple
                self.bufs[-1] = (buf, free)
            return buf


def _counts(buf: np.ndarray) -> tuple[int, int]:
    return sys.getrefcount(buf), sys.getrefcount(_first_array(buf))


def _first_array(a: np.ndarray) -> np.ndarray:
    """The array whose memory ``a`` views (the last NumPy array down its chain of bases)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


_no_direct: set[int] = set()  # devices whose file system refused O_DIRECT writes
_no_direct_read: set[int] = set()  # ... and reads


def _direct_reads() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("VSTORE_BUFFERED_READS", "") in ("", "0")


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                                               "nr_recently_evicted")]


_SYS_CACHESTAT = 451  # the same on every architecture (added after their tables were unified)


@functools.cache
def _libc() -> tuple[Any, Any]:
    """libc's ``syscall`` and ``mincore`` (either None where it cannot be called)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None, None
    syscall, mincore = getattr(libc, "syscall", None), getattr(libc, "mincore", None)
    if syscall is not None:
        syscall.restype = ctypes.c_long
    if mincore is not None:
        mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        mincore.restype = ctypes.c_int
    return syscall, mincore


_no_cachestat: list[bool] = []  # set once the kernel has no cachestat (Linux < 6.5)


def _cached_pages(fd: int, length: int) -> int | None:
    """Pages of the first ``length`` bytes of file ``fd`` in the page cache (``cachestat``, else
    ``mincore`` over a mapping of them); None when that cannot be told."""
    syscall, mincore = _libc()
    if syscall is not None and not _no_cachestat and sys.platform.startswith("linux"):
        rng, st = _CachestatRange(0, length), _Cachestat()
        if syscall(ctypes.c_long(_SYS_CACHESTAT), ctypes.c_int(fd), ctypes.byref(rng), ctypes.byref(st),
                   ctypes.c_uint(0)) == 0:
            return int(st.nr_cache)
        _no_cachestat.append(True)
    if mincore is None:
        return None
    try:
        mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    try:
        pages = np.zeros(-(-length // mmap.PAGESIZE), dtype=np.uint8)
        view = np.frombuffer(mm, dtype=np.uint8)
        rc = mincore(view.ctypes.data, length, pages.ctypes.data)
        del view  # the map cannot close while an array exports it
    finally:
        mm.close()
    return None if rc != 0 else int(np.count_nonzero(pages & 1))


def _cached_fraction(fd: int, length: int) -> float | None:
    """The fraction of the first ``length`` bytes of file ``fd`` in the page cache; None when that
    cannot be told."""
    if length <= 0:
        return None
    n = _cached_pages(fd, length)
    return None if n is None else n / -(-length // mmap.PAGESIZE)


def _read_uncached(path: Path, want: int, buffers: _ReadBuffers) -> np.ndarray | None:
    """The ``want`` bytes of file ``path`` read with ``O_DIRECT`` into a buffer from ``buffers``;
    None when the file system refuses ``O_DIRECT``."""
    buf = buffers.get(-(-want // DIRECT_ALIGN) * DIRECT_ALIGN)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise StoreError(f"{path}: cannot be read: {e}") from None
    done = 0
    try:
        with memoryview(buf.data) as mv:
            while done < want:
                n = os.preadv(fd, [mv[done:]], done)
                done += n
                if n == 0 or (done < want and done % DIRECT_ALIGN):
                    break
    except OSError as e:
        if e.errno == errno.EINVAL and done == 0:
            return None  # refused at the first read
        raise StoreError(f"{path}: cannot be read: {e}") from None
    finally:
        os.close(fd)
    if done != want:
        raise StoreError(f"{path}: truncated chunk: {done} bytes read, expected {want} "
                         "(the chunk is corrupt; run `vstore verify` on the store)")
    return buf[:want]


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
    (``MAP_POPULATE``: one system call, no copy out of the page cache) and their checksum verified,
    or, when they are not cached, read by a thread ahead of the reader with ``O_DIRECT``
    (:meth:`read_ahead`, then :meth:`read` with ``ahead=``); anything else is read through zarr.
    """

    def __init__(self, arr: zarr.Array, *, verify: bool = True) -> None:
        self.arr = arr
        self._buffers = _ReadBuffers(4)  # kept for reuse by read_ahead
        self.chunk_rows = int(arr.chunks[1])
        self.n_neurons = int(arr.shape[2])
        self.dtype = np.dtype(arr.dtype)
        self.verify = verify
        self.direct = direct_chunk_layout(arr) if arr.chunks == (1, self.chunk_rows, self.n_neurons) else None
        self.chunk_bytes = self.chunk_rows * self.n_neurons * self.dtype.itemsize

    def keep_read_buffers(self, n: int) -> None:
        """Keep up to ``n`` buffers of :meth:`read_ahead` for reuse (as many as may be in use at once)."""
        self._buffers.keep = max(1, int(n))

    def read(self, layer: int, r0: int, r1: int, ahead: np.ndarray | None = None) -> np.ndarray:
        """Committed rows ``r0:r1`` of layer position ``layer`` (raw storage dtype, C order; may be read-only).

        ``ahead``: what :meth:`read_ahead` returned for these rows; its checksum is checked here,
        in the caller's thread, and nothing is read again.

        Raises
        ------
        StoreError
            A chunk of these rows is missing, truncated or fails its checksum (never read as zeros).
        """
        n = r1 - r0
        if ahead is not None:
            assert self.direct is not None
            self._check(self.direct[0] / self.direct[1]((layer, r0 // self.chunk_rows, 0)), ahead)
            block = ahead[: n * self.n_neurons * self.dtype.itemsize].view(self.dtype).reshape(n, self.n_neurons)
            block.flags.writeable = False
            return block
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

    def read_ahead(self, layer: int, r0: int, r1: int) -> np.ndarray | None:
        """The chunk file of rows ``r0:r1``, read from the disk now when it is not in the page cache, else None.

        For a reader thread ahead of :meth:`read`, which takes the bytes returned (``ahead=``) and
        checks their checksum. A chunk that is not cached is read with ``O_DIRECT`` into memory of
        our own backed by huge pages: the device then gets a few large requests per chunk (a read
        through the page cache is split into many small ones, and a virtual disk pays per request)
        and no CPU copies the bytes. Returns None, having asked the OS to read the chunk ahead
        (:meth:`advise`), when the chunk is cached (:meth:`read` maps it without a copy), when its
        residency cannot be told, or when the file system refuses ``O_DIRECT``; also None for rows
        :meth:`read` does not map. Raises what :meth:`read` raises for a missing, truncated or
        unreadable chunk file.
        """
        n = r1 - r0
        if (self.direct is None or self.chunk_bytes == 0 or r0 % self.chunk_rows or not 0 < n <= self.chunk_rows
                or not _direct_reads()):
            self.advise(layer, r0)
            return None
        path = self.direct[0] / self.direct[1]((layer, r0 // self.chunk_rows, 0))
        fd, want = self._open_chunk(path)
        try:
            dev = os.fstat(fd).st_dev
            cached = None if dev in _no_direct_read else _cached_fraction(fd, want)
            if cached is None or cached >= 0.5:  # mostly cached (or unknown): mapped by read()
                if (cached is None or cached < 1) and hasattr(os, "posix_fadvise"):
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                return None
            buf = _read_uncached(path, want, self._buffers)
            if buf is None:
                _no_direct_read.add(dev)
                return None
        finally:
            os.close(fd)
        return buf

    def _open_chunk(self, path: Path) -> tuple[int, int]:
        """An open descriptor of a chunk file, checked for size, and the size it must have."""
        want = self.chunk_bytes + (4 if self.direct is not None and self.direct[2] else 0)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(f"{path}: missing chunk: its rows are committed but the file is gone "
                             "(run `vstore verify` on the store)") from None
        try:
            size = os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise
        if size != want:
            os.close(fd)
            raise StoreError(f"{path}: truncated or padded chunk: {size} bytes, expected {want} "
                             "(the chunk is corrupt; run `vstore verify` on the store)")
        return fd, want

    def _check(self, path: Path, data: Any) -> None:
        """Raise when the chunk bytes ``data`` (then their checksum) fail the checksum."""
        if self.direct is None or not self.direct[2] or not self.verify:
            return
        with memoryview(data) as raw, raw.cast("B") as view:  # released before the caller unmaps
            stored = int.from_bytes(view[self.chunk_bytes : self.chunk_bytes + 4], "little")
            ok = crc32c(view[: self.chunk_bytes]) == stored
        if not ok:
            raise StoreError(f"{path}: checksum mismatch (the chunk is corrupt)")

    def _read_direct(self, layer: int, chunk: int, n: int) -> np.ndarray:
        assert self.direct is not None
        if self.chunk_bytes == 0:  # no neurons: nothing to map
            return np.zeros((n, self.n_neurons), dtype=self.dtype)
        root, encode, _ = self.direct
        path = root / encode((layer, chunk, 0))
        fd, want = self._open_chunk(path)
        try:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, want, flags=flags, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            self._check(path, mm)
        except StoreError:
            mm.close()
            raise
        # the array keeps the mapping alive; it is unmapped when the block is dropped
        return np.frombuffer(mm, dtype=self.dtype, count=n * self.n_neurons).reshape(n, self.n_neurons)
