"""Reading a store for a statistics pass: tasks, the group of every row, and a prefetching reader.

A task is one chunk row range of one layer of one part, with the group of each of its rows. The
reader thread of :class:`Prefetch` asks the OS for the next chunks (``fadvise``) and reads a couple
of blocks ahead while the caller reduces the current one (the native kernels release the GIL).
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
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
                    block = self._reader(t.part).read(t.layer, t.r0, t.r1)
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
