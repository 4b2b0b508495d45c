"""`vstore build`: stored activations equal an independent unpadded hooked forward, token by token."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import zarr

from vstore.build import build_store, parse_layers
from vstore.cli import main
from vstore.data import load_examples
from vstore.errors import DataError, DiskSpaceError, ModelError, StoreError, StoreExistsError, VstoreError
from vstore.store import Store


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    g = zarr.open_group(str(path), mode="r")
    acts = np.concatenate([np.asarray(g[f"parts/{p}/acts"][:]) for p in sorted(g["parts"].group_keys())], axis=1)
    ex = np.concatenate([np.asarray(g[f"parts/{p}/rows/example"][:]) for p in sorted(g["parts"].group_keys())])
    pos = np.concatenate([np.asarray(g[f"parts/{p}/rows/position"][:]) for p in sorted(g["parts"].group_keys())])
    return acts, ex, pos, [str(t) for t in g["examples/text"][:]]


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_token_rows_equal_unpadded_single_forward(family, tiny_model_factory, stories, tmp_path):
    model = tiny_model_factory(family)
    out = tmp_path / "store"
    build_store(out, model=str(model), data=stories, dtype="float32", batch_size=4, progress=False)
    acts, ex, pos, texts = _read(out)
    ref = tiny_models.oracle_acts(model, texts)
    # every non-special token of every example is a row, exactly once, in order
    want = [(e, p) for e, (ids, _) in enumerate(ref) for p in range(1, len(ids))]  # position 0 is <s>
    assert list(zip(ex.tolist(), pos.tolist(), strict=True)) == want
    worst = max(float(np.abs(acts[:, r, :] - ref[e][1][:, p, :]).max()) for r, (e, p) in enumerate(want))
    assert worst < 1e-4, f"{family}: max abs diff {worst}"
    tokens = np.concatenate([np.asarray(zarr.open_group(str(out))["parts/0000/rows/token"][:])])
    assert tokens.tolist() == [int(ref[e][0][p]) for e, p in want]


def test_pool_mean_and_last_match_definitions(tiny_model, stories, tmp_path):
    build_store(tmp_path / "m", model=str(tiny_model), data=stories, dtype="float32", pool="mean", batch_size=3, progress=False)
    build_store(tmp_path / "l", model=str(tiny_model), data=stories, dtype="float32", pool="last", batch_size=3, progress=False)
    mean, ex_m, pos_m, texts = _read(tmp_path / "m")
    last, ex_l, pos_l, _ = _read(tmp_path / "l")
    ref = tiny_models.oracle_acts(tiny_model, texts)
    assert ex_m.tolist() == list(range(len(texts))) == ex_l.tolist()
    assert (pos_m == -1).all()
    for e, (ids, a) in enumerate(ref):
        np.testing.assert_allclose(mean[:, e, :], a[:, 1:, :].mean(axis=1), atol=1e-5)
        assert pos_l[e] == len(ids) - 1
        np.testing.assert_allclose(last[:, e, :], a[:, -1, :], atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes_store_rounded_values(dtype, tiny_model, stories, tmp_path):
    import torch

    build_store(tmp_path / "f", model=str(tiny_model), data=stories, dtype="float32", progress=False)
    build_store(tmp_path / "h", model=str(tiny_model), data=stories, dtype=dtype, progress=False)
    full, *_ = _read(tmp_path / "f")
    half, *_ = _read(tmp_path / "h")
    arr = zarr.open_group(str(tmp_path / "h"))["parts/0000/acts"]
    assert arr.attrs["logical_dtype"] == dtype
    tdt = getattr(torch, dtype)
    want = torch.from_numpy(full).to(tdt)
    got = torch.from_numpy(half.view(np.int16)).view(tdt) if dtype == "bfloat16" else torch.from_numpy(half)
    assert torch.equal(got, want)


def test_layers_subset_and_site_down_in(tiny_model_factory, stories, tmp_path):
    model = tiny_model_factory("llama", layers=3)
    build_store(tmp_path / "a", model=str(model), data=stories, dtype="float32", layers="1-2", progress=False)
    build_store(tmp_path / "d", model=str(model), data=stories, dtype="float32", site="down_in", progress=False)
    assert Store(tmp_path / "a").layers == [1, 2]
    acts, *_ = _read(tmp_path / "a")
    full, *_ = _read(tmp_path / "d")
    assert acts.shape[0] == 2 and full.shape[0] == 3
    # down_in = act_fn(gate) * up: differs from the act site, same rows
    act_all, *_ = _read(tmp_path / "a")
    assert not np.allclose(full[1:], act_all)
    assert parse_layers("-1", 3) == [2] and parse_layers("0,2", 3) == [0, 2] and parse_layers("all", 3) is None
    with pytest.raises(VstoreError, match="out of range"):
        parse_layers("5", 3)


def test_texts_aligned_violating_and_labels(tiny_model, stories, tmp_path):
    build_store(tmp_path / "s", model=str(tiny_model), data=stories, texts=["aligned", "violating"],
                labels={"lang": "xx", "source": "unit"}, progress=False)
    st = Store(tmp_path / "s")
    codes, cats = st.labels("polarity")
    assert cats == ["aligned", "violating"] and codes.tolist() == [0, 1] * (len(codes) // 2)
    lc, lcats = st.labels("lang")
    assert lcats == ["xx"] and (lc == 0).all()
    assert "source" in st.label_columns()
    texts = st.texts()
    assert "She helps at once." in texts[0] and "pretends" in texts[1]


def test_append_adds_part_and_refuses_mismatch(tiny_model, stories, eval_stories, tmp_path):
    out = tmp_path / "s"
    build_store(out, model=str(tiny_model), data=stories, progress=False)
    build_store(out, model=str(tiny_model), data=eval_stories, split="evaluation", append=True, progress=False)
    st = Store(out)
    assert [p.name for p in st.parts] == ["0000", "0001"] and st.state == "complete"
    assert st.n_examples == 24
    codes, cats = st.labels("split")
    assert cats == ["activation", "evaluation"] and codes[12:].tolist() == [1] * 12
    _, ex, _, _ = _read(out)
    assert ex.min() == 0 and ex.max() == 23
    with pytest.raises(StoreError, match="dtype"):
        build_store(out, model=str(tiny_model), data=stories, dtype="float32", append=True, progress=False)


def test_refusals_leave_nothing_half_written(tiny_model, stories, tmp_path, monkeypatch):
    out = tmp_path / "s"
    build_store(out, model=str(tiny_model), data=stories, progress=False)
    with pytest.raises(StoreExistsError):
        build_store(out, model=str(tiny_model), data=stories, progress=False)
    with pytest.raises(StoreError, match="already complete"):
        build_store(out, model=str(tiny_model), data=stories, resume=True, progress=False)
    build_store(out, model=str(tiny_model), data=stories, overwrite=True, progress=False)
    with pytest.raises(ModelError, match="no such model path"):
        build_store(tmp_path / "x", model=str(tmp_path / "nope"), data=stories, progress=False)
    assert not (tmp_path / "x").exists()

    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(DiskSpaceError, match="GB free"):
        build_store(tmp_path / "y", model=str(tiny_model), data=stories, progress=False)
    assert not (tmp_path / "y").exists()


def test_unsupported_architecture_lists_supported(tmp_path, stories):
    from transformers import AutoConfig

    d = tmp_path / "m"
    d.mkdir()
    AutoConfig.for_model("bert").save_pretrained(str(d))
    with pytest.raises(ModelError, match="supported: gemma"):
        build_store(tmp_path / "s", model=str(d), data=stories, progress=False)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": "a", "value": "v"\n', "malformed JSON"),
        ('{"id": "a", "value": "v", "lang": "en", "split": "activation", "story": "s", "aligned": "a"}\n', "'violating'"),
        ('{"id": "a", "value": "v", "lang": "en", "split": "test", "story": "s", "aligned": "a", "violating": "b"}\n', "'split'"),
        ('{"id": "a", "value": "v", "lang": "en", "split": "activation", "story": "s", "aligned": "a", "violating": "b"}\n', "'rationale'"),
        ("", "empty"),
    ],
)
def test_bad_data_is_reported_with_file_line_field(content, message, tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as ei:
        load_examples(f)
    if content:
        assert f"{f}:1" in str(ei.value)
    assert main(["build", "--model", "x", "--data", str(f), "--out", str(tmp_path / "s")]) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_txt_data_and_cli_info(tiny_model, tmp_path, capsys):
    f = tmp_path / "plain.txt"
    f.write_text("first line of text\n\nsecond one, a bit longer\n", encoding="utf-8")
    rc = main(["build", "--model", str(tiny_model), "--data", str(f), "--out", str(tmp_path / "s"),
               "--label", "lang=en", "--split", "evaluation", "--no-progress"])
    assert rc == 0
    st = Store(tmp_path / "s")
    assert st.n_examples == 2 and st.labels("lang")[1] == ["en"]
    assert main(["info", str(tmp_path / "s"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["state"] == "complete" and info["examples"] == 2 and info["layers"] == [0, 1]
    assert main(["info", str(tmp_path / "s")]) == 0


def test_store_opens_with_xarray(tiny_model, stories, tmp_path):
    xr = pytest.importorskip("xarray")
    build_store(tmp_path / "s", model=str(tiny_model), data=stories, progress=False)
    ds = xr.open_zarr(str(tmp_path / "s"), group="parts/0000", consolidated=False)
    assert ds["acts"].dims == ("layer", "row", "neuron")
    ex = xr.open_zarr(str(tmp_path / "s"), group="examples", consolidated=False)
    assert "value" in ex and ex["value"].attrs["categories"][0] == "prosperity"


def _state(path: Path) -> dict:
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"]["vstore"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return {}


def test_killed_build_resumes_identical(tiny_model, tmp_path):
    data = tmp_path / "many.jsonl"
    tiny_models.make_stories(data, per_value=20)
    args = [sys.executable, "-m", "vstore", "build", "--model", str(tiny_model), "--data", str(data),
            "--dtype", "float32", "--batch-size", "1", "--commit-every", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "--out", str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    out = tmp_path / "k"
    kills = 0
    for _ in range(3):
        before = sum(p.get("committed_examples", 0) for p in _state(out).get("parts", []))
        proc = subprocess.Popen([*args, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            st = _state(out)
            done = sum(p.get("committed_examples", 0) for p in st.get("parts", []))
            if st.get("state") == "building" and done >= before + 5:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.02)
        proc.wait()
    assert kills >= 1
    assert _state(out)["state"] == "building"
    res = subprocess.run([*args, "--out", str(out)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumed at example" in res.stderr
    a, ea, pa, ta = _read(tmp_path / "ref")
    b, eb, pb, tb = _read(out)
    assert a.shape == b.shape and np.array_equal(a, b)
    assert np.array_equal(ea, eb) and np.array_equal(pa, pb) and ta == tb


def test_float16_overflow_is_detected_and_reported(tiny_model, stories, tmp_path, capsys):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    big = tmp_path / "big"
    shutil.copytree(tiny_model, big)
    m = AutoModelForCausalLM.from_pretrained(str(big), dtype=torch.float32)
    with torch.no_grad():
        m.model.layers[1].mlp.gate_proj.weight.mul_(1e6)  # layer 1 activations far beyond 65504
    m.save_pretrained(str(big), safe_serialization=True)
    res = build_store(tmp_path / "s", model=str(big), data=stories, dtype="float16", progress=False)
    assert set(res.overflow) == {"1"} and res.overflow["1"] > 0
    assert Store(tmp_path / "s").meta["overflow"] == res.overflow
    assert "beyond ±65504" in capsys.readouterr().err
    acts, *_ = _read(tmp_path / "s")
    assert np.isinf(acts[1]).sum() == res.overflow["1"] and np.isfinite(acts[0]).all()


def test_cpu_build_writes_inline_and_matches_the_writer_thread(tiny_model, stories, tmp_path, monkeypatch):
    import functools

    import vstore.build as vbuild
    import vstore.capture as vcapture

    def no_thread(self):
        raise AssertionError("a CPU build started a writer thread")

    with monkeypatch.context() as m:
        m.setattr(vcapture.WriterThread, "start", no_thread)
        build_store(tmp_path / "inline", model=str(tiny_model), data=stories, batch_size=2, commit_every=0)
    monkeypatch.setattr(vbuild, "stream_part", functools.partial(vcapture.stream_part, writer_thread=True))
    build_store(tmp_path / "thread", model=str(tiny_model), data=stories, batch_size=2, commit_every=0)
    a, ea, pa, ta = _read(tmp_path / "inline")
    b, eb, pb, tb = _read(tmp_path / "thread")
    assert a.shape == b.shape and a.shape[1] > 0 and np.array_equal(a, b)
    assert np.array_equal(ea, eb) and np.array_equal(pa, pb) and ta == tb


@pytest.mark.parametrize("skip", [0, 1])
def test_row_ranges_copy_the_rows_a_gather_takes(skip):
    import torch

    from vstore.capture import HostBuffers, RowSink

    valid = torch.zeros((3, 7), dtype=torch.bool)
    valid[0, 1:] = True
    valid[1, [1, 2, 4, 5]] = True  # a gap inside an example: two ranges
    valid[2, 3] = True
    ids = torch.arange(21).reshape(3, 7)
    t = torch.randn((3, 7, 5)) * 100
    t[1, 4, 2] = float("nan")
    outs = []
    for ranges in (True, False):
        sink = RowSink([0, 1], "token", torch.float16, check_overflow=True, buffers=HostBuffers() if ranges else None)
        if not ranges:
            sink.MAX_RANGES = 0
        meta = sink.prepare(valid, ids, skip, 5, "cpu")
        assert (sink.ranges is not None) == ranges
        sink(0, t)
        sink(1, t * 1000)  # overflows float16: counted from the model's values on both paths
        outs.append((sink.out.clone(), meta, dict(sink.nonfinite), dict(sink.overflow)))
    (a, ma, na, oa), (b, mb, nb, ob) = outs
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert all(np.array_equal(x, y) for x, y in zip(ma, mb, strict=True))
    assert a.shape[1] == int(valid[skip:].sum()) and na == nb and oa == ob and oa


def test_host_buffers_are_reused_and_stay_bounded():
    import torch

    from vstore.capture import HostBuffers

    pool = HostBuffers()
    t, buf = pool.take((2, 3, 4), torch.float16)
    assert t.shape == (2, 3, 4) and t.dtype == torch.float16
    t.fill_(7)
    pool.give(buf)
    t2, buf2 = pool.take((2, 3, 4), torch.bfloat16)
    assert buf2 is buf and t2.dtype == torch.bfloat16  # the same memory again
    pool.give(buf2)
    t3, buf3 = pool.take((4, 3, 4000), torch.float32)  # larger than any free buffer: the small one goes
    assert buf3 is not buf and t3.shape == (4, 3, 4000) and buf3.nbytes >= t3.numel() * 4
    t3.fill_(1.0)
    assert float(t3.sum()) == t3.numel()
    pool.give(buf3)
    _, buf4 = pool.take((1, 1, 1), torch.float32)
    assert buf4 is buf3  # the smallest free buffer that fits


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a store, by path (activations, row table, examples)."""
    g = zarr.open_group(str(path), mode="r")
    out: dict[str, np.ndarray] = {}

    def walk(grp, prefix: str) -> None:
        for name, arr in grp.arrays():
            out[prefix + name] = np.asarray(arr[:])
        for name, sub in grp.groups():
            walk(sub, prefix + name + "/")

    walk(g, "")
    return out


