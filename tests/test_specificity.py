"""Specificity of neuron sets (own / shared, pairwise Jaccard, --exclusive) and the chance level of a Jaccard index."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vstore.errors import UsageError
from vstore.specificity import chance_jaccard, keep_exclusive, simulate_jaccard, specificity


def _items(*pairs: tuple[int, int]) -> list[dict]:
    return [{"layer": la, "neuron": n, "score": 1.0} for la, n in pairs]


GROUPS = {"x": _items((0, 1), (0, 2)), "y": _items((0, 2), (1, 0)), "z": []}


def test_specificity_by_hand() -> None:
    sp = specificity(GROUPS, n_neurons=10)
    assert (sp["neurons"], sp["exclusive"], sp["shared"]) == (3, 2, 1)
    assert sp["shared_fraction"] == pytest.approx(1 / 3) and not sp["mostly_shared"]
    assert sp["assigned"] == {"1": 2, "2": 1}
    assert sp["groups"]["x"] == {"neurons": 2, "own": 1, "shared": 1, "shared_fraction": 0.5,
                                 "mean_jaccard": pytest.approx(1 / 3)}
    assert sp["groups"]["z"]["neurons"] == 0 and sp["groups"]["z"]["mean_jaccard"] is None
    assert sp["jaccard"]["matrix"][0][1] == pytest.approx(1 / 3) and sp["jaccard"]["matrix"][2][2] is None
    assert sp["mean_jaccard"] == pytest.approx(1 / 3)  # pairs with the empty group are left out
    # x = 2 neurons of layer 0, y = 1 of layer 0 (+ 1 of layer 1): they share one with p = 2/10, J = 1/3
    assert sp["chance_jaccard"] == pytest.approx(0.2 / 3)
    assert specificity({"a": _items((0, 0)), "b": _items((0, 0))})["mostly_shared"]


def test_chance_jaccard_by_hand() -> None:
    # one neuron each in a layer of 4: they coincide with p = 1/4, and then J = 1
    ch = chance_jaccard({0: 1}, {0: 1}, 4, observed_shared=1)
    assert (ch.mean, ch.sd, ch.p_value) == pytest.approx((0.25, math.sqrt(0.25 - 0.0625), 0.25))
    # layers 0 and 1 of 10 neurons, sizes (2, 1) and (1, 2): X = X0 + X1, P(Xi = 1) = 0.2 each
    ch = chance_jaccard({0: 2, 1: 1}, {0: 1, 1: 2}, 10, observed_shared=2)
    mean = 0.32 * (1 / 5) + 0.04 * (2 / 4)
    sd = math.sqrt(0.32 * (1 / 5) ** 2 + 0.04 * (2 / 4) ** 2 - mean**2)
    assert (ch.mean, ch.sd, ch.p_value) == pytest.approx((mean, sd, 0.04))
    assert chance_jaccard({}, {}, 10).mean is None
    assert chance_jaccard({0: 10}, {0: 10}, 10, observed_shared=10).mean == 1.0  # full layers always coincide


@pytest.mark.parametrize("sizes_a,sizes_b,n,observed", [
    ({0: 5, 1: 3, 2: 0}, {0: 4, 1: 6, 3: 2}, 20, 3),
    ({0: 12, 2: 7}, {0: 9, 2: 8}, 16, 13),
])
def test_exact_chance_matches_a_simulation(sizes_a: dict, sizes_b: dict, n: int, observed: int) -> None:
    exact = chance_jaccard(sizes_a, sizes_b, n, observed_shared=observed)
    sim = simulate_jaccard(sizes_a, sizes_b, n, observed_shared=observed, n_sim=4000, seed=1)
    assert exact.method == "exact" and sim.method == "simulated"
    assert abs(exact.mean - sim.mean) < 4 * exact.sd / math.sqrt(4000)
    assert sim.sd == pytest.approx(exact.sd, rel=0.1)
    assert abs(exact.p_value - sim.p_value) < 4 * math.sqrt(exact.p_value * (1 - exact.p_value) / 4000) + 1e-3


def test_keep_exclusive() -> None:
    kept, dropped = keep_exclusive(GROUPS, 1)
    assert kept == {"x": _items((0, 1)), "y": _items((1, 0)), "z": []} and dropped == {"x": 1, "y": 1, "z": 0}
    assert keep_exclusive(GROUPS, 2)[0] == GROUPS
    with pytest.raises(UsageError, match="exclusive"):
        keep_exclusive(GROUPS, 0)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest_rank import tiny_store

    return tiny_store(tmp_path_factory.mktemp("spec"), per_value=2)


def test_rank_reports_specificity_and_keeps_exclusive_sets(store: Path, tmp_path: Path) -> None:
    from vstore.rank import rank_store

    res = rank_store(store, "value", "vape", top_rate=0.3, bar_ratio=0.6, out=tmp_path / "v.json", split_half=True)
    doc = json.loads((tmp_path / "v.json").read_text(encoding="utf-8"))
    assert doc["specificity"] == json.loads(json.dumps(specificity(res.groups, res.data["n_neurons"])))
    assert doc["specificity"]["shared"] > 0
    ex = rank_store(store, "value", "vape", top_rate=0.3, bar_ratio=0.6, exclusive=1, out=tmp_path / "x.json",
                    split_half=True)
    assert ex.data["params"]["selection"]["exclusive"] == 1
    assert ex.data["specificity"]["shared"] == 0 and ex.data["specificity"]["before_exclusive"]["shared"] > 0
    assert sum(ex.data["params"]["exclusive_dropped"].values()) > 0
    for half in ex.halves or ():
        assert half.data["specificity"]["shared"] == 0
    with pytest.raises(UsageError, match="exclusive"):
        rank_store(store, "value", "vape", exclusive=0)


def test_rank_command_shows_own_and_shared_and_warns(store: Path, tmp_path: Path, capsys) -> None:
    from vstore.cli import main

    assert main(["rank", str(store), "--by", "value", "--method", "vape", "--top-rate", "0.3", "--bar-ratio", "0.3",
                 "--no-progress", "--out", str(tmp_path / "v.json")]) == 0
    cap = capsys.readouterr()
    assert "own" in cap.out and "shared" in cap.out and "chance" in cap.out
    assert "most of this set is shared" in cap.err
    assert main(["rank", str(store), "--by", "value", "--method", "vape", "--top-rate", "0.3", "--bar-ratio", "0.3",
                 "--exclusive", "1", "--no-progress", "--out", str(tmp_path / "x.json")]) == 0
    assert "most of this set is shared" not in capsys.readouterr().err
