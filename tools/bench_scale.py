"""Benchmark the scale-out paths: Dask ranks, build-time statistics, statistics-only stores.

Usage::

    python tools/bench_scale.py [--json FILE] [--repeats 2] [--examples 480] [--neurons 512]

Short by design (well under a minute on two cores): a synthetic store and a tiny random model.

``rank``
    One moments pass (``compute_stats``, cache off) over the same synthetic store: in this process,
    and on a real ``LocalCluster`` of 1 and of 2 worker processes (the cluster is started before the
    clock; its start-up is reported apart). Figures: ``single_mb_per_s``, ``dask1_mb_per_s``,
    ``dask2_mb_per_s``, and the ratios ``dask1_over_single``, ``dask2_over_single``,
    ``dask2_over_dask1``; ``cluster_start_s``.
``build``
    ``build_store`` of a tiny random Llama over the same stories, without and with
    ``stats_by=["value", "lang"]`` (median of ``--repeats``): ``tokens_per_s``,
    ``stats_tokens_per_s``, ``stats_over_plain`` (throughput with statistics / without).
``bytes``
    Store bytes on disk after ``--keep all``, ``--keep pooled`` and ``--keep stats`` builds of the same
    data (with ``--stats-by value``): ``all``, ``pooled``, ``stats`` and ``pooled_over_all``,
    ``stats_over_all``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_rank(tmp: Path, examples: int, neurons: int, repeats: int) -> dict[str, Any]:
    from distributed import LocalCluster
    from make_synthetic_store import make_synthetic_store

    from vstore.stats import compute_stats

    store = tmp / "synthetic"
    make_synthetic_store(store, n_layers=4, n_neurons=neurons, n_examples=examples, rows_per_example=32,
                         groups=4, chunk_rows=1024)
    mb = _size(store) / 1e6

    def timed(dask: str | None) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            compute_stats(store, "value", use_cache=False, dask=dask)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    out: dict[str, Any] = {"store_mb": mb, "single_mb_per_s": mb / timed(None)}
    for n in (1, 2):
        t0 = time.perf_counter()
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
            out["cluster_start_s"] = time.perf_counter() - t0
            timed(c.scheduler_address)  # warm the workers (imports, first open)
            out[f"dask{n}_mb_per_s"] = mb / timed(c.scheduler_address)
    out["dask1_over_single"] = out["dask1_mb_per_s"] / out["single_mb_per_s"]
    out["dask2_over_single"] = out["dask2_mb_per_s"] / out["single_mb_per_s"]
    out["dask2_over_dask1"] = out["dask2_mb_per_s"] / out["dask1_mb_per_s"]
    return out


def bench_build(tmp: Path, repeats: int) -> tuple[dict[str, Any], dict[str, Any]]:
    import tiny_models

    from vstore.build import build_store
    from vstore.models import load_model

    model = tiny_models.make_model(tmp / "model", "llama", 2, 512)
    data = tmp / "stories.jsonl"
    tiny_models.make_stories(data, per_value=24)
    lm = load_model(str(model))

    def run(name: str, **kw: Any) -> tuple[float, int, Path]:
        times, tokens = [], 0
        out = tmp / name
        for _ in range(repeats):
            res = build_store(out, model=lm, data=data, dtype="float16", batch_size=8, overwrite=out.exists(),
                              progress=None, on_note=lambda _m: None, **kw)
            times.append(res.seconds)
            tokens = res.tokens
        return statistics.median(times), tokens, out

    t_plain, tokens, full = run("all")
    t_stats, _, _ = run("stats_by", stats_by=["value", "lang"])
    _, _, pooled = run("pooled", stats_by=["value"], keep="pooled")
    _, _, lean = run("stats", stats_by=["value"], keep="stats")
    build = {"tokens": tokens, "tokens_per_s": tokens / t_plain, "stats_tokens_per_s": tokens / t_stats,
             "stats_over_plain": t_plain / t_stats}
    sizes = {"all": _size(full), "pooled": _size(pooled), "stats": _size(lean)}
    sizes.update({"pooled_over_all": sizes["pooled"] / sizes["all"], "stats_over_all": sizes["stats"] / sizes["all"]})
    return build, sizes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures here")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--examples", type=int, default=480, help="examples of the synthetic store (32 rows each)")
    p.add_argument("--neurons", type=int, default=512)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vstore-bench-scale-") as d:
        tmp = Path(d)
        rank = bench_rank(tmp, a.examples, a.neurons, a.repeats)
        build, sizes = bench_build(tmp, a.repeats)
    res = {"rank": rank, "build": build, "bytes": sizes}
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
