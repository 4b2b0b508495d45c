"""`vstore show`: the native per-column top-k against a NumPy oracle, and neuron cards on a tiny store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vstore import kernels
from vstore.errors import StoreError
from vstore.topk import ColumnTopK, top_k_per_column

BACKENDS = ["numpy", "numba"] + (["cpp"] if kernels.native_available() else [])


def _raw(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return np.ascontiguousarray(x.astype(dtype))


def _oracle(raw: np.ndarray, dtype: str, k: int, columns: np.ndarray, mask: np.ndarray | None):
    """Sort every finite (value, row) of a column: value descending, then row ascending."""
    vals = kernels.decode(raw, dtype).astype(np.float64)
    out_v, out_r = [], []
    for c in columns:
        v = vals[:, c]
        r = np.arange(v.size)
        ok = np.isfinite(v) & (mask >= 0 if mask is not None else True)
        order = sorted(zip(-v[ok], r[ok], strict=True))[:k]
        out_v.append([-a for a, _ in order] + [-np.inf] * (k - len(order)))
        out_r.append([int(b) for _, b in order] + [-1] * (k - len(order)))
    return np.asarray(out_v), np.asarray(out_r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("shape,k", [((1, 5), 3), ((4, 3), 8), ((97, 40), 5), ((300, 70), 1)])
def test_top_k_equals_the_oracle_streamed_in_blocks(backend: str, dtype: str, shape: tuple[int, int], k: int) -> None:
    rng = np.random.default_rng(shape[0] * 31 + k)
    x = rng.integers(-3, 4, size=shape).astype(np.float32) / 2  # many ties
    x[rng.random(shape) < 0.1] = np.nan
    if shape[0] > 3:
        x[1, 0] = np.inf
        x[2, 0] = -np.inf
        x[:, -1] = np.nan  # a column with no finite value
    raw = _raw(x, dtype)
    columns = np.asarray(sorted({0, shape[1] - 1, *rng.choice(shape[1], min(6, shape[1]), replace=False)}), np.int64)
    mask = np.where(rng.random(shape[0]) < 0.2, -1, 0).astype(np.int32)
    want_v, want_r = _oracle(raw, dtype, k, columns, mask)
    state = ColumnTopK(columns.size, k)
    step = max(1, shape[0] // 3)
    for r0 in reversed(range(0, shape[0], step)):  # blocks in any order give the same result
        blk = np.ascontiguousarray(raw[r0 : r0 + step])
        top_k_per_column(blk, dtype=dtype, state=state, columns=columns, row_start=r0, mask=mask[r0 : r0 + step],
                         backend=backend)
    np.testing.assert_array_equal(state.rows, want_r)
    np.testing.assert_array_equal(state.values, want_v)


def test_backends_agree_on_all_columns_without_mask() -> None:
    rng = np.random.default_rng(5)
    raw = _raw(rng.standard_normal((1200, 33)).astype(np.float32), "float16")
    got = []
    for b in BACKENDS:
        s = ColumnTopK(33, 7)
        top_k_per_column(raw, dtype="float16", state=s, backend=b)
        got.append((s.values.copy(), s.rows.copy()))
    for v, r in got[1:]:
        np.testing.assert_array_equal(v, got[0][0])
        np.testing.assert_array_equal(r, got[0][1])
    assert got[0][0][0, 0] == kernels.decode(raw, "float16")[:, 0].max()


def test_top_k_refuses_malformed_input() -> None:
    raw = np.zeros((3, 4), np.float16)
    with pytest.raises(StoreError, match="columns"):
        top_k_per_column(raw, dtype="float16", state=ColumnTopK(1, 2), columns=np.array([4], np.int64))
    with pytest.raises(StoreError, match="state"):
        top_k_per_column(raw, dtype="float16", state=ColumnTopK(2, 2), columns=np.array([1], np.int64))
    with pytest.raises(StoreError, match="mask"):
        top_k_per_column(raw, dtype="float16", state=ColumnTopK(4, 2), mask=np.zeros(2, np.int32))
    with pytest.raises(StoreError, match="raw dtype"):
        top_k_per_column(raw.astype(np.float32), dtype="float16", state=ColumnTopK(4, 2))


# -- neuron cards on a tiny store ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest_rank import tiny_store

    from vstore.rank import rank_store

    tmp = tmp_path_factory.mktemp("cards")
    store = tiny_store(tmp, per_value=2)
    rank_store(store, "value", "welch-t", top_k=4, out=tmp / "welch.json")
    return store, tmp / "welch.json"


def test_cards_equal_an_oracle_over_the_raw_rows(ranked: tuple[Path, Path]) -> None:
    import zarr
    from conftest_rank import raw_rows

    from vstore.cards import neuron_cards
    from vstore.neuronset import NeuronSet

    store, welch = ranked
    ns = NeuronSet.load(welch)
    doc = neuron_cards(store, welch, group=["justice", "harmony"], top=4, context=3, top_neurons=2)
    assert doc["format"] == {"name": "vstore-cards", "version": 1}
    assert [(c["group"], c["rank"]) for c in doc["cards"]] == [("justice", 0), ("justice", 1), ("harmony", 0),
                                                                ("harmony", 1)]
    X, names, cats = raw_rows(store)
    g = zarr.open_group(str(store), mode="r")
    ex = np.asarray(g["parts/0000/rows/example"][:X.shape[1]])
    pos = np.asarray(g["parts/0000/rows/position"][:X.shape[1]])
    texts = [str(t) for t in np.asarray(g["examples/text"][:])]
    layers = g.attrs["vstore"]["layers"]
    for card in doc["cards"]:
        it = ns.groups[card["group"]][card["rank"]]
        assert (card["layer"], card["neuron"], card["score"]) == (it["layer"], it["neuron"], it["score"])
        x = X[layers.index(card["layer"]), :, card["neuron"]]
        order = sorted(range(x.size), key=lambda r: (-x[r], r))[:4]
        assert [h["row"] for h in card["top"]] == order
        assert [h["activation"] for h in card["top"]] == [float(x[r]) for r in order]
        for h in card["top"]:
            assert h["position"] == pos[h["row"]]
            assert h["left"] + h["token"] + h["right"] in texts[ex[h["row"]]] and h["token"]
        for grp in cats:
            v = x[names == grp]
            d = card["by_group"][grp]
            assert d["n"] == v.size
            assert d["mean"] == pytest.approx(v.mean(), rel=1e-12)
            assert d["std"] == pytest.approx(v.std(ddof=1), rel=1e-9)
            assert d["frac_pos"] == pytest.approx((v > 0).mean())
            binned = v.astype(np.float16).astype(np.float64)  # float32 store: quantiles at float16 precision
            assert d["p50"] == np.quantile(binned, 0.5, method="inverted_cdf")
            assert d["p90"] == np.quantile(binned, 0.9, method="inverted_cdf")


def test_show_command_prints_cards_and_json(ranked: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    from vstore.cli import main

    store, welch = ranked
    assert main(["show", str(store), "--neurons", str(welch), "--top", "2", "--top-neurons", "1",
                 "--out", str(tmp_path / "cards.json")]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "frac > 0" in out and "…" not in out
    doc = json.loads((tmp_path / "cards.json").read_text(encoding="utf-8"))
    assert len(doc["cards"]) == 12 and all(len(c["top"]) == 2 for c in doc["cards"])
    assert main(["show", str(store), "--neurons", str(welch), "--group", "justice", "--top-neurons", "1",
                 "--json"]) == 0
    assert [c["group"] for c in json.loads(capsys.readouterr().out)["cards"]] == ["justice"]
    assert main(["show", str(store), "--neurons", str(welch), "--group", "nope"]) == 2
    assert "no group 'nope'" in capsys.readouterr().err


def test_cards_need_a_tokenizer(ranked: tuple[Path, Path], tmp_path: Path) -> None:
    from vstore.cards import neuron_cards
    from vstore.errors import ModelError

    store, welch = ranked
    with pytest.raises(ModelError, match="--tokenizer"):
        neuron_cards(store, welch, tokenizer=tmp_path / "nothing-here")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_histogram_quantiles_are_exact_for_16_bit_stores(dtype: str) -> None:
    from vstore.cards import _key_values, _quantile

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((501, 2)) * 3).astype(np.float32)
    x[:40, 0] = 0.0
    x[40:60, 0] = -0.0
    raw = _raw(x, dtype)
    hist = np.zeros((1, 2, kernels.HISTOGRAM_BINS), dtype=np.uint32)
    kernels.accumulate_histogram(raw, np.zeros(501, np.int32), hist, dtype=dtype, neuron_start=0)
    values = _key_values(dtype)
    exact = kernels.decode(raw, dtype).astype(np.float64)
    for j in range(2):
        for q in (0.1, 0.5, 0.9, 1.0):
            assert _quantile(hist[0, j], values, q) == np.quantile(exact[:, j], q, method="inverted_cdf")
    assert _quantile(np.zeros(kernels.HISTOGRAM_BINS, np.uint32), values, 0.5) is None
