#!/usr/bin/env python
"""Write realistic fake study run folders (docs/report.md, the run-folder contract) for `vstore report`.

Every number is drawn from a seeded generator: the folders exercise the report's figures and tables,
they are not results. Two models by default (an 18-layer and a 24-layer one), the 12 bundled values,
zh and en::

    python tools/make_report_fixture.py OUT_DIR          # writes OUT_DIR/gemma3-270m, OUT_DIR/qwen2.5-0.5b
    vstore report OUT_DIR/* --out /tmp/fixture-report.html
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from vstore.data import bundled_values

MODELS = (("gemma3-270m", "gemma3", 18, 2048), ("qwen2.5-0.5b", "qwen2", 24, 4864))
LANGS = ("zh", "en")
SIZES = (0.005, 0.01, 0.02, 0.05)
TOKENS = {"zh": ["的", "是", "和", "谐", "平", "等", "公", "正", "诚", "信", "友", "善", "法", "治", "自", "由", "爱", "国", "敬", "业", "文", "明", "民", "主", "富", "强", "他", "她", "我们", "大家", "邻居", "老师"],
          "en": ["the", "a", "fair", "honest", "kind", "law", "free", "country", "work", "polite", "vote", "rich", "neighbour", "teacher", "promise", "share", "equal", "justice", "friend"]}


def _write(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")


def _identity(name: str, arch: str, n_layers: int, n_neurons: int) -> dict[str, Any]:
    return {"name": name, "source": f"fixture:{name}", "sha256": "0" * 64, "architecture": arch,
            "n_layers": n_layers, "n_neurons": n_neurons}


def _neuron_set(rng: np.random.Generator, model: dict[str, Any], keys: list[str], per_value: int,
                lang: str | None, centre: float) -> dict[str, Any]:
    L, N = model["n_layers"], model["n_neurons"]
    shared = [(int(rng.integers(L // 2, L)), int(rng.integers(N))) for _ in range(per_value // 3)]
    groups = {}
    for k in keys:
        own = [(int(np.clip(rng.normal(centre * L, L / 6), 0, L - 1)), int(rng.integers(N)))
               for _ in range(per_value - len(shared))]
        uniq = sorted(set(own + shared))
        groups[k] = [{"layer": lay, "neuron": n, "score": float(rng.uniform(0.1, 1.5))} for lay, n in uniq]
    return {"format": {"name": "vstore-neurons", "version": 1}, "model": model,
            "store": {"path": "/fixture/store", "committed": "0000:1000", "site": "act", "dtype": "float16",
                      "pooling": "token"},
            "method": "vape", "params": {"selection": {"top_rate": 0.01}}, "by": "value",
            "where": {"lang": [lang]} if lang else {}, "contrast": None, "layers": list(range(L)),
            "n_neurons": N, "stats": {}, "groups": groups, "created": "2026-01-01T00:00:00",
            "vstore_version": "fixture"}


def _cards(rng: np.random.Generator, ns: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    cards = []
    for k in keys:
        for rank, it in enumerate(ns["groups"][k][:3]):
            top = []
            for j in range(4):
                lang = LANGS[j % 2]
                w = TOKENS[lang]
                sep = "" if lang == "zh" else " "
                top.append({"activation": float(4 - j * 0.5 + rng.uniform(0, 0.3)), "example": f"{k}-a{j:02d}-{lang}",
                            "row": int(rng.integers(1e5)), "position": int(rng.integers(64)),
                            "token": str(rng.choice(w)),
                            "left": sep.join(rng.choice(w, 6)) + sep + "<b>&", "right": sep + sep.join(rng.choice(w, 6))})
            by_group = {g: {"n": 800, "mean": float(rng.normal(0.3 if g == k else 0.1, 0.05)), "std": 0.4,
                            "p50": 0.1, "p90": 0.9, "frac_pos": float(rng.uniform(0.3, 0.8))} for g in keys}
            cards.append({"group": k, "layer": it["layer"], "neuron": it["neuron"], "rank": rank,
                          "score": it["score"], "top": top, "by_group": by_group})
    return {"format": {"name": "vstore-cards", "version": 1}, "store": "/fixture/store",
            "neurons_file": "neurons/vape.json", "model": ns["model"], "context": 8, "cards": cards}


def _overlap(rng: np.random.Generator, a: str, b: str, g: str, n_a: int, n_b: int, pool: int) -> dict[str, Any]:
    shared = int(rng.integers(0, min(n_a, n_b) // 2 + 1))
    chance = n_a * n_b / pool / (n_a + n_b)
    return {"a": a, "b": b, "group": g, "n_a": n_a, "n_b": n_b, "shared": shared,
            "jaccard": shared / (n_a + n_b - shared), "chance_jaccard": chance, "chance_sd": chance / 2 + 1e-4,
            "p_value": float(rng.uniform(0, 0.1)), "by": "neuron"}


def _compare(rng: np.random.Generator, name: str, model: dict[str, Any], sets: dict[str, dict[str, Any]],
             keys: list[str]) -> dict[str, Any]:
    pool = model["n_layers"] * model["n_neurons"]
    info = [{"label": lab, "path": f"neurons/{lab}.json", "model": name, "n_layers": model["n_layers"],
             "n_neurons": model["n_neurons"], "method": "vape", "where": ns["where"],
             "groups": {k: len(v) for k, v in ns["groups"].items()}} for lab, ns in sets.items()]
    zh, en = sets["vape-zh"]["groups"], sets["vape-en"]["groups"]
    overlaps = [_overlap(rng, "vape-zh", "vape-en", k, len(zh[k]), len(en[k]), pool) for k in keys]
    sims = []
    for lang in LANGS:
        x = rng.normal(size=(len(keys), 6))
        m = np.corrcoef(x)
        sims.append({"store": "/fixture/store", "model": name, "lang": lang, "groups": keys,
                     "matrix": np.round(m, 4).tolist()})
    bins = np.linspace(0, 1, 11).tolist()
    hist = [{"set": lab, "bins": bins, "counts": rng.integers(0, 40, 10).tolist()} for lab in sets]
    return {"format": {"name": "vstore-compare", "version": 1}, "sets": info, "overlaps": overlaps,
            "within": [], "depth": [], "depth_hist": hist, "similarity": sims,
            "similarity_agreement": [{"a": f"{name}/zh", "b": f"{name}/en", "spearman": float(rng.uniform(0.1, 0.6)),
                                      "p_value": float(rng.uniform(0, 0.05)), "permutations": 10000}]}


def _ci(d: float, w: float) -> list[float]:
    return [d - w, d + w]


def _ablation(rng: np.random.Generator, model: dict[str, Any], ns: dict[str, Any], keys: list[str],
              scale: float) -> dict[str, Any]:
    base_rows = []
    for k in keys:
        for lang in LANGS:
            vc = float(np.clip(rng.normal(0.62 if lang == "zh" else 0.54, 0.07), 0.3, 0.95))
            lo, hi = max(0.0, vc - 0.13), min(1.0, vc + 0.13)
            base_rows.append({"value": k, "lang": lang, "n": 25, "value_consistency": vc, "ci95": [lo, hi],
                              "p_chance": float(rng.uniform(0.0005, 0.6)), "above_chance": lo > 0.5})
    for lang in LANGS:
        vc = float(np.mean([r["value_consistency"] for r in base_rows if r["lang"] == lang]))
        base_rows.append({"value": "*", "lang": lang, "n": 300, "value_consistency": vc,
                          "ci95": [vc - 0.05, vc + 0.05], "p_chance": 0.001 if vc > 0.56 else 0.2,
                          "above_chance": vc - 0.05 > 0.5})
    base_rows.append({"value": "*", "lang": "*", "n": 600, "value_consistency": 0.58, "ci95": [0.54, 0.62],
                      "p_chance": 0.0004, "above_chance": True})
    abl, matrix = [], []
    for i, k in enumerate(keys):
        layers: dict[str, int] = {}
        for it in ns["groups"][k]:
            layers[str(it["layer"])] = layers.get(str(it["layer"]), 0) + 1
        row = [float(rng.normal(-0.01 * scale, 0.02)) for _ in keys]
        row[i] = float(rng.normal(-0.04 * scale, 0.03))
        matrix.append(row)
        ctrl = [float(rng.normal(-0.005 * scale, 0.015)) for _ in range(3)]
        margin = float(rng.normal(-0.08 * scale, 0.03))
        for kind, seed, d, m in [("target", None, row[i], margin)] + [("control", s, c, margin * 0.2) for s, c in enumerate(ctrl)]:
            nll = {lang: {"baseline": 3.1, "ablated": 3.1 + abs(rng.normal(0.02 * scale, 0.01)),
                          "delta": 0.0} for lang in LANGS}
            for v in nll.values():
                v["delta"] = v["ablated"] - v["baseline"]
            e = {"group": k, "kind": kind, "seed": seed, "n_neurons": len(ns["groups"][k]), "layers": layers,
                 "value_consistency": 0.6 + d, "delta": d, "relative_change": d / 0.6, "ci95": _ci(d, 0.04),
                 "p_value": float(rng.uniform(0.01, 1)), "margin_delta": m, "margin_ci95": _ci(m, 0.02),
                 "breakdown": [{"value": k, "lang": "*", "n": 50, "baseline": 0.6, "value_consistency": 0.6 + d,
                                "delta": d, "ci95": _ci(d, 0.05), "p_value": 0.3, "margin_delta": m,
                                "margin_ci95": _ci(m, 0.03)}],
                 "side_effect": {"nll": nll}, "seconds": 1.0}
            if kind == "target":
                e["vs_controls"] = {"n": 3, "mean_value_consistency": 0.6 + float(np.mean(ctrl)),
                                    "mean_delta": float(np.mean(ctrl)), "sd_delta": float(np.std(ctrl)),
                                    "p_empirical": 0.25, "margin_delta_mean": margin * 0.2}
            abl.append(e)
    return {"format": {"name": "vstore-ablation", "version": 1}, "metric": "vc", "complete": True,
            "run": {"mode": "zero", "scorer": "choice", "controls": 3}, "model": model,
            "baseline": {"value_consistency": 0.58, "n_items": 600, "breakdown": base_rows},
            "ablations": abl, "cross_value": {"groups": keys, "values": keys, "langs": list(LANGS), "matrix": matrix}}


def make_fixture(root: str | Path, *, seed: int = 0, models: tuple[tuple[str, str, int, int], ...] = MODELS,
                 dose: bool = True) -> list[Path]:
    """Write one run folder per model under ``root``; returns the folders."""
    rng = np.random.default_rng(seed)
    keys = [v["key"] for v in bundled_values()]
    runs = []
    for j, (name, arch, L, N) in enumerate(models):
        run = Path(root) / name
        model = _identity(name, arch, L, N)
        _write(run / "study.json", {"model": model, "config": {"scorer": "choice"}, "stages": {}})
        sets = {lab: _neuron_set(rng, model, keys, 30, lang, 0.55 + 0.1 * j)
                for lab, lang in (("vape", None), ("vape-zh", "zh"), ("vape-en", "en"))}
        for lab, ns in sets.items():
            _write(run / "neurons" / f"{lab}.json", ns)
        _write(run / "cards.json", _cards(rng, sets["vape"], keys))
        _write(run / "compare.json", _compare(rng, name, model, sets, keys))
        _write(run / "ablation.json", _ablation(rng, model, sets["vape"], keys, 1.0))
        if dose:
            for s in SIZES:
                _write(run / "dose" / f"{s}.json", _ablation(rng, model, sets["vape"], keys, s / 0.01))
        runs.append(run)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write the run folders into")
    ap.add_argument("--seed", type=int, default=0)
    for r in make_fixture(ap.parse_args().out, seed=ap.parse_args().seed):
        print(r)


if __name__ == "__main__":
    main()
