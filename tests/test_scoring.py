"""Scoring methods and selection against scipy / sklearn / independent re-derivations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from vstore.errors import UsageError, VstoreError
from vstore.kernels import native_available
from vstore.methods import canonical_method, score
from vstore.scoring import (
    cohen_d,
    lape_entropy,
    mean_diff,
    prob_diff,
    probeless,
    random_scores,
    vape,
    welch_t,
)
from vstore.select import Selection, control_set, lape_select, select_neurons
from vstore.stats import GroupStats, auroc_from_histograms


def stats_of(X: np.ndarray, y: np.ndarray, names: list[str], sides: list[str] | None = None,
             base: list[str] | None = None) -> GroupStats:
    """GroupStats straight from rows: X (L, R, N) float, y (R,) group index (-1 = none)."""
    L, _, N = X.shape
    s = GroupStats.for_groups(names, list(range(L)), N)
    for g in range(len(names)):
        rows = X[:, y == g, :].astype(np.float64)
        s.count[:, g] = rows.shape[1]
        s.sum[:, g] = rows.sum(axis=1)
        s.sumsq[:, g] = (rows * rows).sum(axis=1)
        s.npos[:, g] = (rows > 0).sum(axis=1)
    s.sides = sides
    s.base = base if base is not None else list(names)
    return s


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(7)
    L, R, N, G = 3, 600, 40, 4
    X = rng.normal(-0.5, 1.0, size=(L, R, N)).astype(np.float32)
    y = rng.integers(0, G, size=R)
    X[:, y == 1, 5] += 1.5
    X[1, :, 7] = 0.25  # a constant neuron
    X[2, y == 2, 9] = 3.0  # constant within a group
    return X, y, [f"g{i}" for i in range(G)]


def test_welch_t_matches_scipy(data: tuple) -> None:
    X, y, names = data
    sc = welch_t(stats_of(X, y, names))
    for g in range(len(names)):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # scipy on the constant neurons
            ref = sps.ttest_ind(X[:, y == g].astype(np.float64), X[:, y != g].astype(np.float64), axis=1,
                                equal_var=False)
        np.testing.assert_allclose(sc.values[:, g], np.nan_to_num(ref.statistic), rtol=1e-7, atol=1e-9)
        finite = np.isfinite(ref.pvalue)
        np.testing.assert_allclose(sc.extra["p"][:, g][finite], ref.pvalue[finite], rtol=1e-6, atol=1e-12)


@pytest.mark.skipif(not native_available(), reason="the native extension is not built")
@pytest.mark.parametrize("case", ["rest", "contrast", "empty-group", "one-row", "nonfinite", "one-group"])
def test_native_welch_equals_numpy_bit_for_bit(data: tuple, case: str) -> None:
    X, y, names = data
    if case == "contrast":  # targets g0 (sides a/b) and g1
        st = stats_of(X, y, ["g0|a", "g0|b", "g1|a", "g1|b"], sides=["a", "b"], base=["g0", "g1"])
    elif case == "one-group":
        st = stats_of(X, np.zeros_like(y), ["g0"])
    else:
        st = stats_of(X, np.where(y == 3, -1, y) if case == "empty-group" else y, names)
        if case == "one-row":
            st.count[:, 2], st.sum[:, 2], st.sumsq[:, 2] = 1, 0.5, 0.25
        if case == "nonfinite":
            st.nonfinite[0, 1, :7] = st.count[0, 1] - np.arange(7)  # 0..6 finite rows left
            st.sum[0, 0, 3], st.sumsq[1, 2, 4] = np.inf, np.nan
    a, b = welch_t(st, native=True), welch_t(st, native=False)
    assert a.targets == b.targets
    for x, z in ((a.values, b.values), (a.extra["df"], b.extra["df"]), (np.asarray(a.extra["p"]), np.asarray(b.extra["p"]))):
        assert x.shape == z.shape and np.array_equal(x, z, equal_nan=True)
        assert np.array_equal(np.signbit(x), np.signbit(z))


def test_deferred_p_single_elements_equal_the_whole(data: tuple) -> None:
    X, y, names = data
    p = welch_t(stats_of(X, y, names)).extra["p"]
    one = [p[1, 2, j] for j in range(X.shape[2])]  # computed alone, before the whole array exists
    whole = np.asarray(p)
    assert whole.shape == (3, len(names), X.shape[2]) and np.array_equal(one, whole[1, 2], equal_nan=True)
    assert p[0, 0, 5] == whole[0, 0, 5] and np.array_equal(p[:, 1], whole[:, 1], equal_nan=True)
    c = np.array(p, copy=True)  # a copy when asked: writing to it leaves the scores alone
    c[0, 0, 0] = -1.0
    assert np.asarray(p)[0, 0, 0] == whole[0, 0, 0] != -1.0


def test_mean_prob_cohen(data: tuple) -> None:
    X, y, names = data
    st = stats_of(X, y, names)
    md, pd, cd = mean_diff(st), prob_diff(st), cohen_d(st)
    for g in range(len(names)):
        a, b = X[:, y == g].astype(np.float64), X[:, y != g].astype(np.float64)
        np.testing.assert_allclose(md.values[:, g], a.mean(1) - b.mean(1), atol=1e-10)
        np.testing.assert_allclose(pd.values[:, g], (a > 0).mean(1) - (b > 0).mean(1), atol=1e-12)
        n1, n0 = a.shape[1], b.shape[1]
        sp = np.sqrt(((n1 - 1) * a.var(1, ddof=1) + (n0 - 1) * b.var(1, ddof=1)) / (n1 + n0 - 2))
        with np.errstate(all="ignore"):
            ref = np.nan_to_num((a.mean(1) - b.mean(1)) / sp)
        np.testing.assert_allclose(cd.values[:, g], ref, rtol=1e-6, atol=1e-6)
    assert md.values[0, 1, 5] > 1.0 and cd.values[0, 1, 5] > 1.0  # planted: positive in its group


def test_probeless_matches_neurox_tag_ranking(data: tuple) -> None:
    X, y, names = data
    sc = probeless(stats_of(X, y, names))
    means = {g: X[:, y == g].astype(np.float64).mean(1) for g in range(len(names))}
    for g in range(len(names)):  # NeuroX get_neuron_ordering_for_tag: sum over other tags of |q(z) - q(z')|
        ref = sum(np.abs(means[g] - means[j]) for j in range(len(names)) if j != g)
        np.testing.assert_allclose(sc.values[:, g], ref, atol=1e-10)


def test_contrast_compares_the_two_sides() -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(2, 400, 6))
    y = rng.integers(0, 4, size=400)  # groups a|x, a|y, b|x, b|y
    X[:, y == 0, 2] += 2.0
    st = stats_of(X, y, ["a|x", "a|y", "b|x", "b|y"], sides=["x", "y"], base=["a", "b"])
    sc = welch_t(st)
    assert sc.targets == ["a", "b"]
    for t, (p, n) in enumerate([(0, 1), (2, 3)]):
        ref = sps.ttest_ind(X[:, y == p], X[:, y == n], axis=1, equal_var=False).statistic
        np.testing.assert_allclose(sc.values[:, t], ref, rtol=1e-7)
    pl = probeless(st)
    np.testing.assert_allclose(pl.values[:, 0], np.abs(X[:, y == 0].mean(1) - X[:, y == 1].mean(1)), atol=1e-10)
    with pytest.raises(VstoreError, match="contrast"):
        vape(st)


def _lape_reference(P: np.ndarray, top_rate: float, filter_rate: float, bar_ratio: float) -> list[set]:
    """LAPE's identify.py, as published, on P (L, N, G): written here independently."""
    L, N, G = P.shape
    s = P.sum(-1, keepdims=True)
    norm = P / np.where(s == 0, 1, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(norm > 0, norm * np.log(norm), 0.0), axis=-1)
    flat = np.sort(P.ravel())
    top_prob = flat[round(len(flat) * filter_rate) - 1]
    ent = np.where(P.max(-1) > top_prob, ent, np.inf)
    k = round(L * N * top_rate)
    order = [i for i in np.argsort(ent.ravel(), kind="stable")[:k] if np.isfinite(ent.ravel()[i])]
    bar = flat[round(len(flat) * bar_ratio) - 1]
    sets: list[set] = [set() for _ in range(G)]
    for i in order:
        li, n = divmod(int(i), N)
        for g in range(G):
            if P[li, n, g] > bar:
                sets[g].add((li, n))
    return sets


