"""Ablation: value consistency (or per-token NLL) with chosen neurons switched off.

:func:`run_ablation` measures the unablated model once, then every ablated neuron set: each
requested group of a neuron-set file (``a+b`` is the union of two groups), and per group ``controls``
random sets with the same number of neurons in each layer (:func:`vstore.select.control_set`). Each
ablation is applied through :class:`vstore.hooks.Edit` at the capture site the neuron set was ranked
on (``act``: the output of the MLP activation function, so ``zero`` equals zeroing the neurons'
down-projection columns).

The result (:mod:`vstore.ablation_result`, documented in ``docs/ablate-result.md``) is written
atomically after the baseline and after each finished set; a run resumed with the same ``out`` and
arguments skips the sets already there.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import ablation_result as ar
from ._version import __version__
from .ablation_result import RESULT_FORMAT, EvalItems, LayerNeurons
from .atomic import write_json_atomic
from .data import file_sha256, load_examples, load_stories
from .errors import DataError, OutputError, StoreError, UsageError
from .evaluate import SCORERS, score_items, text_nll
from .inference import json_safe
from .models import LoadedModel, ModelIdentity
from .neuronset import NeuronSet
from .progress import Note, Progress, Task, note_to_stderr, task
from .select import control_set

__all__ = ["METRICS", "MODES", "RESULT_FORMAT", "load_eval_items", "parse_mode", "run_ablation"]

METRICS = ("vc", "nll")
MODES = ("zero", "mean", "scale:F")


def parse_mode(mode: str) -> tuple[str, float]:
    """``zero`` | ``mean`` | ``scale:F`` -> (mode, factor)."""
    name, _, arg = str(mode).partition(":")
    if name in ("zero", "mean") and not arg:
        return name, 0.0
    if name == "scale":
        try:
            factor = float(arg)
        except ValueError:
            raise UsageError(f"mode scale needs a factor, e.g. scale:0.5; got {mode!r}", "mode") from None
        if not math.isfinite(factor):
            raise UsageError(f"mode scale factor must be finite, got {mode!r}", "mode")
        return "scale", factor
    raise UsageError(f"unknown mode {mode!r}; use zero, mean or scale:F", "mode")


def load_eval_items(data: str | Path, split: str | None, metric: str, limit: int | None) -> EvalItems:
    """The evaluation items: stories (``metric="vc"``) or texts (``"nll"``) after the split filter and limit."""
    p = Path(data)
    if metric == "vc":
        if p.suffix == ".txt":
            raise DataError(f"{p}: plain text has no actions to choose between; use a story file, or metric nll")
        stories = load_stories(p)
        if split is not None:
            stories = [s for s in stories if s.split == split]
            if not stories:
                raise DataError(f"{p}: no stories of split {split!r} (field 'split')")
        stories = stories[:limit] if limit else stories
        return EvalItems([s.id for s in stories], [s.value for s in stories], [s.lang for s in stories], stories, None)
    examples = load_examples(p, split=split, limit=limit)
    lang_default = p.stem if p.suffix == ".txt" else ""
    return EvalItems([e.id for e in examples], [e.labels.get("value", "") for e in examples],
                     [e.labels.get("lang", lang_default) or lang_default for e in examples], None,
                     [e.text for e in examples])


def _means_from_store(store: str | Path, identity: ModelIdentity, site: str, layers: Sequence[int]) -> dict[int, Any]:
    """Per-neuron means of every needed layer from a store's statistics (``mode="mean"``); read only."""
    import torch

    from .stats import compute_stats
    from .store import Store

    st = Store(store, mode="r")
    m = st.meta.get("model", {})
    for key in ("architecture", "n_layers", "n_neurons"):
        if m.get(key) != getattr(identity, key):
            raise StoreError(f"{st.path}: field 'model.{key}' is {m.get(key)!r} but the model has {getattr(identity, key)!r}")
    if st.meta.get("site", "act") != site:
        raise StoreError(f"{st.path}: field 'site' is {st.meta.get('site')!r} but the neurons are ablated at site {site!r}")
    stats = compute_stats(st, None)
    mean = np.asarray(stats.mean(), dtype=np.float64)
    have = [int(x) for x in stats.layers]
    missing = sorted(set(layers) - set(have))
    if missing:
        raise StoreError(f"{st.path}: field 'layers' lacks model layer(s) {missing} that the neuron set ablates")
    return {lay: torch.as_tensor(mean[have.index(lay), 0, :], dtype=torch.float32) for lay in layers}


