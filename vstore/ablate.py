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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import ablation_result as ar
from ._version import __version__
from .ablation_result import RESULT_FORMAT, EvalItems
from .ablation_run import ITEMS_ON, SetRunner, SetSpec, chunks, run_order
from .atomic import write_json_atomic
from .data import file_sha256, load_examples, load_stories
from .errors import DataError, OutputError, StoreError, UsageError
from .evaluate import PROMPTS, SCORERS, require_chat_template
from .inference import json_safe
from .models import LoadedModel, ModelIdentity
from .neuronset import NeuronSet
from .progress import Note, Progress, note_to_stderr, task
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


def _check_arguments(metric: str, scorer: str, controls: int, seed: int, batch_size: int, limit: int | None,
                     mode: str, store: str | Path | None, prompt: str = "raw", controls_on: str = "own",
                     targets_on: str = "all", side_effect: str | None = None) -> tuple[str, float]:
    for name, val, allowed in (("prompt", prompt, PROMPTS), ("controls_on", controls_on, ITEMS_ON),
                               ("targets_on", targets_on, ITEMS_ON), ("side_effect", side_effect, (None, "nll"))):
        if val not in allowed:
            raise UsageError(f"{name} must be one of {list(allowed)}, got {val!r}", name)
    if prompt == "chat" and scorer != "choice":
        raise UsageError("prompt chat applies to the choice scorer only (ll scores plain text)", "prompt", "scorer")
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