@pytest.mark.parametrize("top_rate,filter_rate,bar_ratio", [(0.01, 0.95, 0.95), (0.05, 0.9, 0.8), (0.2, 0.5, 0.5)])
def test_vape_equals_lape_reference(top_rate: float, filter_rate: float, bar_ratio: float) -> None:
    rng = np.random.default_rng(11)
    L, R, N, G = 4, 900, 64, 5
    X = rng.normal(-1.0, 1.0, size=(L, R, N))
    y = rng.integers(0, G, size=R)
    for g in range(G):
        X[:, y == g, g * 3] += 2.5
    X[0, :, 10] = -1.0  # never fires
    names = [f"v{g}" for g in range(G)]
    sc = vape(stats_of(X, y, names))
    P = np.stack([(X[:, y == g, :] > 0).mean(axis=1) for g in range(G)], axis=-1)
    ref = _lape_reference(P, top_rate, filter_rate, bar_ratio)
    got, thr = lape_select(sc.extra["prob"], sc.extra["entropy"], top_rate=top_rate, filter_rate=filter_rate,
                           bar_ratio=bar_ratio)
    assert [{(li, n) for li, n, _ in items} for items in got] == ref
    assert thr["kept"] <= round(L * N * top_rate)
    for items in got:  # lowest entropy first, the score is the entropy
        ents = [e for _, _, e in items]
        assert ents == sorted(ents)
        for li, n, e in items:
            assert e == sc.extra["entropy"][li, n]