@pytest.mark.parametrize("chunk_rows,dtype,site", [(450, "float16", "act"), (200, "bfloat16", "act,down_in,resid"),
                                                   (1000, "float32", "act")])
def test_rows_written_in_place_equal_rows_copied(chunk_rows, dtype, site, tiny_model, stories, tmp_path, monkeypatch):
    """On the CPU the hooks write each batch's rows straight into the writer's chunk buffers (also
    across a chunk boundary, into the next chunk's buffers); the store is the one the copying path
    writes, array for array, and a build killed with rows in those buffers resumes to the same store."""
    import vstore.capture as cap
    import vstore.store._format as fmt
    from vstore.store import PartWriter

    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    monkeypatch.setattr(fmt, "TARGET_CHUNK_BYTES", chunk_rows * 48 * itemsize)
    kw = dict(model=str(tiny_model), data=stories, dtype=dtype, site=site, batch_size=4, progress=False)
    reserve = PartWriter.reserve
    placed = []

    def spy(self, n):
        views = reserve(self, n)
        placed.append(0 if views is None else len(views))
        return views

    monkeypatch.setattr(PartWriter, "reserve", spy)
    build_store(tmp_path / "in_place", **kw)
    assert any(placed) and (chunk_rows != 450 or 2 in placed), placed  # in place, and across a boundary
    monkeypatch.setattr(PartWriter, "reserve", lambda self, n: None)
    build_store(tmp_path / "copied", **kw)
    want = _store_arrays(tmp_path / "copied")
    got = _store_arrays(tmp_path / "in_place")
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype, k

    # a forward that fails after its hooks wrote into the reserved buffers, then a resume
    monkeypatch.setattr(PartWriter, "reserve", reserve)
    capture, calls = cap._capture, []

    def failing(*a, **k):
        capture(*a, **k)
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed mid-build")

    monkeypatch.setattr(cap, "_capture", failing)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_store(tmp_path / "resumed", **kw)
    monkeypatch.setattr(cap, "_capture", capture)
    build_store(tmp_path / "resumed", **kw)
    got = _store_arrays(tmp_path / "resumed")
    for k in want:
        assert np.array_equal(got[k], want[k]), k
