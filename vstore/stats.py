"""Sufficient statistics per (group, layer, neuron), from one streaming pass over a store.

One pass reads every committed activation chunk once and reduces it, per group of rows, to

* ``count``  rows (int64, per layer: a row holding NaN/Inf in a layer is left out of that layer),
* ``sum`` and ``sumsq`` of the activations (float64),
* ``npos``   rows with activation > 0 (int64),
* ``nonfinite`` rows left out because they hold NaN or Inf (int64, per layer),

which is all that activation probabilities, means, variances, Cohen's d and Welch's t need. The
statistics are mergeable (:meth:`GroupStats.merge`), so parts, threads, processes and Dask workers
can each reduce a slice. They are cached in the store under ``stats/<key>/`` (plain Zarr arrays with
attributes), keyed by grouping, filter and committed rows, so a second scoring method on the same
grouping reads no activations; committing more rows changes the key and drops the stale entry.

Rows are grouped through their example: ``rows/example`` -> the example's label code. A grouping is
a label column (``by``), optionally filtered (``where``), optionally restricted to the two sides of
a contrast (``contrast``; groups are then ``<group>|<side>``), optionally restricted to a subset of
examples (``example_mask``, e.g. one half of a split).

Reading is pipelined: a reader thread fetches the next chunk while the current one is reduced (the
native kernels release the GIL). Uncompressed chunks on a local file system are memory-mapped straight
from their files (no copy out of the page cache; checksums verified); anything else goes through zarr.
With the C++ backend several workers each own a subset of the layers (see :func:`plan_workers`).

AUROC needs more than moments: :func:`compute_auroc` builds an order-preserving 65,536-bin histogram
per (group, neuron) over blocks of neurons (more passes, bounded memory) and turns it into the exact
Mann-Whitney AUROC, ties counted one half.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import StoreError, VstoreError
from .store import Store, direct_chunk_layout

__all__ = [
    "HIST_BINS",
    "STATS_VERSION",
    "AurocResult",
    "GroupStats",
    "Grouping",
    "ReadCounter",
    "clear_cache",
    "compute_auroc",
    "compute_split_stats",
    "compute_stats",
    "cpu_count",
    "item_stem",
    "make_grouping",
    "plan_workers",
    "read_counter",
    "reduce_slice",
    "split_halves",
    "targets",
]

STATS_VERSION = 1
HIST_BINS = 65536
_ATTR = "vstore_stats"
_SIDE_SEP = "|"
_ROW_SEGMENT = 1 << 16
_DEFAULT_HIST_BYTES = 256 << 20


# ---------------------------------------------------------------------------------------------------
# the statistics
# ---------------------------------------------------------------------------------------------------
@dataclass
class GroupStats:
    """Sufficient statistics per (layer, group, neuron) of one grouping of a store.

    Attributes
    ----------
    groups
        Group names (``G``). With a contrast, ``<base>|<side>`` for every base group and side.
    layers
        Model layer index of each layer position (``L``).
    key
        Cache key (grouping, filter, example subset and committed rows).
    count, nonfinite
        int64 (L, G): rows reduced / rows left out for NaN or Inf, per layer and group.
    sum, sumsq
        float64 (L, G, N): sum and sum of squares of the activations.
    npos
        int64 (L, G, N): rows with activation > 0.
    base, sides
        The base groups (label categories, or ``["all"]``) and the contrast sides (or None).
    spec
        The grouping as JSON (by, where, contrast, mask, committed).
    """

    groups: list[str]
    layers: list[int]
    key: str
    count: npt.NDArray[np.int64]
    sum: npt.NDArray[np.float64]
    sumsq: npt.NDArray[np.float64]
    npos: npt.NDArray[np.int64]
    nonfinite: npt.NDArray[np.int64]
    base: list[str] = field(default_factory=list)
    sides: list[str] | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False
    chunks_read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    @classmethod
    def zeros(cls, groups: Sequence[str], layers: Sequence[int], n_neurons: int, key: str = "") -> GroupStats:
        """Empty statistics (all counts and sums zero)."""
        L, G, N = len(layers), len(groups), int(n_neurons)
        return cls(
            list(groups), [int(x) for x in layers], key,
            np.zeros((L, G), np.int64), np.zeros((L, G, N), np.float64), np.zeros((L, G, N), np.float64),
            np.zeros((L, G, N), np.int64), np.zeros((L, G), np.int64), base=list(groups),
        )

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def n_neurons(self) -> int:
        return int(self.sum.shape[2])

    def mean(self) -> npt.NDArray[np.float64]:
        """Mean activation (L, G, N); NaN where a group has no rows."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.sum / self.count[:, :, None]

    def var(self, ddof: int = 1) -> npt.NDArray[np.float64]:
        """Variance (L, G, N) with ``ddof`` (1: unbiased); NaN where a group has <= ddof rows."""
        n = self.count[:, :, None].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ss = self.sumsq - self.sum * self.sum / n
            v = np.maximum(ss, 0.0) / (n - ddof)
        return np.where(n > ddof, v, np.nan)

    def prob(self) -> npt.NDArray[np.float64]:
        """Activation probability P(activation > 0) (L, G, N); 0 where a group has no rows."""
        n = self.count[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(n > 0, self.npos / np.maximum(n, 1), 0.0)

    def merge(self, other: GroupStats) -> None:
        """Add ``other`` (same groups, layers and neurons) into these statistics, in place."""
        if other.groups != self.groups or other.layers != self.layers or other.sum.shape != self.sum.shape:
            raise VstoreError(
                f"cannot merge statistics of groups {other.groups} / layers {other.layers} / shape "
                f"{other.sum.shape} into groups {self.groups} / layers {self.layers} / shape {self.sum.shape}"
            )
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.npos += other.npos
        self.nonfinite += other.nonfinite
        self.chunks_read += other.chunks_read
        self.bytes_read += other.bytes_read

    def take_groups(self, index: Sequence[int], names: Sequence[str] | None = None) -> GroupStats:
        """A copy holding only the groups at ``index`` (renamed to ``names`` if given)."""
        idx = np.asarray(index, dtype=np.int64)
        return GroupStats(
            list(names) if names is not None else [self.groups[i] for i in idx], list(self.layers), self.key,
            self.count[:, idx].copy(), self.sum[:, idx].copy(), self.sumsq[:, idx].copy(),
            self.npos[:, idx].copy(), self.nonfinite[:, idx].copy(), base=list(self.base), sides=self.sides,
            spec=dict(self.spec),
        )

    def rows_per_group(self) -> dict[str, int]:
        """Rows per group (the largest count over layers)."""
        return {g: int(self.count[:, i].max(initial=0)) for i, g in enumerate(self.groups)}

    def nonfinite_per_layer(self) -> dict[int, int]:
        """Rows left out for NaN/Inf, per model layer (only layers with any)."""
        return {lyr: int(n) for lyr, n in zip(self.layers, self.nonfinite.sum(axis=1), strict=True) if n}


def targets(base: Sequence[str], sides: Sequence[str] | None) -> list[tuple[str, list[int], list[int] | None]]:
    """What each contrastive score compares: (target name, positive groups, negative groups).

    Without sides, base group ``g`` is compared with the rest (negative ``None``); with a contrast,
    the target ``g`` compares ``g|side_a`` (positive) with ``g|side_b`` (negative).
    """
    if not sides:
        return [(b, [i], None) for i, b in enumerate(base)]
    S = len(sides)
    return [(b, [i * S], [i * S + 1]) for i, b in enumerate(base)]


# ---------------------------------------------------------------------------------------------------
# grouping
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grouping:
    """How the examples of a store fall into groups.

    ``codes`` holds, per example, its group index in ``[0, len(names))`` or -1 (not used).
    """

    by: str | None
    where: dict[str, list[str]]
    contrast: tuple[str, list[str]] | None
    base: list[str]
    sides: list[str] | None
    names: list[str]
    codes: npt.NDArray[np.int32]
    mask_digest: str | None

    def spec(self, store: Store) -> dict[str, Any]:
        """The grouping as JSON, with the store's committed rows (the cache identity)."""
        return {
            "version": STATS_VERSION,
            **self.grouping_spec(),
            "committed": store.committed_key,
            "n_examples": int(store.meta.get("n_examples", 0)),
        }

    def grouping_spec(self) -> dict[str, Any]:
        """The grouping alone (without the committed rows)."""
        return {
            "by": self.by,
            "where": {k: sorted(v) for k, v in sorted(self.where.items())},
            "contrast": [self.contrast[0], list(self.contrast[1])] if self.contrast else None,
            "mask": self.mask_digest,
        }

    def key(self, store: Store) -> str:
        """Cache key: a readable prefix and a digest of :meth:`spec`."""
        digest = hashlib.sha1(json.dumps(self.spec(store), sort_keys=True).encode()).hexdigest()[:16]
        prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", self.by or "all")
        return f"{prefix}-{digest}"


def _normalise_where(where: dict[str, Any] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in (where or {}).items():
        vals = [v] if isinstance(v, str) else list(v)
        out.setdefault(str(k), [])
        out[str(k)].extend(str(x) for x in vals if str(x) not in out[str(k)])
    return out


def make_grouping(
    store: Store,
    by: str | None,
    *,
    where: dict[str, list[str]] | None = None,
    contrast: tuple[str, list[str]] | None = None,
    example_mask: np.ndarray | None = None,
) -> Grouping:
    """Assign every example of ``store`` a group (or -1).

    Parameters
    ----------
    store
        The store.
    by
        Label column whose categories are the groups; None: one group named ``all``.
    where
        Keep only examples whose label ``column`` is one of the given values, for every column.
    contrast
        ``(column, [side_a, side_b])``: keep only examples on either side; groups become
        ``<group>|<side>``.
    example_mask
        Boolean per example: keep only these (the group list is decided before the mask, so
        complementary masks give the same groups).

    Returns
    -------
    Grouping

    Raises
    ------
    StoreError
        An unknown label column or value.
    """
    n = int(store.meta.get("n_examples", 0))
    where_n = _normalise_where(where)
    keep = np.ones(n, dtype=bool)
    for col, vals in where_n.items():
        codes, cats = store.labels(col)
        unknown = [v for v in vals if v not in cats]
        if unknown:
            raise StoreError(f"{store.path}: --where {col}: no value(s) {unknown}; values: {', '.join(cats)}")
        keep &= np.isin(codes[:n], [cats.index(v) for v in vals])
    sides: list[str] | None = None
    side_idx = np.zeros(n, dtype=np.int64)
    if contrast is not None:
        col, vals = contrast[0], [str(v) for v in contrast[1]]
        if len(vals) != 2 or vals[0] == vals[1]:
            raise VstoreError(f"--contrast {col}: expected two different values (e.g. {col}=a,b), got {vals}")
        codes, cats = store.labels(col)
        unknown = [v for v in vals if v not in cats]
        if unknown:
            raise StoreError(f"{store.path}: --contrast {col}: no value(s) {unknown}; values: {', '.join(cats)}")
        c = codes[:n]
        a, b = cats.index(vals[0]), cats.index(vals[1])
        keep &= (c == a) | (c == b)
        side_idx = np.where(c == b, 1, 0)
        sides = vals
        contrast = (col, vals)
    if by is None:
        base = ["all"]
        base_idx = np.zeros(n, dtype=np.int64)
    else:
        codes, cats = store.labels(by)
        c = codes[:n].astype(np.int64)
        keep &= c >= 0
        present = sorted(set(c[keep].tolist()))
        base = [cats[i] for i in present]
        remap = np.full(len(cats) + 1, -1, dtype=np.int64)
        remap[present] = np.arange(len(present))
        base_idx = remap[np.where(c >= 0, c, len(cats))]
    mask_digest = None
    if example_mask is not None:
        m = np.asarray(example_mask, dtype=bool)
        if m.shape != (n,):
            raise VstoreError(f"example_mask: expected shape ({n},) (one per example), got {m.shape}")
        keep &= m
        mask_digest = hashlib.sha1(np.packbits(m).tobytes() + str(n).encode()).hexdigest()[:16]
    S = len(sides) if sides else 1
    final = np.where(keep, base_idx * S + side_idx, -1).astype(np.int32)
    names = [f"{b}{_SIDE_SEP}{s}" for b in base for s in sides] if sides else list(base)
    return Grouping(by, where_n, contrast, base, sides, names, final, mask_digest)


# ---------------------------------------------------------------------------------------------------
# split halves
# ---------------------------------------------------------------------------------------------------
def item_stem(example_id: str, lang: str | None = None) -> str:
    """The item an example comes from: its id without ``:<polarity>`` and without ``-<lang>``.

    ``justice-a01-zh:aligned`` -> ``justice-a01``, so an item's polarities and its zh/en parallels
    share a stem.
    """
    stem = example_id.split(":", 1)[0]
    if lang:
        for sep in ("-", "_", "."):
            if stem.endswith(f"{sep}{lang}"):
                return stem[: -len(lang) - 1]
    return stem


def split_halves(store: Store, *, seed: int = 0, by: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two complementary example masks that split the items (by :func:`item_stem`) in half.

    Every example of an item lands in the same half. Items are shuffled with ``seed`` and dealt
    alternately within each group of ``by`` (the most common label of the item's examples), so each
    group is split as evenly as its items allow.
    """
    n = int(store.meta.get("n_examples", 0))
    ids = store.ids()[:n]
    langs: list[str | None] = [None] * n
    if "lang" in store.label_columns():
        codes, cats = store.labels("lang")
        langs = [cats[c] if c >= 0 else None for c in codes[:n]]
    stems = [item_stem(i, lg) for i, lg in zip(ids, langs, strict=True)]
    uniq = sorted(set(stems))
    stem_index = {s: i for i, s in enumerate(uniq)}
    ex_stem = np.array([stem_index[s] for s in stems], dtype=np.int64)
    if by is not None:
        codes, _ = store.labels(by)
        grp = np.full(len(uniq), -1, dtype=np.int64)
        for s in range(len(uniq)):
            c = codes[:n][ex_stem == s]
            c = c[c >= 0]
            if c.size:
                vals, cnt = np.unique(c, return_counts=True)
                grp[s] = vals[np.argmax(cnt)]
    else:
        grp = np.zeros(len(uniq), dtype=np.int64)
    rng = np.random.default_rng(seed)
    half = np.zeros(len(uniq), dtype=np.int64)
    for g in np.unique(grp):
        members = np.flatnonzero(grp == g)
        members = members[rng.permutation(members.size)]
        half[members[1::2]] = 1
    h = half[ex_stem]
    return h == 0, h == 1


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------
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


read_counter = ReadCounter()


class _ActsReader:
    """Reads row ranges of one layer of a part's ``acts``.

    Uncompressed chunks (``bytes`` codec, little endian, optionally ``crc32c``) on a local file system
    are memory-mapped straight from their files (``MAP_POPULATE``: one system call, no copy out of
    the page cache) and their checksum verified; anything else is read through zarr.
    """

    def __init__(self, store: Store, part: str, *, verify: bool = True) -> None:
        self.arr = store.acts(part)
        self.chunk_rows = int(self.arr.chunks[1])
        self.n_neurons = int(self.arr.shape[2])
        self.dtype = np.dtype(self.arr.dtype)
        self.verify = verify
        self.direct = self._direct_layout()
        self.chunk_bytes = self.chunk_rows * self.n_neurons * self.dtype.itemsize

    def _direct_layout(self) -> tuple[Path, Callable[[tuple[int, ...]], str], bool] | None:
        if self.arr.chunks != (1, self.chunk_rows, self.n_neurons):
            return None
        return direct_chunk_layout(self.arr)

    def read(self, layer: int, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of layer position ``layer`` (raw storage dtype, C order; may be read-only)."""
        n = r1 - r0
        if self.direct is not None and r0 % self.chunk_rows == 0 and n <= self.chunk_rows:
            block = self._read_direct(layer, r0 // self.chunk_rows, n)
            if block is not None:
                return block
        return np.ascontiguousarray(np.asarray(self.arr[layer, r0:r1]))

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

    def _read_direct(self, layer: int, chunk: int, n: int) -> np.ndarray | None:
        import mmap

        assert self.direct is not None
        root, encode, crc = self.direct
        path = root / encode((layer, chunk, 0))
        want = self.chunk_bytes + (4 if crc else 0)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # an unwritten chunk: zarr fills it in
        try:
            if os.fstat(fd).st_size != want:
                return None
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, want, flags=flags, prot=mmap.PROT_READ)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        if crc and self.verify:
            stored = int.from_bytes(mm[self.chunk_bytes : self.chunk_bytes + 4], "little")
            if _crc32c(memoryview(mm)[: self.chunk_bytes]) != stored:
                mm.close()
                raise StoreError(f"{path}: checksum mismatch (the chunk is corrupt)")
        # the array keeps the mapping alive; it is unmapped when the block is dropped
        return np.frombuffer(mm, dtype=self.dtype, count=n * self.n_neurons).reshape(n, self.n_neurons)


def _crc32c(data: memoryview) -> int:
    try:
        import crc32c

        return int(crc32c.crc32c(data))
    except ImportError:  # zarr's own dependency
        import google_crc32c

        return int(google_crc32c.value(bytes(data)))


@dataclass
class _Task:
    part: str
    layer: int
    r0: int
    r1: int
    groups: npt.NDArray[np.int32]


def _row_ranges(store: Store) -> list[tuple[str, int, int]]:
    """Every committed chunk row range of every part: (part, r0, r1)."""
    out: list[tuple[str, int, int]] = []
    for p in store.parts:
        step = int(store.acts(p.name).chunks[1])
        out.extend((p.name, r0, min(p.committed_rows, r0 + step)) for r0 in range(0, p.committed_rows, step))
    return out


def _row_groups(
    store: Store, codes: npt.NDArray[np.int32], ranges: Iterable[tuple[str, int, int]]
) -> Iterator[tuple[str, int, int, npt.NDArray[np.int32]]]:
    """Per row range, the group of each row (through ``rows/example``), read in segments."""
    seg: tuple[str, int, int, np.ndarray] | None = None
    n_ex = codes.shape[0]
    group: Any = store.group
    for part, r0, r1 in ranges:
        if seg is None or seg[0] != part or r0 < seg[1] or r1 > seg[2]:
            committed = next(p.committed_rows for p in store.parts if p.name == part)
            s0 = r0
            s1 = min(committed, max(r1, s0 + _ROW_SEGMENT))
            ex = np.asarray(group[f"parts/{part}/rows/example"][s0:s1])
            seg = (part, s0, s1, ex)
        ex = seg[3][r0 - seg[1] : r1 - seg[1]]
        if ex.size and (ex.min() < 0 or ex.max() >= n_ex):
            raise StoreError(f"{store.path}: part {part} rows {r0}:{r1} name examples outside 0..{n_ex - 1}")
        yield part, r0, r1, codes[ex].astype(np.int32, copy=False)


class _Prefetch:
    """Reads the tasks' blocks in a background thread, ``depth`` blocks ahead."""

    def __init__(self, store: Store, tasks: Iterable[_Task], *, depth: int = 2, verify: bool = True,
                 lookahead: int = 4) -> None:
        self.store = store
        self.lookahead = lookahead
        self.tasks = tasks
        self.verify = verify
        self.readers: dict[str, _ActsReader] = {}
        self.q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vstore-stats-reader", daemon=True)

    def _reader(self, part: str) -> _ActsReader:
        if part not in self.readers:
            self.readers[part] = _ActsReader(self.store, part, verify=self.verify)
        return self.readers[part]

    def _run(self) -> None:
        import collections

        try:
            ahead: collections.deque[_Task] = collections.deque()
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
                block = self._reader(t.part).read(t.layer, t.r0, t.r1)
                self.q.put((t, block))
                del block
        except BaseException as e:  # handed to the consumer
            self.q.put(e)
            return
        self.q.put(None)

    def __iter__(self) -> Iterator[tuple[_Task, np.ndarray]]:
        self.thread.start()
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                read_counter.add(item[1].nbytes)
                del item
        finally:
            self.stop.set()
            while self.thread.is_alive():  # unblock a reader waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    self.q.get(timeout=0.05)
            self.thread.join()


class _Bar:
    """A transient rich progress bar over bytes (no-op when disabled)."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.p = None
        if not enabled or os.environ.get("VSTORE_NO_PROGRESS") == "1":
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.p = Progress(TextColumn(f"[bold]{label}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          transient=True)
        self.task = self.p.add_task(label, total=total)
        self.p.start()

    def advance(self, n: int) -> None:
        if self.p is not None:
            self.p.advance(self.task, n)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()


def _tasks_for(
    store: Store, codes: npt.NDArray[np.int32], ranges: Sequence[tuple[str, int, int]], layers: Sequence[int]
) -> Iterator[_Task]:
    for part, r0, r1, groups in _row_groups(store, codes, ranges):
        if not (groups >= 0).any():
            continue  # no row of this range is in any group: skip the read
        for li in layers:
            yield _Task(part, li, r0, r1, groups)


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def plan_workers(n_layers: int, backend: str, threads: int | None) -> tuple[int, int]:
    """(reading workers, kernel threads per call) for a pass over ``n_layers`` layers.

    With the C++ backend, each worker owns the layers ``w, w + W, ...`` and reads and reduces their
    chunks in row order (its own reader thread prefetching), so every layer is summed in the same
    order as one sequential pass: results are bit-identical whatever the worker count. Numba's
    default threading layer must not be entered from several threads, and NumPy is the reference:
    both run one worker whose kernel uses ``threads`` (default: all cores but the reader's).
    """
    from . import kernels

    explicit = threads is not None and int(threads) > 0
    cores = max(1, int(threads)) if explicit else cpu_count()  # type: ignore[arg-type]
    if kernels.resolve_backend(backend) != "cpp" or n_layers <= 1:
        # one worker; by default its kernel leaves a core to the reader thread
        return 1, cores if explicit else max(1, cores - 1)
    workers = max(1, min(n_layers, cores))
    return workers, max(1, cores // workers)


def _reduce_moments(
    store: Store,
    codes: npt.NDArray[np.int32],
    n_groups: int,
    *,
    ranges: Sequence[tuple[str, int, int]] | None = None,
    backend: str = "auto",
    threads: int | None = None,
    progress: bool = False,
    verify: bool = True,
) -> tuple[dict[str, np.ndarray], int, int]:
    """One pass over ``ranges`` (default: the whole store): moments arrays, chunks and bytes read."""
    from concurrent.futures import ThreadPoolExecutor

    from . import kernels

    L, N = len(store.layers), store.n_neurons
    ranges = _row_ranges(store) if ranges is None else list(ranges)
    accs = [kernels.Moments.zeros(n_groups, N) for _ in range(L)]
    itemsize = np.dtype(store.acts(store.parts[0].name).dtype).itemsize if store.parts else 2
    bar = _Bar(sum(r1 - r0 for _, r0, r1 in ranges) * L * N * itemsize, "statistics", progress)
    workers, per_call = plan_workers(L, backend, threads)
    stop = threading.Event()
    done = [[0, 0] for _ in range(workers)]

    def work(w: int) -> None:
        try:
            tasks = _tasks_for(store, codes, ranges, range(w, L, workers))
            for t, block in _Prefetch(store, tasks, verify=verify):
                if stop.is_set():
                    return
                kernels.accumulate_moments(block, t.groups, accs[t.layer], dtype=store.dtype, backend=backend,
                                           threads=per_call)
                done[w][0] += 1
                done[w][1] += block.nbytes
                bar.advance(block.nbytes)
        except BaseException:
            stop.set()
            raise

    try:
        if workers == 1:
            work(0)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="vstore-stats") as pool:
                for fut in [pool.submit(work, w) for w in range(workers)]:
                    fut.result()
    finally:
        bar.close()
    chunks, nbytes = sum(d[0] for d in done), sum(d[1] for d in done)
    if L == 0:
        shapes = {"count": (0, n_groups), "nonfinite": (0, n_groups)}
        return ({k: np.zeros(shapes.get(k, (0, n_groups, N)), np.float64 if k in ("sum", "sumsq") else np.int64)
                 for k in ("count", "sum", "sumsq", "npos", "nonfinite")}, 0, 0)
    arrays = {k: np.stack([getattr(a, k) for a in accs]) for k in ("count", "sum", "sumsq", "npos", "nonfinite")}
    return arrays, chunks, nbytes


# ---------------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------------
def _stats_dir(store: Store) -> Path:
    return store.path / "stats"


def _read_cached(store: Store, key: str, spec: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    root: Any = store.group
    try:
        if "stats" not in root or key not in set(root["stats"].group_keys()):
            return None
        g: Any = root[f"stats/{key}"]
        attrs = dict(g.attrs.get(_ATTR, {}))
        if not attrs.get("complete") or attrs.get("spec") != json.loads(json.dumps(spec)):
            return None
        return {name: np.asarray(g[name][...]) for name in g.array_keys()}, attrs
    except (KeyError, OSError, ValueError):
        return None


def _write_cache(store_path: Path, key: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> bool:
    """Write ``stats/<key>`` atomically (a temporary group, then rename); drop stale entries of the
    same grouping. Returns False (and writes nothing) when the store cannot be written."""
    import zarr

    tmp: Path | None = None
    try:
        st = Store(store_path, mode="r+")
        stats = st.group.require_group("stats")
        base = _stats_dir(st)
        tmp_name = f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = base / tmp_name
        g: Any = stats.create_group(tmp_name)
        for name, arr in arrays.items():
            a = np.ascontiguousarray(arr)
            z = g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=tuple(max(1, d) for d in a.shape),
                               fill_value=0)
            if a.size:
                z[...] = a
        g.attrs.update({_ATTR: {**attrs, "complete": True, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}})
        final = base / key
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        tmp = None
        spec: Any = attrs.get("spec", {})
        for other in list(base.iterdir()):
            if not other.is_dir() or other.name == key:
                continue
            if other.name.startswith(".tmp-"):
                if _stale_tmp(other):
                    shutil.rmtree(other, ignore_errors=True)
                continue
            try:
                oattrs: Any = zarr.open_group(str(other), mode="r").attrs.get(_ATTR, {})
            except Exception:
                continue
            ospec = oattrs.get("spec", {})
            same_grouping = all(ospec.get(k) == spec.get(k) for k in ("by", "where", "contrast", "mask"))
            if same_grouping and oattrs.get("kind") == attrs.get("kind") and ospec.get("committed") != spec.get("committed"):
                shutil.rmtree(other, ignore_errors=True)
        return True
    except OSError:  # a read-only store or disk: rank without caching
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _stale_tmp(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime > 24 * 3600
    except OSError:
        return False


def clear_cache(store_path: str | Path) -> int:
    """Delete every cached statistic of a store; returns how many entries were removed."""
    st = Store(store_path, mode="r+")
    n = len(st.stats_keys())
    if "stats" in st.group:
        del st.group["stats"]
    d = _stats_dir(st)
    if d.exists():
        shutil.rmtree(d, ignore_errors=True)
    return n


def _open(store: Store | str | Path) -> Store:
    return store if isinstance(store, Store) else Store(store, mode="r")


# ---------------------------------------------------------------------------------------------------
# the public passes
# ---------------------------------------------------------------------------------------------------
def _stats_from(arrays: dict[str, np.ndarray], grouping: Grouping, store: Store, key: str, spec: dict[str, Any]) -> GroupStats:
    return GroupStats(
        list(grouping.names), store.layers, key, arrays["count"], arrays["sum"], arrays["sumsq"], arrays["npos"],
        arrays["nonfinite"], base=list(grouping.base), sides=list(grouping.sides) if grouping.sides else None,
        spec=spec,
    )


def _cache_attrs(grouping: Grouping, spec: dict[str, Any], kind: str, store: Store) -> dict[str, Any]:
    return {"kind": kind, "spec": spec, "groups": grouping.names, "base": grouping.base, "sides": grouping.sides,
            "layers": store.layers}


def compute_stats(
    store: Store | str | Path,
    by: str | None,
    *,
    where: dict[str, list[str]] | None = None,
    contrast: tuple[str, list[str]] | None = None,
    example_mask: np.ndarray | None = None,
    backend: str = "auto",
    use_cache: bool = True,
    progress: bool = False,
    threads: int | None = None,
    verify: bool = True,
    dask: str | None = None,
) -> GroupStats:
    """Sufficient statistics of a grouping of a store, from its cache or from one pass.

    Parameters
    ----------
    store
        The store (or its path).
    by
        Label column whose categories are the groups; None: one group named ``all``.
    where
        ``{column: [values]}``: keep only examples with one of the values, for every column.
    contrast
        ``(column, [side_a, side_b])``: keep only those examples; groups become ``<group>|<side>``.
    example_mask
        Boolean per example: keep only these examples.
    backend
        ``auto`` (the C++ extension when built), ``cpp``, ``numba`` or ``numpy``.
    use_cache
        Read the cache when it holds this grouping, and write it after a pass.
    progress
        Show a progress bar.
    threads
        Kernel threads (default: all cores).
    verify
        Check the crc32c checksum of every chunk read from its file (zarr checks the others).
    dask
        ``ADDRESS`` of a Dask scheduler or ``local:N`` (a local cluster of N worker processes):
        reduce chunk ranges on the cluster and merge the partial statistics.

    Returns
    -------
    GroupStats
    """
    st = _open(store)
    grouping = make_grouping(st, by, where=where, contrast=contrast, example_mask=example_mask)
    spec = grouping.spec(st)
    key = grouping.key(st)
    if use_cache:
        hit = _read_cached(st, key, spec)
        if hit is not None and hit[1].get("kind") == "moments":
            out = _stats_from(hit[0], grouping, st, key, spec)
            out.from_cache = True
            return out
    t0 = time.perf_counter()
    if dask:
        arrays, chunks, nbytes = _reduce_on_dask(dask, st, grouping.codes, len(grouping.names), backend=backend,
                                                 threads=threads)
    else:
        arrays, chunks, nbytes = _reduce_moments(st, grouping.codes, len(grouping.names), backend=backend,
                                                 threads=threads, progress=progress, verify=verify)
    out = _stats_from(arrays, grouping, st, key, spec)
    out.chunks_read, out.bytes_read, out.seconds = chunks, nbytes, time.perf_counter() - t0
    if use_cache:
        _write_cache(st.path, key, arrays, _cache_attrs(grouping, spec, "moments", st))
    return out


def compute_split_stats(
    store: Store | str | Path,
    by: str | None,
    *,
    where: dict[str, list[str]] | None = None,
    contrast: tuple[str, list[str]] | None = None,
    seed: int = 0,
    backend: str = "auto",
    use_cache: bool = True,
    progress: bool = False,
    threads: int | None = None,
    verify: bool = True,
) -> tuple[GroupStats, GroupStats]:
    """Statistics of the two halves of :func:`split_halves`, in one pass (each half cached).

    The statistics of all the data are ``a.merge(b)`` of the two (on a copy).
    """
    st = _open(store)
    masks = split_halves(st, seed=seed, by=by)
    halves = [make_grouping(st, by, where=where, contrast=contrast, example_mask=m) for m in masks]
    specs = [h.spec(st) for h in halves]
    keys = [h.key(st) for h in halves]
    if use_cache:
        hits = [_read_cached(st, k, s) for k, s in zip(keys, specs, strict=True)]
        if all(h is not None and h[1].get("kind") == "moments" for h in hits):
            res = tuple(_stats_from(h[0], g, st, k, s)  # type: ignore[index]
                        for h, g, k, s in zip(hits, halves, keys, specs, strict=True))
            for r in res:
                r.from_cache = True
            return res[0], res[1]
    G = len(halves[0].names)
    both = np.where(halves[0].codes >= 0, halves[0].codes * 2, np.where(halves[1].codes >= 0, halves[1].codes * 2 + 1, -1))
    t0 = time.perf_counter()
    arrays, chunks, nbytes = _reduce_moments(st, both.astype(np.int32), 2 * G, backend=backend, threads=threads,
                                             progress=progress, verify=verify)
    out = []
    for h, (grouping, key, spec) in enumerate(zip(halves, keys, specs, strict=True)):
        part = {k: np.ascontiguousarray(v[:, h::2]) for k, v in arrays.items()}
        s = _stats_from(part, grouping, st, key, spec)
        s.chunks_read, s.bytes_read, s.seconds = chunks, nbytes, time.perf_counter() - t0
        if use_cache:
            _write_cache(st.path, key, part, _cache_attrs(grouping, spec, "moments", st))
        out.append(s)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------
# Dask
# ---------------------------------------------------------------------------------------------------
def reduce_slice(
    store_path: str, codes: np.ndarray, n_groups: int, ranges: list[tuple[str, int, int]], backend: str = "auto",
    threads: int | None = None,
) -> tuple[dict[str, np.ndarray], int, int]:
    """Moments of some chunk row ranges of a store (what one Dask task computes)."""
    st = Store(store_path, mode="r")
    return _reduce_moments(st, np.asarray(codes, dtype=np.int32), n_groups, ranges=ranges, backend=backend,
                           threads=threads)


def _reduce_on_dask(
    address: str, store: Store, codes: np.ndarray, n_groups: int, *, backend: str = "auto",
    threads: int | None = None, tasks_per_worker: int = 4,
) -> tuple[dict[str, np.ndarray], int, int]:
    """Map chunk row ranges over a Dask cluster and merge the partial moments.

    ``address`` is a scheduler address (``tcp://host:8786``) or ``local:N`` (a LocalCluster of N
    worker processes, one thread each, closed afterwards). Workers open the store by its path, so it
    must be reachable from them under the same path.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:  # pragma: no cover - optional dependency
        raise VstoreError("--dask needs dask.distributed (pip install 'dask[distributed]')") from e
    cluster = None
    if address.startswith("local:"):
        try:
            n = int(address.split(":", 1)[1])
        except ValueError:
            raise VstoreError(f"--dask: expected local:N (N workers), got {address!r}") from None
        if n < 1:
            raise VstoreError(f"--dask: expected local:N with N >= 1, got {address!r}")
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    else:
        client = Client(address)
    try:
        ranges = _row_ranges(store)
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        n_tasks = max(1, min(len(ranges), n_workers * tasks_per_worker))
        batches = [list(b) for b in np.array_split(np.arange(len(ranges)), n_tasks) if len(b)]
        codes_f = client.scatter(np.asarray(codes, dtype=np.int32), broadcast=True)
        futures = [client.submit(reduce_slice, str(store.path.resolve()), codes_f, n_groups,
                                 [ranges[i] for i in b], backend, threads, pure=False) for b in batches]
        total: dict[str, np.ndarray] | None = None
        chunks = nbytes = 0
        for fut in futures:  # merged in range order: the result does not depend on finishing order
            arrays, c, nb = fut.result()
            chunks += c
            nbytes += nb
            if total is None:
                total = {k: v.copy() for k, v in arrays.items()}
            else:
                for k in total:
                    total[k] += arrays[k]
        assert total is not None
        return total, chunks, nbytes
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ---------------------------------------------------------------------------------------------------
# AUROC from histograms
# ---------------------------------------------------------------------------------------------------
@dataclass
class AurocResult:
    """Mann-Whitney AUROC per (layer, target, neuron) and its error bound.

    ``error`` is 0 where the AUROC is exact (float16/bfloat16 stores: one bin per bit pattern). For
    float32 stores values are binned at float16 precision; pairs that share a bin count one half,
    so the true AUROC lies within ``auroc +- error``.
    """

    targets: list[str]
    layers: list[int]
    auroc: npt.NDArray[np.float64]
    error: npt.NDArray[np.float64]
    key: str
    exact: bool
    from_cache: bool = False
    passes: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    rows: dict[str, int] = field(default_factory=dict)


def auroc_from_histograms(
    hist: np.ndarray, pairs: Sequence[tuple[list[int], list[int] | None]]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """AUROC (and the half-weight of within-bin pairs) of each pair from order-preserving histograms.

    Parameters
    ----------
    hist
        (G, M, B) counts per group, neuron and bin (bins in value order).
    pairs
        Per target: positive groups and negative groups (None: every other group).

    Returns
    -------
    auroc, tie_weight
        (T, M) each: P(pos > neg) + P(pos == neg) / 2, and P(same bin) / 2 (NaN without rows).
    """
    _G, M, _ = hist.shape
    T = len(pairs)
    auc = np.full((T, M), np.nan)
    ties = np.full((T, M), np.nan)
    step = max(1, (1 << 22) // hist.shape[2])  # neurons per slice: bounded temporaries
    for m0 in range(0, M, step):
        used = np.flatnonzero(hist[:, m0 : m0 + step].any(axis=(0, 1)))  # empty bins change nothing
        h = hist[:, m0 : m0 + step][:, :, used].astype(np.int64)
        total = h.sum(axis=0)
        for t, (pos, neg) in enumerate(pairs):
            hp = h[pos].sum(axis=0)
            hn = total - hp if neg is None else h[neg].sum(axis=0)
            n1, n0 = hp.sum(axis=1), hn.sum(axis=1)
            d = n1.astype(np.float64) * n0
            if float(d.max(initial=0)) < 2.0**61:  # 2U and the tie count are exact int64 sums
                below = np.cumsum(hn, axis=1) - hn
                u2 = (hp * (2 * below + hn)).sum(axis=1)
                tie = (hp * hn).sum(axis=1)
            else:  # beyond int64: float64 (relative error ~1e-16)
                hpf, hnf = hp.astype(np.float64), hn.astype(np.float64)
                below = np.cumsum(hnf, axis=1) - hnf
                u2 = (hpf * (2 * below + hnf)).sum(axis=1)
                tie = (hpf * hnf).sum(axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                # one correctly rounded division of exact integers: the nearest float64 to the AUROC
                auc[t, m0 : m0 + step] = np.where(d > 0, u2 / (2.0 * d), np.nan)
                ties[t, m0 : m0 + step] = np.where(d > 0, tie / (2.0 * d), np.nan)
    return auc, ties


def compute_auroc(
    store: Store | str | Path,
    by: str | None,
    *,
    where: dict[str, list[str]] | None = None,
    contrast: tuple[str, list[str]] | None = None,
    example_mask: np.ndarray | None = None,
    backend: str = "auto",
    use_cache: bool = True,
    progress: bool = False,
    threads: int | None = None,
    verify: bool = True,
    memory: int = _DEFAULT_HIST_BYTES,
) -> AurocResult:
    """Exact Mann-Whitney AUROC of every target (group vs rest, or the two sides of a contrast).

    Each pass histograms a block of neurons of one layer (``memory`` bytes of uint32 counts at most:
    ``groups x neurons x 65,536 x 4``), so a layer takes ``ceil(N / block)`` passes over its chunks.
    float16/bfloat16 values have one bin per bit pattern, so the AUROC is exact, ties included;
    float32 values are binned at float16 precision and the result reports its error bound.
    """
    from . import kernels

    st = _open(store)
    grouping = make_grouping(st, by, where=where, contrast=contrast, example_mask=example_mask)
    spec = grouping.spec(st)
    key = grouping.key(st) + ".auroc"
    tg = targets(grouping.base, grouping.sides)
    names = [t[0] for t in tg]
    exact = st.dtype in ("float16", "bfloat16")
    if use_cache:
        hit = _read_cached(st, key, spec)
        if hit is not None and hit[1].get("kind") == "auroc":
            rows = {t: int(hit[0]["rows"][i]) for i, t in enumerate(names)} if "rows" in hit[0] else {}
            return AurocResult(names, st.layers, hit[0]["auroc"], hit[0]["error"], key, exact, from_cache=True,
                               rows=rows)
    L, N, G = len(st.layers), st.n_neurons, len(grouping.names)
    block = max(1, min(N, int(memory) // max(1, G * HIST_BINS * 4)))
    auc = np.full((L, len(tg), N), np.nan)
    err = np.zeros((L, len(tg), N))
    ranges = _row_ranges(st)
    total = sum(r1 - r0 for _, r0, r1 in ranges) * N * np.dtype(st.acts(st.parts[0].name).dtype).itemsize \
        if st.parts else 0
    passes = chunks = nbytes = 0
    target_rows = np.zeros(len(tg), dtype=np.int64)
    _, per_call = plan_workers(1, backend, threads)
    bar = _Bar(total * L * ((N + block - 1) // block), "auroc", progress)
    pairs = [(p, n) for _, p, n in tg]
    try:
        hist = np.zeros((G, block, HIST_BINS), dtype=np.uint32)
        for li in range(L):
            for n0 in range(0, N, block):
                m = min(block, N - n0)
                h = hist[:, :m] if m == block else np.zeros((G, m, HIST_BINS), dtype=np.uint32)
                h[...] = 0
                passes += 1
                for t, blk in _Prefetch(st, _tasks_for(st, grouping.codes, ranges, [li]), verify=verify):
                    kernels.accumulate_histogram(blk, t.groups, h, dtype=st.dtype, neuron_start=n0,
                                                 backend=backend, threads=per_call)
                    chunks += 1
                    nbytes += blk.nbytes
                    bar.advance(blk.nbytes)
                a, w = auroc_from_histograms(h, pairs)
                auc[li, :, n0 : n0 + m] = a
                if li == 0 and n0 == 0:  # rows per target (layer 0, its NaN rows left out)
                    per_group = h[:, 0].sum(axis=-1, dtype=np.int64)
                    target_rows = np.array([per_group[p].sum() + (per_group[n].sum() if n else 0)
                                            for _, p, n in tg], dtype=np.int64)
                if not exact:
                    err[li, :, n0 : n0 + m] = w
    finally:
        bar.close()
    if use_cache:
        _write_cache(st.path, key, {"auroc": auc, "error": err, "rows": target_rows},
                     _cache_attrs(grouping, spec, "auroc", st))
    return AurocResult(names, st.layers, auc, err, key, exact, passes=passes, chunks_read=chunks, bytes_read=nbytes,
                       rows={t: int(target_rows[i]) for i, t in enumerate(names)})
