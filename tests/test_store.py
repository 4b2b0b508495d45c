"""The store layer (``vstore.store``): what a build writes is what a reader gets, even after a kill.

* property tests (hypothesis) of :class:`~vstore.store.PartWriter`: random shapes, dtypes, chunk
  sizes, example lengths, batch groupings and flushes; read back with plain zarr;
* fault injection: a writer dropped mid-feed, garbage beyond the committed rows, resumed from the
  committed counters, ends bitwise identical to an uninterrupted run; crashed ``add_examples``;
* label columns (late columns, append-only categories, missing = -1);
* the golden store ``tests/golden/store-v1`` (written once by ``tools/make_golden_store.py``),
  decoded on every run so an old store keeps opening;
* refusals: not a store, plain zarr group, future format version, writes through read-only stores.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from vstore.errors import StoreError, StoreExistsError, StoreNotFoundError, VstoreError
from vstore.store import FORMAT_VERSION, STORAGE_DTYPES, PartInfo, PartWriter, Store, is_store

GOLDEN = Path(__file__).parent / "golden" / "store-v1"
DTYPES = ("float16", "float32", "bfloat16")
BITS = {"float16": np.uint16, "float32": np.uint32, "bfloat16": np.uint16}
PROPERTY = settings(deadline=None, max_examples=30)

# hypothesis imports this (-> libcst -> mypy_extensions, a DeprecationWarning) only while it reports a
# failing example, where filterwarnings=error turns the report into an INTERNALERROR; import it now.
with warnings.catch_warnings(), suppress(ImportError):  # without libcst hypothesis skips it too
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401


# -- helpers -------------------------------------------------------------------------------------


@contextmanager
def _tmpdir() -> Iterator[Path]:
    # hypothesis runs many examples per test function: a fresh folder each (not tmp_path)
    with tempfile.TemporaryDirectory(prefix="vstore-test-store-") as d:
        yield Path(d)


def _meta(n_layers: int, n_neurons: int, dtype: str, chunk_rows: int, compressor: str = "none") -> dict[str, Any]:
    return {
        "model": {
            "name": "tiny", "source": "local:tiny", "sha256": "0" * 64, "architecture": "llama",
            "n_layers": n_layers + 1, "n_neurons": n_neurons,
        },
        "site": "act", "layers": list(range(n_layers)), "dtype": dtype, "storage_dtype": STORAGE_DTYPES[dtype],
        "pooling": "token", "compressor": compressor, "chunk_rows": chunk_rows,
    }


def _disk_meta(path: Path) -> dict[str, Any]:
    """The ``vstore`` attributes as they are on disk right now."""
    return json.loads((path / "zarr.json").read_text())["attributes"]["vstore"]


def _bits(a: np.ndarray) -> np.ndarray:
    """An array's raw bit patterns (so NaN payloads and -0.0 compare exactly)."""
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _assert_bitwise(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.array_equal(_bits(got), _bits(want)), f"{what}: contents differ"


@dataclass
class Feed:
    """A random build: shapes, per-example rows, batch groupings and flushes, and the data."""

    n_layers: int
    n_neurons: int
    chunk_rows: int
    dtype: str
    compressor: str
    rows: list[int]  # rows of each example of the part
    batches: list[tuple[int, int]]  # consecutive part-relative example ranges [a, b), may be empty
    flushes: list[bool]  # flush after each batch
    seed: int
    prior_part: bool = False  # write a complete part 0000 first (so the fed part starts later)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        storage = np.dtype(STORAGE_DTYPES[self.dtype])
        bits = BITS[self.dtype]
        self.acts: list[np.ndarray] = []
        self.position: list[np.ndarray] = []
        self.token: list[np.ndarray] = []
        for r in self.rows:
            raw = rng.integers(0, np.iinfo(bits).max, size=(self.n_layers, r, self.n_neurons), dtype=bits,
                               endpoint=True)
            self.acts.append(raw.view(storage))  # any bit pattern, NaN and -0.0 included
            self.position.append((np.arange(r) + int(rng.integers(0, 3))).astype(np.int32))
            self.token.append(rng.integers(0, 50_000, size=r).astype(np.int32))
        self.cum = np.concatenate([[0], np.cumsum(self.rows, dtype=np.int64)]).astype(int)

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def example_start(self) -> int:
        return 2 if self.prior_part else 0

    @property
    def part(self) -> str:
        return "0001" if self.prior_part else "0000"

    def batch(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What a build hands PartWriter.add for examples [a, b) of the part."""
        empty = np.zeros((self.n_layers, 0, self.n_neurons), dtype=STORAGE_DTYPES[self.dtype])
        acts = np.concatenate([empty, *self.acts[a:b]], axis=1)
        example = np.concatenate(
            [np.zeros(0, np.int64)] + [np.full(self.rows[i], self.example_start + i, np.int64) for i in range(a, b)]
        )
        position = np.concatenate([np.zeros(0, np.int32), *self.position[a:b]])
        token = np.concatenate([np.zeros(0, np.int32), *self.token[a:b]])
        return acts, example, position, token

    def expected(self, upto: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The concatenation of the first ``upto`` examples (all by default)."""
        return self.batch(0, self.n if upto is None else upto)


@st.composite
def feeds(draw: st.DrawFn) -> Feed:
    rows = draw(st.lists(st.integers(0, 5), max_size=12))
    cuts = sorted(draw(st.lists(st.integers(0, len(rows)), max_size=8)))
    edges = [0, *cuts, len(rows)]
    batches = list(itertools.pairwise(edges))
    return Feed(
        n_layers=draw(st.integers(1, 3)),
        n_neurons=draw(st.integers(1, 9)),
        chunk_rows=draw(st.integers(1, 7)),
        dtype=draw(st.sampled_from(DTYPES)),
        compressor=draw(st.sampled_from(["none", "none", "zstd-1"])),
        rows=rows,
        batches=batches,
        flushes=draw(st.lists(st.booleans(), min_size=len(batches), max_size=len(batches))),
        seed=draw(st.integers(0, 2**32 - 1)),
        prior_part=draw(st.booleans()),
    )


def _create(path: Path, feed: Feed) -> None:
    """A store with the examples of ``feed`` and its (empty, building) part."""
    store = Store.create(path, _meta(feed.n_layers, feed.n_neurons, feed.dtype, feed.chunk_rows, feed.compressor))
    if feed.prior_part:  # a complete part 0000 of 2 one-row examples
        start = store.add_examples(["p0", "p1"], ["prior 0", "prior 1"], [{"value": "a"}, {}])
        part = store.start_part(2, start, {}, compressor=feed.compressor)
        w = PartWriter(store, part)
        ones = np.ones((feed.n_layers, 2, feed.n_neurons), dtype=STORAGE_DTYPES[feed.dtype])
        w.add(ones, np.arange(2, dtype=np.int64), np.zeros(2, np.int32), np.zeros(2, np.int32), 2)
        w.flush()
        store.finish_part(part)
    ids = [f"ex{i}" for i in range(feed.n)]
    start = store.add_examples(ids, [f"text {i}" for i in range(feed.n)], [{"value": f"v{i % 3}"} for i in range(feed.n)])
    assert start == feed.example_start
    assert store.start_part(feed.n, start, {}, compressor=feed.compressor) == feed.part


def _check_committed(path: Path, feed: Feed) -> dict[str, Any]:
    """The invariant readers rely on: committed counters sit at an example boundary."""
    info = _disk_meta(path)["parts"][-1]
    k = info["committed_examples"]
    assert 0 <= k <= feed.n
    assert info["committed_rows"] == feed.cum[k], (
        f"committed_rows {info['committed_rows']} is not the end of example {k} ({feed.cum[k]})"
    )
    return info


def _run(path: Path, feed: Feed, crashes: Sequence[tuple[int, str]] = (), seed: int = 0) -> None:
    """Feed the part, crashing after ``steps`` batches with ``corruption`` for each (steps, corruption).

    After each crash the store is reopened, a new PartWriter trims to the committed counters, and
    the feed restarts with the batch that holds the first uncommitted example (its committed
    examples skipped), as ``vstore build`` does.
    """
    rng = np.random.default_rng(seed)
    for attempt in [*crashes, None]:
        store = Store(path, "r+")
        store.trim_examples()
        _spy_commits(store, path, feed)
        writer = PartWriter(store, feed.part)
        k = writer.committed_examples
        assert writer.written == feed.cum[k]
        acts_arr = zarr.open_array(str(path / f"parts/{feed.part}/acts"), mode="r")
        assert acts_arr.shape[1] == feed.cum[k], "PartWriter did not trim acts to the committed rows"
        todo = [(max(a, k), b, fl) for (a, b), fl in zip(feed.batches, feed.flushes, strict=True) if b > k]
        steps = len(todo) if attempt is None else attempt[0]
        flushed = k
        for a, b, fl in todo[:steps]:
            before = writer.written
            writer.add(*feed.batch(a, b), examples_done=b)
            # writes end on chunk boundaries (whole chunks, except the one a flush/resume starts in)
            assert writer.written == before or writer.written % feed.chunk_rows == 0
            if fl:
                writer.flush()
                flushed = b
            info = _check_committed(path, feed)
            assert info["committed_examples"] >= flushed, "flush did not commit every example fed"
            assert info["committed_examples"] <= b
        if attempt is None:
            writer.flush()
            assert _check_committed(path, feed)["committed_examples"] == feed.n
            store.commit(feed.part, feed.n, writer.written)
            store.finish_part(feed.part)
            return
        # the kill: the writer and its queued rows are gone; maybe the disk holds more
        del writer, store
        _corrupt(path, feed, attempt[1], rng)
        _check_reader_sees_committed(path, feed)


def _spy_commits(store: Store, path: Path, feed: Feed) -> None:
    """Check every commit the writer makes: its rows are on disk first, and it ends an example."""
    commit = store.commit

    def checked(part: str, examples: int, rows: int, **kw: Any) -> None:
        assert part == feed.part
        assert rows == feed.cum[examples], f"commit of {examples} examples with {rows} rows (not {feed.cum[examples]})"
        want = dict(zip(("acts", "rows/example", "rows/position", "rows/token"), feed.expected(examples), strict=True))
        for key, value in want.items():
            arr = store.group[f"parts/{part}/{key}"]
            got = arr[:, :rows] if key == "acts" else arr[:rows]
            _assert_bitwise(got, value, f"{key} on disk before its commit")
        commit(part, examples, rows, **kw)
        _check_committed(path, feed)

    store.commit = checked  # type: ignore[method-assign]


def _corrupt(path: Path, feed: Feed, how: str, rng: np.random.Generator) -> None:
    """What a killed process may leave beyond the committed rows."""
    if how == "drop":
        return
    committed = _disk_meta(path)["parts"][-1]["committed_rows"]
    g = zarr.open_group(str(path), mode="r+")
    acts = g[f"parts/{feed.part}/acts"]
    L, n_now, N = acts.shape
    new = max(n_now, committed) + int(rng.integers(1, 2 * feed.chunk_rows + 2))
    acts.resize((L, new, N))  # zarr saves the new shape first ...
    cols = {c: g[f"parts/{feed.part}/rows/{c}"] for c in ("example", "position", "token")}
    for arr in cols.values():
        arr.resize((new,))
    if how == "garbage":  # ... then the data: any bits, over everything past the committed rows
        bits = BITS[feed.dtype]
        junk = rng.integers(0, np.iinfo(bits).max, size=(L, new - committed, N), dtype=bits, endpoint=True)
        acts[:, committed:new] = junk.view(STORAGE_DTYPES[feed.dtype])
        for arr in cols.values():
            arr[committed:new] = rng.integers(-5, 1000, size=new - committed).astype(arr.dtype)


def _check_reader_sees_committed(path: Path, feed: Feed) -> None:
    """A reader opened on a killed build sees exactly the committed prefix, whatever lies beyond."""
    store = Store(path, "r")
    info = next(p for p in store.parts if p.name == feed.part)
    acts, example, position, token = feed.expected(info.committed_examples)
    for col, want in (("example", example), ("position", position), ("token", token)):
        _assert_bitwise(store.rows(feed.part, col), want, f"rows/{col} after a kill")
    for layer in range(feed.n_layers):
        blocks = [b for _, _, b in store.iter_blocks(layer, part=feed.part)]
        got = np.concatenate(blocks, axis=0) if blocks else acts[layer, :0]
        _assert_bitwise(got, acts[layer], f"iter_blocks layer {layer} after a kill")


def _read_plain(path: Path, part: str) -> dict[str, Any]:
    """A part read with plain zarr-python, as docs/store-format.md shows (no vstore)."""
    g = zarr.open_group(str(path), mode="r")
    meta = g.attrs["vstore"]
    info = next(p for p in meta["parts"] if p["name"] == part)
    n = info["committed_rows"]
    out: dict[str, Any] = {"info": info, "acts": g[f"parts/{part}/acts"][:, :n], "acts_full": g[f"parts/{part}/acts"][...]}
    for col in ("example", "position", "token"):
        out[col] = g[f"parts/{part}/rows/{col}"][:n]
        out[f"{col}_full"] = g[f"parts/{part}/rows/{col}"][...]
    out["ids"] = [str(x) for x in g["examples/id"][: meta["n_examples"]]]
    return out


def _check_final(path: Path, feed: Feed) -> dict[str, Any]:
    got = _read_plain(path, feed.part)
    acts, example, position, token = feed.expected()
    assert got["info"]["committed_examples"] == feed.n
    assert got["info"]["committed_rows"] == sum(feed.rows)
    assert got["info"]["state"] == "complete"
    _assert_bitwise(got["acts"], acts, "acts")
    _assert_bitwise(got["example"], example, "rows/example")
    _assert_bitwise(got["position"], position, "rows/position")
    _assert_bitwise(got["token"], token, "rows/token")
    # nothing beyond the committed rows once the part is complete
    assert got["acts_full"].shape[1] == sum(feed.rows)
    assert got["example_full"].shape == (sum(feed.rows),)
    assert got["ids"][feed.example_start :] == [f"ex{i}" for i in range(feed.n)]
    return got


# -- 1. property: what goes in comes out ----------------------------------------------------------------


@PROPERTY
@given(feed=feeds())
def test_part_writer_round_trip(feed: Feed) -> None:
    with _tmpdir() as d:
        path = d / "store"
        _create(path, feed)
        _run(path, feed)
        _check_final(path, feed)
        store = Store(path, "r")
        assert store.state == "complete"
        assert store.n_examples == feed.n + (2 if feed.prior_part else 0)
        assert store.committed_key.endswith(f"{feed.part}:{sum(feed.rows)}")
        acts = feed.expected()[0]
        assert store.acts(feed.part).attrs["logical_dtype"] == feed.dtype
        assert store.acts(feed.part).chunks == (1, feed.chunk_rows, feed.n_neurons)
        for layer in range(feed.n_layers):  # iter_blocks: one chunk at a time, in order
            starts = []
            blocks = []
            for _, r0, block in store.iter_blocks(layer, part=feed.part):
                starts.append(r0)
                blocks.append(block)
                assert 0 < block.shape[0] <= feed.chunk_rows
            assert starts == list(range(0, sum(feed.rows), feed.chunk_rows))
            got = np.concatenate(blocks) if blocks else acts[layer, :0]
            _assert_bitwise(got, acts[layer], f"iter_blocks layer {layer}")


def test_a_partial_chunk_after_a_full_one_is_padded_with_zeros() -> None:
    """The writer reuses its chunk buffer: rows past a partial chunk's last row are zeros on disk, not
    the previous chunk's rows, however many times the partial chunk is flushed."""
    from vstore.store import chunk_file

    with _tmpdir() as d:
        store = Store.create(d / "s", _meta(2, 3, "float16", 4))
        start = store.add_examples([f"e{i}" for i in range(7)], [f"t{i}" for i in range(7)], [{}] * 7)
        part = store.start_part(7, start, {}, compressor="none")
        w = PartWriter(store, part)
        rows = np.arange(2 * 7 * 3, dtype=np.float16).reshape(2, 7, 3) + 1  # no zeros
        for a, b in ((0, 4), (4, 6), (6, 7)):  # a full chunk, then a partial one flushed twice
            w.add(rows[:, a:b], np.arange(a, b, dtype=np.int64), np.zeros(b - a, np.int32),
                  np.zeros(b - a, np.int32), b)
            w.flush()
        arr = store.acts(part)
        for layer in range(2):
            f = chunk_file(arr, (layer, 1, 0))
            assert f is not None
            raw = np.frombuffer(f.read_bytes()[:-4], dtype=np.float16).reshape(4, 3)
            assert np.array_equal(raw[:3], rows[layer, 4:7]) and not raw[3].any()


def test_a_store_whose_creation_fails_leaves_nothing_behind(monkeypatch) -> None:
    """A full disk while the store's metadata is written leaves no half-made folder at the path (which a
    rerun would refuse as "not a vstore store") and no temporary beside it; the next create succeeds."""
    import errno

    import zarr.core.attributes

    real = zarr.core.attributes.Attributes.update

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with _tmpdir() as d:
        (d / ".s.creating-999999999").mkdir()  # left by a process that died
        monkeypatch.setattr(zarr.core.attributes.Attributes, "update", full)
        with pytest.raises(OSError, match="No space left"):
            Store.create(d / "s", _meta(2, 3, "float16", 4))
        assert not (d / "s").exists()
        assert not list(d.glob(".s.creating-*"))
        monkeypatch.setattr(zarr.core.attributes.Attributes, "update", real)
        (d / "s").mkdir()  # an empty folder is taken
        store = Store.create(d / "s", _meta(2, 3, "float16", 4))
        assert is_store(d / "s") and store.meta["state"] == "building"
        assert not list(d.glob(".s.creating-*"))


def test_background_chunk_writes_give_the_files_of_the_caller_thread() -> None:
    """Full chunks written from a thread (two buffers in turn) give the same files and row table as
    writes in the caller's thread, a partial chunk after two full ones included (its buffer then holds
    the rows of the chunk before last: they must be zeros on disk)."""
    from vstore.store import chunk_file

    n = 11
    rows = np.arange(2 * n * 3, dtype=np.float16).reshape(2, n, 3) + 1  # no zeros
    files = {}
    for background in (False, True):
        with _tmpdir() as d:
            store = Store.create(d / "s", _meta(2, 3, "float16", 4))
            start = store.add_examples([f"e{i}" for i in range(n)], [f"t{i}" for i in range(n)], [{}] * n)
            part = store.start_part(n, start, {}, compressor="none")
            w = PartWriter(store, part, background=background)
            for a, b in ((0, 3), (3, 5), (5, 9), (9, 10), (10, 11)):
                w.add(rows[:, a:b], np.arange(a, b, dtype=np.int64), np.zeros(b - a, np.int32),
                      np.full(b - a, 7, np.int32), b)
                if b in (5, 10):
                    w.flush()
            w.flush()
            assert w.written == n and w.committed_examples == n
            arr = store.acts(part)
            assert np.array_equal(np.asarray(arr[:]), rows)
            files[background] = [chunk_file(arr, (lyr, c, 0)).read_bytes() for lyr in range(2) for c in range(3)]
            example = np.asarray(store.array(f"parts/{part}/rows/example")[:])
            assert np.array_equal(example, np.arange(n))
    assert files[True] == files[False]


def test_partial_chunks_go_through_the_page_cache_and_full_ones_direct(monkeypatch) -> None:
    """The caller waits for a partial chunk's files: they are written through the page cache
    (``direct=False``); full chunks keep ``O_DIRECT`` in either thread. The files read back the same."""
    import vstore.store._writer as wmod

    real = wmod.write_chunk_file
    calls: list[tuple[int, bool]] = []

    def spy(layout, coords, block, *, direct=True, filled=None):
        calls.append((coords[1], direct))
        real(layout, coords, block, direct=direct, filled=filled)

    monkeypatch.setattr(wmod, "write_chunk_file", spy)
    rows = np.arange(2 * 6 * 3, dtype=np.float16).reshape(2, 6, 3) + 1
    for background in (False, True):
        calls.clear()
        with _tmpdir() as d:
            store = Store.create(d / "s", _meta(2, 3, "float16", 4))
            start = store.add_examples([f"e{i}" for i in range(6)], [f"t{i}" for i in range(6)], [{}] * 6)
            part = store.start_part(6, start, {}, compressor="none")
            w = PartWriter(store, part, background=background)
            w.add(rows, np.arange(6, dtype=np.int64), np.zeros(6, np.int32), np.zeros(6, np.int32), 6)
            w.flush()
            assert np.array_equal(np.asarray(store.acts(part)[:]), rows)
        assert sorted(calls) == [(0, True), (0, True), (1, False), (1, False)], background


def test_chunk_file_direct_false_never_tries_o_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vstore.store import _chunks

    block = _chunks.aligned_zeros((4, 2048), np.float16)
    block[:] = 1.5
    monkeypatch.setattr(_chunks, "_write_direct", lambda *a: pytest.fail("O_DIRECT tried"))
    layout = (tmp_path, lambda c: "/".join(map(str, c)), True)
    _chunks.write_chunk_file(layout, (0, 0, 0), block, direct=False)
    assert (tmp_path / "0" / "0" / "0").read_bytes() == _expected(block)


@pytest.mark.parametrize("crc", [True, False])
def test_chunk_file_filled_leaves_the_zero_tail_a_hole(tmp_path: Path, crc: bool) -> None:
    """``filled`` writes only the block's first bytes: the file has the full size and reads back the
    whole block (zeros after ``filled``), with the checksum of the whole block; where the file system
    keeps holes, the zero tail takes no disk blocks."""
    from vstore.store import _chunks

    block = np.zeros((64, 2048), np.float16)
    block[:5] = 2.5
    filled = 5 * 2048 * 2
    layout = (tmp_path, lambda c: "/".join(map(str, c)), crc)
    _chunks.write_chunk_file(layout, (0, 0, 0), block, direct=False, filled=filled)
    f = tmp_path / "0" / "0" / "0"
    want = _expected(block) if crc else block.tobytes()
    assert f.read_bytes() == want
    probe = tmp_path / "probe"
    with open(probe, "wb") as fh:
        fh.seek(1 << 20)
        fh.write(b"x")
    if probe.stat().st_blocks * 512 < 1 << 19:  # this file system keeps holes
        assert f.stat().st_blocks * 512 < block.nbytes // 2
    # `filled` past the end writes the whole block
    _chunks.write_chunk_file(layout, (0, 0, 1), block, direct=False, filled=10 * block.nbytes)
    assert (tmp_path / "0" / "0" / "1").read_bytes() == want


# ------------------------------------------------------------------------------------------------
# Reading chunks that are not in the page cache (ChunkReader.read_ahead: O_DIRECT, reused buffers).


def _reader_store(path: Path, dtype: str = "float16", chunk_rows: int = 64, n_neurons: int = 48) -> Store:
    import conftest_rank  # noqa: F401  (tools/ on the path)
    from make_synthetic_store import make_synthetic_store

    make_synthetic_store(path, n_layers=2, n_neurons=n_neurons, n_examples=40, rows_per_example=(3, 9), groups=3,
                         planted=2, effect=3.0, dtype=dtype, seed=3, chunk_rows=chunk_rows)
    return Store(path)


def _evict(path: Path) -> None:
    """Drop a store's chunk files from the page cache (they must be clean: synced first)."""
    import os

    for f in (path / "parts").rglob("*"):
        if f.is_file() and "/acts/c/" in f.as_posix():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_read_ahead_reads_an_uncached_chunk_as_read_does(tmp_path: Path, dtype: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from vstore.store import ChunkReader, _chunks

    st = _reader_store(tmp_path / "s", dtype)
    part = st.parts[0]
    reader = ChunkReader(st.acts(part.name))
    assert reader.direct is not None
    monkeypatch.setattr(_chunks, "_cached_fraction", lambda fd, n: 0.0)  # as if nothing were cached
    rows = part.committed_rows
    assert rows % 64, "the last chunk must be partial"
    for layer in range(2):
        for r0 in range(0, rows, 64):
            r1 = min(rows, r0 + 64)
            raw = reader.read_ahead(layer, r0, r1)
            if raw is None:
                pytest.skip("this file system refuses O_DIRECT reads")
            assert raw.dtype == np.uint8 and raw.nbytes == 64 * 48 * np.dtype(dtype).itemsize + 4  # bytes, checksum
            block = reader.read(layer, r0, r1, raw)  # checked and viewed, not read again
            assert np.shares_memory(block, raw)
            assert block.shape == (r1 - r0, 48) and block.dtype == np.dtype(dtype) and not block.flags.writeable
            _assert_bitwise(block, reader.read(layer, r0, r1), f"layer {layer} rows {r0}:{r1}")
    assert reader.read_ahead(0, 1, 64) is None  # rows off the chunk grid: read() reads them through zarr


def test_read_ahead_leaves_cached_chunks_to_read_and_obeys_buffered_reads(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from vstore.store import ChunkReader, _chunks

    st = _reader_store(tmp_path / "s")
    reader = ChunkReader(st.acts(st.parts[0].name))
    reader.read(0, 0, 64)  # now in the page cache
    assert reader.read_ahead(0, 0, 64) is None
    _evict(tmp_path / "s")
    path = reader.direct[0] / reader.direct[1]((0, 0, 0))
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        if _chunks._cached_fraction(fd, path.stat().st_size) != 0:
            pytest.skip("this file system keeps evicted files in memory")
    finally:
        os.close(fd)
    monkeypatch.setenv("VSTORE_BUFFERED_READS", "1")
    assert reader.read_ahead(0, 0, 64) is None  # and the OS was asked to read the chunk ahead
    monkeypatch.delenv("VSTORE_BUFFERED_READS")
    _evict(tmp_path / "s")
    raw = reader.read_ahead(0, 0, 64)
    if raw is None:
        pytest.skip("this file system refuses O_DIRECT reads")
    _assert_bitwise(reader.read(0, 0, 64, raw), np.asarray(st.acts(st.parts[0].name)[0, 0:64]), "rows 0:64")


@pytest.mark.parametrize(("cached", "direct", "advised"),
                         [(0.0, True, False), (0.4, True, False), (0.6, False, True), (1.0, False, False),
                          (None, False, True)])
def test_read_ahead_reads_what_is_mostly_uncached_and_advises_what_is_partly_cached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: float | None, direct: bool, advised: bool) -> None:
    import os

    from vstore.store import ChunkReader, _chunks

    st = _reader_store(tmp_path / "s")
    reader = ChunkReader(st.acts(st.parts[0].name))
    monkeypatch.setattr(_chunks, "_cached_fraction", lambda fd, n: cached)
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(_chunks.os, "posix_fadvise", lambda fd, o, n, a: (calls.append(a), real(fd, o, n, a)))
    raw = reader.read_ahead(0, 0, 64)
    if direct and raw is None:
        pytest.skip("this file system refuses O_DIRECT reads")
    assert (raw is not None) == direct
    assert bool(calls) == advised


def test_cached_pages_agree_between_cachestat_and_mincore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from vstore.store import _chunks

    f = tmp_path / "f"
    f.write_bytes(b"x" * (1 << 20))
    fd = os.open(f, os.O_RDONLY)
    try:
        os.read(fd, 1 << 20)
        got = _chunks._cached_pages(fd, 1 << 20)
        monkeypatch.setattr(_chunks, "_no_cachestat", [True])  # the fallback of kernels before 6.5
        assert _chunks._cached_pages(fd, 1 << 20) == got
        assert got is None or got == (1 << 20) // mmap_pagesize()
        assert _chunks._cached_fraction(fd, 0) is None
        assert _chunks._cached_fraction(fd, 1 << 20) in (None, 1.0)
    finally:
        os.close(fd)


def mmap_pagesize() -> int:
    import mmap

    return mmap.PAGESIZE


@pytest.mark.parametrize("how", ["checksum", "truncated", "missing"])
def test_read_ahead_raises_on_a_damaged_chunk(tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from vstore.store import ChunkReader, _chunks

    st = _reader_store(tmp_path / "s")
    reader = ChunkReader(st.acts(st.parts[0].name))
    monkeypatch.setattr(_chunks, "_cached_fraction", lambda fd, n: 0.0)
    path = reader.direct[0] / reader.direct[1]((1, 0, 0))
    data = bytearray(path.read_bytes())
    if how == "checksum":
        data[100] ^= 0x40
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(bytes(data[:-10]))
    else:
        path.unlink()
    with pytest.raises(StoreError, match={"checksum": "checksum mismatch", "truncated": "truncated",
                                          "missing": "missing chunk"}[how]):
        raw = reader.read_ahead(1, 0, 64)  # missing or truncated: raised here
        if raw is None:
            pytest.skip("this file system refuses O_DIRECT reads")
        reader.read(1, 0, 64, raw)  # the checksum: checked by the consumer


def test_read_ahead_falls_back_where_o_direct_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from vstore.store import ChunkReader, _chunks

    st = _reader_store(tmp_path / "s")
    reader = ChunkReader(st.acts(st.parts[0].name))
    monkeypatch.setattr(_chunks, "_cached_fraction", lambda fd, n: 0.0)
    monkeypatch.setattr(_chunks, "_no_direct_read", set())
    real_open = os.open
    tried = []

    def refusing(path, flags, *a):
        if flags & os.O_DIRECT:
            tried.append(path)
            raise OSError(errno.EINVAL, "no O_DIRECT here")
        return real_open(path, flags, *a)

    monkeypatch.setattr(_chunks.os, "open", refusing)
    assert reader.read_ahead(0, 0, 64) is None and len(tried) == 1
    assert reader.read_ahead(0, 64, 128) is None and len(tried) == 1  # the device is remembered
    monkeypatch.setattr(_chunks.os, "open", real_open)
    _assert_bitwise(reader.read(0, 0, 64), np.asarray(st.acts(st.parts[0].name)[0, 0:64]), "rows 0:64")


@pytest.mark.parametrize("nbytes", [8192, 8 << 20])
def test_read_buffers_are_reused_only_once_no_array_refers_to_them(nbytes: int) -> None:
    from vstore.store import _chunks

    pool = _chunks._ReadBuffers(keep=4)
    a = pool.get(nbytes)
    assert a.nbytes >= nbytes and a.ctypes.data % _chunks.DIRECT_ALIGN == 0
    held = a[:64].view(np.float16).reshape(4, 8)  # a consumer's view of a block
    del a
    b = pool.get(nbytes)
    assert b.ctypes.data != held.ctypes.data  # in use: a new buffer
    mv = memoryview(b)
    del b
    assert pool.get(nbytes).ctypes.data not in (held.ctypes.data, np.frombuffer(mv, np.uint8).ctypes.data)
    addr = held.ctypes.data
    del held
    assert pool.get(nbytes).ctypes.data == addr  # free again: reused
    del mv
    assert len(pool.bufs) == 3
    for _ in range(3):
        pool.get(1 << 23 + 1)  # bigger than any kept: new ones, and only `keep` are kept
    assert len(pool.bufs) == 4


def test_aligned_zeros_of_a_chunk_buffer_are_private_huge_page_aligned_zeros() -> None:
    from vstore.store import _chunks

    a = _chunks.aligned_zeros((3, 1 << 20), np.float16)
    assert a.shape == (3, 1 << 20) and a.flags.c_contiguous and a.flags.writeable and not a.any()
    assert a.ctypes.data % (2 << 20) == 0
    a[:] = 1.0  # private memory: writable, and not shared with anyone
    assert float(a.sum(dtype=np.float64)) == 3 << 20


def test_a_failed_background_chunk_write_is_raised_and_not_committed(monkeypatch) -> None:
    """An error met while a chunk is written in the background surfaces at the next write or flush, and
    the part's counters stay at the last chunk that was written."""
    import vstore.store._writer as wmod

    with _tmpdir() as d:
        store = Store.create(d / "s", _meta(2, 3, "float16", 4))
        start = store.add_examples([f"e{i}" for i in range(8)], [f"t{i}" for i in range(8)], [{}] * 8)
        part = store.start_part(8, start, {}, compressor="none")
        w = PartWriter(store, part)
        rows = np.ones((2, 8, 3), dtype=np.float16)
        w.add(rows[:, :4], np.arange(4, dtype=np.int64), np.zeros(4, np.int32), np.zeros(4, np.int32), 4)
        w.flush()
        assert w.written == 4

        def broken(*_a, **_k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(wmod, "write_chunk_file", broken)
        w.add(rows[:, 4:], np.arange(4, 8, dtype=np.int64), np.zeros(4, np.int32), np.zeros(4, np.int32), 8)
        with pytest.raises(OSError, match="No space left"):
            w.flush()
        assert w.written == 4 and store.part_info(part).committed_rows == 4
        with pytest.raises(StoreError, match="open the part again"):  # its rows are gone: no silent gap
            w.flush()


# -- 2. fault injection: killed builds resume to the same bits --------------------------------------------


@settings(deadline=None, max_examples=20)
@given(
    feed=feeds(),
    crashes=st.lists(st.tuples(st.integers(0, 8), st.sampled_from(["drop", "garbage", "resize"])), min_size=1,
                     max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_killed_build_resumes_bitwise_identical(feed: Feed, crashes: list[tuple[int, str]], seed: int) -> None:
    with _tmpdir() as d:
        ref, killed = d / "uninterrupted", d / "killed"
        _create(ref, feed)
        _run(ref, feed)
        _create(killed, feed)
        _run(killed, feed, crashes, seed)
        want, got = _check_final(ref, feed), _check_final(killed, feed)
        for key in ("acts_full", "example_full", "position_full", "token_full"):
            _assert_bitwise(got[key], want[key], key)
        assert _disk_meta(killed) == _disk_meta(ref)


def test_resume_after_kill_at_every_add() -> None:
    """Deterministic sweep: kill after each add in turn (garbage left), resume, compare."""
    feed = Feed(n_layers=2, n_neurons=3, chunk_rows=3, dtype="bfloat16", compressor="none",
                rows=[2, 0, 4, 1, 5, 3], batches=[(0, 2), (2, 3), (3, 5), (5, 6)],
                flushes=[False, True, False, False], seed=7)
    with _tmpdir() as d:
        _create(d / "ref", feed)
        _run(d / "ref", feed)
        want = _check_final(d / "ref", feed)
        for steps in range(len(feed.batches) + 1):
            path = d / f"killed-{steps}"
            _create(path, feed)
            _run(path, feed, [(steps, "garbage")], seed=steps)
            got = _check_final(path, feed)
            _assert_bitwise(got["acts_full"], want["acts_full"], f"acts, killed after {steps} adds")


def test_crash_between_add_examples_and_start_part_is_trimmed() -> None:
    with _tmpdir() as d:
        path = d / "store"
        store = Store.create(path, _meta(1, 2, "float16", 2))
        store.add_examples(["a", "b"], ["text a", "text b"], [{"value": "honesty"}, {"value": "justice"}])
        part = store.start_part(2, 0, {}, compressor="none")
        w = PartWriter(store, part)
        w.add(np.ones((1, 2, 2), np.float16), np.array([0, 1]), np.zeros(2, np.int32), np.zeros(2, np.int32), 2)
        w.flush()
        store.finish_part(part)
        # an --append that dies after add_examples, before start_part: new column, new category
        Store(path, "r+").add_examples(
            ["c", "d", "e"], ["text c", "text d", "text e"],
            [{"value": "patriotism", "split": "x"}, {"value": "honesty"}, {}],
        )
        g = zarr.open_group(str(path), mode="r")
        assert g["examples/id"].shape == (5,)  # the arrays did grow ...
        reader = Store(path, "r")  # ... but readers trust the counter
        assert reader.meta["n_examples"] == 2
        assert reader.ids() == ["a", "b"] and reader.texts() == ["text a", "text b"]
        codes, cats = reader.labels("value")
        assert codes.tolist() == [0, 1] and cats[:2] == ["honesty", "justice"]

        store = Store(path, "r+")
        store.trim_examples()
        g = zarr.open_group(str(path), mode="r")
        for key in g["examples"].array_keys():
            assert g[f"examples/{key}"].shape == (2,), f"examples/{key} not trimmed"
        assert [str(x) for x in g["examples/id"][:]] == ["a", "b"]
        for col in store.label_columns():  # codes stay valid, whatever the crashed call added
            codes, cats = store.labels(col)
            assert ((codes >= -1) & (codes < len(cats))).all()
        assert store.labels("value")[0].tolist() == [0, 1]

        # the retried append writes over the leftovers
        start = store.add_examples(["f"], ["text f"], [{"value": "justice", "lang": "en"}])
        assert start == 2
        store.start_part(1, start, {}, compressor="none")
        reader = Store(path, "r")
        assert reader.ids() == ["a", "b", "f"]
        codes, cats = reader.labels("value")
        assert [cats[c] for c in codes] == ["honesty", "justice", "justice"]
        assert reader.labels("lang")[0].tolist() == [-1, -1, 0]
        if "split" in reader.label_columns():  # only the crashed call had it
            assert reader.labels("split")[0].tolist() == [-1, -1, -1]


def test_crash_mid_add_examples_one_array_grown() -> None:
    """Killed after growing examples/id only (columns are written one after another)."""
    with _tmpdir() as d:
        path = d / "store"
        store = Store.create(path, _meta(1, 2, "float32", 4))
        store.add_examples(["a"], ["text a"], [{"lang": "en"}])
        store.start_part(1, 0, {}, compressor="none")
        g = zarr.open_group(str(path), mode="r+")
        g["examples/id"].resize((4,))
        g["examples/id"][1:4] = np.array(["junk1", "junk2", "junk3"], dtype=object).astype(str)
        store = Store(path, "r+")
        store.trim_examples()
        assert zarr.open_array(str(path / "examples/id"), mode="r").shape == (1,)
        start = store.add_examples(["b"], ["text b"], [{"lang": "zh"}])
        store.start_part(1, start, {}, compressor="none")
        assert Store(path, "r").ids() == ["a", "b"]


# -- 3. labels ------------------------------------------------------------------------------------------------


LABEL = st.dictionaries(st.sampled_from(["value", "lang", "split"]), st.sampled_from(["a", "b", "c", "zh", "中"]),
                        max_size=3)


@settings(deadline=None, max_examples=15)
@given(parts=st.lists(st.lists(LABEL, max_size=4), min_size=1, max_size=4))
def test_label_columns_property(parts: list[list[dict[str, str]]]) -> None:
    """Oracle: categories in order of first appearance; codes index them; -1 where missing."""
    with _tmpdir() as d:
        path = d / "store"
        store = Store.create(path, _meta(1, 1, "float16", 1))
        seen: list[dict[str, str]] = []
        before: dict[str, tuple[list[int], list[str]]] = {}
        for labels in parts:
            start = store.add_examples([f"id{len(seen) + i}" for i in range(len(labels))],
                                       [f"t{len(seen) + i}" for i in range(len(labels))], labels)
            assert start == len(seen)
            store.start_part(len(labels), start, {}, compressor="none")
            seen += labels
            columns = sorted({k for lab in seen for k in lab})
            reader = Store(path, "r")
            assert reader.label_columns() == columns
            for col in columns:
                cats: list[str] = []
                for lab in seen:
                    if col in lab and lab[col] not in cats:
                        cats.append(lab[col])
                want = [cats.index(lab[col]) if col in lab else -1 for lab in seen]
                codes, got_cats = reader.labels(col)
                assert codes.dtype == np.int32
                assert codes.tolist() == want and got_cats == cats
                if col in before:  # append-only: old codes and categories never move
                    old_codes, old_cats = before[col]
                    assert codes.tolist()[: len(old_codes)] == old_codes
                    assert got_cats[: len(old_cats)] == old_cats
                before[col] = (codes.tolist(), got_cats)
        g = zarr.open_group(str(path), mode="r")  # plain zarr agrees
        for col, (codes_list, cats) in before.items():
            assert g[f"examples/{col}"][: len(seen)].tolist() == codes_list
            assert list(g[f"examples/{col}"].attrs["categories"]) == cats


def test_labels_late_column_and_missing() -> None:
    with _tmpdir() as d:
        path = d / "store"
        store = Store.create(path, _meta(1, 1, "float16", 1))
        start = store.add_examples(["a", "b", "c"], ["ta", "tb", "tc"], [{"value": "honesty"}, {}, {"value": "justice"}])
        store.start_part(3, start, {}, compressor="none")
        start = store.add_examples(
            ["d", "e", "f"], ["td", "te", "tf"],
            [{"value": "justice", "lang": "zh"}, {"lang": "en"}, {"value": "patriotism", "lang": None}],  # type: ignore[dict-item]
        )
        store.start_part(3, start, {}, compressor="none")
        reader = Store(path, "r")
        assert reader.label_columns() == ["lang", "value"]
        codes, cats = reader.labels("value")
        assert codes.tolist() == [0, -1, 1, 1, -1, 2] and cats == ["honesty", "justice", "patriotism"]
        codes, cats = reader.labels("lang")
        assert codes.tolist() == [-1, -1, -1, 0, 1, -1] and cats == ["zh", "en"]
        with pytest.raises(StoreError, match=r"no label column 'split'.*lang, value"):
            reader.labels("split")


# -- 4. the golden store ----------------------------------------------------------------------------------------

GOLDEN_ACTS = np.array(
    [
        [[-1.5, -1.375, -1.25], [-1.125, -0.0, -0.875], [-0.75, -0.625, -0.5], [-0.375, -0.25, -0.125],
         [0.0, 0.125, 0.25]],
        [[0.375, 0.5, 0.625], [0.75, 0.875, 1.0], [1.125, 1.25, 1.375], [1.5, 1.625, 1.75], [1.875, 2.0, 65504.0]],
    ],
    dtype=np.float16,
)
GOLDEN_ROWS = {"example": [0, 0, 0, 1, 1], "position": [1, 2, 3, 1, 2], "token": [101, 102, 103, 201, 202]}


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def golden() -> Iterator[Path]:
    assert is_store(GOLDEN), f"{GOLDEN} missing: it is committed (written once by tools/make_golden_store.py)"
    digest = _tree_digest(GOLDEN)
    yield GOLDEN
    assert _tree_digest(GOLDEN) == digest, "reading the golden store changed its files"


def test_golden_store_opens_with_vstore(golden: Path) -> None:
    store = Store(golden, "r")
    assert store.state == "complete"
    assert store.layers == [0, 1] and store.n_neurons == 3 and store.dtype == "float16"
    assert store.parts == [PartInfo("0000", "complete", 0, 2, 2, 5)]
    assert store.n_examples == 2 and store.n_rows == 5
    assert store.committed_key == "0000:5"
    assert store.ids() == ["honesty-0-en:aligned", "justice-0-zh:violating"]
    assert store.texts() == ["Tom returned the wallet.", "小明拿走了钱包。"]
    assert store.label_columns() == ["lang", "value"]
    codes, cats = store.labels("value")
    assert codes.tolist() == [0, 1] and codes.dtype == np.int32 and cats == ["honesty", "justice"]
    codes, cats = store.labels("lang")
    assert codes.tolist() == [0, 1] and cats == ["en", "zh"]
    for col, want in GOLDEN_ROWS.items():
        got = store.rows("0000", col)
        assert got.tolist() == want
        assert got.dtype == (np.int64 if col == "example" else np.int32)
    for layer in (0, 1):
        blocks = list(store.iter_blocks(layer))
        assert [(p, r0, b.shape[0]) for p, r0, b in blocks] == [("0000", 0, 2), ("0000", 2, 2), ("0000", 4, 1)]
        _assert_bitwise(np.concatenate([b for _, _, b in blocks]), GOLDEN_ACTS[layer], f"layer {layer}")
    info = store.info()
    assert info["rows"] == 5 and info["examples"] == 2 and info["activation_bytes"] == 5 * 2 * 3 * 2
    assert info["label_columns"] == {"lang": ["en", "zh"], "value": ["honesty", "justice"]}
    assert info["stats_cache"] == [] and info["overflow"] == {}


def test_golden_store_reads_with_plain_zarr(golden: Path) -> None:
    """Every field docs/store-format.md names, read the way it tells a user to read them."""
    g = zarr.open_group(str(golden), mode="r")
    meta = g.attrs["vstore"]
    assert meta["format_version"] == 1
    assert set(meta["model"]) == {"name", "source", "sha256", "architecture", "n_layers", "n_neurons"}
    assert meta["model"]["n_layers"] == 2 and meta["model"]["n_neurons"] == 3
    assert meta["site"] == "act" and meta["layers"] == [0, 1]
    assert meta["dtype"] == "float16" and meta["storage_dtype"] == "float16"
    assert meta["pooling"] == "token" and meta["compressor"] == "none" and meta["chunk_rows"] == 2
    assert set(meta["versions"]) == {"vstore", "torch", "transformers", "zarr", "numpy", "python"}
    assert meta["state"] == "complete" and meta["n_examples"] == 2
    (part,) = meta["parts"]
    assert {k: part[k] for k in ("name", "state", "example_start", "n_examples", "committed_examples",
                                  "committed_rows")} == {
        "name": "0000", "state": "complete", "example_start": 0, "n_examples": 2, "committed_examples": 2,
        "committed_rows": 5,
    }
    assert set(part["dataset"]) == {"paths", "sha256", "examples", "split", "texts", "labels", "limit"}
    assert set(part["build"]) == {"batch_size", "max_length", "device", "pool"}

    # the snippet of docs/store-format.md, "Reading without vstore"
    n = part["committed_rows"]
    acts = g[f"parts/{part['name']}/acts"][:, :n]
    ex = g[f"parts/{part['name']}/rows/example"][:n]
    value = g["examples/value"]
    names = value.attrs["categories"]
    row_value = np.asarray(names)[value[:][ex]]
    assert row_value.tolist() == ["honesty"] * 3 + ["justice"] * 2
    _assert_bitwise(acts, GOLDEN_ACTS, "acts")

    arr = g["parts/0000/acts"]
    assert arr.dtype == np.float16 and arr.shape == (2, 5, 3) and arr.chunks == (1, 2, 3)
    assert arr.attrs["logical_dtype"] == "float16"
    acts_json = json.loads((golden / "parts/0000/acts/zarr.json").read_text())
    assert acts_json["zarr_format"] == 3
    assert acts_json["dimension_names"] == ["layer", "row", "neuron"]
    assert [c["name"] for c in acts_json["codecs"]] == ["bytes", "crc32c"]
    for col, dt in (("example", np.int64), ("position", np.int32), ("token", np.int32)):
        a = g[f"parts/0000/rows/{col}"]
        assert a.dtype == dt and a[:n].tolist() == GOLDEN_ROWS[col]
        assert json.loads((golden / f"parts/0000/rows/{col}/zarr.json").read_text())["dimension_names"] == ["row"]
    assert [str(x) for x in g["examples/text"][:]] == ["Tom returned the wallet.", "小明拿走了钱包。"]
    assert g["examples/lang"][:].tolist() == [0, 1] and list(g["examples/lang"].attrs["categories"]) == ["en", "zh"]


def test_golden_store_chunk_bytes(golden: Path) -> None:
    """The bytes on disk: little-endian values, then a crc32c of them (zarr v3 default chunk keys)."""
    google_crc32c = pytest.importorskip("google_crc32c")
    first = (golden / "parts/0000/acts/c/0/0/0").read_bytes()
    assert first.hex() == "00be80bd00bd80bc008000bb6c48529e"
    assert first[:12] == GOLDEN_ACTS[0, 0:2].astype("<f2").tobytes()
    last = (golden / "parts/0000/acts/c/1/2/0").read_bytes()  # the partial chunk: row 4, then fill
    assert last.hex() == "803f0040ff7b000000000000a47488a1"
    for blob in (first, last):
        assert blob[-4:] == google_crc32c.value(blob[:-4]).to_bytes(4, "little")


def test_golden_store_opens_with_xarray(golden: Path) -> None:
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(golden), group="parts/0000", consolidated=False)
    assert ds["acts"].dims == ("layer", "row", "neuron")
    _assert_bitwise(ds["acts"].values, GOLDEN_ACTS, "xarray acts")


# -- 5. refusals -------------------------------------------------------------------------------------------------


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="no vstore store"):
        Store(tmp_path / "missing")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hello")
    with pytest.raises(StoreNotFoundError):
        Store(tmp_path / "folder")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "zarr.json").write_text("{not json")
    assert not is_store(tmp_path / "badjson")
    with pytest.raises(StoreError):
        Store(tmp_path / "badjson")


def test_plain_zarr_group_is_not_a_store(tmp_path: Path) -> None:
    g = zarr.open_group(str(tmp_path / "plain"), mode="w")
    g.attrs.update({"something": 1})
    assert not is_store(tmp_path / "plain")
    with pytest.raises(StoreError, match="not a vstore store") as err:
        Store(tmp_path / "plain")
    assert not isinstance(err.value, StoreNotFoundError)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 99, 0, None])
def test_other_format_version_is_refused(tmp_path: Path, version: int | None) -> None:
    path = tmp_path / "store"
    Store.create(path, _meta(1, 2, "float16", 2))
    g = zarr.open_group(str(path), mode="r+")
    meta = dict(g.attrs["vstore"])
    if version is None:
        del meta["format_version"]
    else:
        meta["format_version"] = version
    g.attrs.update({"vstore": meta})
    with pytest.raises(StoreError, match=rf"version {version} is not supported.*version {FORMAT_VERSION}"):
        Store(path)
    with pytest.raises(StoreError):
        Store(path, "r+")


def _small_store(path: Path) -> str:
    store = Store.create(path, _meta(1, 2, "float16", 2))
    start = store.add_examples(["a"], ["text a"], [{"value": "honesty"}])
    part = store.start_part(1, start, {}, compressor="none")
    w = PartWriter(store, part)
    w.add(np.ones((1, 1, 2), np.float16), np.zeros(1, np.int64), np.zeros(1, np.int32), np.zeros(1, np.int32), 1)
    w.flush()
    return part


def test_read_only_store_refuses_meta_writes(tmp_path: Path) -> None:
    path = tmp_path / "store"
    part = _small_store(path)
    digest = _tree_digest(path)
    store = Store(path, "r")
    for write in (lambda: store.commit(part, 1, 1), lambda: store.finish_part(part),
                  lambda: store.update_meta(state="complete")):
        with pytest.raises(StoreError, match="read-only"):
            write()
    assert _tree_digest(path) == digest


def test_read_only_store_refuses_array_writes(tmp_path: Path) -> None:
    path = tmp_path / "store"
    _small_store(path)
    digest = _tree_digest(path)
    store = Store(path, "r")
    with pytest.raises(StoreError, match="read-only"):
        store.add_examples(["b"], ["text b"], [{}])
    with pytest.raises(StoreError, match="read-only"):
        store.start_part(1, 1, {}, compressor="none")
    assert _tree_digest(path) == digest


def test_write_mode_is_refused_and_store_survives(tmp_path: Path) -> None:
    path = tmp_path / "store"
    _small_store(path)
    with pytest.raises(StoreError, match="mode"):
        Store(path, "w")
    assert Store(path).n_rows == 1


def test_unknown_part_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store"
    _small_store(path)
    with pytest.raises(StoreError, match="0007"):
        Store(path).rows("0007", "example")


def test_create_refuses_to_clobber(tmp_path: Path) -> None:
    path = tmp_path / "store"
    _small_store(path)
    with pytest.raises(StoreExistsError):
        Store.create(path, _meta(1, 2, "float16", 2))
    assert Store(path).n_rows == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a vstore store"):
        Store.create(other, _meta(1, 2, "float16", 2), overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"
    fresh = Store.create(path, _meta(1, 2, "float16", 2), overwrite=True)
    assert fresh.parts == [] and fresh.state == "building"


def test_errors_are_vstore_errors() -> None:
    assert issubclass(StoreNotFoundError, StoreError) and issubclass(StoreNotFoundError, FileNotFoundError)
    assert issubclass(StoreExistsError, StoreError) and issubclass(StoreError, VstoreError)


def test_direct_chunk_writes_equal_zarr_writes(tmp_path):
    """PartWriter writes local uncompressed chunks itself; the files must be what zarr writes."""
    import vstore.store as vs

    rng = np.random.default_rng(7)
    meta = {"model": {"n_neurons": 5, "n_layers": 2}, "site": "act", "layers": [0, 1], "dtype": "float16",
            "pooling": "token", "chunk_rows": 4}
    acts = rng.standard_normal((2, 10, 5)).astype(np.float16)
    paths = {}
    for name, direct in (("direct", True), ("zarr", False)):
        st = vs.Store.create(tmp_path / name, meta)
        st.add_examples(["a", "b"], ["x", "y"], [{}, {}])
        part = st.start_part(2, 0, {}, compressor="none")
        w = vs.PartWriter(st, part)
        assert (w._direct is not None) is True
        if not direct:
            w._direct = None
        w.add(acts[:, :6], np.zeros(6, np.int64), np.arange(6, dtype=np.int32), np.arange(6, dtype=np.int32), 1)
        w.add(acts[:, 6:], np.ones(4, np.int64), np.arange(4, dtype=np.int32), np.arange(4, dtype=np.int32), 2)
        w.flush()
        paths[name] = tmp_path / name / "parts" / "0000" / "acts" / "c"
        np.testing.assert_array_equal(np.asarray(zarr.open_group(str(tmp_path / name))["parts/0000/acts"][:]), acts)
    files = sorted(p.relative_to(paths["zarr"]) for p in paths["zarr"].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(paths["direct"]) for p in paths["direct"].rglob("*") if p.is_file())
    assert len(files) == 6  # 2 layers x 3 chunks of 4 rows
    for f in files:
        assert (paths["direct"] / f).read_bytes() == (paths["zarr"] / f).read_bytes(), f


def test_golden_store_ranks_as_it_always_did(golden: Path, tmp_path: Path) -> None:
    from vstore.rank import rank_store

    want = json.loads((GOLDEN.parent / "store-v1-ranks.json").read_text(encoding="utf-8"))
    copy = tmp_path / "g"
    shutil.copytree(golden, copy)
    for method, rec in want["ranks"].items():
        got = rank_store(copy, want["by"], method, use_cache=False, **rec["kw"])
        assert {g: [[it["layer"], it["neuron"], it["score"]] for it in items] for g, items in got.groups.items()} \
            == rec["groups"], method
    rank_store(golden, want["by"], "welch-t", top_k=2, use_cache=False)  # ranking without the cache writes nothing


# ------------------------------------------------------------------------------------------------
# Chunk files written with O_DIRECT, and every way that falls back to ordinary writes.


def _chunk_bytes(tmp: Path, block: np.ndarray, name: str) -> bytes:
    from vstore.store._chunks import write_chunk_file

    layout = (tmp, lambda c: f"{name}/{'/'.join(map(str, c))}", True)
    write_chunk_file(layout, (0, 1, 0), block)
    return (tmp / name / "0" / "1" / "0").read_bytes()


def _expected(block: np.ndarray) -> bytes:
    from vstore.store._chunks import crc32c

    raw = np.ascontiguousarray(block).tobytes()
    return raw + crc32c(raw).to_bytes(4, "little")


def test_chunk_files_are_the_same_bytes_direct_or_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vstore.store import _chunks

    block = _chunks.aligned_zeros((4, 2048), np.float16)
    assert block.ctypes.data % _chunks.DIRECT_ALIGN == 0
    block[:] = np.random.default_rng(0).standard_normal(block.shape).astype(np.float16)
    monkeypatch.setattr(_chunks, "_no_direct", set())
    used = []
    real = _chunks._write_direct
    monkeypatch.setattr(_chunks, "_write_direct", lambda *a: used.append(real(*a)) or used[-1])
    direct = _chunk_bytes(tmp_path, block, "direct")
    monkeypatch.setenv("VSTORE_BUFFERED_WRITES", "1")
    buffered = _chunk_bytes(tmp_path, block, "buffered")
    assert direct == buffered == _expected(block)
    assert used[-1] is False  # buffered when asked
    odd = np.arange(3, dtype=np.float16)  # not a whole block: ordinary writes
    monkeypatch.delenv("VSTORE_BUFFERED_WRITES")
    assert _chunk_bytes(tmp_path, odd, "odd") == _expected(odd) and used[-1] is False


def test_a_file_system_refusing_o_direct_gets_ordinary_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from vstore.store import _chunks

    block = _chunks.aligned_zeros((2, 4096), np.uint8)
    block[:] = 7
    real_open = os.open
    refused = []

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(_chunks.os, "open", no_direct)
    monkeypatch.setattr(_chunks, "_no_direct", set())
    assert _chunk_bytes(tmp_path, block, "a") == _expected(block)
    assert _chunk_bytes(tmp_path, block, "b") == _expected(block)
    assert len(refused) == (1 if hasattr(os, "O_DIRECT") else 0)  # the refusal is remembered per device


def test_a_short_direct_write_is_finished_through_the_page_cache(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from vstore.store import _chunks

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    block = _chunks.aligned_zeros((3, 8192), np.uint8)
    block[:] = np.arange(block.size, dtype=np.int64).reshape(block.shape) % 251
    monkeypatch.setattr(_chunks, "_no_direct", set())
    if not _chunks._write_direct(tmp_path / "probe", block.reshape(-1), b""):
        pytest.skip("this file system takes no O_DIRECT writes")
    (tmp_path / "probe").unlink()
    real_write = os.write
    calls = []

    def short(fd, data):  # the first write reports fewer bytes than a whole number of blocks
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[: 2 * _chunks.DIRECT_ALIGN]) - 100
        return real_write(fd, data)

    monkeypatch.setattr(_chunks.os, "write", short)
    assert _chunk_bytes(tmp_path, block, "short") == _expected(block)
    assert calls[0] == block.nbytes and len(calls) == 1  # the rest went through an ordinary file


def test_a_full_disk_during_a_direct_write_leaves_no_partial_file(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from vstore.store import _chunks

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    block = _chunks.aligned_zeros((2, 4096), np.uint8)
    monkeypatch.setattr(_chunks, "_no_direct", set())
    if not _chunks._write_direct(tmp_path / "probe", block.reshape(-1), b""):
        pytest.skip("this file system takes no O_DIRECT writes")
    (tmp_path / "probe").unlink()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_chunks.os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        _chunk_bytes(tmp_path, block, "full")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_aligned_buffers_small_and_large_are_zero_aligned_and_writable() -> None:
    from vstore.store import _chunks

    for shape in ((3, 5, 7), (2, 1024, 2048)):  # the second is a memory map (>= 4 MiB)
        a = _chunks.aligned_zeros(shape, np.float16)
        assert a.shape == shape and a.dtype == np.float16 and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % _chunks.DIRECT_ALIGN == 0 and not a.any()
        a[-1, -1, -1] = 1.5
        assert a[-1, -1, -1] == 1.5


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint16])
def test_writer_copy_on_torch_threads_equals_numpy(dtype: Any) -> None:
    """Batch rows of 4 MiB and more go into the chunk buffer through torch (loaded here): strided
    slices of source and destination, the same values as NumPy's assignment; the rest is untouched."""
    import torch  # noqa: F401  (loaded: the copy takes torch's path)

    from vstore.store._writer import _copy

    rng = np.random.default_rng(0)
    src = (rng.standard_normal((3, 700, 2048)) * 100).astype(dtype)
    dst = np.zeros((3, 1024, 2048), dtype=dtype)
    want = dst.copy()
    want[:, 100:600] = src[:, 150:650]
    _copy(dst[:, 100:600], src[:, 150:650])
    assert dst[:, 100:600].nbytes >= 1 << 22
    assert np.array_equal(dst.view(np.uint8), want.view(np.uint8))
    small = np.zeros((2, 3), dtype=dtype)
    _copy(small, src[0, :2, :3])  # under 4 MiB: NumPy's assignment
    assert np.array_equal(small, src[0, :2, :3])
