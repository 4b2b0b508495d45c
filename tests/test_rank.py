"""`vstore rank` end to end: a tiny llama store against scipy and a LAPE re-derivation, planted
signal on synthetic stores for every method, the neuron-set format, split halves, the cache."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).parent))
from conftest_rank import raw_rows, tiny_store
from make_synthetic_store import make_synthetic_store

from vstore.cli import main
from vstore.errors import NeuronSetError, VstoreError
from vstore.neuronset import NeuronSet
from vstore.rank import rank_store
from vstore.stats import read_counter


def neurons(path: Path) -> dict[str, set[tuple[int, int]]]:
    d = json.loads(Path(path).read_text())
    return {g: {(it["layer"], it["neuron"]) for it in items} for g, items in d["groups"].items()}


# ---------------------------------------------------------------------------------------------------
# a store from a tiny llama: the acceptance contract
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("llama"), per_value=4)


def test_welch_t_top_k_matches_scipy(llama_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.json"
    assert main(["rank", str(llama_store), "--by", "value", "--method", "welch-t", "--top-k", "10", "--out", str(out),
                 "--no-progress"]) == 0
    X, y, cats = raw_rows(llama_store)
    _L, _, N = X.shape
    got = neurons(out)
    for g in cats:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t = np.nan_to_num(sps.ttest_ind(X[:, y == g], X[:, y != g], axis=1, equal_var=False).statistic)
        top = np.argsort(-t.ravel(), kind="stable")[:10]
        assert got[g] == {(int(i // N), int(i % N)) for i in top}, g
    doc = json.loads(out.read_text())
    scores = [it["score"] for it in doc["groups"][cats[0]]]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= it["p"] <= 1 for it in doc["groups"][cats[0]])


def test_vape_defaults_match_lape_rederivation(llama_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.json"
    assert main(["rank", str(llama_store), "--by", "value", "--method", "vape", "--out", str(out),
                 "--no-progress"]) == 0
    X, y, cats = raw_rows(llama_store)
    L, _, N = X.shape
    groups = sorted(cats)
    P = np.stack([(X[:, y == g, :] > 0).mean(axis=1) for g in groups], axis=-1)
    s = P.sum(-1, keepdims=True)
    norm = P / np.where(s == 0, 1, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(norm > 0, norm * np.log(norm), 0.0), axis=-1)
    flat = np.sort(P.ravel())
    top_prob = flat[round(len(flat) * 0.95) - 1]
    ent = np.where(P.max(-1) > top_prob, ent, np.inf)
    order = [i for i in np.argsort(ent.ravel(), kind="stable")[: round(L * N * 0.01)] if np.isfinite(ent.ravel()[i])]
    bar = flat[round(len(flat) * 0.95) - 1]
    ref: dict[str, set] = {g: set() for g in groups}
    for i in order:
        li, n = divmod(int(i), N)
        for gi, g in enumerate(groups):
            if P[li, n, gi] > bar:
                ref[g].add((li, n))
    assert neurons(out) == ref
    doc = json.loads(out.read_text())
    for items in doc["groups"].values():  # the score is the entropy, lowest first
        assert [it["score"] for it in items] == sorted(it["score"] for it in items)


def test_neuron_set_format(llama_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "n.json"
    ns = rank_store(llama_store, "value", "mean-diff", out=out, top_k=5, where={"lang": ["zh"]})
    doc = NeuronSet.load(out, n_layers=3, n_neurons=96).to_dict()
    assert doc["format"] == {"name": "vstore-neurons", "version": 1}
    assert set(doc["model"]) >= {"name", "source", "sha256", "architecture", "n_layers", "n_neurons"}
    assert set(doc["store"]) == {"path", "committed", "site", "dtype", "pooling"}
    assert doc["method"] == "mean-diff" and doc["by"] == "value" and doc["where"] == {"lang": ["zh"]}
    assert doc["params"]["selection"]["top_k"] == 5
    assert all(len(v) == 5 for v in doc["groups"].values())
    npz = np.load(out.with_suffix(".npz"))
    assert npz["scores"].shape == (3, 12, 96) and list(npz["groups"]) == list(doc["groups"])
    g0 = next(iter(doc["groups"]))
    it = doc["groups"][g0][0]
    assert npz["scores"][list(npz["layers"]).index(it["layer"]), 0, it["neuron"]] == it["score"]
    assert ns.rows[g0] > 0


def test_load_neuron_set_errors(tmp_path: Path) -> None:
    good = {"format": {"name": "vstore-neurons", "version": 1}, "model": {"n_layers": 3, "n_neurons": 8},
            "method": "vape", "groups": {"a": [{"layer": 1, "neuron": 2, "score": 0.5}]}}
    cases = [
        ({**good, "format": {"name": "other", "version": 1}}, "format.name"),
        ({**good, "format": {"name": "vstore-neurons", "version": 2}}, "format.version"),
        ({**good, "groups": []}, "groups"),
        ({**good, "groups": {"a": [{"layer": "1", "neuron": 2, "score": 0.5}]}}, r"groups.a\[0\].layer"),
        ({**good, "groups": {"a": [{"layer": 1, "neuron": 2}]}}, r"groups.a\[0\].score"),
        ({**good, "groups": {"a": [{"layer": 1, "neuron": 9, "score": 0}]}}, r"groups.a\[0\].neuron"),
    ]
    for i, (doc, field) in enumerate(cases):
        p = tmp_path / f"bad{i}.json"
        p.write_text(json.dumps(doc))
        with pytest.raises(NeuronSetError, match=field) as e:
            NeuronSet.load(p, n_neurons=8).to_dict()
        assert str(p) in str(e.value)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(NeuronSetError, match="line 1"):
        NeuronSet.load(tmp_path / "broken.json").to_dict()
    with pytest.raises(NeuronSetError, match="no such"):
        NeuronSet.load(tmp_path / "missing.json").to_dict()
    (tmp_path / "ok.json").write_text(json.dumps(good))
    assert NeuronSet.load(tmp_path / "ok.json", n_layers=3, n_neurons=8).to_dict()["groups"]["a"][0]["score"] == 0.5
    with pytest.raises(NeuronSetError, match="beyond"):
        NeuronSet.load(tmp_path / "ok.json", n_layers=1).to_dict()


# ---------------------------------------------------------------------------------------------------
# planted signal
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("syn") / "store"
    info = make_synthetic_store(path, n_layers=3, n_neurons=64, n_examples=96, rows_per_example=(8, 16), groups=4,
                                planted=3, effect=3.0, dtype="float16", seed=5, layers=[2, 5, 9], chunk_rows=256)
    return path, info


@pytest.mark.parametrize("method", ["vape", "prob-diff", "mean-diff", "cohen-d", "welch-t", "auroc", "probeless"])
def test_every_method_recovers_planted_neurons(planted: tuple[Path, dict], tmp_path: Path, method: str) -> None:
    path, info = planted
    out = tmp_path / f"{method}.json"
    k = 3
    args = ["rank", str(path), "--by", "value", "--method", method, "--out", str(out), "--no-progress"]
    args += ["--top-k", str(4 * k) if method == "vape" else str(k)]
    assert main(args) == 0
    got = neurons(out)
    for g, want in info["planted"].items():
        assert got[g] == {tuple(x) for x in want}, (method, g)  # precision@k = 1, model layer indices


def test_random_control_matches_per_layer_counts(planted: tuple[Path, dict], tmp_path: Path) -> None:
    path, _ = planted
    ref = tmp_path / "ref.json"
    rank_store(path, "value", "welch-t", out=ref, per_layer_k=2)
    before = read_counter.chunks
    a = rank_store(path, "value", "random", out=tmp_path / "r1.json", neurons=ref, seed=1)
    rank_store(path, "value", "random", out=tmp_path / "r2.json", neurons=ref, seed=1)
    rank_store(path, "value", "random", out=tmp_path / "r3.json", neurons=ref, seed=2)
    assert read_counter.chunks == before  # no statistics needed
    refset = rank_store(path, "value", "welch-t", per_layer_k=2)
    for g in refset.groups:
        assert a.per_layer()[g] == refset.per_layer()[g] == {2: 2, 5: 2, 9: 2}
    assert neurons(tmp_path / "r1.json") == neurons(tmp_path / "r2.json") != neurons(tmp_path / "r3.json")
    with pytest.raises(VstoreError, match="neurons is the reference set of method random"):
        rank_store(path, "value", "welch-t", neurons=ref)


def test_contrast_and_abs(tmp_path: Path) -> None:
    info = make_synthetic_store(tmp_path / "s", n_layers=2, n_neurons=40, n_examples=160, rows_per_example=6,
                                groups=2, planted=2, effect=3.0, seed=9, polarity=True, chunk_rows=128)
    out = tmp_path / "c.json"
    assert main(["rank", str(tmp_path / "s"), "--by", "value", "--contrast", "polarity=aligned,violating",
                 "--method", "cohen-d", "--top-k", "2", "--out", str(out), "--no-progress"]) == 0
    got = neurons(out)
    for g, want in info["planted"].items():
        assert got[g] == {tuple(x) for x in want}
    flipped = rank_store(tmp_path / "s", "value", "cohen-d", contrast="polarity=violating,aligned", top_k=2)
    for g, want in info["planted"].items():  # signed: the planted neurons are now the most negative
        assert not {(it["layer"], it["neuron"]) for it in flipped.groups[g]} & {tuple(x) for x in want}
    mag = rank_store(tmp_path / "s", "value", "cohen-d", contrast="polarity=violating,aligned", top_k=2, by_abs=True)
    for g, want in info["planted"].items():
        assert {(it["layer"], it["neuron"]) for it in mag.groups[g]} == {tuple(x) for x in want}
        assert all(it["score"] < 0 for it in mag.groups[g])
    with pytest.raises(VstoreError, match="contrast"):
        rank_store(tmp_path / "s", "value", "vape", contrast="polarity=aligned,violating")


def test_split_half_writes_both_sets_and_jaccard(planted: tuple[Path, dict], tmp_path: Path) -> None:
    path, info = planted
    out = tmp_path / "sh.json"
    assert main(["rank", str(path), "--by", "value", "--method", "welch-t", "--top-k", "3", "--split-half",
                 "--out", str(out), "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    sh = doc["split_half"]
    assert set(sh["jaccard"]) == set(info["planted"]) and all(j == 1.0 for j in sh["jaccard"].values())
    h1, h2 = (NeuronSet.load(f).to_dict() for f in sh["files"])
    assert h1["params"]["split_half"]["half"] == 1 and h2["params"]["split_half"]["half"] == 2
    assert h1["examples"] + h2["examples"] == sum(sh["examples"])
    assert neurons(out) == {g: {tuple(x) for x in v} for g, v in info["planted"].items()}


def test_second_rank_reads_no_chunk(tmp_path: Path) -> None:
    make_synthetic_store(tmp_path / "s", n_layers=2, n_neurons=32, n_examples=32, rows_per_example=8, groups=2,
                         planted=1, effect=3.0, seed=4, chunk_rows=64)
    first = rank_store(tmp_path / "s", "value", "welch-t", top_k=2)
    assert not first.from_cache and first.bytes_read > 0
    before = read_counter.chunks
    for m in ("vape", "cohen-d", "prob-diff", "probeless", "mean-diff"):
        ns = rank_store(tmp_path / "s", "value", m, top_k=2)
        assert ns.from_cache
    assert read_counter.chunks == before
    assert main(["rank", str(tmp_path / "s"), "--by", "value", "--method", "welch-t", "--no-cache", "--out",
                 str(tmp_path / "x.json"), "--no-progress"]) == 0
    assert read_counter.chunks > before


def test_cli_errors_are_exit_2(planted: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, _ = planted
    out = str(tmp_path / "e.json")
    assert main(["rank", str(path), "--by", "colour", "--method", "welch-t", "--out", out]) == 2
    assert main(["rank", str(path), "--by", "value", "--where", "lang", "--out", out]) == 2
    assert main(["rank", str(path), "--by", "value", "--top-k", "3", "--top-rate", "0.1", "--out", out]) == 2
    assert main(["rank", str(path), "--by", "value", "--method", "vape", "--per-layer-k", "2", "--out", out]) == 2
    assert main(["rank", str(tmp_path / "nowhere"), "--by", "value", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "colour" in err and "--where" in err
