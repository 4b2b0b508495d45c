"""Appending rows to one part of a store, chunk by chunk, committed at example boundaries."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .._faults import fault_point
from ..errors import StoreError
from ._chunks import aligned_zeros, direct_chunk_layout, write_chunk_file
from ._store import Store

__all__ = ["PartWriter"]

#: Threads that write a partial chunk's files (the build waits for them).
_WRITE_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class PartWriter:
    """Appends rows to one part, chunk by chunk, and commits at example boundaries.

    Rows arrive in example order and are copied once into a staging buffer the size of one chunk
    row-range of every layer. A full buffer is written as whole chunks (straight to the chunk
    files, checksum included, when the store is local and uncompressed; through zarr otherwise);
    :meth:`flush` also writes a partial one. After each write the part's counters advance to the
    last example whose rows are all written.

    A part built ``--keep stats`` has no ``acts``: only the row table is written (and, through
    ``on_commit``, the statistics); ``--keep pooled`` adds one mean and one last row per example.
    ``on_commit(payloads, examples)`` receives, before the counters advance, the payloads given to
    :meth:`add` of the examples about to be committed (the build's statistics of those batches).

    A store of several sites (:attr:`Store.sites`) gets one array and one buffer per site, all with
    the same row chunking; every site's rows are written before the counters advance.

    With ``background`` (the default), a full chunk written straight to its files is written from a
    short-lived thread while the next chunk fills a second buffer: the build waits on the disk only
    at the next full chunk or at :meth:`flush`, and the part's counters advance once the files are
    written. ``O_DIRECT`` writes cost that thread almost no CPU, so on a CPU build they overlap the
    forward instead of stopping it (docs/performance.md). A partial chunk and the zarr path are
    written in the caller's thread.
    """

    def __init__(self, store: Store, part: str, *,
                 on_commit: Callable[[list[Any], int], None] | None = None, background: bool = True) -> None:
        self.store = store
        self.part = part
        store.check_writable()
        info = store.part_info(part)
        entry = store.part_entry(part)
        self.keep = str(entry.get("keep", "all"))
        self.on_commit = on_commit
        self.sites = store.sites
        self.arrays: dict[str, Any] = {s: store.acts(part, s) for s in self.sites} if self.keep == "all" else {}
        self.acts: Any = self.arrays.get(self.sites[0])
        chunks = {int(a.chunks[1]) for a in self.arrays.values()}
        if len(chunks) > 1:
            raise StoreError(f"{store.path}: part {part}: the sites' arrays have different row chunks {sorted(chunks)}")
        self.rows = {c: store.array(f"parts/{part}/rows/{c}") for c in ("example", "position", "token")}
        self.chunk = chunks.pop() if chunks else int(store.meta["chunk_rows"])
        self.written = info.committed_rows
        self.committed_examples = info.committed_examples
        self.example_start = info.example_start
        self.overflow: dict[str, int] = dict(entry.get("overflow", {}) if "shard" in entry
                                             else store.meta.get("overflow", {}))
        self._boundaries: list[tuple[int, int, Any, int]] = []  # (row end, examples done, payload, pooled rows)
        self.bytes_written = 0
        self.pooled: dict[str, Any] = {}
        self.pooled_rows = int(entry.get("pooled_rows", 0))
        if self.keep == "pooled":
            self.pooled = {k: store.array(f"parts/{part}/pooled/{k}") for k in ("mean", "last")}
            self.pooled["example"] = store.array(f"parts/{part}/rows/pooled/example")
            for arr in self.pooled.values():  # drop pooled rows written after the last commit
                if arr.shape[-2 if arr.ndim == 3 else 0] != self.pooled_rows:
                    arr.resize((*arr.shape[:-2], self.pooled_rows, arr.shape[-1]) if arr.ndim == 3
                               else (self.pooled_rows,))
        # None (tests set it) writes every site through zarr
        self._direct: dict[str, Any] | None = {s: direct_chunk_layout(a) for s, a in self.arrays.items()}
        # drop anything written after the last commit (a killed build)
        for a in self.arrays.values():
            if a.shape[1] != self.written:
                a.resize((a.shape[0], self.written, a.shape[2]))
        for arr in self.rows.values():
            if arr.shape[0] != self.written:
                arr.resize((self.written,))
        # page-aligned, so whole chunks go to disk with O_DIRECT (write_chunk_file)
        self._bufs = {s: aligned_zeros((a.shape[0], self.chunk, a.shape[2]), a.dtype) for s, a in self.arrays.items()}
        self._rows_buf = {c: np.full(self.chunk, -1, dtype=a.dtype) for c, a in self.rows.items()}
        self._base = self.written - self.written % self.chunk  # first row of the buffer
        self._fill = self.written - self._base  # rows in the buffer
        self._stale = 0  # buffer rows [_fill, _stale) still hold the previous chunk's rows
        self.background = background
        # the second set of chunk buffers (made at the first background write) and its stale rows
        self._spare: tuple[dict[str, np.ndarray], int] | None = None
        # a full chunk being written in the background: (thread, error box, r0, r1, row columns, buffers)
        self._pending: tuple[threading.Thread, list[BaseException], int, int, dict[str, np.ndarray],
                             dict[str, np.ndarray]] | None = None
        self._failed: BaseException | None = None  # a background write failed: its rows are gone
        self._pooled_end = self.pooled_rows
        self._reserved: int | None = None  # rows handed out by reserve() for the next add(in_place=True)
        if self._fill:  # resuming inside a chunk: its committed rows are the start of the buffer
            for s, a in self.arrays.items():
                self._bufs[s][:, : self._fill] = a[:, self._base : self.written]

    def reserve(self, n: int) -> list[dict[str, np.ndarray]] | None:
        """Where the next ``n`` rows go in the chunk buffers, for a producer to write them in place.

        Returns one ``{site: (layers, rows, neurons) view}`` per chunk the rows fall in (in order: the
        rest of the current chunk, then the start of the next), or None where the rows cannot be
        written in place (a part without ``acts``, the zarr path, no background writes, or more rows
        than the current and one more chunk hold); then pass them to :meth:`add` as usual. After
        filling the views, call :meth:`add` with ``acts=None, in_place=True`` for the same ``n`` rows.
        Saves the copy of every batch into the chunk buffers (and the batch's own host buffer).
        """
        self._check_usable()
        self._reserved = None
        room = self.chunk - self._fill
        if not self.arrays or self._direct is None or n < 1 or (n > room and not self.background) \
                or n > room + self.chunk:
            return None
        first = min(n, room)
        views = [{s: b[:, self._fill : self._fill + first] for s, b in self._bufs.items()}]
        # rows the producer writes and that a failed batch leaves behind: zeroed before a partial write
        self._stale = max(self._stale, self._fill + first)
        if n > room:  # the next chunk's buffers: those of the chunk before, once its files are written
            self._finish_pending()
            spare, stale = self._spare if self._spare is not None else (
                {s: aligned_zeros(b.shape, b.dtype) for s, b in self._bufs.items()}, 0)
            self._spare = (spare, max(stale, n - first))
            views.append({s: b[:, : n - first] for s, b in spare.items()})
        self._reserved = n
        return views

    def add(self, acts: np.ndarray | Mapping[str, np.ndarray] | None, example: np.ndarray, position: np.ndarray,
            token: np.ndarray, examples_done: int, *, payload: Any = None,
            pooled: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, in_place: bool = False) -> None:
        """Queue rows (``acts`` shaped (layers, rows, neurons), or one such array per site; None for a
        part without ``acts``); ``examples_done`` of the part are then complete.

        Every call must end at an example boundary: the rows of an example arrive in one call.
        ``pooled`` is ``(mean, last, example)`` of these examples (``--keep pooled``). ``in_place``:
        the rows are already in the views :meth:`reserve` gave for this many rows (``acts`` is None).
        """
        per_site = {} if acts is None or not self.arrays else (
            dict(acts) if isinstance(acts, Mapping) else {self.sites[0]: acts})
        if per_site and set(per_site) != set(self.sites):
            raise StoreError(f"{self.store.path}: part {self.part} holds sites {self.sites}, got rows of "
                             f"{sorted(per_site)}")
        self._check_usable()
        n, i = example.shape[0], 0
        if in_place and (self._reserved != n or per_site):
            raise StoreError(f"{self.store.path}: part {self.part}: {n} row(s) added in place, but "
                             f"{self._reserved} were reserved")
        self._reserved = None
        cols = {"example": example, "position": position, "token": token}
        if pooled is not None and self.pooled:
            self._add_pooled(*pooled)
        while i < n:
            take = min(n - i, self.chunk - self._fill)
            for s, a in per_site.items():
                _copy(self._bufs[s][:, self._fill : self._fill + take], a[:, i : i + take])
            for c, v in cols.items():
                self._rows_buf[c][self._fill : self._fill + take] = v[i : i + take]
            self._fill += take
            i += take
            if self._fill == self.chunk:
                self._write()
        self._boundaries.append((self._base + self._fill, examples_done, payload, self._pooled_end))

    def _add_pooled(self, mean: np.ndarray, last: np.ndarray, example: np.ndarray) -> None:
        """Pooled rows go through zarr at once (they are few); they count once their examples commit."""
        start = max(self.pooled_rows, self._pooled_end)
        end = start + example.shape[0]
        for key, values in (("mean", mean), ("last", last)):
            arr = self.pooled[key]
            arr.resize((arr.shape[0], end, arr.shape[2]))
            arr[:, start:end] = values
        self.pooled["example"].resize((end,))
        self.pooled["example"][start:end] = example
        self._pooled_end = end

    def flush(self) -> None:
        """Write every queued row (a partial chunk too) and commit."""
        self._check_usable()
        self._finish_pending()
        if self._base + self._fill > self.written:
            self._write()
        else:
            self._commit()

    def _write(self) -> None:
        self._finish_pending()
        r0, r1 = self._base, self._base + self._fill
        full = self._fill == self.chunk
        if self.background and full and self._direct is not None and self.arrays:
            self._start_background(r0, r1)
            return
        if self._direct is not None and self._stale > self._fill:  # a partial chunk's file is full size
            for buf in self._bufs.values():
                buf[:, self._fill : self._stale] = 0
        # the caller waits for these files: a partial chunk goes through the page cache (a copy), a
        # full one with O_DIRECT (no copy, but the caller waits for the disk)
        self._write_files(self._bufs, r0, self._fill, direct_io=full)
        cols = {c: b[self.written - r0 : self._fill] for c, b in self._rows_buf.items()}
        if self._direct is not None:
            self._stale = self.chunk if full else self._fill
        if full:  # start the next chunk (its rows overwrite the buffer)
            self._base, self._fill = r1, 0
        self._advance(r1, cols)

    def _write_files(self, bufs: Mapping[str, np.ndarray], r0: int, fill: int, *, direct_io: bool = True) -> None:
        """The chunk files of rows ``r0 : r0 + fill`` of every site (the direct layout; ``O_DIRECT``
        where taken, with ``direct_io``), or the rows through zarr (which then also resizes the arrays)."""
        for site, arr in self.arrays.items():
            L, _, N = arr.shape
            buf, direct = bufs[site], self._direct[site] if self._direct is not None else None
            if direct is not None:
                # a partial chunk's rows past `fill` are zero (see _write): written as a hole
                filled = None if direct_io else fill * N * arr.dtype.itemsize

                def one(layer: int, direct: Any = direct, buf: np.ndarray = buf, filled: int | None = filled) -> None:
                    write_chunk_file(direct, (layer, r0 // self.chunk, 0), buf[layer], direct=direct_io,
                                     filled=filled)
                    fault_point("after-layer")

                if direct_io or L == 1 or _WRITE_THREADS == 1:
                    for layer in range(L):
                        one(layer)
                else:  # the caller waits for these copies into the page cache: on every core
                    with ThreadPoolExecutor(_WRITE_THREADS, thread_name_prefix="vstore-chunk") as pool:
                        list(pool.map(one, range(L)))
            else:
                arr.resize((L, r0 + fill, N))
                arr[:, r0 : r0 + fill] = buf[:, :fill]

    def _start_background(self, r0: int, r1: int) -> None:
        """Write the full chunk in the buffers from a thread; the next rows go to the spare buffers."""
        bufs = self._bufs
        cols = {c: b[self.written - r0 :].copy() for c, b in self._rows_buf.items()}
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self._write_files(bufs, r0, self.chunk)
            except BaseException as e:  # raised in the caller's thread by _finish_pending
                errors.append(e)

        thread = threading.Thread(target=run, name="vstore-chunk-io", daemon=True)
        thread.start()
        self._pending = (thread, errors, r0, r1, cols, bufs)
        if self._spare is None:
            self._bufs, self._stale = {s: aligned_zeros(b.shape, b.dtype) for s, b in bufs.items()}, 0
        else:
            self._bufs, self._stale = self._spare
            self._spare = None
        self._base, self._fill = r1, 0

    def _finish_pending(self) -> None:
        """Wait for the chunk being written in the background, then advance the counters to it."""
        if self._pending is None:
            return
        thread, errors, _r0, r1, cols, bufs = self._pending
        thread.join()
        self._pending = None
        if errors:
            self._failed = errors[0]
            raise errors[0]
        self._spare = (bufs, self.chunk)
        self._advance(r1, cols)

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise StoreError(f"{self.store.path}: part {self.part}: writing a chunk failed ({self._failed}); its rows "
                             f"are not kept: open the part again to resume from its {self.committed_examples} "
                             "committed example(s)") from self._failed

    def _advance(self, r1: int, cols: Mapping[str, np.ndarray]) -> None:
        """Rows up to ``r1`` are in their chunk files: grow the arrays and the row table, commit."""
        for arr in self.arrays.values():
            L, _, N = arr.shape
            if arr.shape[1] != r1:
                arr.resize((L, r1, N))
            self.bytes_written += (r1 - self.written) * L * N * arr.dtype.itemsize
        for col, rarr in self.rows.items():
            rarr.resize((r1,))
            rarr[self.written : r1] = cols[col]
        self.written = r1
        fault_point("before-commit")
        self._commit()

    def _commit(self) -> None:
        done = None
        payloads = []
        while self._boundaries and self._boundaries[0][0] <= self.written:
            done = self._boundaries.pop(0)
            payloads.append(done[2])
        if done is not None and done[1] != self.committed_examples:
            if self.on_commit is not None:  # the statistics of these examples first, then the counters
                self.on_commit(payloads, done[1])
            self.committed_examples = done[1]
            extra = {"pooled_rows": done[3]} if self.pooled else {}
            self.pooled_rows = done[3] if self.pooled else 0
            self.store.commit(self.part, done[1], done[0], overflow=self.overflow, **extra)


def _copy(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src``; with torch loaded (a build), on its threads: the rows of a batch are tens of
    MB, most into pages touched for the first time, and torch sits idle between batches."""
    torch = sys.modules.get("torch")
    if torch is None or dst.nbytes < 1 << 22 or dst.dtype != src.dtype or not dst.flags.writeable:
        dst[...] = src
        return
    try:
        d, s = torch.from_numpy(dst), torch.from_numpy(src)
    except (TypeError, ValueError):  # a dtype or layout torch does not take
        dst[...] = src
        return
    d.copy_(s)
