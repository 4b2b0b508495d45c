"""The statistics pass: equality with NumPy on raw store arrays, every backend, grouping, the cache,
split halves, AUROC from histograms, NaN rows, the direct chunk reader and Dask."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).parent))
from conftest_rank import raw_rows
from make_synthetic_store import make_synthetic_store

from vstore import kernels
from vstore.cli import main
from vstore.errors import StoreError, VstoreError
from vstore.stats import (
    GroupStats,
    compute_auroc,
    compute_split_stats,
    compute_stats,
    item_stem,
    make_grouping,
    read_counter,
    split_halves,
)
from vstore.store import ChunkReader, Store

BACKENDS = [b for b in kernels.BACKENDS if b != "cpp" or kernels.native_available()]


def synth(path: Path, dtype: str = "float16", **kw: object) -> dict:
    args = dict(n_layers=3, n_neurons=48, n_examples=64, rows_per_example=(3, 12), groups=4, planted=2, effect=3.0,
                dtype=dtype, seed=1, chunk_rows=64)
    args.update(kw)
    return make_synthetic_store(path, **args)  # type: ignore[arg-type]


def reference(path: Path, column: str = "value") -> dict[str, dict[str, np.ndarray]]:
    """Per group: count/sum/sumsq/npos per layer from the raw arrays (NaN/Inf values left out per neuron)."""
    X, y, cats = raw_rows(path, column)
    out = {}
    for g in cats:
        rows = X[:, y == g, :]
        ok = np.isfinite(rows)  # (L, R, N)
        vals = np.where(ok, rows, 0)
        out[g] = {
            "count": np.full(rows.shape[0], rows.shape[1]),
            "sum": vals.sum(axis=1),
            "sumsq": (vals * vals).sum(axis=1),
            "npos": (vals > 0).sum(axis=1),
            "nonfinite": (~ok).sum(axis=1),
        }
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_stats_equal_numpy_on_every_backend(tmp_path: Path, dtype: str) -> None:
    synth(tmp_path / "s", dtype, nonfinite_rows=5)
    ref = reference(tmp_path / "s")
    results = []
    for backend in BACKENDS:
        st = compute_stats(tmp_path / "s", "value", backend=backend, use_cache=False)
        results.append(st)
        assert st.groups == list(ref)
        for gi, g in enumerate(st.groups):
            np.testing.assert_array_equal(st.count[:, gi], ref[g]["count"])
            np.testing.assert_array_equal(st.npos[:, gi], ref[g]["npos"])
            np.testing.assert_array_equal(st.nonfinite[:, gi], ref[g]["nonfinite"])
            # float16 sums in float32 runs of 32 rows (docs/rank.md): within 31 * 2**-24 of sum |x|
            rtol, atol = (1e-5, 1e-3) if dtype == "float16" else (1e-12, 1e-9)
            np.testing.assert_allclose(st.sum[:, gi], ref[g]["sum"], rtol=rtol, atol=atol)
            np.testing.assert_allclose(st.sumsq[:, gi], ref[g]["sumsq"], rtol=rtol, atol=atol)
    assert int(results[0].nonfinite.sum()) == 5 * 3  # one NaN neuron in each layer of each NaN row
    assert (results[0].valid()[:, :, 1:] == results[0].count[:, :, None]).all()  # the other neurons keep every row
    for other in results[1:]:  # backends agree bit for bit
        for k in ("count", "sum", "sumsq", "npos", "nonfinite"):
            assert np.array_equal(getattr(results[0], k), getattr(other, k)), k


def test_grouping_where_contrast_and_mask(tmp_path: Path) -> None:
    synth(tmp_path / "s", polarity=True, n_examples=48)
    store = Store(tmp_path / "s")
    g = make_grouping(store, "value", where={"lang": ["zh"]}, contrast=("polarity", ["aligned", "violating"]))
    assert g.names[:2] == ["g00|aligned", "g00|violating"] and g.base == ["g00", "g01", "g02", "g03"]
    lang, lcats = store.labels("lang")
    assert (g.codes[lang == lcats.index("en")] == -1).all()
    st = compute_stats(store, "value", where={"lang": ["zh"]}, contrast=("polarity", ["aligned", "violating"]),
                       use_cache=False)
    X, y, _ = raw_rows(tmp_path / "s")
    _, pol, _ = raw_rows(tmp_path / "s", "polarity")
    _, lg, _ = raw_rows(tmp_path / "s", "lang")
    sel = (y == "g01") & (pol == "violating") & (lg == "zh")
    gi = st.groups.index("g01|violating")
    np.testing.assert_allclose(st.sum[:, gi], X[:, sel].sum(axis=1), rtol=1e-5, atol=1e-3)  # float16: float32 runs
    with pytest.raises(StoreError, match="no value"):
        make_grouping(store, "value", where={"lang": ["fr"]})
    with pytest.raises(StoreError, match="no label column"):
        make_grouping(store, "colour")
    with pytest.raises(VstoreError, match="two different"):
        make_grouping(store, "value", contrast=("polarity", ["aligned"]))
    one = make_grouping(store, None)
    assert one.names == ["all"] and (one.codes == 0).all()


def test_cache_reused_and_invalidated(tmp_path: Path) -> None:
    synth(tmp_path / "s")
    first = compute_stats(tmp_path / "s", "value")
    assert not first.from_cache and first.chunks_read > 0
    before = read_counter.chunks
    second = compute_stats(tmp_path / "s", "value")
    assert second.from_cache and read_counter.chunks == before  # no activation chunk read
    for k in ("count", "sum", "sumsq", "npos", "nonfinite"):
        assert np.array_equal(getattr(first, k), getattr(second, k))
    keys = Store(tmp_path / "s").stats_keys()
    assert keys == [first.key]
    synth(tmp_path / "s", append=True, n_examples=16, seed=2)  # rows added: a new key, the stale one dropped
    third = compute_stats(tmp_path / "s", "value")
    assert not third.from_cache and third.key != first.key
    assert int(third.count.sum()) > int(first.count.sum())
    assert Store(tmp_path / "s").stats_keys() == [third.key]
    assert main(["cache", "clear", str(tmp_path / "s")]) == 0
    assert Store(tmp_path / "s").stats_keys() == []
    assert not compute_stats(tmp_path / "s", "value").from_cache


def test_cache_is_plain_zarr(tmp_path: Path) -> None:
    import zarr

    synth(tmp_path / "s")
    st = compute_stats(tmp_path / "s", "value")
    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    arr = g[f"stats/{st.key}/sum"]
    assert np.array_equal(np.asarray(arr[...]), st.sum)
    assert g[f"stats/{st.key}"].attrs["vstore_stats"]["groups"] == st.groups


def test_merge_of_halves_equals_the_whole(tmp_path: Path) -> None:
    synth(tmp_path / "s")
    whole = compute_stats(tmp_path / "s", "value", use_cache=False)
    a, b = compute_split_stats(tmp_path / "s", "value", seed=3, use_cache=False)
    ma, mb = split_halves(Store(tmp_path / "s"), seed=3, by="value")
    a2 = compute_stats(tmp_path / "s", "value", example_mask=ma, use_cache=False)
    assert np.array_equal(a.count, a2.count) and np.allclose(a.sum, a2.sum)
    assert not (ma & mb).any() and (ma | mb).all()
    merged = GroupStats.for_groups(whole.groups, whole.layers, whole.n_neurons)
    merged.merge(a)
    merged.merge(b)
    assert np.array_equal(merged.count, whole.count) and np.array_equal(merged.npos, whole.npos)
    # float16 sums in float32 runs of 32 rows: the halves cut the runs elsewhere than the whole
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-5, atol=1e-5)
    with pytest.raises(VstoreError, match="cannot merge"):
        merged.merge(GroupStats.for_groups(["x"], whole.layers, whole.n_neurons))


def test_split_halves_keep_items_together(tmp_path: Path) -> None:
    assert item_stem("justice-a01-zh:aligned", "zh") == "justice-a01"
    assert item_stem("justice-a01-en", "en") == "justice-a01"
    assert item_stem("plain", None) == "plain"
    synth(tmp_path / "s", polarity=True, n_examples=96)
    store = Store(tmp_path / "s")
    ma, mb = split_halves(store, seed=0, by="value")
    ids = store.ids()
    half_of: dict[str, bool] = {}
    for i, ex in enumerate(ids):
        stem = ex.split(":")[0].rsplit("-", 1)[0]
        assert half_of.setdefault(stem, bool(ma[i])) == bool(ma[i])
    codes, _ = store.labels("value")
    for g in np.unique(codes):  # each group split evenly
        assert abs(int((ma & (codes == g)).sum()) - int((mb & (codes == g)).sum())) <= 4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_auroc_exact_for_16_bit_stores(tmp_path: Path, dtype: str) -> None:
    synth(tmp_path / "s", dtype, nonfinite_rows=3)
    # 3 groups x 8 neurons x 65536 x 4 bytes: several neuron blocks (passes) per layer
    res = compute_auroc(tmp_path / "s", "value", memory=4 * 8 * 65536 * 4, use_cache=False)
    assert res.exact and res.passes == 3 * 6 and float(res.error.max()) == 0.0
    X, y, _ = raw_rows(tmp_path / "s")
    ok = np.isfinite(X)  # NaN/Inf values are left out neuron by neuron (neuron 0 holds the NaNs)
    for ti, g in enumerate(res.targets):
        for li in range(3):
            for n in (0, 5, 17, 47):
                x, lab = X[li, ok[li, :, n], n], y[ok[li, :, n]] == g
                assert res.auroc[li, ti, n] == pytest.approx(roc_auc_score(lab, x), abs=1e-13)
                # exact: the Mann-Whitney U (midranks, ties count one half) over n1 * n0, one rounding
                u = mannwhitneyu(x[lab], x[~lab]).statistic
                assert res.auroc[li, ti, n] == u / (lab.sum() * (~lab).sum())


def test_auroc_float32_reports_its_error_bound(tmp_path: Path) -> None:
    synth(tmp_path / "s", "float32")
    res = compute_auroc(tmp_path / "s", "value", use_cache=False)
    assert not res.exact and float(res.error.max()) > 0
    X, y, _ = raw_rows(tmp_path / "s")
    for ti, g in enumerate(res.targets):
        for li in range(3):
            for n in range(0, 48, 7):
                ref = roc_auc_score(y == g, X[li, :, n])
                assert abs(res.auroc[li, ti, n] - ref) <= res.error[li, ti, n] + 1e-12
    cached = compute_auroc(tmp_path / "s", "value")
    again = compute_auroc(tmp_path / "s", "value")
    assert not cached.from_cache and again.from_cache and np.array_equal(cached.auroc, again.auroc)


def test_zarr_path_equals_direct_reader(tmp_path: Path) -> None:
    synth(tmp_path / "raw")
    synth(tmp_path / "zstd", compressor="zstd-1")
    assert ChunkReader(Store(tmp_path / "raw").acts("0000")).direct is not None
    assert ChunkReader(Store(tmp_path / "zstd").acts("0000")).direct is None
    a = compute_stats(tmp_path / "raw", "value", use_cache=False)
    b = compute_stats(tmp_path / "zstd", "value", use_cache=False)
    for k in ("count", "sum", "sumsq", "npos"):
        assert np.array_equal(getattr(a, k), getattr(b, k))


def test_corrupt_chunk_is_reported(tmp_path: Path) -> None:
    synth(tmp_path / "s")
    chunk = tmp_path / "s" / "parts" / "0000" / "acts" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        compute_stats(tmp_path / "s", "value", use_cache=False)


def test_unwritable_cache_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    synth(tmp_path / "s")

    def refuse(*a: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    st = compute_stats(tmp_path / "s", "value")
    assert st.chunks_read > 0 and not st.from_cache
    assert Store(tmp_path / "s").stats_keys() == []  # the temporary group is gone too
    assert not [p for p in (tmp_path / "s" / "stats").iterdir() if p.name.startswith(".")]


def test_dask_local_cluster_matches_one_pass(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    synth(tmp_path / "s")
    one = compute_stats(tmp_path / "s", "value", use_cache=False)
    dist = compute_stats(tmp_path / "s", "value", use_cache=False, dask="local:2")
    assert np.array_equal(one.count, dist.count) and np.array_equal(one.npos, dist.npos)
    np.testing.assert_allclose(dist.sum, one.sum, rtol=1e-12)
    np.testing.assert_allclose(dist.sumsq, one.sumsq, rtol=1e-12)
    assert dist.chunks_read == one.chunks_read


def test_read_only_store_is_never_written_through(tmp_path: Path) -> None:
    from vstore.store import write_cached

    synth(tmp_path / "s")
    ro = Store(tmp_path / "s", mode="r")
    st = compute_stats(ro, "value")
    assert not st.from_cache and Store(tmp_path / "s").stats_keys() == []  # computed, not cached
    with pytest.raises(StoreError, match="read-only"):
        write_cached(ro, "x", {"count": np.zeros(1)}, {"kind": "moments", "spec": {}})
    compute_stats(tmp_path / "s", "value")  # a path is opened for writing when it will cache
    assert len(Store(tmp_path / "s").stats_keys()) == 1
    assert compute_stats(ro, "value").from_cache  # and a read-only store reads the cache


# ------------------------------------------------------------------------------------------------
# The reader: the advising helper thread of Prefetch.


def _tasks(store: Store) -> list:
    from vstore.stats.reading import tasks_for

    codes, _ = store.labels("value")
    return list(tasks_for(store, codes, store.chunk_ranges(), range(len(store.layers))))


def test_prefetch_hands_out_every_block_in_order_and_stays_within_lookahead(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from vstore.stats.reading import Prefetch

    synth(tmp_path / "s", chunk_rows=16)
    st = Store(tmp_path / "s")
    tasks = _tasks(st)
    assert len(tasks) > 8
    advised: list[int] = []
    consumed: list[int] = []
    real = ChunkReader.read_ahead

    def read_ahead(self: ChunkReader, layer: int, r0: int, r1: int):
        advised.append(len(consumed))  # blocks handed out when the helper came to this chunk
        return real(self, layer, r0, r1)

    monkeypatch.setattr(ChunkReader, "read_ahead", read_ahead)
    got = []
    for t, block in Prefetch(st, iter(tasks), lookahead=3):
        assert block is not None
        np.testing.assert_array_equal(block, np.asarray(st.acts(t.part)[t.layer, t.r0 : t.r1]))
        got.append((t.part, t.layer, t.r0))
        consumed.append(1)
    assert got == [(t.part, t.layer, t.r0) for t in tasks]
    # the helper comes to chunk i only once at most `lookahead` chunks are ahead and not yet handed out
    assert len(advised) == len(tasks)
    assert all(i - n_out <= 3 for i, n_out in enumerate(advised)), advised


def test_a_pass_over_uncached_chunks_equals_the_pass_over_cached_ones(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper thread reads chunks that are not cached itself (O_DIRECT, reused buffers): the same
    statistics, bit for bit, as mapping them from the page cache, with every block valid while held."""
    from vstore.stats.passes import reduce_moments
    from vstore.stats.reading import Prefetch
    from vstore.store import _chunks

    synth(tmp_path / "s", chunk_rows=16)
    st = Store(tmp_path / "s")
    codes, names = st.labels("value")
    cached = reduce_moments(st, codes, names, backend="numpy")
    read_ahead = []
    real = ChunkReader.read_ahead

    def spy(self: ChunkReader, layer: int, r0: int, r1: int):
        block = real(self, layer, r0, r1)
        read_ahead.append(block is not None)
        return block

    monkeypatch.setattr(ChunkReader, "read_ahead", spy)
    monkeypatch.setattr(_chunks, "_cached_fraction", lambda fd, n: 0.0)  # as if evicted
    uncached = reduce_moments(st, codes, names, backend="numpy")
    if not any(read_ahead):
        pytest.skip("this file system refuses O_DIRECT reads")
    assert all(read_ahead) and len(read_ahead) == uncached.chunks_read
    for f in ("count", "sum", "sumsq", "npos", "nonfinite"):
        np.testing.assert_array_equal(getattr(uncached, f), getattr(cached, f), err_msg=f)
    # a consumer that keeps every block: none is overwritten by a later read into a reused buffer
    kept = [(t, b) for t, b in Prefetch(st, iter(_tasks(st)), lookahead=2)]
    for t, b in kept:
        np.testing.assert_array_equal(b, np.asarray(st.acts(t.part)[t.layer, t.r0 : t.r1]))


