"""Ablation and evaluation: scorers against hand computations, run_ablation, the result JSON, the CLI."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest_ablate import (
    down_weight_zeroed,
    family_model,
    make_model_dir,
    make_tokenizer,
    neuron_set,
    stories,
    write_jsonl,
    write_neuron_set,
)

import vstore.ablate
import vstore.ablation_run as ablate_mod
from vstore.ablate import parse_mode, run_ablation
from vstore.cli import main
from vstore.data import Story, join_text, load_stories
from vstore.errors import DataError, NeuronSetError, UsageError, VstoreError
from vstore.evaluate import choice_prompt, score_choice, score_ll, text_nll
from vstore.hooks import Edit, _count_hooks
from vstore.inference import bootstrap_interval, mcnemar_exact
from vstore.models import LoadedModel, load_model
from vstore.neuronset import NeuronSet
from vstore.select import control_set

# big groups, so that ablating them flips some of the tiny model's choices
GROUPS = {
    "harmony": [(la, n) for la in range(3) for n in range(0, 96, 2)],
    "justice": [(la, n) for la in (0, 2) for n in range(1, 96, 3)],
    "integrity": [(1, n) for n in range(40, 60)],
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("ablate")
    make_model_dir(w / "model")
    write_jsonl(w / "eval.jsonl", stories())
    return w


@pytest.fixture(scope="module")
def lm(work: Path) -> LoadedModel:
    return load_model(str(work / "model"))


@pytest.fixture(scope="module")
def nfile(work: Path, lm: LoadedModel) -> Path:
    return write_neuron_set(work / "n.json", neuron_set(lm.identity, GROUPS))


@pytest.fixture(scope="module")
def evals(work: Path) -> list[Story]:
    return load_stories(work / "eval.jsonl")


def _strip_seconds(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_seconds(v) for k, v in obj.items() if k not in ("seconds", "cost")}  # what this run did
    if isinstance(obj, list):
        return [_strip_seconds(v) for v in obj]
    return obj


def _assert_close(a: Any, b: Any, path: str = "") -> None:
    """Equal structures, floats to 1e-6 (a margin recomputed from another prefix differs by rounding)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, abs=1e-6, nan_ok=True), path
    else:
        assert a == b, path


def _won(items: list[dict[str, Any]]) -> dict[str, bool]:
    return {it["id"]: it["aligned_won"] for it in items}


# ----------------------------------------------------------------------------------------------
# scorers against hand computations
# ----------------------------------------------------------------------------------------------


def _hand_ll(model: Any, tok: Any, s: Story, action: str) -> float:
    """Mean log-probability of the action's tokens, from one full forward over story + action."""
    story = tok(s.story, add_special_tokens=False)["input_ids"]
    full = tok(join_text([s.story, action], s.lang), add_special_tokens=False)["input_ids"]
    c = next((i for i, (a, b) in enumerate(zip(story, full, strict=False)) if a != b), min(len(story), len(full)))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return float(np.mean([lp[i - 1, full[i]].item() for i in range(c, len(full))]))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "gpt_neox", "qwen3"])
def test_ll_equals_full_sequence_computation(tmp_path: Path, evals: list[Story], family: str) -> None:
    tok = make_tokenizer(tmp_path / "tok")
    model = family_model(family, vocab=len(tok), layers=2, inter=48)
    got = score_ll(model, tok, evals, batch_size=5)
    for i, s in enumerate(evals):
        assert got.aligned[i] == pytest.approx(_hand_ll(model, tok, s, s.aligned), abs=2e-5)
        assert got.violating[i] == pytest.approx(_hand_ll(model, tok, s, s.violating), abs=2e-5)


def test_ll_uses_softcapping(tmp_path: Path, evals: list[Story]) -> None:
    tok = make_tokenizer(tmp_path / "tok")
    model = family_model("gemma2", vocab=len(tok))
    model.config.final_logit_softcapping = 0.05  # so strong that it dominates the scores
    got = score_ll(model, tok, evals[:2])
    assert got.aligned[0] == pytest.approx(_hand_ll(model, tok, evals[0], evals[0].aligned), abs=2e-5)


