"""Reliability: damage is never read as data (`vstore verify`, missing and corrupt chunks), a full disk, unsafe
outputs, and bad input end in one clear error."""

from __future__ import annotations

import errno
import json
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_synthetic_store import make_synthetic_store

from vstore.cli import main
from vstore.errors import DiskSpaceError, StoreError
from vstore.rank import rank_store
from vstore.stats import compute_stats
from vstore.verify import verify_store


def synth(path: Path, **kw: object) -> Path:
    args = dict(n_layers=2, n_neurons=32, n_examples=40, rows_per_example=(3, 9), groups=3, planted=2, effect=3.0,
                dtype="float16", seed=3, chunk_rows=64)
    args.update(kw)
    make_synthetic_store(path, **args)  # type: ignore[arg-type]
    return path


def chunk_files(store: Path) -> list[Path]:
    return sorted(p for p in (store / "parts" / "0000" / "acts" / "c").rglob("*") if p.is_file())


def test_a_whole_store_verifies(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    s = synth(tmp_path / "s")
    rep = verify_store(s)
    assert rep.ok and rep.chunks == len(chunk_files(s)) and rep.bytes > 0
    assert main(["verify", str(s), "--no-progress"]) == 0
    assert "whole" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_chunk_is_named_by_verify_and_refused_by_rank(tmp_path: Path, damage: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    s = synth(tmp_path / "s")
    f = chunk_files(s)[1]
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        f.unlink()
    rep = verify_store(s)
    key = "/".join(f.relative_to(s / "parts" / "0000" / "acts" / "c").parts)
    assert not rep.ok and len(rep.damage) == 1 and key in rep.damage[0].where, rep.damage
    with pytest.raises(StoreError, match=r"corrupt|missing"):
        compute_stats(s, "value", use_cache=False)  # never zeros
    assert main(["rank", str(s), "--by", "value", "--method", "mean-diff", "--out", str(tmp_path / "n.json"),
                 "--no-cache", "--no-progress"]) == 2
    assert f.name in capsys.readouterr().err
    assert main(["verify", str(s), "--no-progress"]) == 1
    assert key in capsys.readouterr().out.replace("\n", "")


def test_missing_chunk_of_a_compressed_store_is_damage(tmp_path: Path) -> None:
    s = synth(tmp_path / "z", compressor="zstd-1")
    f = chunk_files(s)[0]
    f.unlink()
    with pytest.raises(StoreError, match="missing chunk"):
        compute_stats(s, "value", use_cache=False)
    assert not verify_store(s).ok


def test_partial_files_are_listed_and_removed(tmp_path: Path) -> None:
    s = synth(tmp_path / "s")
    left = s / "parts" / "0000" / "acts" / "c" / ".0.123.abcd1234.partial"
    left.write_bytes(b"x" * 100)
    rep = verify_store(s)
    assert rep.ok and rep.partial_files == [str(left.relative_to(s))] and left.exists()
    rep = verify_store(s, fix_partial=True)
    assert rep.removed == rep.partial_files and not left.exists()


def test_bad_root_metadata_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    s = synth(tmp_path / "s")
    meta = s / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["vstore"]["format_version"] = "1"
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"format version '1' is not supported.*version 1, an integer"):
        verify_store(s)
    meta.write_text(meta.read_text()[:40])
    assert main(["verify", str(s)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_full_disk_ends_the_build_with_one_clear_error(tiny_model: Path, stories: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that fails in its final flush must not leave the build waiting forever."""
    import vstore.store._writer as writer_mod
    from vstore.build import build_store

    calls = {"n": 0}

    def full(*a: object, **k: object) -> None:
        calls["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device", "chunk")

    monkeypatch.setattr(writer_mod, "write_chunk_file", full)
    result: dict[str, BaseException] = {}

    def run() -> None:
        try:
            build_store(tmp_path / "s", model=str(tiny_model), data=stories, dtype="float32")
        except BaseException as e:  # recorded for the assertions below
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the build hung on a full disk"
    assert isinstance(result.get("error"), DiskSpaceError), result
    assert "no space left on device" in str(result["error"]) and "resume" in str(result["error"])
    assert calls["n"] >= 1 and not list((tmp_path / "s").rglob("*.partial"))
    monkeypatch.undo()
    build_store(tmp_path / "s", model=str(tiny_model), data=stories, dtype="float32")  # space again: it resumes
    assert verify_store(tmp_path / "s").ok


def test_rank_names_the_store_it_cannot_read(tmp_path: Path) -> None:
    s = synth(tmp_path / "s")
    chunk_files(s)[0].unlink()
    with pytest.raises(StoreError, match="missing chunk"):
        rank_store(s, "value", "welch-t", top_k=2, use_cache=False)


def test_outputs_go_only_to_regular_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import os

    from vstore.atomic import write_json_atomic
    from vstore.errors import OutputError

    s = synth(tmp_path / "s")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    for target in (fifo, folder):
        with pytest.raises(OutputError, match="vstore writes only regular files"):
            write_json_atomic(target, {"a": 1})
        assert main(["rank", str(s), "--by", "value", "--method", "welch-t", "--out", str(target), "--no-progress"]) == 2
    assert fifo.exists() and folder.is_dir() and not list(folder.iterdir())  # neither replaced nor written into
    assert main(["rank", str(s), "--by", "value", "--method", "welch-t", "--out", str(tmp_path / "n.npz")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "n.npz").exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    from vstore.data import sample_stories

    assert main(["build", "--out", str(a_file), "--data", str(sample_stories()), "--no-progress"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["study", "--out", str(a_file), "--model", str(tmp_path / "nope")]) == 2
    assert a_file.read_text() == "keep me"
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*partial"))


def test_bad_arguments_are_usage_errors(tmp_path: Path, tiny_model: Path, stories: Path) -> None:
    from vstore.build import build_store
    from vstore.errors import ModelError, UsageError

    s = synth(tmp_path / "s")
    for kw in ({"seed": -1}, {"threshold": float("nan")}):
        with pytest.raises(UsageError, match=next(iter(kw))):
            rank_store(s, "value", "welch-t", **kw)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="every example is in one group"):
        rank_store(s, None, "welch-t")
    with pytest.raises(UsageError, match="the single group 'g00'"):
        rank_store(s, "value", "welch-t", where={"value": ["g00"]})
    for kw in ({"limit": 0}, {"limit": -1}, {"compressor": "zstd-abc"}, {"layers": "1-0"}):
        with pytest.raises((UsageError, StoreError)):
            build_store(tmp_path / "b", model=str(tiny_model), data=stories, **kw)  # type: ignore[arg-type]
        assert not (tmp_path / "b").exists() or not list((tmp_path / "b" / "parts").iterdir())
    build_store(tmp_path / "b", model=str(tiny_model), data=stories)  # nothing left behind blocks a good build
    assert verify_store(tmp_path / "b").ok
    with pytest.raises(ModelError, match="not a torch device"):
        build_store(tmp_path / "c", model=str(tiny_model), data=stories, device="bogus")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            build_store(tmp_path / "c", model=str(tiny_model), data=stories, device="cuda")


def test_a_store_killed_before_its_first_part_builds_again(tmp_path: Path, tiny_model: Path, stories: Path) -> None:
    from vstore.build import build_store
    from vstore.store import Store

    Store.create(tmp_path / "s", {"layers": [0, 1], "model": {"n_neurons": 48}, "dtype": "float32"})  # what a kill leaves
    res = build_store(tmp_path / "s", model=str(tiny_model), data=stories, dtype="float32")
    assert res.examples > 0 and verify_store(tmp_path / "s").ok


def test_bad_data_is_a_data_error(tmp_path: Path) -> None:
    from vstore.data import load_stories
    from vstore.datatools import import_stories
    from vstore.errors import DataError

    line = {"id": "x-en", "value": "v", "lang": "en", "split": "evaluation", "story": "A \ud800 story.",
            "aligned": "Help.", "violating": "Refuse."}
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps(line) + "\n", encoding="utf-8")  # JSON escapes the surrogate: valid JSON, bad text
    with pytest.raises(DataError, match=r"s\.jsonl:1: field 'story' holds a character that is not valid Unicode"):
        load_stories(f)
    csv = tmp_path / "latin1.csv"
    csv.write_bytes("text,good,bad\nCaf\xe9 story.,Help.,Refuse.\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv:2: not UTF-8"):
        import_stories(csv, tmp_path / "o.jsonl", {"story": "text", "aligned": "good", "violating": "bad"}, {})


def test_damaged_store_metadata_is_named(tmp_path: Path) -> None:
    from vstore.store import Store

    s = synth(tmp_path / "s")
    meta = s / "zarr.json"
    good = meta.read_text()
    doc = json.loads(good)
    doc["attributes"]["vstore"]["parts"][0]["committed_rows"] = -5
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"parts\[0\]\.committed_rows is -5"):
        Store(s)
    doc = json.loads(good)
    doc["attributes"]["vstore"]["format_version"] = "1"
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"format version '1' is not supported.*version 1, an integer"):
        Store(s)
    meta.write_text(good[: len(good) // 2])
    with pytest.raises(StoreError, match="damaged group metadata"):
        Store(s)


def test_unknown_site_of_a_neuron_set_is_refused(tmp_path: Path) -> None:
    from vstore.errors import NeuronSetError
    from vstore.neuronset import NeuronSet

    doc = {"format": {"name": "vstore-neurons", "version": 1}, "model": {"n_layers": 2, "n_neurons": 4},
           "method": "vape", "store": {"site": "attn_out"}, "groups": {"a": [{"layer": 0, "neuron": 1, "score": 1.0}]}}
    with pytest.raises(NeuronSetError, match=r"store\.site: unknown capture site 'attn_out'"):
        _ = NeuronSet.from_dict(doc).site


def test_a_second_build_of_the_same_store_is_refused(tmp_path: Path, tiny_model: Path, stories: Path) -> None:
    import fcntl
    import os

    from vstore.build import build_store

    lock = tmp_path / ".s.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running build holds it
    try:
        with pytest.raises(StoreError, match="being written by another build"):
            build_store(tmp_path / "s", model=str(tiny_model), data=stories)
    finally:
        os.close(fd)
    build_store(tmp_path / "s", model=str(tiny_model), data=stories)
    assert not lock.exists()


def test_concurrent_ranks_converge_on_one_cache_entry(tmp_path: Path) -> None:
    import subprocess

    s = synth(tmp_path / "s", n_examples=80)
    code = ("import sys; from vstore.rank import rank_store; "
            "rank_store(sys.argv[1], 'value', 'welch-t', top_k=3, out=sys.argv[2])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(s), str(tmp_path / f"r{i}.json")],
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    from vstore.store import Store

    assert len(Store(s).stats_keys()) == 1
    docs = [json.loads((tmp_path / f"r{i}.json").read_text())["groups"] for i in range(3)]
    assert docs[0] == docs[1] == docs[2]


def test_statistics_never_leave_the_store(tmp_path: Path) -> None:
    s = synth(tmp_path / "s")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (s / "stats").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(StoreError, match="leads outside the store"):
        compute_stats(s, "value")
    assert not list(elsewhere.iterdir())


def test_float16_overflow_counts_only_what_became_inf() -> None:
    import torch

    from vstore.capture import RowSink

    sink = RowSink([0], "token", torch.float16, check_overflow=True)
    valid = torch.ones((1, 4), dtype=torch.bool)
    sink.prepare(valid, torch.zeros((1, 4), dtype=torch.long), 0, 3, "cpu")
    t = torch.tensor([[[65504.0, 65510.0, 65519.0], [65520.0, -70000.0, 1.0], [0.0, 0.0, 0.0], [1e6, 2.0, 3.0]]])
    sink(0, t)
    assert sink.overflow == {0: int(torch.isinf(sink.out).sum())} == {0: 3}


def test_texts_longer_than_the_model_can_read_are_cut(tiny_model_factory, tmp_path: Path) -> None:
    from vstore.build import build_store
    from vstore.store import Store

    gpt2 = tiny_model_factory("gpt2")  # n_positions = 256
    long = " ".join(["the value of a good deed"] * 120)
    row = {"id": "v-a01-en", "value": "v", "lang": "en", "split": "activation", "story": long,
           "aligned": "Help.", "violating": "Refuse.", "rationale": "Because."}
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps(row) + "\n", encoding="utf-8")
    res = build_store(tmp_path / "s", model=str(gpt2), data=f, dtype="float32", max_length=512)
    assert 0 < res.rows <= 256 and Store(tmp_path / "s").n_rows == res.rows


@pytest.mark.parametrize("method", ["welch-t", "auroc"])
def test_skip_damaged_reports_exactly_the_rows_left_out(tmp_path: Path, method: str,
                                                         capsys: pytest.CaptureFixture) -> None:
    from vstore.store import Store

    s = synth(tmp_path / "s")
    f = chunk_files(s)[1]  # layer position 0, second chunk (c/0/1/0)
    layer, chunk = (int(x) for x in f.relative_to(s / "parts" / "0000" / "acts" / "c").parts[:2])
    f.unlink()
    rows = Store(s).parts[0].committed_rows
    want = [("0000", layer, chunk * 64, min(rows, chunk * 64 + 64))]
    res = rank_store(s, "value", method, top_k=2, skip_damaged=True)
    assert res.skipped == want
    assert res.data["params"]["skipped_damaged"] == [{"part": "0000", "layer": Store(s).layers[layer],
                                                      "rows": [want[0][2], want[0][3]]}]
    assert Store(s).stats_keys() == []  # partial statistics are never cached
    out = tmp_path / "n.json"
    assert main(["rank", str(s), "--by", "value", "--method", method, "--top-k", "2", "--skip-damaged",
                 "--out", str(out), "--no-progress"]) == 0
    assert f"rows {want[0][2]}:{want[0][3]}" in capsys.readouterr().err
    with pytest.raises(StoreError, match="missing chunk"):
        rank_store(s, "value", method, top_k=2)


def test_cached_statistics_know_the_chunks_they_came_from(tmp_path: Path) -> None:
    import shutil

    from vstore.store import Store

    s = synth(tmp_path / "s")
    first = compute_stats(s, "value")
    assert compute_stats(s, "value").from_cache
    files = chunk_files(s)
    shutil.copyfile(files[0], files[2])  # a chunk replaced by another whole, valid chunk
    assert not verify_store(s).ok and any("stale" in d.problem for d in verify_store(s).damage)
    again = compute_stats(s, "value")
    assert not again.from_cache and not np.array_equal(again.sum, first.sum)  # recomputed, not served stale
    assert verify_store(s).ok and len(Store(s).stats_keys()) == 1
    files[1].unlink()
    with pytest.raises(StoreError, match="missing chunk"):  # corruption is seen even after caching
        compute_stats(s, "value")


def test_a_nan_neuron_costs_only_its_own_values(tiny_model: Path, stories: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """A neuron that is NaN on every token is left out alone: its layer keeps every row, in build,
    rank and AUROC alike, and the build reports it."""
    import torch
    from transformers import AutoModelForCausalLM

    from vstore.build import build_store
    from vstore.stats import compute_auroc
    from vstore.store import Store

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    m = AutoModelForCausalLM.from_pretrained(str(broken), dtype=torch.float32)
    with torch.no_grad():  # the last layer's neuron 3: NaN on every token (nothing after it to spread into)
        m.model.layers[1].mlp.gate_proj.weight[3] = float("nan")
    m.save_pretrained(str(broken), safe_serialization=True)
    res = build_store(tmp_path / "s", model=str(broken), data=stories, dtype="float32")
    assert res.nonfinite == {"1": res.rows} and "NaN/Inf" in capsys.readouterr().err
    assert Store(tmp_path / "s").meta["nonfinite"] == res.nonfinite
    st = compute_stats(tmp_path / "s", "value")
    assert (st.nonfinite[1, :, 3] == st.count[1]).all() and st.nonfinite.sum() == res.rows
    keep = np.ones(st.n_neurons, bool)
    keep[3] = False
    assert (st.valid()[1][:, keep] == st.count[1][:, None]).all()  # the layer's other neurons keep every row
    ranked = rank_store(tmp_path / "s", "value", "welch-t", top_k=8)
    assert ranked.nonfinite == {1: res.rows} and any(it["layer"] == 1 for g in ranked.groups.values() for it in g)
    assert not any((it["layer"], it["neuron"]) == (1, 3) for g in ranked.groups.values() for it in g)
    auc = compute_auroc(tmp_path / "s", "value")
    assert np.isnan(auc.auroc[1, :, 3]).all() and np.isfinite(auc.auroc[1][:, keep]).all()
    assert auc.nonfinite == {1: res.rows}  # AUROC reports them too
    assert rank_store(tmp_path / "s", "value", "auroc", top_k=3).data["stats"]["nonfinite_values"] == {"1": res.rows}


def test_a_store_whose_folders_lead_outside_is_refused(tmp_path: Path) -> None:
    from vstore.store import Store

    s = synth(tmp_path / "s")
    outside = tmp_path / "outside"
    (s / "parts" / "0000").rename(outside)
    (s / "parts" / "0000").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError, match="leads outside the store"):
        Store(s)
    assert main(["rank", str(s), "--by", "value", "--method", "welch-t", "--out", str(tmp_path / "n.json")]) == 2


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    import subprocess

    s = synth(tmp_path / "s", n_layers=1, n_neurons=4, n_examples=20000, rows_per_example=1, groups=20000, planted=0)
    p = subprocess.run(f"{sys.executable} -m vstore info --json {s} | head -c 10", shell=True, capture_output=True,
                       text=True, timeout=120)  # ~120 KB of JSON (past the pipe buffer) into a pipe closed after 10 bytes
    assert p.stdout and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_threads_and_an_unreachable_scheduler_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import time

    from vstore.errors import UsageError, VstoreError

    s = synth(tmp_path / "s")
    with pytest.raises(UsageError, match=r"threads must be in 1\.\.1024, got 100000"):
        compute_stats(s, "value", threads=100000, use_cache=False)
    t0 = time.monotonic()
    with pytest.raises(VstoreError, match="cannot reach the scheduler"):
        compute_stats(s, "value", dask="tcp://127.0.0.1:9", use_cache=False)
    assert time.monotonic() - t0 < 60
    assert main(["rank", str(s), "--by", "value", "--threads", "100000", "--out", str(tmp_path / "n.json")]) == 2
    assert "--threads must be in 1..1024" in capsys.readouterr().err


def test_a_full_disk_outside_the_writer_is_one_clear_error(tiny_model: Path, stories: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    """ENOSPC while the examples or attributes are written (not a chunk): DiskSpaceError, and one CLI line."""
    from vstore.build import build_store
    from vstore.store import Store

    def full(self: Store, *a: object, **k: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "examples/text")

    monkeypatch.setattr(Store, "add_examples", full)
    with pytest.raises(DiskSpaceError, match=r"no space left on device.*resume"):
        build_store(tmp_path / "s", model=str(tiny_model), data=stories)
    assert main(["build", "--model", str(tiny_model), "--data", str(stories), "--out", str(tmp_path / "t"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and "Traceback" not in err
