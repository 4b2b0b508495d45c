"""The cheaper ablation study gives the same answers: the shared unablated prefix is exact on every
architecture, and the default study (controls on their own items, prefix shared) computes every cell
that the full-matrix path computes equal to float tolerance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest_ablate import (
    family_model,
    make_model_dir,
    make_tokenizer,
    neuron_set,
    stories,
    write_jsonl,
    write_neuron_set,
)
from tiny_models import FAMILIES

from vstore.ablate import run_ablation
from vstore.ablation_result import ALL
from vstore.data import load_stories
from vstore.errors import UsageError
from vstore.evaluate import score_choice, score_ll, text_nll
from vstore.hooks import Edit
from vstore.lm import Prefix, choose_threads, set_threads
from vstore.models import LoadedModel, decoder_layers, load_model

# sets whose lowest edited layer is 1 or 2, so the prefix has something to share (and one at layer 0)
GROUPS = {
    "harmony": [(la, n) for la in (1, 2) for n in range(0, 96, 3)],
    "justice": [(la, n) for la in (0, 2) for n in range(1, 96, 3)],
    "integrity": [(2, n) for n in range(40, 70)],
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("ablate_cost")
    make_model_dir(w / "model")
    write_jsonl(w / "eval.jsonl", stories())
    return w


@pytest.fixture(scope="module")
def lm(work: Path) -> LoadedModel:
    return load_model(str(work / "model"))


@pytest.fixture(scope="module")
def nfile(work: Path, lm: LoadedModel) -> Path:
    return write_neuron_set(work / "n.json", neuron_set(lm.identity, GROUPS))


def _flat(r: Any) -> np.ndarray:
    if hasattr(r, "aligned"):
        return np.concatenate([r.aligned, r.violating])
    return np.asarray(r[0], dtype=np.float64)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_replay_equals_the_full_forward(tmp_path: Path, family: str) -> None:
    write_jsonl(tmp_path / "e.jsonl", stories())
    ev = load_stories(tmp_path / "e.jsonl")
    tok = make_tokenizer(tmp_path / "tok")
    m = family_model(family, vocab=len(tok), layers=4, inter=48)
    layers = decoder_layers(m)
    scorers = {
        "ll": lambda **k: score_ll(m, tok, ev, batch_size=3, **k),
        "choice": lambda **k: score_choice(m, tok, ev, batch_size=5, **k),
        "nll": lambda **k: text_nll(m, tok, [s.story for s in ev], batch_size=4, **k),
    }
    for name, fn in scorers.items():
        rec = Prefix(layers, record=1)
        base = fn(prefix=rec)
        assert len(rec.recorded) > 0 and rec.replayed == 0
        with Edit(m, {2: [1, 5, 7], 3: [0, 2]}):
            ref = fn()
            up = Prefix(layers, replay=(1, rec.recorded), record=2)
            got = fn(prefix=up)
            top = Prefix(layers, replay=(2, up.recorded))
            got2 = fn(prefix=top)
        assert up.replayed > 0 and top.replayed > 0, name
        assert np.abs(_flat(ref) - _flat(base)).max() > 1e-6, f"{name}: the edit changes nothing; the test proves nothing"
        np.testing.assert_allclose(_flat(got), _flat(ref), rtol=0, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(_flat(got2), _flat(ref), rtol=0, atol=1e-5, err_msg=name)


def test_prefix_replays_only_with_every_row_recorded(lm: LoadedModel) -> None:
    ev = load_stories(write_jsonl(Path(lm.path) / "e.jsonl", stories()))
    layers = decoder_layers(lm.model)
    rec = Prefix(layers, record=1)
    ref = score_ll(lm.model, lm.tokenizer, ev, batch_size=4, prefix=rec)
    # forget one action's states: its batch must run whole, also the story pass its cache continues
    del rec.recorded[next(k for k in rec.recorded if k[0] == "a")]
    p = Prefix(layers, replay=(1, rec.recorded))
    with Edit(lm.model, {1: [3, 4], 2: [5]}):
        want = score_ll(lm.model, lm.tokenizer, ev, batch_size=4)
        got = score_ll(lm.model, lm.tokenizer, ev, batch_size=4, prefix=p)
    n_batches = -(-len(ev) // 4)
    assert p.replayed == 2 * (n_batches - 1)
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=0, atol=1e-6)
    assert np.abs(_flat(want) - _flat(ref)).max() > 1e-6
    with pytest.raises(UsageError):
        Prefix(layers, record=0)


def _cells(a: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["value"], r["lang"]): r for r in a["breakdown"]}


def test_default_study_equals_the_full_matrix_on_the_cells_both_compute(work: Path, lm: LoadedModel, nfile: Path) -> None:
    kw: dict[str, Any] = {"controls": 2, "progress": False}
    full = run_ablation(lm, nfile, work / "eval.jsonl", None, controls_on="all", prefix_mb=0, **kw)
    cheap = run_ablation(lm, nfile, work / "eval.jsonl", None, **kw)
    assert cheap["cost"]["item_passes"] < full["cost"]["item_passes"]
    assert cheap["cost"]["prefix_replays"] > 0 and full["cost"]["prefix_replays"] == 0
    assert [(a["group"], a["kind"], a["seed"]) for a in cheap["ablations"]] == \
        [(a["group"], a["kind"], a["seed"]) for a in full["ablations"]]
    compared = 0
    for f, c in zip(full["ablations"], cheap["ablations"], strict=True):
        assert c["items_on"] == ("all" if c["kind"] == "target" else "own")
        if c["kind"] == "control":
            assert {it["value"] for it in c["items"]} == {c["group"]}
        fc = _cells(f)
        for key, row in _cells(c).items():
            if key[0] == ALL and c["items_on"] == "own":
                continue  # an aggregate over other items than the full path's
            for field in ("value_consistency", "delta", "margin_delta", "won_to_lost", "lost_to_won"):
                assert row[field] == pytest.approx(fc[key][field], abs=1e-6), (c["group"], c["kind"], key, field)
            compared += 1
        fi = {it["id"]: it for it in f["items"]}
        for it in c["items"]:
            assert it["score_aligned"] == pytest.approx(fi[it["id"]]["score_aligned"], abs=1e-5)
            assert it["aligned_won"] == fi[it["id"]]["aligned_won"] or \
                abs(it["score_aligned"] - it["score_violating"]) < 1e-5
    assert compared > 20
    np.testing.assert_allclose(np.asarray(cheap["cross_value"]["matrix"], dtype=float),
                               np.asarray(full["cross_value"]["matrix"], dtype=float), rtol=0, atol=1e-6)
    # the target beside its controls on the group's own items: the same comparison in both
    for f, c in zip(full["ablations"], cheap["ablations"], strict=True):
        if c["kind"] != "target":
            continue
        own = _cells(f)[(c["group"], ALL)]
        vs, vf = c["vs_controls"], f["vs_controls"]
        assert vs["items_on"] == "own" and vs["target_delta"] == pytest.approx(own["delta"], abs=1e-9)
        assert vs["target_margin_delta"] == pytest.approx(own["margin_delta"], abs=1e-6)
        ctl_own = [_cells(a)[(c["group"], ALL)]["delta"] for a in full["ablations"]
                   if a["kind"] == "control" and a["group"] == c["group"]]
        assert vs["mean_delta"] == pytest.approx(float(np.mean(ctl_own)), abs=1e-6)
        assert vf["items_on"] == "all"


def test_targets_on_own_and_resume_keeps_items_on(work: Path, lm: LoadedModel, nfile: Path) -> None:
    out = work / "own.json"
    res = run_ablation(lm, nfile, work / "eval.jsonl", out, controls=1, targets_on="own", progress=False,
                       overwrite=True)
    assert {a["items_on"] for a in res["ablations"]} == {"own"}
    assert res["ablations"][0]["vs_controls"]["items_on"] == "all"  # the same items as the target's
    again = run_ablation(lm, nfile, work / "eval.jsonl", out, controls=1, targets_on="own", progress=False)
    assert again["cost"]["item_passes"] == 0
    redo = run_ablation(lm, nfile, work / "eval.jsonl", out, controls=1, progress=False)
    assert redo["cost"]["item_passes"] == 12 * 3  # the targets again, on all items; the controls kept
    with pytest.raises(UsageError, match="controls_on"):
        run_ablation(lm, nfile, work / "eval.jsonl", None, controls_on="some", progress=False)


def test_thread_choice() -> None:
    import os

    before = torch.get_num_threads()
    try:
        n = choose_threads(sample_s=0.05)
        assert 1 <= n <= len(os.sched_getaffinity(0))
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(UsageError):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_cli_flags(work: Path, nfile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vstore.cli import main

    out = work / "cli.json"
    rc = main(["ablate", "--model", str(work / "model"), "--neurons", str(nfile), "--data", str(work / "eval.jsonl"),
               "--out", str(out), "--groups", "integrity", "--controls", "1", "--controls-on", "all",
               "--prefix-mb", "0", "--threads", "1", "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["run"]["controls_on"] == "all" and doc["cost"]["prefix_replays"] == 0
    assert "baseline vs chance" in capsys.readouterr().out


@pytest.mark.parametrize(("scorer", "metric"), [("ll", "vc"), ("choice", "vc"), ("ll", "nll")])
def test_sets_per_forward_equal_one_set_at_a_time(work: Path, lm: LoadedModel, nfile: Path, scorer: str,
                                                  metric: str) -> None:
    (work / "zh.txt").write_text("今天天气很好。\n邻居请李娜帮忙。\n", encoding="utf-8")
    (work / "en.txt").write_text("The weather is nice.\nA neighbour asks for help.\n", encoding="utf-8")
    kw: dict[str, Any] = {"controls": 2, "progress": False, "scorer": scorer, "metric": metric,
                          "side_effect": "nll", "general_text": {"zh": work / "zh.txt", "en": work / "en.txt"}}
    one = run_ablation(lm, nfile, work / "eval.jsonl", None, **kw)
    three = run_ablation(lm, nfile, work / "eval.jsonl", None, sets_per_forward=3, **kw)
    assert three["run"]["sets_per_forward"] == 3
    field = "score_aligned" if metric == "vc" else "nll_sum"
    for a, b in zip(one["ablations"], three["ablations"], strict=True):
        assert (a["group"], a["kind"], a["seed"], a["items_on"]) == (b["group"], b["kind"], b["seed"], b["items_on"])
        np.testing.assert_allclose([it[field] for it in b["items"]], [it[field] for it in a["items"]], rtol=0, atol=1e-5)
        assert b["side_effect"]["nll"] == pytest.approx(a["side_effect"]["nll"], abs=1e-5)
        if metric == "vc":
            assert b["margin_delta"] == pytest.approx(a["margin_delta"], abs=1e-5)
    with pytest.raises(UsageError, match="sets_per_forward"):
        run_ablation(lm, nfile, work / "eval.jsonl", None, sets_per_forward=0, progress=False)


def test_multi_edit_blocks_equal_separate_edits(lm: LoadedModel) -> None:
    from vstore.hooks import MultiEdit, _count_hooks

    ev = load_stories(write_jsonl(Path(lm.path) / "e2.jsonl", stories()))
    sets = [{1: [3, 4], 2: [5]}, {0: [7]}, {}]
    want = []
    for st in sets:
        with Edit(lm.model, st, mode="scale", factor=0.5):
            want.append(score_ll(lm.model, lm.tokenizer, ev))
    before = _count_hooks(lm.model)
    with MultiEdit(lm.model, sets, mode="scale", factor=0.5):
        got = score_ll(lm.model, lm.tokenizer, ev, replicas=3)
    assert _count_hooks(lm.model) == before
    for k, w in enumerate(want):
        np.testing.assert_allclose(got.aligned[k], w.aligned, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got.violating[k], w.violating, rtol=0, atol=1e-5)
    assert np.abs(want[0].aligned - want[2].aligned).max() > 1e-6