def test_scores_do_not_depend_on_the_batch(lm: LoadedModel, evals: list[Story]) -> None:
    for fn in (score_ll, score_choice):
        one = fn(lm.model, lm.tokenizer, evals[:6], batch_size=1)
        many = fn(lm.model, lm.tokenizer, evals[:6], batch_size=4)
        np.testing.assert_allclose(one.aligned, many.aligned, atol=1e-5)
        np.testing.assert_allclose(one.violating, many.violating, atol=1e-5)


def test_choice_is_invariant_to_option_order(lm: LoadedModel, evals: list[Story]) -> None:
    ab = score_choice(lm.model, lm.tokenizer, evals, orders=("AB", "BA"))
    ba = score_choice(lm.model, lm.tokenizer, evals, orders=("BA", "AB"))
    assert np.array_equal(ab.aligned, ba.aligned) and np.array_equal(ab.violating, ba.violating)
    # a bias towards option A shifts both actions' scores alike: the difference is unchanged
    a_ids = [lm.tokenizer(x, add_special_tokens=False)["input_ids"] for x in (" A", "A")]
    a_ids = sorted({ids[0] for ids in a_ids if len(ids) == 1})
    assert a_ids

    def bias(_m: Any, _i: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[..., a_ids] += 4.0
        return out

    h = lm.model.get_output_embeddings().register_forward_hook(bias)
    try:
        biased = score_choice(lm.model, lm.tokenizer, evals)
        one_order = score_choice(lm.model, lm.tokenizer, evals, orders=("AB",))
    finally:
        h.remove()
    np.testing.assert_allclose(biased.aligned - biased.violating, ab.aligned - ab.violating, atol=1e-4)
    assert (one_order.aligned_won).all(), "shown in one order only, the biased model always picks A"


def test_choice_prompt_by_language(evals: list[Story]) -> None:
    en = next(s for s in evals if s.lang == "en")
    zh = next(s for s in evals if s.lang == "zh")
    assert choice_prompt(en, "x", "y").endswith("A. x\nB. y\nAnswer:")
    assert choice_prompt(zh, "x", "y").endswith("A. x\nB. y\n答案：")


def test_choice_equals_hand_computation(lm: LoadedModel, evals: list[Story]) -> None:
    s = evals[0]
    tok, model = lm.tokenizer, lm.model
    letter = {x: sorted({ids[0] for ids in (tok(v, add_special_tokens=False)["input_ids"] for v in (" " + x, x))
                         if len(ids) == 1}) for x in "AB"}

    def lp(prompt: str) -> dict[str, float]:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        return {x: float(torch.logsumexp(out[letter[x]], 0)) for x in "AB"}

    p1, p2 = lp(choice_prompt(s, s.aligned, s.violating)), lp(choice_prompt(s, s.violating, s.aligned))
    got = score_choice(model, tok, [s])
    assert got.aligned[0] == pytest.approx((p1["A"] + p2["B"]) / 2, abs=1e-5)
    assert got.violating[0] == pytest.approx((p1["B"] + p2["A"]) / 2, abs=1e-5)


def _hand_nll(model: Any, tok: Any, text: str) -> tuple[float, int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return -sum(lp[i - 1, ids[i]].item() for i in range(1, len(ids))), len(ids) - 1


def test_text_nll_equals_hand_computation(lm: LoadedModel) -> None:
    texts = ["a short line", "Story 0 about harmony: a neighbour asks for help.", "关于harmony的故事"]
    nll, count = text_nll(lm.model, lm.tokenizer, texts, batch_size=2)
    for i, t in enumerate(texts):
        want, n = _hand_nll(lm.model, lm.tokenizer, t)
        assert count[i] == n and nll[i] == pytest.approx(want, rel=1e-5)


def test_metric_nll_equals_hand_computation(work: Path, lm: LoadedModel, nfile: Path) -> None:
    lines = ["Story 1 about justice: a neighbour asks.", "Help them honestly.", "Ignore them for gain 3."]
    txt = work / "en.txt"
    txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = run_ablation(lm, nfile, txt, None, metric="nll", groups="integrity", controls=0, progress=False)
    tok = lm.tokenizer
    sums = [_hand_nll(lm.model, tok, t) for t in lines]
    assert res["baseline"]["nll"] == pytest.approx(sum(s for s, _ in sums) / sum(n for _, n in sums), rel=1e-6)
    assert [it["lang"] for it in res["baseline"]["items"]] == ["en"] * 3
    with Edit(lm.model, {1: list(range(40, 60))}):
        abl = [_hand_nll(lm.model, tok, t) for t in lines]
    (entry,) = res["ablations"]
    assert entry["nll"] == pytest.approx(sum(s for s, _ in abl) / sum(n for _, n in abl), rel=1e-6)
    assert entry["delta"] == pytest.approx(entry["nll"] - res["baseline"]["nll"])
    assert res["cross_lang"] == {"groups": ["integrity"], "langs": ["en"], "matrix": [[pytest.approx(entry["delta"])]]}


def test_metric_nll_on_story_files_per_language(work: Path, lm: LoadedModel, nfile: Path) -> None:
    res = run_ablation(lm, nfile, work / "eval.jsonl", None, metric="nll", groups="harmony", controls=1,
                       progress=False)
    rows = {(r["value"], r["lang"]) for r in res["ablations"][0]["breakdown"]}
    assert ("*", "en") in rows and ("*", "zh") in rows and ("*", "*") in rows
    assert len(res["cross_lang"]["matrix"][0]) == 2
    assert res["ablations"][0]["vs_controls"]["n"] == 1


# ----------------------------------------------------------------------------------------------
# run_ablation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scorer", ["ll", "choice"])
def test_hook_ablation_equals_zeroed_weights(work: Path, lm: LoadedModel, nfile: Path, scorer: str) -> None:
    """The acceptance contract: target ablation == the baseline of a copy with down_proj columns zeroed."""
    zdir = work / "zeroed"
    if not zdir.exists():
        m = copy.deepcopy(lm.model)
        per: dict[int, list[int]] = {}
        for la, n in GROUPS["harmony"]:
            per.setdefault(la, []).append(n)
        down_weight_zeroed(m, "llama", per)
        m.save_pretrained(zdir, safe_serialization=True)
        for f in (work / "model").glob("tokenizer*"):
            shutil.copy(f, zdir)
    hooked = run_ablation(lm, nfile, work / "eval.jsonl", None, groups="harmony", controls=0, scorer=scorer,
                          progress=False)
    notes: list[str] = []
    zeroed = run_ablation(str(zdir), nfile, work / "eval.jsonl", None, groups="harmony", controls=0, scorer=scorer,
                          progress=False, on_note=notes.append)
    assert any("weights" in n for n in notes), "another weights hash is accepted with a note"
    (target,) = hooked["ablations"]
    assert _won(target["items"]) == _won(zeroed["baseline"]["items"])
    a = np.array([[it["score_aligned"], it["score_violating"]] for it in target["items"]])
    z = np.array([[it["score_aligned"], it["score_violating"]] for it in zeroed["baseline"]["items"]])
    np.testing.assert_allclose(a, z, atol=1e-6)
    b = np.array([[it["score_aligned"], it["score_violating"]] for it in hooked["baseline"]["items"]])
    assert np.abs(a - b).max() > 1e-3, "the ablation must change the scores for the test to mean anything"


@pytest.mark.parametrize("scorer", ["ll", "choice"])
def test_value_consistency_is_deterministic(work: Path, lm: LoadedModel, nfile: Path, scorer: str) -> None:
    kw = {"groups": "justice,integrity", "controls": 2, "seed": 5, "scorer": scorer, "progress": False}
    a = run_ablation(lm, nfile, work / "eval.jsonl", None, **kw)
    b = run_ablation(lm, nfile, work / "eval.jsonl", None, **kw)
    assert _strip_seconds(a) == _strip_seconds(b)
    assert _count_hooks(lm.model) == 0


def test_result_json_shape(work: Path, lm: LoadedModel, nfile: Path) -> None:
    out = work / "shape.json"
    res = run_ablation(lm, nfile, work / "eval.jsonl", out, controls=1, controls_on="all", progress=False,
                       overwrite=True)
    on_disk = json.loads(out.read_text(encoding="utf-8"))
    assert _strip_seconds(on_disk) == _strip_seconds(res)
    assert res["complete"] is True and res["format"] == {"name": "vstore-ablation", "version": 1}
    base = res["baseline"]
    assert 0 <= base["value_consistency"] <= 1 and len(base["items"]) == 12
    assert set(base["items"][0]) >= {"id", "value", "lang", "aligned_won", "score_aligned", "score_violating"}
    assert [(a["group"], a["kind"], a["seed"]) for a in res["ablations"]] == [
        (g, k, s) for g in GROUPS for k, s in (("target", None), ("control", 0))]
    for a in res["ablations"]:
        assert a["n_neurons"] == len(GROUPS[a["group"]]) == len(a["neurons"])
        assert set(a) >= {"value_consistency", "delta", "relative_change", "ci95", "p_value", "breakdown", "items"}
        cells = {(r["value"], r["lang"]) for r in a["breakdown"]}
        assert {("harmony", "en"), ("justice", "zh"), ("*", "en"), ("harmony", "*"), ("*", "*")} <= cells
        for r in a["breakdown"]:
            assert r["ci95"][0] <= r["delta"] <= r["ci95"][1] and 0 <= r["p_value"] <= 1
        won = np.array([it["aligned_won"] for it in a["items"]])
        assert a["value_consistency"] == pytest.approx(won.mean())
    cv = res["cross_value"]
    assert cv["groups"] == list(GROUPS) and cv["values"] == sorted(GROUPS)
    assert np.asarray(cv["matrix"], dtype=float).shape == (3, 3)
    # cell (i, j) is the change of value j's consistency when group i is ablated
    t = res["ablations"][0]
    row = next(r for r in t["breakdown"] if r["value"] == "justice" and r["lang"] == "*")
    assert cv["matrix"][0][cv["values"].index("justice")] == pytest.approx(row["delta"])
    assert res["ablations"][0]["vs_controls"]["n"] == 1
    assert res["ablations"][0]["vs_controls"]["items_on"] == "all"
    assert {a["items_on"] for a in res["ablations"]} == {"all"}


def test_controls_have_the_same_per_layer_counts(work: Path, lm: LoadedModel, nfile: Path) -> None:
    res = run_ablation(lm, nfile, work / "eval.jsonl", None, groups="integrity", controls=3, progress=False)
    target, *ctl = res["ablations"]
    assert [c["seed"] for c in ctl] == [0, 1, 2]
    tset = {tuple(x) for x in target["neurons"]}
    for c in ctl:
        assert c["layers"] == target["layers"] and not tset & {tuple(x) for x in c["neurons"]}
    assert len({json.dumps(c["neurons"]) for c in ctl}) == 3


def test_union_group(work: Path, lm: LoadedModel, nfile: Path) -> None:
    res = run_ablation(lm, nfile, work / "eval.jsonl", None, groups="justice+integrity", controls=0, progress=False)
    (a,) = res["ablations"]
    assert a["group"] == "justice+integrity"
    assert a["n_neurons"] == len(set(GROUPS["justice"]) | set(GROUPS["integrity"]))


def test_resume_skips_finished_sets(work: Path, lm: LoadedModel, nfile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = work / "resume.json"
    kw = {"groups": "justice,integrity", "controls": 1, "progress": False}
    first = run_ablation(lm, nfile, work / "eval.jsonl", out, overwrite=True, **kw)
    # simulate a run killed before its last set
    doc = json.loads(out.read_text(encoding="utf-8"))
    doc["ablations"] = doc["ablations"][:-1]
    doc["complete"] = False
    out.write_text(json.dumps(doc), encoding="utf-8")
    calls = []
    real = ablate_mod.score_items

    def counting(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ablate_mod, "score_items", counting)
    second = run_ablation(lm, nfile, work / "eval.jsonl", out, **kw)
    assert len(calls) == 1, "only the missing set is computed; the baseline and finished sets are reused"
    _assert_close(_strip_seconds(second), _strip_seconds(first))
    calls.clear()
    run_ablation(lm, nfile, work / "eval.jsonl", out, **kw)
    assert calls == []
    with pytest.raises(DataError, match="different run"):
        run_ablation(lm, nfile, work / "eval.jsonl", out, **{**kw, "scorer": "choice"})


def test_mode_scale_and_parse_mode(work: Path, lm: LoadedModel, nfile: Path) -> None:
    assert parse_mode("scale:0.5") == ("scale", 0.5) and parse_mode("zero") == ("zero", 0.0)
    for bad in ("scale", "scale:x", "half", "zero:1", "scale:inf"):
        with pytest.raises(VstoreError):
            parse_mode(bad)
    one = run_ablation(lm, nfile, work / "eval.jsonl", None, groups="harmony", controls=0, mode="scale:1",
                       progress=False)
    assert _won(one["ablations"][0]["items"]) == _won(one["baseline"]["items"])
    assert one["ablations"][0]["delta"] == 0


def test_mode_mean_from_store(work: Path, lm: LoadedModel, nfile: Path) -> None:
    pytest.importorskip("vstore.stats", reason="vstore.stats (the rank issue) is not there yet")
    from vstore.build import build_store
    from vstore.store import Store

    act = write_jsonl(work / "act.jsonl", stories("activation"))
    store = work / "store"
    if not store.exists():
        build_store(store, model=str(work / "model"), data=str(act), dtype="float32", progress=False)
    means = vstore.ablate._means_from_store(store, lm.identity, "act", [0, 1, 2])
    st = Store(store)
    for pos, layer in enumerate(st.layers):
        acts = np.concatenate([np.asarray(st.acts(p.name)[pos]) for p in st.parts])
        np.testing.assert_allclose(means[layer].numpy(), acts.mean(axis=0), rtol=1e-5, atol=1e-6)
    res = run_ablation(lm, nfile, work / "eval.jsonl", None, groups="integrity", controls=0, mode="mean",
                       store=store, progress=False)
    assert res["ablations"][0]["n_neurons"] == 20
    with pytest.raises(UsageError, match="mode mean needs store") as e:
        run_ablation(lm, nfile, work / "eval.jsonl", None, mode="mean", progress=False)
    assert "--mode mean needs --store" in e.value.for_cli()


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


def test_mcnemar_exact() -> None:
    before = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 0], dtype=bool)
    after = np.array([0, 0, 0, 0, 0, 1, 1, 0, 1, 0], dtype=bool)
    p, b, c = mcnemar_exact(before, after)
    assert (b, c) == (5, 1)
    assert p == pytest.approx(2 * (1 + 6) / 64)  # two-sided binomial, n=6, k<=1
    assert mcnemar_exact(before, before)[0] == 1.0


def test_bootstrap_interval_is_seeded_and_covers_the_delta() -> None:
    rng = np.random.default_rng(0)
    x = rng.random(200) < 0.7
    y = rng.random(200) < 0.4
    a = bootstrap_interval(x, y, np.random.default_rng(1))
    assert a == bootstrap_interval(x, y, np.random.default_rng(1))
    d = y.mean() - x.mean()
    assert a[0] < d < a[1] and a[1] - a[0] < 0.3
    assert bootstrap_interval(x, x, np.random.default_rng(1)) == (0.0, 0.0)


def test_control_set_is_deterministic() -> None:
    target = {0: np.array([1, 2, 3]), 4: np.array([7])}
    a = control_set(target, 50, 0, "g")
    assert {k: v.tolist() for k, v in a.items()} == {k: v.tolist() for k, v in control_set(target, 50, 0, "g").items()}
    assert {k: len(v) for k, v in a.items()} == {0: 3, 4: 1}
    assert not set(a[0]) & {1, 2, 3}
    assert a[0].tolist() != control_set(target, 50, 1, "g")[0].tolist()


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def _doc(lm: LoadedModel, **over: Any) -> dict[str, Any]:
    return neuron_set(lm.identity, {"g": [(0, 1), (2, 5)], "empty": []}, **over)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"architecture": "gpt2"}, r"model\.architecture.*'gpt2'.*'llama'"),
        ({"n_layers": 24}, r"model\.n_layers.*24.*3"),
        ({"n_neurons": 2048}, r"model\.n_neurons.*2048.*96"),
    ],
)
def test_neuron_set_for_another_model(work: Path, lm: LoadedModel, override: dict, match: str) -> None:
    f = write_neuron_set(work / "other.json", _doc(lm, **override))
    with pytest.raises(NeuronSetError, match=match):
        run_ablation(lm, f, work / "eval.jsonl", None, groups="g", progress=False)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"layer": 3, "neuron": 0, "score": 1.0}, r"groups\.g\[0\].*layer 3 out of range"),
        ({"layer": 0, "neuron": 96, "score": 1.0}, r"groups\.g\[0\].*neuron 96 out of range"),
        ({"layer": -1, "neuron": 0, "score": 1.0}, r"groups\.g\[0\]\.layer: expected a non-negative integer"),
        ({"layer": "0", "neuron": 0, "score": 1.0}, r"groups\.g\[0\]\.layer: expected a non-negative integer"),
        ({"neuron": 0, "score": 1.0}, r"groups\.g\[0\]\.layer: expected a non-negative integer"),
        ({"layer": 0, "neuron": 0}, r"groups\.g\[0\]\.score: expected a number"),
    ],
)
def test_layer_or_neuron_out_of_range(work: Path, lm: LoadedModel, entry: dict, match: str) -> None:
    doc = _doc(lm)
    doc["groups"]["g"] = [entry]
    f = write_neuron_set(work / "range.json", doc)
    with pytest.raises(NeuronSetError, match=match) as e:
        NeuronSet.load(f).require_model()
    assert "range.json" in str(e.value)