def _load_previous(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    if (out.exists() or out.is_symlink()) and not (out.is_file() and not out.is_symlink()):
        raise OutputError(f"{out} is not a regular file; the result is written only to a file (choose another out)")
    if overwrite or not out.exists():
        return None
    try:
        prev = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{out}: exists but is not a readable result JSON ({e}); use another out or overwrite") from e
    if not isinstance(prev, dict) or prev.get("format", {}).get("name") != RESULT_FORMAT["name"]:
        raise DataError(f"{out}: exists and is not a vstore ablation result; use another out or overwrite")
    old = prev.get("fingerprint", {})
    for key in sorted(set(old) | set(fingerprint)):
        if old.get(key) != fingerprint.get(key):
            raise DataError(
                f"{out}: was written by a different run (field 'fingerprint.{key}' is {old.get(key)!r}, "
                f"this run has {fingerprint.get(key)!r}); use another out, or overwrite to start again"
            )
    return prev


@dataclass(frozen=True)
class _Run:
    """One validated ablation run: what to measure, on what, and how."""

    lm: LoadedModel
    ns: NeuronSet
    items: EvalItems
    plan: list[tuple[str, str, int | None, LayerNeurons]]  # (group, kind, control seed, neurons)
    metric: str
    scorer: str
    mode: str
    factor: float
    means: dict[int, Any] | None
    batch_size: int

    def evaluate(self, bar: Task) -> tuple[np.ndarray, ...]:
        if self.metric == "vc":
            sc = score_items(self.lm.model, self.lm.tokenizer, self.items.stories or [], self.scorer,
                             batch_size=self.batch_size, progress=bar.advance)
            return sc.aligned_won, sc.aligned, sc.violating
        return text_nll(self.lm.model, self.lm.tokenizer, self.items.texts or [], batch_size=self.batch_size,
                        progress=bar.advance)

    def measure(self, name: str, kind: str, seed: int | None, sel: LayerNeurons, base: dict[str, Any],
                bar: Task) -> dict[str, Any]:
        """One ablated set, measured and compared with the baseline."""
        from .hooks import Edit

        t0 = time.perf_counter()
        with Edit(self.lm.model, dict(sel), mode=self.mode, means=self.means, factor=self.factor, site=self.ns.site):  # type: ignore[arg-type]
            res = self.evaluate(bar)
        entry: dict[str, Any] = {"group": name, "kind": kind, "seed": seed, "n_neurons": sum(len(v) for v in sel.values()),
                                 "layers": {str(lay): len(idx) for lay, idx in sel.items()}}
        key = ar.set_key(name, kind, seed)
        if self.metric == "vc":
            won, aligned, violating = res
            base_won = np.asarray([it["aligned_won"] for it in base["items"]], dtype=bool)
            o = (cmp := ar.compare_vc(self.items, base_won, won, key))["overall"]
            entry.update({"value_consistency": o["value_consistency"], "delta": o["delta"],
                          "relative_change": o["relative_change"], "ci95": o["ci95"], "p_value": o["p_value"],
                          "breakdown": cmp["breakdown"], "items": ar.vc_items(self.items, won, aligned, violating)})
        else:
            nll, _ = res
            base_nll = np.asarray([it["nll_sum"] for it in base["items"]], dtype=np.float64)
            count = np.asarray([it["n_tokens"] for it in base["items"]], dtype=np.int64)
            o = (cmp := ar.compare_nll(self.items, base_nll, nll, count, key))["overall"]
            entry.update({"nll": o["nll"], "delta": o["delta"], "relative_change": o["relative_change"],
                          "ci95": o["ci95"], "p_value": o["p_value"], "breakdown": cmp["breakdown"],
                          "items": ar.nll_items(self.items, nll, count)})
        entry["seconds"] = time.perf_counter() - t0
        entry["neurons"] = ar.neuron_list(sel)
        return entry


def _check_arguments(metric: str, scorer: str, controls: int, seed: int, batch_size: int, limit: int | None,
                     mode: str, store: str | Path | None) -> tuple[str, float]:
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}; use one of {list(METRICS)}", "metric")
    if metric == "vc" and scorer not in SCORERS:
        raise UsageError(f"unknown scorer {scorer!r}; use one of {list(SCORERS)}", "scorer")
    if controls < 0:
        raise UsageError(f"controls must be >= 0, got {controls}", "controls")
    if seed < 0:
        raise UsageError(f"seed must be >= 0, got {seed}", "seed")
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}", "batch_size")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be >= 1 (None: every item), got {limit}", "limit")
    mode_name, factor = parse_mode(mode)
    if mode_name == "mean" and store is None:
        raise UsageError("mode mean needs store (the neurons' means come from its statistics)", "mode", "store")
    return mode_name, factor


