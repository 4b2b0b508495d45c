"""The whole study in one call: build -> rank -> ablate, each stage resumable.

``run_study(out_dir)`` writes into ``out_dir``:

* ``store/`` — activations of the activation split (``vstore build``)
* ``neurons.json`` (+ ``.npz``) — value neurons (``vstore rank --by value``)
* ``ablation.json`` — value consistency, unablated and with each value's neurons (and random
  controls) switched off (``vstore ablate``)
* ``summary.json`` — the headline figures

Run again on the same folder, a finished stage is not redone: an incomplete store resumes, a
complete one is kept, and the ablation resumes its finished sets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .ablate import run_ablation
from .atomic import write_json_atomic
from .build import build_store
from .data import bundled_stories, sample_stories
from .errors import OutputError
from .models import DEFAULT_MODEL, load_model
from .progress import Note, Progress
from .rank import RankResult, rank_store, write_rank_result
from .store import Store, is_store

__all__ = ["run_study"]


def run_study(
    out_dir: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    data: str | Path | None = None,
    quick: bool = False,
    method: str = "vape",
    top_k: int | None = None,
    scorer: str = "ll",
    controls: int | None = None,
    dtype: str = "float16",
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
    say: Note = print,
) -> dict[str, Any]:
    """Build a store from the activation split, rank value neurons, and ablate them.

    Parameters
    ----------
    out_dir
        Folder for the store and the results.
    model
        Model alias, ``.gguf``, folder or hub id (default: the packaged Gemma 3 270M).
    data
        Story file/folder with both splits (default: the bundled benchmark, or with ``quick`` its
        sample: 4 activation and 2 evaluation stories per value and language).
    quick
        The quick profile (about ten minutes on a 2-core CPU): the sample stories, one control.
    method
        Scoring method for ``vstore rank`` (default ``vape``, the paper's).
    top_k
        Neurons per value (default: the method's own selection; vape keeps the top 1%).
    scorer
        ``ll`` or ``choice``.
    controls
        Random control sets per value (default 1 quick, 3 full).

    Returns
    -------
    dict
        The summary also written to ``summary.json``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder; the study writes a folder (choose another out)")
    out.mkdir(parents=True, exist_ok=True)
    data_path = Path(data) if data is not None else (sample_stories() if quick else bundled_stories())
    n_controls = controls if controls is not None else (1 if quick else 3)
    lm = load_model(model, device=device, progress=say)
    store_path = out / "store"
    if is_store(store_path) and Store(store_path).state == "complete":
        say(f"[1/3] store {store_path} is complete; keeping it")
    else:
        say(f"[1/3] building {store_path} from the activation split of {data_path}")
        build_store(store_path, model=lm, data=data_path, split="activation", dtype=dtype,
                    batch_size=batch_size, device=device, progress=progress, on_note=say)
    neurons = out / "neurons.json"
    say(f"[2/3] ranking value neurons ({method}) -> {neurons}")
    ns = rank_store(store_path, "value", method, top_k=top_k, seed=seed, progress=progress)
    if _same_ranking(neurons, ns):  # keep the file (and its digest): a finished ablation of it resumes
        ns.neurons.path = neurons
    else:
        write_rank_result(ns, neurons)
    say(f"[3/3] ablating each value's neurons (+{n_controls} random control(s) each) -> {out / 'ablation.json'}")
    result = run_ablation(lm, neurons, data_path, out / "ablation.json", split="evaluation", scorer=scorer,
                          controls=n_controls, seed=seed, batch_size=batch_size, device=device, progress=progress,
                          on_note=say)
    summary = _summarise(result, ns, store_path)
    write_json_atomic(out / "summary.json", summary)
    return summary


def _same_ranking(path: Path, ns: RankResult) -> bool:
    """Whether ``path`` holds this very ranking (everything but the time it was written)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    new = json.loads(json.dumps(ns.data))
    return isinstance(old, dict) and {**old, "created": None} == {**new, "created": None} and path.with_suffix(".npz").exists()


def _own_delta(ablation: dict[str, Any], value: str) -> float | None:
    """Change of the ablated group's own value consistency (all languages)."""
    for row in ablation.get("breakdown", []):
        if row["value"] == value and row["lang"] == "*":
            return row.get("delta")
    rows = [r for r in ablation.get("breakdown", []) if r["value"] == value]
    return rows[0].get("delta") if len(rows) == 1 else None


def _summarise(result: dict[str, Any], ns: RankResult, store_path: Path) -> dict[str, Any]:
    groups = ns.groups
    per_value = []
    for target in (a for a in result["ablations"] if a["kind"] == "target"):
        g = target["group"]
        ctrl = [d for a in result["ablations"] if a["kind"] == "control" and a["group"] == g
                if (d := _own_delta(a, g)) is not None]
        per_value.append({
            "value": g, "n_neurons": target["n_neurons"], "target_change": _own_delta(target, g),
            "control_change": sum(ctrl) / len(ctrl) if ctrl else None,
            "p_value": next((r.get("p_value") for r in target.get("breakdown", [])
                             if r["value"] == g and r["lang"] == "*"), None),
        })
    done = [r for r in per_value if r["target_change"] is not None]
    ctrl_done = [r for r in done if r["control_change"] is not None]
    return {
        "store": str(store_path),
        "neurons_per_value": {g: len(v) for g, v in groups.items()},
        "baseline_value_consistency": result["baseline"]["value_consistency"],
        "per_value": per_value,
        "mean_own_change_target": sum(r["target_change"] for r in done) / len(done) if done else None,
        "mean_own_change_control": sum(r["control_change"] for r in ctrl_done) / len(ctrl_done) if ctrl_done else None,
    }
