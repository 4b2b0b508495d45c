"""Shared pieces of the ranking tests (imported explicitly by test_stats/test_scoring/test_rank).

* :func:`tiny_model` / :func:`tiny_store`: a random-initialised 3-layer llama with its own BPE
  tokenizer, and a float32 store built from it over 12 values x 2 stems x 2 languages.
* :func:`synthetic` writes a synthetic store with planted neurons.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tiny_models

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

VALUES = ["prosperity", "democracy", "civility", "harmony", "freedom", "equality", "justice",
          "rule_of_law", "patriotism", "dedication", "integrity", "friendliness"]


def make_data(path: Path, per_value: int = 2) -> list[dict]:
    """Stories in the C-voice schema: per value, ``per_value`` stems in en and zh."""
    rows = []
    for vi, v in enumerate(VALUES):
        for k in range(per_value):
            for lang in ("en", "zh"):
                if lang == "en":
                    story = f"Story {k} about {v}: a neighbour asks for help with case {vi * 7 + k}."
                    al, vio, rat = f"Help them honestly ({v}).", f"Ignore them for gain {k}.", f"Because {v} matters."
                else:
                    story = f"关于{v}的故事{k}：邻居在第{vi * 7 + k}件事上请求帮助。"
                    al, vio, rat = f"诚实地帮助他们（{v}）。", f"为了利益{k}而不理他们。", f"因为{v}很重要。"
                rows.append(dict(id=f"{v}-{k}-{lang}", value=v, lang=lang, split="activation", story=story,
                                 aligned=al, violating=vio, rationale=rat))
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def tiny_model(out: Path, layers: int = 3, inter: int = 96) -> Path:
    """A random-initialised llama (hidden 32) with a BPE tokenizer also trained on the stories."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = tuple(r["story"] + r["aligned"] + r["violating"] for r in make_data(out / "corpus.jsonl"))
    return tiny_models.make_model(out, "llama", layers, inter, add_bos=False, extra_corpus=corpus, init_std=None)


def tiny_store(tmp: Path, *, texts: list[str] | None = None, per_value: int = 2, name: str = "store") -> Path:
    """A float32 store of the tiny llama over the sample stories."""
    from vstore.build import build_store

    model = tiny_model(tmp / "model")
    data = tmp / f"data{per_value}.jsonl"
    make_data(data, per_value=per_value)
    out = tmp / name
    build_store(out, model=str(model), data=data, dtype="float32", texts=texts, progress=False)
    return out


def raw_rows(store_path: Path, column: str = "value") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every committed activation (L, rows, N) as float64 and the label name of each row, with plain zarr."""
    import zarr

    g = zarr.open_group(str(store_path), mode="r")
    meta = g.attrs["vstore"]
    X, ex = [], []
    for p in meta["parts"]:
        n = p["committed_rows"]
        a = np.asarray(g[f"parts/{p['name']}/acts"][:, :n])
        if meta["dtype"] == "bfloat16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        X.append(a.astype(np.float64))
        ex.append(np.asarray(g[f"parts/{p['name']}/rows/example"][:n]))
    arr = g[f"examples/{column}"]
    cats = list(arr.attrs["categories"])
    codes = np.asarray(arr[:])
    names = np.asarray([*cats, "<missing>"], dtype=object)[np.where(codes < 0, len(cats), codes)]
    return np.concatenate(X, axis=1), names[np.concatenate(ex)].astype(str), cats
