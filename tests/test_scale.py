"""Scale out: statistics while building, statistics-only and pooled stores, shards, store URLs, Dask.

Oracles: the out-of-core pass (:func:`vstore.stats.compute_stats` with the cache off) over a full
store of the same data, the NumPy reference kernel, and a single-process build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_models

from vstore import kernels
from vstore.build import build_store
from vstore.cli import main
from vstore.errors import StoreError, UsageError
from vstore.rank import rank_store
from vstore.stats import Moments, compute_auroc, compute_split_stats, compute_stats, read_counter
from vstore.stats.live import accumulate_torch
from vstore.store import Store


def _neurons(res) -> dict[str, list[tuple[int, int]]]:
    """The selected (layer, neuron) of every group, in order (scores may differ by float64 rounding)."""
    return {g: [(int(i["layer"]), int(i["neuron"])) for i in items] for g, items in res.groups.items()}


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _same_moments(a: Moments, b: Moments) -> None:
    """Counts exactly; sums to rounding. The out-of-core kernels sum float16 in float32 runs of 32 rows
    (docs/rank.md: within 31 * 2**-24 of the exact sum relative to sum |x|, and sum |x| <=
    sqrt(n * sum x**2)); for float32 and bfloat16 stores the bound is float64 rounding."""
    assert np.array_equal(a.count, b.count) and np.array_equal(a.npos, b.npos)
    assert np.array_equal(a.nonfinite, b.nonfinite)
    f32_run = 32 * 2.0**-24
    n = np.broadcast_to(b.count[..., None], b.sum.shape) - b.nonfinite
    bound = f32_run * np.sqrt(np.maximum(n, 0) * b.sumsq) + 1e-12 * np.abs(b.sum) + 1e-300
    assert (np.abs(a.sum - b.sum) <= bound).all()
    assert (np.abs(a.sumsq - b.sumsq) <= f32_run * np.abs(b.sumsq) + 1e-300).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_accumulate_torch_equals_numpy_reference(dtype):
    import torch

    rng = np.random.default_rng(1)
    x = rng.normal(size=(37, 9)).astype(np.float32) * 3
    x[4, 2], x[5, 0], x[6, 8], x[7, :] = np.nan, np.inf, -np.inf, 0.0
    x[8, 3] = 70000.0  # inf in float16
    groups = rng.integers(-1, 3, size=37).astype(np.int32)
    t = torch.from_numpy(x).to(getattr(torch, dtype))
    raw = t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()
    want = Moments.zeros(3, 9)
    kernels.accumulate_moments(np.ascontiguousarray(raw), groups, want, dtype=dtype, backend="numpy")
    acc = [torch.zeros(3, dtype=torch.int64), torch.zeros((3, 9), dtype=torch.float64),
           torch.zeros((3, 9), dtype=torch.float64), torch.zeros((3, 9), dtype=torch.int64),
           torch.zeros((3, 9), dtype=torch.int64)]
    accumulate_torch(t, torch.from_numpy(groups), *acc)
    _same_moments(Moments(*(a.numpy() for a in acc)), want)
    empty = [a.clone() for a in acc]
    accumulate_torch(t[:0], torch.from_numpy(groups[:0]), *empty)  # no rows: nothing changes
    assert all(torch.equal(a, b) for a, b in zip(acc, empty, strict=True))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_build_time_statistics_equal_the_out_of_core_pass(tiny_model, stories, tmp_path, dtype):
    out = tmp_path / "s"
    res = build_store(out, model=str(tiny_model), data=stories, dtype=dtype, batch_size=5, progress=False,
                      stats_by=["value", "lang"])
    assert res.stats_written == ["value", "lang"]
    for by in ("value", "lang"):
        live = compute_stats(out, by)  # from the cache the build wrote
        assert live.from_cache and live.bytes_read == 0
        _same_moments(live, compute_stats(out, by, use_cache=False))
    before = read_counter.bytes
    ranked = rank_store(out, "value", "welch-t", top_k=5)
    assert ranked.from_cache and read_counter.bytes == before  # ranking read no activation
    assert Store(out).meta["stats_by"] == ["lang", "value"]


def test_append_with_stats_by_reduces_the_earlier_part_and_merges(tiny_model, stories, tmp_path):
    out = tmp_path / "s"
    build_store(out, model=str(tiny_model), data=stories, dtype="float16", progress=False)
    more = tmp_path / "more.jsonl"
    tiny_models.make_stories(more, per_value=1, seed=5)
    res = build_store(out, model=str(tiny_model), data=more, dtype="float16", progress=False, append=True,
                      stats_by=["value"], labels={"batch": "two"})
    assert res.stats_written == ["value"] and len(Store(out).parts) == 2
    live = compute_stats(out, "value")
    assert live.from_cache
    _same_moments(live, compute_stats(out, "value", use_cache=False))


def test_keep_stats_ranks_the_same_and_names_what_needs_activations(tiny_model, stories, tmp_path):
    full, lean = tmp_path / "full", tmp_path / "lean"
    build_store(full, model=str(tiny_model), data=stories, dtype="float32", progress=False)
    build_store(lean, model=str(tiny_model), data=stories, dtype="float32", progress=False, stats_by=["value"],
                keep="stats")
    st = Store(lean)
    assert "acts" not in st.group["parts/0000"] and not st.keeps_activations
    assert st.n_rows == Store(full).n_rows and st.info()["parts"][0]["keep"] == "stats"
    assert _size(lean) < 0.5 * _size(full)
    for method in ("welch-t", "vape", "cohen-d"):
        a = rank_store(full, "value", method, top_k=7)
        b = rank_store(lean, "value", method, top_k=7)
        assert _neurons(a) == _neurons(b) and b.from_cache
    for kwargs in ({"method": "auroc"}, {"split_half": True}, {"by": "lang"}):
        with pytest.raises(StoreError, match=r"--keep stats: it holds no token activations.*--keep all"):
            rank_store(lean, **{"by": "value", "method": "welch-t", **kwargs}, top_k=3)
    with pytest.raises(UsageError, match="stats_by"):
        build_store(tmp_path / "x", model=str(tiny_model), data=stories, keep="stats", progress=False)


def test_keep_pooled_rows_are_mean_and_last_of_the_token_rows(tiny_model, stories, tmp_path):
    full, pooled = tmp_path / "full", tmp_path / "pooled"
    build_store(full, model=str(tiny_model), data=stories, dtype="float32", progress=False, batch_size=4)
    build_store(pooled, model=str(tiny_model), data=stories, dtype="float32", progress=False, keep="pooled",
                stats_by=["value"], batch_size=4)
    f, p = Store(full), Store(pooled)
    acts, ex = np.asarray(f.acts("0000")[:]), f.rows("0000", "example")
    g = p.group
    n = p.part_entry("0000")["pooled_rows"]
    mean, last = np.asarray(g["parts/0000/pooled/mean"][:, :n]), np.asarray(g["parts/0000/pooled/last"][:, :n])
    pex = np.asarray(g["parts/0000/rows/pooled/example"][:n])
    assert pex.tolist() == sorted(set(ex.tolist()))
    for i, e in enumerate(pex):
        rows = np.flatnonzero(ex == e)
        np.testing.assert_allclose(mean[:, i], acts[:, rows].mean(axis=1), rtol=1e-5, atol=1e-6)
        assert np.array_equal(last[:, i], acts[:, rows[-1]])
    assert _neurons(rank_store(pooled, "value", "welch-t", top_k=4)) == _neurons(rank_store(full, "value", "welch-t",
                                                                                            top_k=4))
    # the pooled rows rank like a --pool mean / --pool last build of the same batches
    means, lasts = tmp_path / "means", tmp_path / "lasts"
    for out, pool in ((means, "mean"), (lasts, "last")):
        build_store(out, model=str(tiny_model), data=stories, dtype="float32", progress=False, batch_size=4, pool=pool)
    view = Store(pooled, view="mean")
    assert view.n_rows == len(pex) and view.committed_key.endswith(";rows=mean")
    a, b = compute_stats(view, "value", use_cache=False), compute_stats(means, "value", use_cache=False)
    assert np.array_equal(a.count, b.count)
    np.testing.assert_allclose(a.sum, b.sum, rtol=1e-5, atol=1e-5)
    r = rank_store(pooled, "value", "auroc", rows="last", top_k=4)
    assert _neurons(r) == _neurons(rank_store(lasts, "value", "auroc", top_k=4))
    assert r.data["store"]["pooling"] == "last"
    with pytest.raises(StoreError, match="--rows mean"):
        rank_store(pooled, "value", "auroc", top_k=4)
    with pytest.raises(StoreError, match="--keep pooled"):
        Store(full, view="mean")


def _build_cmd(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vstore", "build", "--model", str(model), "--data", str(data), "--out", str(out),
            "--dtype", "float32", "--batch-size", "3", "--no-progress", *extra]


def test_two_concurrent_shards_equal_one_build_and_a_killed_shard_resumes_alone(tiny_model, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    stories = tmp_path / "stories.jsonl"
    tiny_models.make_stories(stories, per_value=4)  # 24 examples: 4 batches of 3 per shard
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_build_cmd(tiny_model, stories, one, "--stats-by", "value"), check=True, env=env,
                   capture_output=True)
    shard = [_build_cmd(tiny_model, stories, two, "--shard", f"{i}/2", "--stats-by", "value", "--keep", "stats",
                        "--commit-every", "0") for i in range(2)]
    # shard 0 is killed after its third commit; shard 1 runs to the end beside it
    procs = [subprocess.Popen(shard[0], env={**env, "VSTORE_FAULT": "after-attrs:3"}, stderr=subprocess.PIPE),
             subprocess.Popen(shard[1], env=env, stderr=subprocess.PIPE)]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes[0] == 99 and codes[1] == 0, procs[1].stderr.read() if procs[1].stderr else ""
    info = Store(two).info()
    assert info["state"] == "building" and [p["state"] for p in info["parts"]] == ["building", "complete"]
    assert info["parts"][0]["committed_examples"] < info["parts"][0]["n_examples"]
    assert main(["info", str(two)]) == 0
    with pytest.raises(StoreError, match="sharded build"):  # not resumed as one build
        build_store(two, model=str(tiny_model), data=stories, dtype="float32", batch_size=3, progress=False,
                    stats_by=["value"], keep="stats")
    res = subprocess.run(shard[0], env=env, capture_output=True, text=True)  # shard 0 resumes alone
    assert res.returncode == 0, res.stderr
    assert "resumed at example" in res.stderr
    a, b = Store(one), Store(two)
    assert b.state == "complete" and [p.name for p in b.parts] == ["0000", "0001"]
    assert [e["shard"] for e in b.meta["parts"]] == [[0, 2], [1, 2]]
    assert np.array_equal(np.concatenate([b.rows(p.name, "example") for p in b.parts]), a.rows("0000", "example"))
    assert np.array_equal(np.concatenate([b.rows(p.name, "token") for p in b.parts]), a.rows("0000", "token"))
    _same_moments(compute_stats(two, "value"), compute_stats(one, "value", use_cache=False))
    assert _neurons(rank_store(two, "value", "welch-t", top_k=6)) == _neurons(rank_store(one, "value", "welch-t",
                                                                                         top_k=6))


def test_sharded_activations_equal_one_build(tiny_model, stories, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    one, two = tmp_path / "one", tmp_path / "two"
    build_store(one, model=str(tiny_model), data=stories, dtype="float32", batch_size=3, progress=False)
    procs = [subprocess.Popen(_build_cmd(tiny_model, stories, two, "--shard", f"{i}/2"), env=env,
                              stderr=subprocess.DEVNULL) for i in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    a, b = Store(one), Store(two)
    acts = np.concatenate([np.asarray(b.acts(p.name)[:, : p.committed_rows]) for p in b.parts], axis=1)
    assert np.array_equal(acts, np.asarray(a.acts("0000")[:]))
    with pytest.raises(StoreError, match="complete store"):
        build_store(two, model=str(tiny_model), data=stories, dtype="float32", batch_size=3, progress=False)
    with pytest.raises(StoreError, match="not a build of 3 shards"):
        build_store(two, model=str(tiny_model), data=stories, dtype="float32", batch_size=3, progress=False,
                    shard="0/3")


def test_memory_url_store_builds_and_ranks_through_zarr(tiny_model, stories, tmp_path):
    url = f"memory://vstore-test/{tmp_path.name}/store"
    build_store(url, model=str(tiny_model), data=stories, dtype="float16", progress=False, stats_by=["value"])
    local = tmp_path / "local"
    build_store(local, model=str(tiny_model), data=stories, dtype="float16", progress=False)
    st = Store(url)
    assert st.url == url and st.location == url and st.state == "complete"
    _same_moments(compute_stats(url, "value", use_cache=False), compute_stats(local, "value", use_cache=False))
    live = compute_stats(url, "value")
    assert live.from_cache
    _same_moments(live, compute_stats(local, "value", use_cache=False))
    a = rank_store(url, "value", "auroc", top_k=5, use_cache=False)
    b = rank_store(local, "value", "auroc", top_k=5, use_cache=False)
    assert _neurons(a) == _neurons(b) and a.data["store"]["path"] == url


@pytest.fixture(scope="module")
def cluster():
    """One real LocalCluster of two worker processes for the module's Dask tests."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as c:
        yield c


