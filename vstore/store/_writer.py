"""Appending rows to one part of a store, chunk by chunk, committed at example boundaries."""

from __future__ import annotations

import numpy as np

from .._faults import fault_point
from ._chunks import direct_chunk_layout, write_chunk_file
from ._store import Store

__all__ = ["PartWriter"]


class PartWriter:
    """Appends rows to one part, chunk by chunk, and commits at example boundaries.

    Rows arrive in example order and are copied once into a staging buffer the size of one chunk
    row-range of every layer. A full buffer is written as whole chunks (straight to the chunk
    files, checksum included, when the store is local and uncompressed; through zarr otherwise);
    :meth:`flush` also writes a partial one. After each write the part's counters advance to the
    last example whose rows are all written.
    """

    def __init__(self, store: Store, part: str) -> None:
        self.store = store
        self.part = part
        store.check_writable()
        info = store.part_info(part)
        self.acts = store.acts(part)
        self.rows = {c: store.array(f"parts/{part}/rows/{c}") for c in ("example", "position", "token")}
        self.chunk = int(self.acts.chunks[1])
        self.written = info.committed_rows
        self.committed_examples = info.committed_examples
        self.example_start = info.example_start
        self.overflow: dict[str, int] = dict(store.meta.get("overflow", {}))
        self._boundaries: list[tuple[int, int]] = []  # (row end, examples done) not yet committed
        self.bytes_written = 0
        self._direct = direct_chunk_layout(self.acts)
        # drop anything written after the last commit (a killed build)
        if self.acts.shape[1] != self.written:
            self.acts.resize((self.acts.shape[0], self.written, self.acts.shape[2]))
        for arr in self.rows.values():
            if arr.shape[0] != self.written:
                arr.resize((self.written,))
        L, _, N = self.acts.shape
        self._buf = np.zeros((L, self.chunk, N), dtype=self.acts.dtype)
        self._rows_buf = {c: np.full(self.chunk, -1, dtype=a.dtype) for c, a in self.rows.items()}
        self._base = self.written - self.written % self.chunk  # first row of the buffer
        self._fill = self.written - self._base  # rows in the buffer
        if self._fill:  # resuming inside a chunk: its committed rows are the start of the buffer
            self._buf[:, : self._fill] = self.acts[:, self._base : self.written]

    def add(self, acts: np.ndarray, example: np.ndarray, position: np.ndarray, token: np.ndarray, examples_done: int) -> None:
        """Queue rows (``acts`` shaped (layers, rows, neurons)); ``examples_done`` of the part are then complete.

        Every call must end at an example boundary: the rows of an example arrive in one call.
        """
        n, i = acts.shape[1], 0
        cols = {"example": example, "position": position, "token": token}
        while i < n:
            take = min(n - i, self.chunk - self._fill)
            self._buf[:, self._fill : self._fill + take] = acts[:, i : i + take]
            for c, v in cols.items():
                self._rows_buf[c][self._fill : self._fill + take] = v[i : i + take]
            self._fill += take
            i += take
            if self._fill == self.chunk:
                self._write()
        self._boundaries.append((self._base + self._fill, examples_done))

    def flush(self) -> None:
        """Write every queued row (a partial chunk too) and commit."""
        if self._base + self._fill > self.written:
            self._write()
        else:
            self._commit()

    def _write(self) -> None:
        r0, r1 = self._base, self._base + self._fill
        L, _, N = self.acts.shape
        if self._direct is not None:
            for layer in range(L):
                write_chunk_file(self._direct, (layer, r0 // self.chunk, 0), self._buf[layer])
                fault_point("after-layer")
            self.acts.resize((L, r1, N))
        else:
            self.acts.resize((L, r1, N))
            self.acts[:, r0:r1] = self._buf[:, : self._fill]
        for col, arr in self.rows.items():
            arr.resize((r1,))
            arr[self.written : r1] = self._rows_buf[col][self.written - r0 : self._fill]
        self.bytes_written += (r1 - self.written) * L * N * self._buf.itemsize
        self.written = r1
        fault_point("before-commit")
        if self._fill == self.chunk:  # start the next chunk
            self._base, self._fill = r1, 0
            self._buf[...] = 0
        self._commit()

    def _commit(self) -> None:
        done = None
        while self._boundaries and self._boundaries[0][0] <= self.written:
            done = self._boundaries.pop(0)
        if done is not None and done[1] != self.committed_examples:
            self.committed_examples = done[1]
            self.store.commit(self.part, done[1], done[0], overflow=self.overflow)