def _header(run: _Run, model: Any, neurons: Any, data: Any, fingerprint: dict[str, Any], notes: list[str],
            args: dict[str, Any]) -> dict[str, Any]:
    items = run.items
    return {
        "format": dict(RESULT_FORMAT),
        "metric": run.metric,
        "run": {"model": str(model) if not isinstance(model, LoadedModel) else str(run.lm.path), "neurons": str(neurons),
                "data": str(data), "groups": [p[0] for p in run.plan if p[1] == "target"], **args},
        "fingerprint": fingerprint,
        "model": run.lm.identity.to_json(),
        "neurons": {"path": str(neurons), "sha256": run.ns.sha256, "method": run.ns.method, "site": run.ns.site,
                    "model": run.ns.model},
        "data": {"path": str(data), "sha256": fingerprint["data_sha256"], "n_items": len(items.ids),
                 "values": sorted(set(items.values)), "langs": sorted(set(items.langs))},
        "notes": notes,
        "versions": {"vstore": __version__},
        "complete": False,
        "baseline": None,
        "ablations": [],
    }


def run_ablation(
    model: str | Path | LoadedModel,
    neurons: str | Path,
    data: str | Path,
    out: str | Path | None,
    *,
    split: str | None = "evaluation",
    groups: str | Sequence[str] | None = None,
    mode: str = "zero",
    scorer: str = "ll",
    controls: int = 3,
    seed: int = 0,
    metric: str = "vc",
    store: str | Path | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    limit: int | None = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    on_note: Note | None = None,
) -> dict[str, Any]:
    """Measure value consistency (or per-token NLL) unablated and under each ablated neuron set.

    Parameters
    ----------
    model
        A model spec for :func:`vstore.models.load_model` (alias, folder, ``.gguf``, hub id), or an
        already loaded :class:`~vstore.models.LoadedModel`.
    neurons
        A neuron-set JSON written by ``vstore rank``; checked against the model by architecture,
        layer count and neuron count.
    data
        Evaluation stories (JSONL file or folder); for ``metric="nll"`` also a ``.txt`` file with one
        text per line (its language is the file's stem, e.g. ``zh.txt``).
    out
        The result JSON (written atomically after the baseline and after each finished set; an
        existing result of the same run is resumed), or ``None`` to write nothing.
    split
        Keep the stories of this split (``None`` keeps all).
    groups
        ``None``: each group of the neuron set in turn; else names (comma-separated string or list);
        ``a+b`` ablates the union of groups ``a`` and ``b``.
    mode
        ``zero`` (LAPE's deactivation), ``mean`` (replace with the neuron's mean over ``store``), or
        ``scale:F`` (multiply by F).
    scorer
        ``ll`` or ``choice`` (see :mod:`vstore.evaluate`); ignored for ``metric="nll"``.
    controls
        Random neuron sets per group with the same per-layer counts (seeds ``seed .. seed+controls-1``).
    seed
        First control seed; the bootstrap is seeded from the set and cell names.
    metric
        ``vc`` (value consistency) or ``nll`` (mean negative log-likelihood per token, per language).
    store
        The activation store whose statistics give the means of ``mode="mean"`` (read only).
    batch_size
        Stories (texts) per forward pass.
    device
        Torch device used when ``model`` is loaded here.
    limit
        Evaluate only the first N items (after the split filter).
    overwrite
        Start again even if ``out`` holds a result of another run.
    trust_remote_code
        Passed to :func:`vstore.models.load_model`.
    progress
        A :class:`vstore.progress.Progress` reporter (None: report nothing).
    on_note
        Receives notes for the user (e.g. a neuron set ranked on other weights of the same shape);
        default: :func:`vstore.progress.note_to_stderr`.

    Returns
    -------
    dict
        The result (see ``docs/ablate-result.md``), also written to ``out``.

    Raises
    ------
    UsageError
        A bad argument.
    NeuronSetError
        The neuron set does not fit the model, or a requested group is unknown or empty.
    DataError
        Malformed evaluation data, or ``out`` holds a result of a different run.
    StoreError
        ``mode="mean"`` with a store that does not fit.
    """
    from .models import load_model, site_width

    note = on_note or note_to_stderr
    mode_name, factor = _check_arguments(metric, scorer, controls, seed, batch_size, limit, mode, store)
    ns = NeuronSet.load(neurons).require_model()
    sets = ns.select(groups)
    items = load_eval_items(data, split, metric, limit)
    lm = model if isinstance(model, LoadedModel) else load_model(
        str(model), device=device, trust_remote_code=trust_remote_code, progress=note)
    notes = ns.check_model(lm.identity)
    if groups is None and ns.empty_groups():
        notes.append(f"skipped the empty group(s) {', '.join(ns.empty_groups())} of the neuron set")
    for n in notes:
        note(f"note: {n}")
    layers_needed = sorted({lay for _, sel in sets for lay in sel})
    means = _means_from_store(store, lm.identity, ns.site, layers_needed) if mode_name == "mean" else None  # type: ignore[arg-type]
    plan: list[tuple[str, str, int | None, LayerNeurons]] = []
    for name, sel in sets:
        plan.append((name, "target", None, sel))
        plan += [(name, "control", seed + i, control_set(sel, site_width(lm.model, ns.site), seed + i, name))
                 for i in range(controls)]
    run = _Run(lm, ns, items, plan, metric, scorer, mode_name, factor, means, batch_size)
    fingerprint = {
        "model": {k: v for k, v in lm.identity.to_json().items() if k != "source"},
        "neurons_sha256": ns.sha256, "data_sha256": file_sha256(data), "split": split, "limit": limit,
        "metric": metric, "scorer": scorer if metric == "vc" else None, "mode": mode, "site": ns.site,
        "store": str(Path(store).resolve()) if store is not None else None,
    }
    args = {"split": split, "mode": mode, "scorer": scorer, "controls": controls, "seed": seed,
            "store": str(store) if store is not None else None, "batch_size": batch_size, "device": device,
            "limit": limit}
    out_path = Path(out) if out is not None else None
    prev = _load_previous(out_path, fingerprint, overwrite) if out_path is not None else None
    result = _header(run, model, neurons, data, fingerprint, notes, args)
    _measure_all(run, result, prev, out_path, progress)
    return json_safe(result)  # type: ignore[no-any-return]


