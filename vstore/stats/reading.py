"""Reading a store for a statistics pass: tasks, the group of every row, and a prefetching reader.

A task is one chunk row range of one layer of one part, with the group of each of its rows. The
reader thread of :class:`Prefetch` asks the OS for the next chunks (``fadvise``) and reads a couple
of blocks ahead while the caller reduces the current one (the native kernels release the GIL).

Uncompressed local chunks are read with ``readv`` into a small ring of reused buffers and their
crc32c checked there: the checksum and then the kernel find the block in the cache the read just
filled, where a fresh memory map costs page-table work per block and makes the checksum and the
kernel each fetch the block from memory. A block handed out stays valid until the consumer takes
the next one (the ring holds ``depth + 3`` buffers: the queue, the one being reduced, the one being
read, and a spare).
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import StoreError
from ..store import ChunkReader, Store, crc32c

__all__ = ["Prefetch", "ReadCounter", "Task", "read_block_into", "read_counter", "row_groups", "tasks_for"]

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


def read_block_into(reader: ChunkReader, layer: int, r0: int, r1: int, buf: bytearray) -> np.ndarray:
    """Rows ``r0:r1`` of ``layer`` as :meth:`ChunkReader.read` gives them, read into ``buf`` (which must
    hold a chunk file) when the chunk is an uncompressed local file; a read-only view of ``buf``.

    Raises
    ------
    StoreError
        The chunk file is missing, truncated or padded, or fails its checksum (the messages of
        :meth:`ChunkReader.read`).
    """
    n = r1 - r0
    d = reader.direct
    if d is None or reader.chunk_bytes == 0 or r0 % reader.chunk_rows != 0 or not 0 < n <= reader.chunk_rows:
        return reader.read(layer, r0, r1)
    root, encode, crc = d
    path = root / encode((layer, r0 // reader.chunk_rows, 0))
    want = reader.chunk_bytes + (4 if crc else 0)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing chunk: its rows are committed but the file is gone "
                         "(run `vstore verify` on the store)") from None
    view = memoryview(buf)[:want]
    try:
        size = os.fstat(fd).st_size
        got = 0
        while size == want and got < want:
            k = os.readv(fd, [view[got:]])
            if k <= 0:
                break
            got += k
    finally:
        os.close(fd)
    if size != want or got != want:
        raise StoreError(f"{path}: truncated or padded chunk: {size} bytes, expected {want} "
                         "(the chunk is corrupt; run `vstore verify` on the store)")
    if crc and reader.verify:
        stored = int.from_bytes(view[reader.chunk_bytes : want], "little")
        if crc32c(view[: reader.chunk_bytes]) != stored:
            raise StoreError(f"{path}: checksum mismatch (the chunk is corrupt)")
    out = np.frombuffer(buf, dtype=reader.dtype, count=n * reader.n_neurons).reshape(n, reader.n_neurons)
    out.flags.writeable = False
    return out


class Prefetch:
    """Reads the tasks' blocks in a background thread, ``depth`` blocks ahead; iterate for ``(task, block)``.

    With ``skip_damaged``, a chunk that cannot be read (missing, truncated, bad checksum) comes as
    ``(task, None)`` instead of ending the pass.
    """

    def __init__(self, store: Store, tasks: Iterable[Task], *, depth: int = 2, verify: bool = True,
                 lookahead: int = 4, skip_damaged: bool = False) -> None:
        self.store = store
        self.skip_damaged = skip_damaged
        self.lookahead = lookahead
        self.tasks = tasks
        self.verify = verify
        self.readers: dict[str, ChunkReader] = {}
        self.q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.ring: list[bytearray] = [bytearray(0) for _ in range(depth + 3)]
        self.served = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vstore-stats-reader", daemon=True)

    def _reader(self, part: str) -> ChunkReader:
        if part not in self.readers:
            self.readers[part] = ChunkReader(self.store.acts(part), verify=self.verify)
        return self.readers[part]

    def _run(self) -> None:
        try:
            ahead: collections.deque[Task] = collections.deque()
            it = iter(self.tasks)
            exhausted = False
            while True:
                while not exhausted and len(ahead) < self.lookahead + 1:  # the disk reads ahead of us
                    nxt = next(it, None)
                    if nxt is None:
                        exhausted = True
                        break
                    self._reader(nxt.part).advise(nxt.layer, nxt.r0)
                    ahead.append(nxt)
                if not ahead:
                    break
                t = ahead.popleft()
                if self.stop.is_set():
                    return
                try:
                    block = self._read(t)
                except StoreError:
                    if not self.skip_damaged:
                        raise
                    block = None  # a damaged chunk, skipped: the consumer records it
                self.q.put((t, block))
                del block
        except BaseException as e:  # handed to the consumer
            self.q.put(e)
            return
        self.q.put(None)

    def _read(self, t: Task) -> np.ndarray:
        reader = self._reader(t.part)
        slot = self.served % len(self.ring)
        self.served += 1
        need = reader.chunk_bytes + 4
        if len(self.ring[slot]) < need:
            self.ring[slot] = bytearray(need)
        return read_block_into(reader, t.layer, t.r0, t.r1, self.ring[slot])

    def __iter__(self) -> Iterator[tuple[Task, np.ndarray]]:
        self.thread.start()
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item[1] is not None:
                    read_counter.add(item[1].nbytes)
                del item
        finally:
            self.stop.set()
            while self.thread.is_alive():  # unblock a reader waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    self.q.get(timeout=0.05)
            self.thread.join()