def _header(run: SetRunner, ns: NeuronSet, plan: list[SetSpec], model: Any, neurons: Any, data: Any,
            fingerprint: dict[str, Any], notes: list[str], args: dict[str, Any]) -> dict[str, Any]:
    items = run.items
    return {
        "format": dict(RESULT_FORMAT),
        "metric": run.metric,
        "run": {"model": str(model) if not isinstance(model, LoadedModel) else str(run.lm.path), "neurons": str(neurons),
                "data": str(data), "groups": [p.group for p in plan if p.kind == "target"], **args},
        "fingerprint": fingerprint,
        "model": run.lm.identity.to_json(),
        "neurons": {"path": str(neurons), "sha256": ns.sha256, "method": ns.method, "site": ns.site,
                    "model": ns.model},
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
    prompt: str = "raw",
    controls_on: str = "own",
    targets_on: str = "all",
    side_effect: str | None = None,
    general_text: str | Mapping[str, str | Path] | None = None,
    prefix_mb: float = 1024.0,
    threads: int | None = None,
    sets_per_forward: int = 1,
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
    prompt
        ``raw`` (default) or ``chat``: the ``choice`` question in the tokenizer's chat template.
    controls_on
        ``own`` (default): a group's random controls are measured on the group's own items (the
        items of the values it is named after), which is all their comparison with the target
        needs; ``all``: on every item (the controls' full cross-value matrix).
    targets_on
        ``all`` (default; the cross-value matrix needs every value's items) or ``own``.
    side_effect
        ``nll``: also the per-token NLL on general texts under each set (``general_text``).
    general_text
        ``"default"`` (the packaged texts of :func:`vstore.generaltext.general_texts`) or
        language -> ``.txt`` file (one text per line); needed with ``side_effect="nll"``.
    prefix_mb
        Memory for the hidden states below the lowest edited layer shared between sets (0: none).
    threads
        Torch threads (None: :func:`vstore.lm.choose_threads`, the cores this process may use
        less those other processes keep busy).
    sets_per_forward
        Measure up to this many sets (on the same items) in one batched forward, ``batch_size``
        items each (pays on a GPU; results equal one set at a time up to float rounding).

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
    from .lm import set_threads
    from .models import load_model, site_width

    note = on_note or note_to_stderr
    mode_name, factor = _check_arguments(metric, scorer, controls, seed, batch_size, limit, mode, store, prompt,
                                         controls_on, targets_on, side_effect)
    if sets_per_forward < 1:
        raise UsageError(f"sets_per_forward must be >= 1, got {sets_per_forward}", "sets_per_forward")
    set_threads(threads)
    ns = NeuronSet.load(neurons).require_model()
    sets = ns.select(groups)
    items = load_eval_items(data, split, metric, limit)
    general, general_meta = _general(side_effect, general_text)
    lm = model if isinstance(model, LoadedModel) else load_model(
        str(model), device=device, trust_remote_code=trust_remote_code, progress=note)
    if prompt == "chat":
        require_chat_template(lm.tokenizer)
    notes = ns.check_model(lm.identity)
    if groups is None and ns.empty_groups():
        notes.append(f"skipped the empty group(s) {', '.join(ns.empty_groups())} of the neuron set")
    for n in notes:
        note(f"note: {n}")
    layers_needed = sorted({lay for _, sel in sets for lay in sel})
    means = _means_from_store(store, lm.identity, ns.site, layers_needed) if mode_name == "mean" else None  # type: ignore[arg-type]
    plan: list[SetSpec] = []
    for name, sel in sets:
        plan.append(SetSpec(name, "target", None, sel, targets_on))
        plan += [SetSpec(name, "control", seed + i, control_set(sel, site_width(lm.model, ns.site), seed + i, name),
                         controls_on)
                 for i in range(controls)]
    run = SetRunner(lm, ns.site, items, metric, scorer, prompt, mode_name, factor, means, batch_size, general, prefix_mb,
                    sets_per_forward)
    fingerprint = {
        "model": {k: v for k, v in lm.identity.to_json().items() if k != "source"},
        "neurons_sha256": ns.sha256, "data_sha256": file_sha256(data), "split": split, "limit": limit,
        "metric": metric, "scorer": scorer if metric == "vc" else None, "mode": mode, "site": ns.site,
        "store": str(Path(store).resolve()) if store is not None else None,
    }
    # added later: present only when not the default, so results of earlier versions still resume
    if prompt != "raw":
        fingerprint["prompt"] = prompt
    if general_meta is not None:
        fingerprint["general_text_sha256"] = general_meta["sha256"]
    args = {"split": split, "mode": mode, "scorer": scorer, "controls": controls, "seed": seed,
            "store": str(store) if store is not None else None, "batch_size": batch_size, "device": device,
            "limit": limit, "prompt": prompt, "controls_on": controls_on, "targets_on": targets_on,
            "side_effect": side_effect, "sets_per_forward": sets_per_forward}
    out_path = Path(out) if out is not None else None
    prev = _load_previous(out_path, fingerprint, overwrite) if out_path is not None else None
    result = _header(run, ns, plan, model, neurons, data, fingerprint, notes, args)
    if general_meta is not None:
        result["general_text"] = general_meta
    _measure_all(run, plan, result, prev, out_path, progress)
    return json_safe(result)  # type: ignore[no-any-return]


def _general(side_effect: str | None, general_text: str | Mapping[str, str | Path] | None
             ) -> tuple[EvalItems | None, dict[str, Any] | None]:
    """The general texts of the NLL side effect, and what the result says about them."""
    from .generaltext import general_items

    if side_effect is None:
        if general_text is not None:
            raise UsageError("general_text is used only with side_effect 'nll'", "general_text", "side_effect")
        return None, None
    if general_text is None:
        raise UsageError("side_effect 'nll' needs general_text ('default', or language -> text file)", "general_text")
    return general_items(general_text)


def _reusable(old: dict[str, Any] | None, spec: SetSpec, n_items: int, side: bool) -> bool:
    if old is None or old.get("neurons") != ar.neuron_list(spec.neurons) or (side and not old.get("side_effect")):
        return False
    # results written before items_on measured every set on all items
    return bool(old.get("items_on", "all") == spec.on and (spec.on == "own" or len(old.get("items", [])) == n_items))


def _measure_all(run: SetRunner, plan: list[SetSpec], result: dict[str, Any], prev: dict[str, Any] | None,
                 out: Path | None, progress: Progress | None) -> None:
    """The baseline, then every set of the plan not finished in ``prev`` (lowest edited layer first,
    so the unablated prefix is shared), saving after each; ``ablations`` stays in plan order."""
    from .ablation_run import own_items

    items, values, langs = run.items, result["data"]["values"], result["data"]["langs"]
    done = {ar.set_key(a["group"], a["kind"], a.get("seed")): a for a in (prev or {}).get("ablations", [])}
    finished: dict[int, dict[str, Any]] = {}

    def save() -> None:
        result["ablations"] = [finished[i] for i in sorted(finished)]
        ar.summaries(result, run.metric, values, langs)
        if out is not None:
            write_json_atomic(out, json_safe(result))

    todo = [i for i, sp in enumerate(plan) if not _reusable(done.get(sp.key), sp, len(items.ids), run.general is not None)]
    n_eval = sum(len(items.ids) if plan[i].on == "all" else len(own_items(items, plan[i].group)) for i in todo)
    low = min((plan[i].lowest_layer for i in todo if plan[i].lowest_layer > 0), default=None)
    with task(progress, "ablate", len(items.ids) + n_eval, unit="items") as bar:
        pb = (prev or {}).get("baseline")
        if pb and len(pb.get("items", [])) == len(items.ids) and (run.general is None or pb.get("side_effect")):
            result["baseline"] = ar.refresh_baseline(pb, items, run.metric)
            bar.advance(len(items.ids))
            n_base = 0
        else:
            bar.describe("baseline")
            result["baseline"] = run.baseline(bar, low)
            n_base = len(items.ids)
        for i, sp in enumerate(plan):
            if i not in todo:
                finished[i] = done[sp.key]
        save()
        specs = [plan[j] for j in todo]
        for chunk in chunks(specs, run_order(specs), run.sets_per_forward):
            sp = specs[chunk[0]]
            bar.describe(f"{sp.group} ({sp.kind}{'' if sp.seed is None else f' seed {sp.seed}'})"
                         + (f" +{len(chunk) - 1}" if len(chunk) > 1 else ""))
            for i, entry in zip(chunk, run.measure_many([specs[i] for i in chunk], result["baseline"], bar), strict=True):
                finished[todo[i]] = entry
            save()
        result["cost"] = {"item_passes": n_base + n_eval, "prefix_replays": run.replayed}
        result["complete"] = True
        save()