def test_dask_split_half_and_auroc_equal_one_process(tiny_model, stories, tmp_path, cluster):
    out = tmp_path / "s"
    build_store(out, model=str(tiny_model), data=stories, dtype="float16", progress=False)
    address = cluster.scheduler_address
    assert len(cluster.workers) == 2
    for x, y in zip(compute_split_stats(out, "value", use_cache=False),
                    compute_split_stats(out, "value", use_cache=False, dask=address), strict=True):
        _same_moments(x, y)
    a = compute_auroc(out, "value", use_cache=False, memory=48 * 3 * 65536 * 4 // 2)  # two blocks per layer
    b = compute_auroc(out, "value", use_cache=False, memory=48 * 3 * 65536 * 4 // 2, dask=address)
    assert a.passes == b.passes == 4
    assert np.array_equal(a.auroc, b.auroc, equal_nan=True) and a.rows == b.rows and a.nonfinite == b.nonfinite
    r1 = rank_store(out, "value", "welch-t", top_k=5, split_half=True, use_cache=False)
    r2 = rank_store(out, "value", "welch-t", top_k=5, split_half=True, use_cache=False, dask=address)
    assert _neurons(r1) == _neurons(r2) and r1.jaccard == r2.jaccard


def _moto(monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("s3fs", reason="s3fs is not installed: no s3:// test")
    server = pytest.importorskip("moto.server", reason="moto[server] is not installed: no s3:// test")
    try:
        srv = server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        srv.start()
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"a moto server cannot be started on 127.0.0.1 ({e})")
    host, port = srv.get_host_and_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("vstore-bucket")
    return srv


def test_s3_store_on_a_local_moto_server_builds_and_ranks_on_dask(tiny_model, stories, tmp_path, monkeypatch):
    srv = _moto(monkeypatch)
    try:
        distributed = pytest.importorskip("distributed")
        url = "s3://vstore-bucket/store"
        build_store(url, model=str(tiny_model), data=stories, dtype="float16", progress=False)
        local = tmp_path / "local"
        build_store(local, model=str(tiny_model), data=stories, dtype="float16", progress=False)
        want = compute_stats(local, "value", use_cache=False)
        _same_moments(compute_stats(url, "value", use_cache=False), want)
        # the workers start after the endpoint is in the environment, so they reach the same server
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as c:
            _same_moments(compute_stats(url, "value", use_cache=False, dask=c.scheduler_address), want)
        r = rank_store(url, "value", "welch-t", top_k=4)
        assert _neurons(r) == _neurons(rank_store(local, "value", "welch-t", top_k=4))
        assert rank_store(url, "value", "welch-t", top_k=4).from_cache
    finally:
        srv.stop()


def test_cli_build_flags_and_info(tiny_model, stories, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["build", "--model", str(tiny_model), "--data", str(stories), "--out", str(out), "--stats-by",
                 "value", "--stats-by", "lang", "--keep", "stats", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "statistics by value, lang cached" in err
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["keep"] == "stats" and info["stats_by"] == ["lang", "value"] and info["activation_bytes"] == 0
    assert main(["rank", str(out), "--by", "lang", "--method", "mean-diff", "--top-k", "3", "--out",
                 str(tmp_path / "n.json"), "--no-progress"]) == 0
    assert main(["rank", str(out), "--by", "value", "--method", "auroc", "--top-k", "3", "--out",
                 str(tmp_path / "m.json"), "--no-progress"]) != 0
    assert "--keep all" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--stats-by", "--keep", "--shard"))
    assert main(["build", "--model", str(tiny_model), "--data", str(stories), "--out", str(tmp_path / "b"),
                 "--shard", "2/2", "--no-progress"]) != 0
