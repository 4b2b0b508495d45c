"""Attribution (``-act x d(margin)/d(act)``) against the truth: the measured margin change when one
neuron alone is zeroed at the story tokens, on tiny models; and the build's ``attr`` site."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny_models
import zarr
from scipy.stats import spearmanr

from vstore.attribution import attribute_batch, measure_zeroing
from vstore.build import build_store
from vstore.cli import main
from vstore.data import load_stories
from vstore.errors import DataError, UsageError
from vstore.evaluate import _letter_ids, _ll_item, choice_prompt, score_choice, score_ll
from vstore.lm import Encoder, common_prefix
from vstore.neuronset import NeuronSet
from vstore.rank import rank_store
from vstore.store import Store

#: Spearman rank correlation of attribution with the zeroing effect, over every neuron, at least.
MIN_SPEARMAN = 0.8
#: Scaling a neuron's activations by (1 - EPS) changes the margin by EPS x attribution up to a
#: second-order term: |change / EPS - attribution| <= SMALL_TOL x max |attribution| over all neurons.
EPS = 1e-2
SMALL_TOL = 0.02


def _load(model_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(model_dir)))


def _sequences(tok: Any, stories: list[Any], scorer: str) -> tuple[list[list[int]], list[int], list[Any]]:
    """Our own sequences per item (two each), the story tokens they share, and what each scores."""
    enc = Encoder(tok)
    seqs, lens, what = [], [], []
    for s in stories:
        if scorer == "ll":
            it = _ll_item(enc, s, 1024)
            seqs += [it.context + a for a in it.actions]
            lens.append(len(it.context))
            what += [(len(it.context), len(it.context) + len(a)) for a in it.actions]
        else:
            pair = [enc(choice_prompt(s, a, b)) for a, b in ((s.aligned, s.violating), (s.violating, s.aligned))]
            seqs += pair
            lens.append(min(common_prefix(enc(s.story.strip()), p) for p in pair))
            what += ["AB", "BA"]
    return seqs, lens, what


def _oracle_margins(model: Any, tok: Any, stories: list[Any], scorer: str, site_module: Any,
                    edits: list[tuple[int, float]]) -> np.ndarray:
    """Margins (float64, (len(edits), items)) with neuron ``n`` of one module multiplied by ``f`` at
    the story tokens, one replica of the batch per edit: a plain forward of the full sequences."""
    import torch

    seqs, lens, what = _sequences(tok, stories, scorer)
    letters = {x: _letter_ids(tok, x) for x in "AB"}
    S, width = len(seqs), max(len(s) for s in seqs)
    ids = torch.zeros((S * len(edits), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r in range(S * len(edits)):
        s = seqs[r % S]
        ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
    scale = torch.ones((S * len(edits), width, site_module[1]), dtype=torch.float32)
    for k, (n, f) in enumerate(edits):
        for r in range(S):
            scale[k * S + r, : lens[r // 2], n] = f
    h = site_module[0].register_forward_hook(lambda _m, _i, o: o * scale)
    try:
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), dim=-1)
    finally:
        h.remove()
    out = np.zeros((len(edits), len(stories)))
    for k in range(len(edits)):
        for i in range(len(stories)):
            sc = []
            for j in (2 * i, 2 * i + 1):
                r, w = k * S + j, what[j]
                if scorer == "ll":
                    c0, c1 = w
                    tgt = ids[r, c0:c1]
                    sc.append(float(lp[r, c0 - 1 : c1 - 1].gather(-1, tgt[:, None]).mean()))
                else:
                    last = lp[r, len(seqs[j]) - 1]
                    a, b = (float(torch.logsumexp(last[letters[x]], 0)) for x in "AB")
                    sc.append(a - b if w == "AB" else b - a)
            out[k, i] = sc[0] - sc[1] if scorer == "ll" else (sc[0] + sc[1]) / 2
    return out


@pytest.mark.parametrize(("family", "scorer"), [("llama", "ll"), ("llama", "choice"), ("gpt2", "ll")])
def test_attribution_agrees_with_zeroing_each_neuron(family, scorer, tiny_model_factory, tmp_path):
    model_dir = tiny_model_factory(family)
    data = tmp_path / "ev.jsonl"
    tiny_models.make_stories(data, per_value=1, split="evaluation")
    stories = load_stories(data)
    model, tok = _load(model_dir)
    res = attribute_batch(model, tok, stories, scorer, site="act")
    modules = tiny_models.act_modules(model)
    base = _oracle_margins(model, tok, stories, scorer, (modules[0], 48), [(0, 1.0)])[0]
    np.testing.assert_allclose(res.margins.numpy(), base, atol=1e-4)  # the differentiable margin is the scorer's
    want = score_ll(model, tok, stories) if scorer == "ll" else score_choice(model, tok, stories)
    np.testing.assert_allclose(base, want.aligned - want.violating, atol=1e-4)
    attr, zero, small = [], [], []
    for layer, mod in enumerate(modules):
        a = res.attr[layer].sum(dim=1).numpy().T.astype(np.float64)  # (neurons, items): summed over story tokens
        N = a.shape[0]
        z = _oracle_margins(model, tok, stories, scorer, (mod, N), [(n, 0.0) for n in range(N)]) - base
        e = _oracle_margins(model, tok, stories, scorer, (mod, N), [(n, 1.0 - EPS) for n in range(N)]) - base
        attr.append(a)
        zero.append(z)
        small.append(e / EPS)
    A, Z, E = (np.concatenate(x) for x in (attr, zero, small))
    rho = spearmanr(A.sum(axis=1), Z.sum(axis=1)).statistic  # per neuron, over the items
    print(f"{family}/{scorer}: Spearman(attribution, zeroing) over {A.shape[0]} neurons = {rho:.3f}; "
          f"max |change/eps - attribution| = {np.abs(E - A).max():.2e} (max |attribution| {np.abs(A).max():.2e})")
    assert rho >= MIN_SPEARMAN
    assert np.abs(E - A).max() <= SMALL_TOL * np.abs(A).max()
    assert np.abs(A).max() > 0


def test_measure_zeroing_is_the_scorers_truth(tiny_model, tmp_path):
    data = tmp_path / "ev.jsonl"
    tiny_models.make_stories(data, per_value=1, split="evaluation")
    stories = load_stories(data)
    model, tok = _load(tiny_model)
    mod = tiny_models.act_modules(model)[1]
    for scorer in ("ll", "choice"):
        base, change = measure_zeroing(model, tok, stories, scorer, [(1, 3), (1, 40)], batch_size=4)
        want = _oracle_margins(model, tok, stories, scorer, (mod, 48), [(3, 0.0), (40, 0.0)])
        np.testing.assert_allclose(base[None] + change, want, atol=1e-4)


def test_build_attribution_site(tiny_model, stories, tmp_path):
    out = tmp_path / "s"
    build_store(out, model=str(tiny_model), data=stories, dtype="float16", attribution="ll", batch_size=3,
                progress=False)
    st = Store(out)
    assert st.sites == ["act", "attr"]
    info = st.site_info("attr")
    assert (info["dtype"], info["n_neurons"], info["of"], info["scorer"], info["path"]) == \
        ("float32", 48, "act", "ll", "sites/attr")
    g = zarr.open_group(str(out), mode="r")
    assert g["parts/0000/sites/attr"].attrs["logical_dtype"] == "float32"
    attr = np.asarray(st.acts("0000", "attr")[:, : st.parts[0].committed_rows])
    ex, pos = st.rows("0000", "example"), st.rows("0000", "position")
    # every row of an example is its story token's attribution (summed per item) or 0 past the story
    items = load_stories(stories)
    model, tok = _load(tiny_model)
    ref = attribute_batch(model, tok, items, "ll")
    ids, texts = st.ids(), st.texts()
    for r in range(len(ex)):
        i = next(k for k, s in enumerate(items) if s.id == ids[ex[r]])
        n = common_prefix(ref.tokens[i], list(tok(texts[ex[r]])["input_ids"]))  # the story tokens the row shares
        want = np.stack([ref.attr[lay][i, pos[r]].numpy() if pos[r] < n else np.zeros(48) for lay in (0, 1)])
        np.testing.assert_allclose(attr[:, r], want, atol=1e-5, rtol=1e-4)
    assert (attr != 0).any() and (attr == 0).all(axis=(0, 2)).any()  # rationale rows carry none


def test_rank_attr_site_records_it_and_attribution_method(tiny_model, stories, tmp_path):
    out = tmp_path / "s"
    assert main(["build", "--model", str(tiny_model), "--data", str(stories), "--out", str(out), "--dtype",
                 "float32", "--attribution", "choice", "--no-progress"]) == 0
    assert main(["rank", str(out), "--by", "value", "--site", "attr", "--method", "mean-diff", "--top-k", "5",
                 "--out", str(tmp_path / "md.json"), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "md.json").read_text())
    assert doc["store"]["site"] == "attr" and doc["store"]["attribution"] == {"of": "act", "scorer": "choice"}
    assert sum(len(v) for v in doc["groups"].values()) == 15
    assert NeuronSet.load(tmp_path / "md.json").site == "act"  # ablated where the attributed neurons live
    res = rank_store(out, "value", "attribution", top_k=4)
    mean = rank_store(out, "value", "mean", site="attr", top_k=4 * 48)
    for g, items in res.groups.items():  # attribution = mean on attr, most negative first
        scores = sorted(it["score"] for it in mean.groups[g])[:4]
        assert [it["score"] for it in items] == pytest.approx(scores)
    assert res.data["store"]["site"] == "attr" and res.data["method"] == "attribution"
    for method in ("vape", "auroc", "welch-t", "probeless", "random"):
        rank_store(out, "value", method, site="attr", top_k=3) if method != "vape" else \
            rank_store(out, "value", method, site="attr", top_rate=0.05)
    with pytest.raises(UsageError, match="ranks site 'attr'"):
        rank_store(out, "value", "attribution", site="act", top_k=3)
    assert main(["verify", str(out), "--no-progress"]) == 0


def test_attribution_needs_both_actions_and_story_data(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = tiny_models.make_stories(tmp_path / "ok.jsonl", per_value=1)
    rows[1]["violating"] = " "
    bad.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        build_store(tmp_path / "s", model=str(tiny_model), data=bad, attribution="ll", progress=False)
    txt = tmp_path / "t.txt"
    txt.write_text("one line\nanother line\n", encoding="utf-8")
    with pytest.raises(UsageError, match="plain text"):
        build_store(tmp_path / "t", model=str(tiny_model), data=txt, attribution="ll", progress=False)
    with pytest.raises(UsageError, match="choice or ll"):
        build_store(tmp_path / "u", model=str(tiny_model), data=tmp_path / "ok.jsonl", attribution="nll",
                    progress=False)
