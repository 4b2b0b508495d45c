"""`vstore compare`: overlaps with chance, within-set specificity, depth across models, value similarity —
numbers computed by hand on small fixtures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from vstore.compare import compare_sets


def _set(path: Path, groups: dict, *, model: str = "m", n_layers: int = 4, n_neurons: int = 10, method: str = "welch-t",
         where: dict | None = None, extra: dict | None = None) -> Path:
    doc = {"format": {"name": "vstore-neurons", "version": 1},
           "model": {"name": model, "architecture": "llama", "n_layers": n_layers, "n_neurons": n_neurons},
           "method": method, "by": "value", "where": where or {}, "n_neurons": n_neurons,
           "groups": {g: [{"layer": la, "neuron": n, "score": 1.0} for la, n in items] for g, items in groups.items()},
           **(extra or {})}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@pytest.fixture
def sets(tmp_path: Path) -> dict[str, Path]:
    return {
        "a": _set(tmp_path / "a.json", {"g1": [(0, 1), (0, 2), (1, 3)], "g2": [(2, 5)]}),
        "b": _set(tmp_path / "b.json", {"g1": [(0, 1), (1, 3), (1, 4)], "g2": [(2, 5), (3, 0)]}, method="vape"),
        "c": _set(tmp_path / "c.json", {"g1": [(0, 0), (4, 1), (6, 2)]}, model="other", n_layers=8),
    }


def _row(doc: dict, a: str, b: str, group: str) -> dict:
    return next(r for r in doc["overlaps"] if (r["a"], r["b"], r["group"]) == (a, b, group))


def test_overlap_of_one_model_against_exact_chance(sets: dict[str, Path]) -> None:
    doc = compare_sets([sets["a"], sets["b"]])
    assert doc["format"] == {"name": "vstore-compare", "version": 1}
    assert [s["label"] for s in doc["sets"]] == ["a", "b"] and doc["sets"][1]["groups"] == {"g1": 3, "g2": 2}
    g1 = _row(doc, "a", "b", "g1")
    assert (g1["by"], g1["kind"], g1["n_a"], g1["n_b"], g1["shared"], g1["jaccard"]) == ("neuron", "method", 3, 3, 2,
                                                                                         0.5)
    # layer 0: sizes 2 and 1 of 10 (share one with p 0.2); layer 1: 1 and 2 (p 0.2); J = X / (6 - X)
    mean = 0.32 * (1 / 5) + 0.04 * (2 / 4)
    sd = math.sqrt(0.32 * (1 / 5) ** 2 + 0.04 * (2 / 4) ** 2 - mean**2)
    assert (g1["chance_jaccard"], g1["chance_sd"], g1["p_value"]) == pytest.approx((mean, sd, 0.04))
    g2 = _row(doc, "a", "b", "g2")
    assert (g2["shared"], g2["jaccard"], g2["chance_jaccard"], g2["p_value"]) == pytest.approx((1, 0.5, 0.05, 0.1))
    union = _row(doc, "a", "b", "*")
    assert (union["n_a"], union["n_b"], union["shared"], union["jaccard"]) == (4, 5, 3, 0.5)
    w = doc["within"][0]
    assert w["groups"] == ["g1", "g2"] and w["jaccard"] == [[1.0, 0.0], [0.0, 1.0]]
    assert w["own"] == {"g1": 3, "g2": 1} and w["shared"] == {"g1": 0, "g2": 0}
    # g1 (2 in layer 0, 1 in layer 1) and g2 (1 in layer 2) share no layer: chance 0
    assert w["chance_jaccard"] == 0.0
    assert doc["depth"] == [] and doc["similarity"] == [] and doc["similarity_agreement"] == []


def test_models_compared_by_relative_depth(sets: dict[str, Path]) -> None:
    doc = compare_sets([sets["a"], sets["c"]], simulations=200)
    g1 = _row(doc, "a", "c", "g1")
    # depths: a = 0, 0, 0.25 (layers 0, 0, 1 of 4); c = 0, 0.5, 0.75 (layers 0, 4, 6 of 8); bin 0 holds 2 vs 1
    assert (g1["by"], g1["kind"], g1["shared"], g1["jaccard"]) == ("depth", "model", 1, pytest.approx(0.2))
    assert 0 <= g1["chance_jaccard"] <= 1 and 0 < g1["p_value"] <= 1 and g1["chance_method"] == "simulated"
    d = next(r for r in doc["depth"] if r["group"] == "g1")
    assert d["wasserstein"] == pytest.approx(1 / 3)  # (|0-0| + |0-0.5| + |0.25-0.75|) / 3
    assert d["chance_wasserstein"] > 0 and d["chance_sd"] > 0 and 0 < d["p_value"] <= 1
    hist = {h["set"]: h for h in doc["depth_hist"]}
    assert hist["a"]["counts"][:3] == [2, 0, 1] and sum(hist["c"]["counts"]) == 3
    assert hist["a"]["bins"][0] == 0.0 and hist["a"]["bins"][-1] == 1.0


def test_languages_and_split_halves(tmp_path: Path) -> None:
    h1 = _set(tmp_path / "v.half1.json", {"g": [(0, 1), (0, 2)]})
    h2 = _set(tmp_path / "v.half2.json", {"g": [(0, 2), (0, 3)]})
    zh = _set(tmp_path / "v-zh.json", {"g": [(0, 1)]}, where={"lang": ["zh"]},
              extra={"split_half": {"seed": 0, "files": [str(h1), str(h2)]}})
    en = _set(tmp_path / "v-en.json", {"g": [(0, 1)]}, where={"lang": ["en"]})
    doc = compare_sets([zh, en])
    lang = _row(doc, "v-zh", "v-en", "g")
    assert lang["kind"] == "language" and lang["jaccard"] == 1.0
    assert lang["chance_jaccard"] == pytest.approx(0.1) and lang["p_value"] == pytest.approx(0.1)
    half = _row(doc, "v-zh.half1", "v-zh.half2", "g")
    assert (half["kind"], half["shared"], half["jaccard"]) == ("split-half", 1, pytest.approx(1 / 3))
    # layer 0 of 10, two neurons each: P(X=1) = 2*8*2/90... hypergeometric
    from scipy.stats import hypergeom

    p = hypergeom.pmf([0, 1, 2], 10, 2, 2)
    assert half["chance_jaccard"] == pytest.approx(p[1] / 3 + p[2] * 1.0)


@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from conftest_rank import tiny_store

    from vstore.rank import rank_store

    tmp = tmp_path_factory.mktemp("cmp")
    store = tiny_store(tmp, per_value=2)
    rank_store(store, "value", "welch-t", top_k=5, out=tmp / "welch.json")
    rank_store(store, "value", "vape", top_rate=0.2, out=tmp / "vape.json")
    return store, tmp / "welch.json", tmp / "vape.json"


def test_value_similarity_equals_an_oracle(ranked: tuple[Path, Path, Path]) -> None:
    from conftest_rank import raw_rows
    from scipy.stats import spearmanr

    from vstore.neuronset import NeuronSet

    store, welch, vape = ranked
    doc = compare_sets([welch, vape], similarity=[store], permutations=500)
    assert [m["lang"] for m in doc["similarity"]] == ["en", "zh"]
    X, values, _cats = raw_rows(store)
    _, langs, _ = raw_rows(store, "lang")
    layers = json.loads((store / "zarr.json").read_text())["attributes"]["vstore"]["layers"]
    keys = sorted({(layers.index(it["layer"]), it["neuron"]) for p in (welch, vape)
                   for items in NeuronSet.load(p).groups.values() for it in items})
    for m in doc["similarity"]:
        assert m["neurons"] == "sets" and m["n_profile"] == len(keys)
        prof = np.asarray([[X[li, (values == g) & (langs == m["lang"]), n].mean() for li, n in keys]
                           for g in m["groups"]])
        want = np.corrcoef(prof - prof.mean(axis=0))
        np.testing.assert_allclose(np.asarray(m["matrix"]), want, atol=1e-9)
    ag = doc["similarity_agreement"][0]
    iu = np.triu_indices(len(ag["groups"]), 1)
    rho = spearmanr(np.asarray(doc["similarity"][0]["matrix"])[iu], np.asarray(doc["similarity"][1]["matrix"])[iu])
    assert ag["spearman"] == pytest.approx(rho.statistic, abs=1e-12)
    assert 1 / 501 <= ag["p_value"] <= 1 and ag["permutations"] == 500
    only = compare_sets([], similarity=[store], where={"lang": ["zh"]}, permutations=100)
    assert [m["lang"] for m in only["similarity"]] == ["zh"] and only["similarity"][0]["neurons"] == "all"


def test_agreement_of_a_matrix_with_itself_is_beyond_chance() -> None:
    from vstore.similarity import similarity_agreement

    rng = np.random.default_rng(0)
    m = np.corrcoef(rng.standard_normal((8, 20)))
    mats = [{"store": "s", "model": "m", "lang": lang, "groups": list("abcdefgh"), "matrix": m.tolist()}
            for lang in ("zh", "en")]
    ag = similarity_agreement(mats, permutations=999)[0]
    assert ag["spearman"] == pytest.approx(1.0) and ag["p_value"] < 0.01


def test_compare_command_prints_chance(ranked: tuple[Path, Path, Path], tmp_path: Path, capsys) -> None:
    from vstore.cli import main

    _store, welch, vape = ranked
    assert main(["compare", str(welch), str(vape), "--out", str(tmp_path / "c.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "chance" in out and "…" not in out
    doc = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert {r["group"] for r in doc["overlaps"]} >= {"*", "justice"}
    assert main(["compare", str(welch), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["within"][0]["set"] == "welch"
    assert main(["compare"]) == 2
