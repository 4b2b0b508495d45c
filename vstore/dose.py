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

from .ablate import run_ablation
from .ablation_result import dose_summary
from .atomic import write_json_atomic
from .errors import UsageError
from .inference import json_safe
from .models import LoadedModel, load_model
from .progress import Note, Progress, note_to_stderr

__all__ = ["DOSE_FORMAT", "dose_summary", "run_dose"]

DOSE_FORMAT = {"name": "vstore-dose", "version": 1}


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
