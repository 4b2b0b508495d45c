"""Dose-response: the ablation effect against neuron-set size, with a cross-value matrix per size.

:func:`run_dose` ablates the groups of several neuron-set files — one per size, e.g. ``vstore rank``
at ``--top-rate`` 0.005, 0.01, 0.02, 0.05 — each beside matched random controls of the same
per-layer counts (so every size has its own controls), through :func:`vstore.ablate.run_ablation`
(one resumable result per size). Per size it reads the cross-value matrix (row: the value whose set
is ablated; column: the value whose items change) and separates the two readings that a shared
cluster and value-specific neurons predict: a value-specific set moves its own value's items more
than the other values' (``own - other`` below zero for value consistency), a shared cluster moves
all values alike (``own - other`` near zero) — each beside what the random controls do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .ablate import run_ablation
from .atomic import write_json_atomic
from .errors import UsageError
from .inference import clean, json_safe
from .models import LoadedModel, load_model
from .progress import Note, Progress, note_to_stderr

__all__ = ["DOSE_FORMAT", "dose_summary", "run_dose"]

DOSE_FORMAT = {"name": "vstore-dose", "version": 1}


def _mean(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return float(np.mean(v)) if v else None


def dose_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The dose-response reading of one ablation result (one size): own vs other values, vs controls.

    Returns ``n_neurons_mean``; ``own_delta_mean`` (mean diagonal of the cross-value matrix: a
    value's set on its own items), ``other_delta_mean`` (mean off-diagonal), ``own_minus_other``;
    ``control_own_delta_mean`` (the controls on their group's items); the same for the margin
    (``margin_own_mean``, ``control_margin_own_mean``) and the NLL side effect (``nll_delta_mean``,
    ``control_nll_delta_mean``) when the result has them.
    """
    cv = result.get("cross_value") or {}
    groups, values = cv.get("groups", []), cv.get("values", [])
    mat = np.asarray([[np.nan if x is None else x for x in row] for row in cv.get("matrix", [])], dtype=np.float64)
    own: list[float] = []
    other: list[float] = []
    for i, g in enumerate(groups):
        for j, v in enumerate(values):
            if mat.size and np.isfinite(mat[i, j]):
                (own if g == v else other).append(float(mat[i, j]))
    targets = [a for a in result["ablations"] if a["kind"] == "target"]
    vs = [t.get("vs_controls") or {} for t in targets]
    own_m = _mean(own)
    other_m = _mean(other)
    return {
        "n_neurons_mean": _mean([t["n_neurons"] for t in targets]),
        "own_delta_mean": own_m, "other_delta_mean": other_m,
        "own_minus_other": None if own_m is None or other_m is None else own_m - other_m,
        "control_own_delta_mean": _mean([v.get("mean_delta") for v in vs]),
        "target_own_delta_mean": _mean([v.get("target_delta") for v in vs]),
        "margin_own_mean": _mean([v.get("target_margin_delta") for v in vs]),
        "control_margin_own_mean": _mean([v.get("mean_margin_delta") for v in vs]),
        "nll_delta_mean": _mean([clean((t.get("side_effect") or {}).get("delta")) for t in targets]),
        "control_nll_delta_mean": _mean([v.get("mean_nll_delta") for v in vs]),
        "cross_value": cv,
    }


def run_dose(
    model: str | Path | LoadedModel,
    neurons: Sequence[str | Path],
    data: str | Path,
    out: str | Path,
    *,
    labels: Sequence[str] | None = None,
    groups: str | Sequence[str] | None = None,
    controls: int = 3,
    seed: int = 0,
    scorer: str = "ll",
    prompt: str = "raw",
    mode: str = "zero",
    batch_size: int = 8,
    device: str = "cpu",
    limit: int | None = None,
    side_effect: str | None = None,
    general_text: str | Mapping[str, str | Path] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_note: Note | None = None,
    **ablate_kw: Any,
) -> dict[str, Any]:
    """Ablate neuron sets of several sizes, each beside matched controls; one cross-value matrix per size.

    Parameters
    ----------
    model
        Model spec or loaded model (loaded once for all sizes).
    neurons
        One neuron-set file per size (the same groups in each), smallest first by convention.
    data
        Evaluation stories.
    out
        A folder: ``size-<label>.json`` (each an ablation result, resumable) and ``dose.json``.
    labels
        A name per size (default: the file stems), e.g. ``["0.5%", "1%", "2%", "5%"]``.
    groups, controls, seed, scorer, prompt, mode, batch_size, device, limit, side_effect, general_text
        As :func:`vstore.ablate.run_ablation` (targets on all items, controls on their own items).
    overwrite
        Start each size's result again.
    ablate_kw
        Further keyword arguments of :func:`vstore.ablate.run_ablation`.

    Returns
    -------
    dict
        ``{"format": {"name": "vstore-dose", "version": 1}, "sizes": [{"label", "neurons", "result",
        ...dose_summary}]}``, also written to ``out/dose.json``.
    """
    files = [Path(n) for n in neurons]
    if not files:
        raise UsageError("dose needs at least one neuron-set file", "neurons")
    names = list(labels) if labels is not None else [f.stem for f in files]
    if len(names) != len(files) or len(set(names)) != len(names):
        raise UsageError(f"labels must be {len(files)} distinct names, got {names}", "labels")
    note = on_note or note_to_stderr
    lm = model if isinstance(model, LoadedModel) else load_model(str(model), device=device, progress=note)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = []
    for name, f in zip(names, files, strict=True):
        note(f"dose: size {name} ({f})")
        res_path = folder / f"size-{name.replace('/', '_').replace('%', 'pct')}.json"
        res = run_ablation(lm, f, data, res_path, groups=groups, controls=controls, seed=seed, scorer=scorer,
                           prompt=prompt, mode=mode, batch_size=batch_size, device=device, limit=limit,
                           side_effect=side_effect, general_text=general_text, overwrite=overwrite,
                           progress=progress, on_note=note, **ablate_kw)
        sizes.append({"label": name, "neurons": str(f), "result": str(res_path), **dose_summary(res)})
    doc = json_safe({"format": dict(DOSE_FORMAT), "model": lm.identity.to_json(), "data": str(data),
                     "scorer": scorer, "prompt": prompt, "mode": mode, "controls": controls, "sizes": sizes})
    write_json_atomic(folder / "dose.json", doc)
    return doc  # type: ignore[no-any-return]
