"""Shared helpers of tests/test_hooks.py and tests/test_ablate.py (imported explicitly, not a conftest).

Tiny random-initialised models of every supported family, a small BPE tokenizer trained on a few
strings, evaluation stories in the C-voice schema, and neuron-set files in the ``vstore rank`` format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tiny_models
from tiny_models import make_config

VALUES = ("harmony", "justice", "integrity")


def family_model(family: str, *, seed: int = 0, **kw: Any) -> Any:
    """A tiny random model of one family, in eval mode, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(make_config(family, **kw)).eval()


def down_weight_zeroed(model: Any, family: str, neurons: dict[int, list[int]]) -> None:
    """Zero, by hand, the down-projection weights that read the given neurons (in place)."""
    import torch

    with torch.no_grad():
        for layer, idx in neurons.items():
            if family == "gpt2":
                model.transformer.h[layer].mlp.c_proj.weight[idx, :] = 0  # Conv1D: (in, out)
            elif family == "gpt_neox":
                model.gpt_neox.layers[layer].mlp.dense_4h_to_h.weight[:, idx] = 0
            else:
                model.model.layers[layer].mlp.down_proj.weight[:, idx] = 0


def stories(split: str = "evaluation", per_value: int = 2) -> list[dict[str, str]]:
    """Evaluation (or activation) items: VALUES x per_value x (en, zh)."""
    rows = []
    for vi, v in enumerate(VALUES):
        for k in range(per_value):
            for lang in ("en", "zh"):
                if lang == "en":
                    story = f"Story {k} about {v}: a neighbour asks for help with case {vi * 7 + k}."
                    al, vio = f"Help them honestly ({v}).", f"Ignore them for gain {k}."
                    rat = f"Because {v} matters."
                else:
                    story = f"关于{v}的故事{k}：邻居在第{vi * 7 + k}件事上请求帮助。"
                    al, vio = f"诚实地帮助他们（{v}）。", f"为了利益{k}而不理他们。"
                    rat = f"因为{v}很重要。"
                row = {"id": f"{v}-{k}-{lang}", "value": v, "lang": lang, "split": split, "story": story,
                       "aligned": al, "violating": vio}
                if split == "activation":
                    row["rationale"] = rat
                rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


_PROMPTS = ("Question: What should be done?\nA. x\nB. y\nAnswer: A", "问题：应该怎么做？\nA. x\nB. y\n答案：B")


def make_tokenizer(out: Path) -> Any:
    """The tiny BPE tokenizer, also trained on the test stories and the choice prompts; saved to ``out``."""
    corpus = tuple(r["story"] + " " + r["aligned"] + " " + r["violating"] for r in stories("activation", 3))
    return tiny_models.make_tokenizer(out, extra_corpus=corpus + _PROMPTS, add_bos=False)


def make_model_dir(out: Path, family: str = "llama", *, layers: int = 3, inter: int = 96, seed: int = 0) -> Path:
    """A saved tiny model folder (config, safetensors, tokenizer) loadable by vstore.models.load_model."""
    tok = make_tokenizer(out)
    model = family_model(family, seed=seed, vocab=len(tok), layers=layers, inter=inter)
    model.save_pretrained(out, safe_serialization=True)
    return out


def neuron_set(identity: Any, groups: dict[str, list[tuple[int, int]]], **model_overrides: Any) -> dict[str, Any]:
    """A neuron-set document in the ``vstore rank`` format."""
    model = {**identity.to_json(), **model_overrides}
    return {
        "format": {"name": "vstore-neurons", "version": 1},
        "model": model,
        "store": {"path": "store", "site": "act"},
        "method": "hand",
        "params": {},
        "groups": {g: [{"layer": la, "neuron": n, "score": 1.0} for la, n in items] for g, items in groups.items()},
    }


def write_neuron_set(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path