def test_empty_or_unknown_group(work: Path, lm: LoadedModel) -> None:
    f = write_neuron_set(work / "empty.json", _doc(lm))
    with pytest.raises(NeuronSetError, match=r"groups\.empty.*empty"):
        run_ablation(lm, f, work / "eval.jsonl", None, groups="empty", progress=False)
    with pytest.raises(NeuronSetError, match=r"no group 'nope'.*empty, g"):
        run_ablation(lm, f, work / "eval.jsonl", None, groups="g,nope", progress=False)
    notes: list[str] = []
    res = run_ablation(lm, f, work / "eval.jsonl", None, controls=0, progress=False, on_note=notes.append)
    assert [a["group"] for a in res["ablations"]] == ["g"], "by default, empty groups are skipped"
    assert any("empty" in n for n in notes) and any("empty" in n for n in res["notes"])
    doc = _doc(lm)
    doc["groups"] = {"e1": [], "e2": []}
    with pytest.raises(NeuronSetError, match="every group is empty"):
        run_ablation(lm, write_neuron_set(work / "allempty.json", doc), work / "eval.jsonl", None, progress=False)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("format"), r"format\.name"),
        (lambda d: d["format"].update(version=2), r"format\.version"),
        (lambda d: d.pop("groups"), r"groups: expected an object"),
        (lambda d: d["model"].pop("n_neurons"), r"model\.n_neurons"),
    ],
)
def test_malformed_neuron_set(work: Path, lm: LoadedModel, mutate: Any, match: str) -> None:
    doc = _doc(lm)
    mutate(doc)
    f = write_neuron_set(work / "bad.json", doc)
    with pytest.raises(NeuronSetError, match=match):
        NeuronSet.load(f).require_model()
    (work / "notjson.json").write_text("{", encoding="utf-8")
    with pytest.raises(NeuronSetError, match="not valid JSON"):
        NeuronSet.load(work / "notjson.json").require_model()