def _measure_all(run: _Run, result: dict[str, Any], prev: dict[str, Any] | None, out: Path | None,
                 progress: Progress | None) -> None:
    """The baseline, then every set of the plan not finished in ``prev``, saving after each."""
    items, values, langs = run.items, result["data"]["values"], result["data"]["langs"]
    done = {ar.set_key(a["group"], a["kind"], a.get("seed")): a for a in (prev or {}).get("ablations", [])}

    def save() -> None:
        ar.summaries(result, run.metric, values, langs)
        if out is not None:
            write_json_atomic(out, json_safe(result))

    todo = sum(1 for p in run.plan if ar.set_key(p[0], p[1], p[2]) not in done)
    with task(progress, "ablate", len(items.ids) * (1 + todo), unit="items") as bar:
        if prev and prev.get("baseline") and len(prev["baseline"].get("items", [])) == len(items.ids):
            result["baseline"] = prev["baseline"]
            bar.advance(len(items.ids))
        else:
            bar.describe("baseline")
            t0 = time.perf_counter()
            res = run.evaluate(bar)
            result["baseline"] = ar.baseline_vc(items, *res) if run.metric == "vc" else ar.baseline_nll(items, *res)
            result["baseline"]["seconds"] = time.perf_counter() - t0
        save()
        for name, kind, sd, sel in run.plan:
            old = done.get(ar.set_key(name, kind, sd))
            if old is not None and old.get("neurons") == ar.neuron_list(sel):
                result["ablations"].append(old)
                continue
            bar.describe(f"{name} ({kind}{'' if sd is None else f' seed {sd}'})")
            result["ablations"].append(run.measure(name, kind, sd, sel, result["baseline"], bar))
            save()
        result["complete"] = True
        save()
