"""Reading a store for a statistics pass: tasks, the group of every row, and a reader that reads ahead.

A task is one chunk row range of one layer of one part, with the group of each of its rows.
:class:`Prefetch` hands out each task's block. Uncompressed chunk files on a local file system are
memory-mapped and checked (:meth:`ChunkReader.read`) in the consumer's own thread when the page
cache holds them (a map costs no copy); a helper thread ahead of the consumer reads the chunks that
are not cached from the disk itself (``O_DIRECT``, :meth:`ChunkReader.read_ahead`), or, where that is
refused, asks the OS to read them (``fadvise``, which blocks while the device queue is full, so it is
kept out of the consumer's way): the device stays busy while the caller reduces. Other chunks (compressed,
remote) are read through zarr by a background thread a couple of blocks ahead (the native kernels
release the GIL).
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import StoreError
from ..store import ChunkReader, Store

__all__ = ["Prefetch", "ReadCounter", "Task", "read_counter", "row_groups", "tasks_for"]

_ROW_SEGMENT = 1 << 16  # rows of rows/example read at once


@dataclass
class ReadCounter:
    """Activation chunks and bytes read by this process (for tests and reports)."""

    chunks: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.chunks += 1
            self.bytes += nbytes


#: Every chunk a :class:`Prefetch` hands out is counted here.
read_counter = ReadCounter()


@dataclass
class Task:
    """One block to read and reduce: rows ``r0:r1`` of layer position ``layer`` of ``part``."""

    part: str
    layer: int
    r0: int
    r1: int
    groups: npt.NDArray[np.int32]


def row_groups(
    store: Store, codes: npt.NDArray[np.int32], ranges: Iterable[tuple[str, int, int]]
) -> Iterator[tuple[str, int, int, npt.NDArray[np.int32]]]:
    """Per row range, the group of each row (through ``rows/example``), read in segments."""
    seg: tuple[str, int, int, np.ndarray] | None = None
    n_ex = codes.shape[0]
    committed = {p.name: p.committed_rows for p in store.parts}
    for part, r0, r1 in ranges:
        if seg is None or seg[0] != part or r0 < seg[1] or r1 > seg[2]:
            s1 = min(committed[part], max(r1, r0 + _ROW_SEGMENT))
            ex = np.asarray(store.array(f"parts/{part}/rows/example")[r0:s1])
            seg = (part, r0, s1, ex)
        ex = seg[3][r0 - seg[1] : r1 - seg[1]]
        if ex.size and (ex.min() < 0 or ex.max() >= n_ex):
            raise StoreError(f"{store.path}: part {part} rows {r0}:{r1} name examples outside 0..{n_ex - 1}")
        yield part, r0, r1, codes[ex].astype(np.int32, copy=False)


def tasks_for(
    store: Store, codes: npt.NDArray[np.int32], ranges: Sequence[tuple[str, int, int]], layers: Iterable[int]
) -> Iterator[Task]:
    """The tasks of ``layers`` over ``ranges``, row range by row range; ranges without a used row are skipped."""
    layers = list(layers)
    for part, r0, r1, groups in row_groups(store, codes, ranges):
        if not (groups >= 0).any():
            continue
        for li in layers:
            yield Task(part, li, r0, r1, groups)


class Prefetch:
    """Reads the tasks' blocks ahead of the consumer; iterate for ``(task, block)``.

    Local uncompressed chunks are mapped in the consumer's thread, or read by a helper thread at most
    ``lookahead`` chunks (and ``ahead_bytes``) ahead of it when they are not cached; other chunks by a
    background thread ``depth`` blocks ahead. A
    block is read-only and stays valid as long as the consumer holds it. With ``skip_damaged``, a chunk that cannot be read
    (missing, truncated, bad checksum) comes as ``(task, None)`` instead of ending the pass.
    """

    def __init__(self, store: Store, tasks: Iterable[Task], *, depth: int = 2, verify: bool = True,
                 lookahead: int = 16, ahead_bytes: int = 64 << 20, skip_damaged: bool = False) -> None:
        self.store = store
        self.skip_damaged = skip_damaged
        self.lookahead = lookahead
        self.ahead_bytes = ahead_bytes
        self.depth = depth
        self.tasks = tasks
        self.verify = verify
        self.readers: dict[str, ChunkReader] = {}

    def _reader(self, part: str) -> ChunkReader:
        if part not in self.readers:
            reader = ChunkReader(self.store.acts(part), verify=self.verify)
            reader.keep_read_buffers(self._ahead(reader) + 2)  # those read ahead, the consumer's, one being read
            self.readers[part] = reader
        return self.readers[part]

    def _ahead(self, reader: ChunkReader) -> int:
        """Chunks the helper thread may be ahead of the consumer."""
        return max(1, min(self.lookahead, self.ahead_bytes // max(1, reader.chunk_bytes)))

    def _read(self, t: Task, ahead: np.ndarray | None = None) -> np.ndarray | None:
        try:
            return self._reader(t.part).read(t.layer, t.r0, t.r1, ahead)
        except StoreError:
            if not self.skip_damaged:
                raise
            return None  # a damaged chunk, skipped: the consumer records it

    def __iter__(self) -> Iterator[tuple[Task, np.ndarray | None]]:
        it = iter(self.tasks)
        first = next(it, None)
        if first is None:
            return
        tasks = itertools.chain([first], it)
        blocks = self._local(tasks) if self._reader(first.part).direct is not None else self._threaded(tasks)
        for t, block in blocks:
            if block is not None:
                read_counter.add(block.nbytes)
            yield t, block

    def _local(self, tasks: Iterator[Task]) -> Iterator[tuple[Task, np.ndarray | None]]:
        # A helper thread walks the tasks ahead of the consumer: a chunk not in the page cache it reads
        # itself (O_DIRECT, ChunkReader.read_ahead), any other it asks the OS for (fadvise blocks while
        # the device queue is full) and the consumer maps it. It stays at most `lookahead` chunks, and
        # `ahead_bytes` of chunks, ahead of the consumer, which checks the chunks the helper read.
        q: queue.Queue[Any] = queue.Queue()
        first = next(tasks)
        room = threading.Semaphore(self._ahead(self._reader(first.part)))
        stop = threading.Event()

        def ahead() -> None:
            for t in itertools.chain([first], tasks):
                while not room.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                try:
                    raw = self._reader(t.part).read_ahead(t.layer, t.r0, t.r1)
                except StoreError:
                    raw = None  # the consumer's own read raises it (or skips the chunk)
                q.put((t, raw))

        thread = _background("vstore-stats-advise", ahead, q)
        try:
            for t, raw in _items(q):
                block = self._read(t, raw)  # the checksum is checked here, beside the helper's next read
                del raw
                room.release()
                yield t, block
                del block
        finally:
            stop.set()
            thread.join()

    def _threaded(self, tasks: Iterator[Task]) -> Iterator[tuple[Task, np.ndarray | None]]:
        q: queue.Queue[Any] = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def read() -> None:
            for t in tasks:
                if stop.is_set():
                    return
                q.put((t, self._read(t)))

        thread = _background("vstore-stats-reader", read, q)
        try:
            for item in _items(q):
                yield item
                del item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a reader waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    q.get(timeout=0.05)
            thread.join()


def _background(name: str, produce: Callable[[], None], q: queue.Queue[Any]) -> threading.Thread:
    """Runs ``produce`` (which puts items on ``q``) in a daemon thread, then puts the end marker
    ``None`` on ``q``, or the exception ``produce`` raised (handed to the consumer)."""

    def run() -> None:
        try:
            produce()
        except BaseException as e:
            q.put(e)
            return
        q.put(None)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def _items(q: queue.Queue[Any]) -> Iterator[Any]:
    """The items a :func:`_background` producer puts on ``q``, until its end; raises its exception."""
    while True:
        item = q.get()
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