def test_evaluation_file_without_the_needed_fields(work: Path, lm: LoadedModel, nfile: Path) -> None:
    rows = stories()
    del rows[3]["violating"]
    bad = write_jsonl(work / "bad_eval.jsonl", rows)
    with pytest.raises(DataError, match=r"bad_eval\.jsonl:4: missing field 'violating'"):
        run_ablation(lm, nfile, bad, None, progress=False)
    with pytest.raises(DataError, match="split 'evaluation'"):
        run_ablation(lm, nfile, write_jsonl(work / "act_only.jsonl", stories("activation")), None, progress=False)
    txt = work / "plain.txt"
    txt.write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError, match="or metric nll"):
        run_ablation(lm, nfile, txt, None, progress=False)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_ablate(work: Path, nfile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = work / "cli.json"
    args = ["ablate", "--model", str(work / "model"), "--neurons", str(nfile), "--data", str(work / "eval.jsonl"),
            "--out", str(out), "--groups", "harmony,integrity", "--controls", "1", "--scorer", "choice",
            "--no-progress", "--overwrite"]
    assert main(args) == 0
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["run"]["scorer"] == "choice" and len(res["ablations"]) == 4
    text = capsys.readouterr().out
    assert "harmony" in text and "cross-value" in text
    assert main([*args[:-1]]) == 0  # resumed: nothing to recompute


def test_cli_bad_input_exit_code(work: Path, lm: LoadedModel, capsys: pytest.CaptureFixture[str]) -> None:
    f = write_neuron_set(work / "cli_other.json", _doc(lm, n_neurons=7))
    code = main(["ablate", "--model", str(work / "model"), "--neurons", str(f), "--data", str(work / "eval.jsonl"),
                 "--out", str(work / "x.json"), "--groups", "g", "--no-progress"])
    assert code == 2
    assert "n_neurons" in capsys.readouterr().err