def test_lape_entropy_independent_of_group_order() -> None:
    rng = np.random.default_rng(0)
    P = rng.random((2, 3, 10))
    e1 = lape_entropy(P, ["b", "a", "c"])
    e2 = lape_entropy(P[:, [1, 0, 2]], ["a", "b", "c"])
    assert np.array_equal(e1, e2)


def test_auroc_from_histograms_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(5)
    G, M, B = 3, 4, 50
    vals = rng.integers(0, B, size=(500, M))  # bins in value order: many ties
    grp = rng.integers(0, G, size=500)
    hist = np.zeros((G, M, B), np.uint32)
    for r in range(500):
        hist[grp[r], np.arange(M), vals[r]] += 1
    auc, tie = auroc_from_histograms(hist, [([g], None) for g in range(G)] + [([0], [2])])
    for g in range(G):
        for m in range(M):
            assert auc[g, m] == pytest.approx(roc_auc_score(grp == g, vals[:, m]), abs=1e-12)
    sel = grp != 1
    for m in range(M):
        assert auc[G, m] == pytest.approx(roc_auc_score(grp[sel] == 0, vals[sel, m]), abs=1e-12)
    assert (tie > 0).all()


def test_selection_modes() -> None:
    s = np.array([[0.1, 5.0, -7.0, 2.0], [3.0, np.nan, 5.0, -1.0]])
    top = select_neurons(s, Selection(top_k=3))
    assert [(li, n) for li, n, _ in top] == [(0, 1), (1, 2), (1, 0)]  # tie 5.0: lower flat index first
    absk = select_neurons(s, Selection(top_k=2, by_abs=True))
    assert [(li, n) for li, n, _ in absk] == [(0, 2), (0, 1)]
    assert absk[0][2] == -7.0  # the signed score is reported
    per = select_neurons(s, Selection(per_layer_k=1))
    assert [(li, n) for li, n, _ in per] == [(0, 1), (1, 2)]
    thr = select_neurons(s, Selection(threshold=2.0))
    assert [(li, n) for li, n, _ in thr] == [(0, 1), (1, 2), (1, 0), (0, 3)]
    rate = select_neurons(s, Selection(top_rate=0.25))
    assert len(rate) == 2
    low = select_neurons(s, Selection(top_k=2), lower_is_better=True)
    assert [(li, n) for li, n, _ in low] == [(0, 2), (1, 3)]
    with pytest.raises(VstoreError, match="choose one"):
        select_neurons(s, Selection(top_k=1, top_rate=0.1))


def test_random_is_seeded_and_matches_counts() -> None:
    a = random_scores(["x", "y"], [0, 4, 8], 50, seed=3)
    b = random_scores(["x", "y"], [0, 4, 8], 50, seed=3)
    c = random_scores(["x", "y"], [0, 4, 8], 50, seed=4)
    assert np.array_equal(a.values, b.values) and not np.array_equal(a.values, c.values)
    ref = {0: np.arange(3), 8: np.arange(10, 15)}
    picked = control_set(ref, 50, 3, "x")
    assert {k: len(v) for k, v in picked.items()} == {0: 3, 8: 5}
    assert not set(picked[0]) & set(ref[0]) and not set(picked[8]) & set(ref[8])
    assert {k: v.tolist() for k, v in control_set(ref, 50, 3, "x").items()} == {k: v.tolist() for k, v in picked.items()}


def test_method_names() -> None:
    assert canonical_method("lape") == "vape"
    with pytest.raises(UsageError, match="method: expected one of") as e:
        canonical_method("nope")
    assert e.value.for_cli().startswith("--method: expected one of")
    with pytest.raises(VstoreError, match="auroc"):
        score("auroc")