def test_prefetch_passes_on_an_error_of_the_tasks_and_stops_its_helper(tmp_path: Path) -> None:
    import threading

    from vstore.stats.reading import Prefetch

    synth(tmp_path / "s", chunk_rows=16)
    st = Store(tmp_path / "s")
    tasks = _tasks(st)

    def failing():
        yield from tasks[:2]
        raise StoreError("rows/example is damaged")

    seen = []
    with pytest.raises(StoreError, match="damaged"):
        for t, _ in Prefetch(st, failing(), lookahead=4):
            seen.append(t)
    assert len(seen) == 2
    for _ in Prefetch(st, iter(tasks), lookahead=2):
        break  # the consumer leaves early: the helper must end with it
    assert not [th for th in threading.enumerate() if th.name == "vstore-stats-advise"]


def test_plan_workers_gives_the_reader_thread_a_core_only_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from vstore.stats import passes

    monkeypatch.setattr(passes, "cpu_count", lambda: 4)
    assert passes.plan_workers(8, "numba", None, reader_thread=False) == (1, 4)  # chunks mapped in place
    assert passes.plan_workers(8, "numba", None, reader_thread=True) == (1, 3)  # zarr decodes beside it
    assert passes.plan_workers(8, "numba", 2, reader_thread=True) == (1, 2)  # asked for: as asked
    assert passes.plan_workers(1, "numpy", None, reader_thread=False) == (1, 4)
    if kernels.native_available():
        assert passes.plan_workers(8, "cpp", None) == (4, 1)
        assert passes.plan_workers(2, "cpp", None) == (2, 2)


def test_reads_in_place_only_for_uncompressed_local_chunks(tmp_path: Path) -> None:
    from vstore.stats.passes import reads_in_place

    synth(tmp_path / "raw")
    synth(tmp_path / "zstd", compressor="zstd-1")
    assert reads_in_place(Store(tmp_path / "raw")) and not reads_in_place(Store(tmp_path / "zstd"))
