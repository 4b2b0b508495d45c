"""Ablation: value consistency (or per-token NLL) with chosen neurons switched off.

:func:`run_ablation` measures the unablated model once, then every ablated neuron set: each
requested group of a neuron-set file (``a+b`` is the union of two groups), and per group ``controls``
random sets with the same number of neurons in each layer. Each ablation is applied through
:class:`vstore.hooks.Edit` at the capture site the neuron set was ranked on (``act``: the output of
the MLP activation function, so ``zero`` equals zeroing the neurons' down-projection columns).

Per ablated set the result holds value consistency per evaluated value and language, the absolute
and relative change against the baseline, a paired bootstrap 95% interval of the change and an exact
McNemar test of it; the cross-value matrix (ablate the neurons of value i, measure value j) comes
out of the same run. The result JSON (documented in ``docs/ablate-result.md``) is written atomically
after the baseline and after each finished set; a run resumed with the same ``out`` and arguments
skips the sets already there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .atomic import write_json_atomic
from .data import Story, file_sha256, load_examples, load_stories
from .errors import DataError, NeuronSetError, StoreError, VstoreError
from .evaluate import SCORERS, score_items, text_nll, value_consistency
from .models import SITES, LoadedModel, ModelIdentity
from .neuronset import load_neuron_set

__all__ = [
    "METRICS",
    "MODES",
    "RESULT_FORMAT",
    "NeuronSet",
    "bootstrap_interval",
    "check_neuron_set",
    "control_set",
    "mcnemar_exact",
    "parse_groups",
    "parse_mode",
    "read_neuron_set",
    "run_ablation",
]

METRICS = ("vc", "nll")
MODES = ("zero", "mean", "scale:F")
RESULT_FORMAT = {"name": "vstore-ablation", "version": 1}
NEURON_FORMAT = "vstore-neurons"
N_BOOT = 2000
ALL = "*"  # the value/lang of an aggregated breakdown row

LayerNeurons = dict[int, np.ndarray]  # model layer index -> sorted int64 neuron indices


# ----------------------------------------------------------------------------------------------
# neuron sets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeuronSet:
    """A validated neuron-set file (format ``vstore-neurons`` version 1)."""

    path: Path
    sha256: str
    model: dict[str, Any]
    store: dict[str, Any]
    method: str
    groups: dict[str, LayerNeurons]

    @property
    def site(self) -> str:
        """The capture site the set was ranked on (``act`` unless its store says otherwise)."""
        site = str(self.store.get("site") or "act")
        return site if site in SITES else "act"


def _int_field(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_neuron_set(path: str | Path) -> NeuronSet:
    """Read and validate a neuron-set JSON written by ``vstore rank``.

    Parameters
    ----------
    path
        The JSON file: ``{"format": {"name": "vstore-neurons", "version": 1}, "model": {...},
        "store": {...}, "method": ..., "params": {...}, "groups": {name: [{"layer", "neuron",
        "score"}, ...]}}``.

    Raises
    ------
    NeuronSetError
        Naming the file and the field that is missing or malformed. Empty groups are allowed here
        and refused when they are asked for (:func:`parse_groups`).
    """
    p = Path(path)
    d = load_neuron_set(p)  # format, types and field names
    raw = p.read_bytes()
    model = d["model"]
    for key in ("architecture", "n_layers", "n_neurons"):
        if key not in model:
            raise NeuronSetError(f"{p}: missing field 'model.{key}'")
    groups_raw = d["groups"]
    if not groups_raw:
        raise NeuronSetError(f"{p}: field 'groups' must be a non-empty object of group name -> neuron list")
    n_layers, n_neurons = int(model["n_layers"]), int(model["n_neurons"])
    groups: dict[str, LayerNeurons] = {}
    for name, entries in groups_raw.items():
        per: dict[int, set[int]] = {}
        for k, ent in enumerate(entries):
            where = f"{p}: field 'groups.{name}[{k}]'"
            layer, neuron = int(ent["layer"]), int(ent["neuron"])
            if not 0 <= layer < n_layers:
                raise NeuronSetError(f"{where}: layer {layer} out of range (model.n_layers = {n_layers})")
            if not 0 <= neuron < n_neurons:
                raise NeuronSetError(f"{where}: neuron {neuron} out of range (model.n_neurons = {n_neurons})")
            per.setdefault(layer, set()).add(neuron)
        groups[str(name)] = {lay: np.asarray(sorted(ns), dtype=np.int64) for lay, ns in sorted(per.items())}
    store = d.get("store") if isinstance(d.get("store"), dict) else {}
    return NeuronSet(p, hashlib.sha256(raw).hexdigest(), dict(model), dict(store or {}), str(d.get("method", "")), groups)


def check_neuron_set(ns: NeuronSet, identity: ModelIdentity) -> list[str]:
    """Check a neuron set against a model by architecture, layer count and neuron count.

    A copied or edited model directory is fine: a different weights hash only yields a note.

    Returns
    -------
    list of str
        Notes for the user (empty when everything matches).

    Raises
    ------
    NeuronSetError
        On a mismatch, naming the file, the field, what the set says and what the model has.
    """
    for key, have in (("architecture", identity.architecture), ("n_layers", identity.n_layers),
                      ("n_neurons", identity.n_neurons)):
        want = ns.model.get(key)
        if want != have:
            raise NeuronSetError(
                f"{ns.path}: field 'model.{key}' is {want!r} but the model {identity.name!r} has {have!r}: "
                f"this neuron set was ranked for another model ({ns.model.get('name', '?')})"
            )
    notes = []
    sha = ns.model.get("sha256")
    if sha and identity.sha256 and sha != identity.sha256:
        notes.append(
            f"the neuron set was ranked on model weights {str(sha)[:12]} and this model's are {identity.sha256[:12]} "
            "(same architecture and shape: accepted)"
        )
    return notes


def parse_groups(spec: str | Sequence[str] | None, ns: NeuronSet) -> list[tuple[str, LayerNeurons]]:
    """The neuron sets to ablate: ``None`` = each non-empty group in turn; ``"a,b"``; ``"a+b"`` = a union.

    Raises
    ------
    NeuronSetError
        An unknown group name, a requested group (or union) without neurons, or only empty groups.
    """
    if spec is None:
        names = [g for g, sel in ns.groups.items() if any(len(v) for v in sel.values())]
        if not names:
            raise NeuronSetError(f"{ns.path}: field 'groups': every group is empty, no neurons to ablate")
    elif isinstance(spec, str):
        names = [x.strip() for x in spec.split(",") if x.strip()]
    else:
        names = [str(x).strip() for x in spec if str(x).strip()]
    if not names:
        raise NeuronSetError(f"{ns.path}: no group to ablate (--groups is empty)")
    out: list[tuple[str, LayerNeurons]] = []
    for name in dict.fromkeys(names):
        parts = [x.strip() for x in name.split("+")]
        per: dict[int, set[int]] = {}
        for part in parts:
            if part not in ns.groups:
                raise NeuronSetError(
                    f"{ns.path}: field 'groups' has no group {part!r}; it has: {', '.join(sorted(ns.groups))}"
                )
            for layer, idx in ns.groups[part].items():
                per.setdefault(layer, set()).update(int(i) for i in idx)
        if not any(per.values()):
            raise NeuronSetError(f"{ns.path}: field 'groups.{name}' is empty: no neurons to ablate")
        out.append((name, {lay: np.asarray(sorted(v), dtype=np.int64) for lay, v in sorted(per.items()) if v}))
    return out


def control_set(target: LayerNeurons, n_neurons: int, seed: int, group: str) -> LayerNeurons:
    """A random neuron set with the same count per layer as ``target``.

    Neurons are drawn without replacement from those of the layer outside ``target`` (from the whole
    layer when the target fills more than half of it). The draw depends only on ``seed``, the group
    name and the layer, so it is the same on every run and every machine.
    """
    out: LayerNeurons = {}
    for layer, idx in sorted(target.items()):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(group.encode("utf-8")), int(layer)])
        k = len(idx)
        pool = np.setdiff1d(np.arange(n_neurons, dtype=np.int64), idx) if 2 * k <= n_neurons else np.arange(n_neurons)
        out[layer] = np.sort(rng.choice(pool, size=k, replace=False)).astype(np.int64)
    return out


def parse_mode(mode: str) -> tuple[str, float]:
    """``zero`` | ``mean`` | ``scale:F`` -> (mode, factor)."""
    name, _, arg = str(mode).partition(":")
    if name in ("zero", "mean") and not arg:
        return name, 0.0
    if name == "scale":
        try:
            factor = float(arg)
        except ValueError:
            raise VstoreError(f"--mode scale needs a factor, e.g. scale:0.5; got {mode!r}") from None
        if not math.isfinite(factor):
            raise VstoreError(f"--mode scale factor must be finite, got {mode!r}")
        return "scale", factor
    raise VstoreError(f"unknown --mode {mode!r}; use zero, mean or scale:F")


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


def mcnemar_exact(before: np.ndarray, after: np.ndarray) -> tuple[float, int, int]:
    """Exact two-sided McNemar test of paired binary outcomes.

    Returns
    -------
    (p_value, b, c)
        ``b`` items won before and lost after, ``c`` the reverse; ``p = 1`` when ``b + c = 0``.
    """
    from scipy.stats import binomtest

    x, y = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    b, c = int((x & ~y).sum()), int((~x & y).sum())
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return min(p, 1.0), b, c


def sign_test(before: np.ndarray, after: np.ndarray) -> float:
    """Exact two-sided paired sign test (ties dropped); ``1`` when all pairs tie."""
    from scipy.stats import binomtest

    d = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    up, down = int((d > 0).sum()), int((d < 0).sum())
    return 1.0 if up + down == 0 else min(float(binomtest(up, up + down, 0.5).pvalue), 1.0)


def _rng_for(*keys: Any) -> np.random.Generator:
    words = [zlib.crc32(str(k).encode("utf-8")) for k in keys]
    return np.random.default_rng(words)


def bootstrap_interval(
    before: np.ndarray,
    after: np.ndarray,
    rng: np.random.Generator,
    *,
    weights: np.ndarray | None = None,
    n_boot: int = N_BOOT,
) -> tuple[float, float]:
    """Paired percentile bootstrap 95% interval of ``mean(after) - mean(before)``.

    Items are resampled with replacement (the same items for both). With ``weights`` the means are
    weighted (``sum(x) / sum(weights)`` with ``x`` already summed per item), as for NLL per token.
    """
    x = np.asarray(before, dtype=np.float64)
    y = np.asarray(after, dtype=np.float64)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    deltas = np.empty(n_boot, dtype=np.float64)
    step = max(1, (1 << 22) // n)  # resamples per chunk: bounds the (resamples, n) index buffer
    for s in range(0, n_boot, step):
        idx = rng.integers(0, n, size=(min(step, n_boot - s), n))
        ws = w[idx].sum(axis=1)
        ws[ws == 0] = np.nan
        deltas[s : s + len(idx)] = (y[idx].sum(axis=1) - x[idx].sum(axis=1)) / ws
    lo, hi = np.nanpercentile(deltas, [2.5, 97.5])
    return float(lo), float(hi)


def _relative(delta: float, base: float) -> float | None:
    return None if not base or not math.isfinite(base) else delta / base


def _clean(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# ----------------------------------------------------------------------------------------------
# evaluation data
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Items:
    ids: list[str]
    values: list[str]  # "" for texts without a value
    langs: list[str]
    stories: list[Story] | None  # vc
    texts: list[str] | None  # nll


def _load_items(data: str | Path, split: str | None, metric: str, limit: int | None) -> _Items:
    p = Path(data)
    if metric == "vc":
        if p.suffix == ".txt":
            raise DataError(f"{p}: plain text has no actions to choose between; use a story file, or --metric nll")
        stories = load_stories(p)
        if split is not None:
            stories = [s for s in stories if s.split == split]
            if not stories:
                raise DataError(f"{p}: no stories of split {split!r} (field 'split')")
        stories = stories[:limit] if limit else stories
        return _Items([s.id for s in stories], [s.value for s in stories], [s.lang for s in stories], stories, None)
    examples = load_examples(p, split=split, limit=limit)
    lang_default = p.stem if p.suffix == ".txt" else ""
    return _Items(
        [e.id for e in examples],
        [e.labels.get("value", "") for e in examples],
        [e.labels.get("lang", lang_default) or lang_default for e in examples],
        None,
        [e.text for e in examples],
    )


def _means_from_store(store: str | Path, identity: ModelIdentity, site: str, layers: Sequence[int]) -> dict[int, Any]:
    """Per-neuron means of every needed layer from a store's statistics (``--mode mean``)."""
    import torch

    from .store import Store

    try:
        from .stats import compute_stats  # type: ignore[attr-defined]
    except ImportError as e:
        raise StoreError("--mode mean needs vstore.stats (the statistics of `vstore rank`), which is not installed") from e
    st = Store(store)
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


# ----------------------------------------------------------------------------------------------
# result assembly
# ----------------------------------------------------------------------------------------------


def _cells(items: _Items) -> list[tuple[str, str, np.ndarray]]:
    """(value, lang, item indices): per value x lang, per value, per lang, and overall (``*``)."""
    v, lang = np.asarray(items.values, dtype=object), np.asarray(items.langs, dtype=object)
    values = sorted(set(items.values))
    langs = sorted(set(items.langs))
    out = []
    for val in values:
        for lg in langs:
            idx = np.flatnonzero((v == val) & (lang == lg))
            if len(idx):
                out.append((val, lg, idx))
        if len(langs) > 1:
            out.append((val, ALL, np.flatnonzero(v == val)))
    if len(values) > 1:
        for lg in langs:
            out.append((ALL, lg, np.flatnonzero(lang == lg)))
    out.append((ALL, ALL, np.arange(len(items.ids))))
    return out


def _vc_items(items: _Items, won: np.ndarray, aligned: np.ndarray, violating: np.ndarray) -> list[dict[str, Any]]:
    return [
        {"id": items.ids[i], "value": items.values[i], "lang": items.langs[i], "aligned_won": bool(won[i]),
         "score_aligned": float(aligned[i]), "score_violating": float(violating[i])}
        for i in range(len(items.ids))
    ]


def _nll_items(items: _Items, nll: np.ndarray, count: np.ndarray) -> list[dict[str, Any]]:
    return [
        {"id": items.ids[i], "value": items.values[i] or None, "lang": items.langs[i],
         "nll": float(nll[i] / count[i]) if count[i] else None, "nll_sum": float(nll[i]), "n_tokens": int(count[i])}
        for i in range(len(items.ids))
    ]


def _baseline_vc(items: _Items, won: np.ndarray, aligned: np.ndarray, violating: np.ndarray) -> dict[str, Any]:
    rows = [{"value": val, "lang": lg, "n": len(idx), "value_consistency": value_consistency(won[idx])}
            for val, lg, idx in _cells(items)]
    return {"value_consistency": value_consistency(won), "n_items": len(won), "breakdown": rows,
            "items": _vc_items(items, won, aligned, violating)}


def _baseline_nll(items: _Items, nll: np.ndarray, count: np.ndarray) -> dict[str, Any]:
    def mean(idx: np.ndarray) -> float | None:
        c = count[idx].sum()
        return float(nll[idx].sum() / c) if c else None

    rows = [{"value": val, "lang": lg, "n": len(idx), "n_tokens": int(count[idx].sum()), "nll": mean(idx)}
            for val, lg, idx in _cells(items)]
    return {"nll": mean(np.arange(len(nll))), "n_items": len(nll), "n_tokens": int(count.sum()), "breakdown": rows,
            "items": _nll_items(items, nll, count)}


def _compare_vc(items: _Items, base: np.ndarray, won: np.ndarray, key: str) -> dict[str, Any]:
    rows = []
    for val, lg, idx in _cells(items):
        b, a = base[idx], won[idx]
        vb, va = value_consistency(b), value_consistency(a)
        lo, hi = bootstrap_interval(b.astype(float), a.astype(float), _rng_for(key, val, lg))
        p, nb, nc = mcnemar_exact(b, a)
        rows.append({"value": val, "lang": lg, "n": len(idx), "baseline": vb, "value_consistency": va,
                     "delta": va - vb, "relative_change": _relative(va - vb, vb), "ci95": [lo, hi],
                     "p_value": p, "won_to_lost": nb, "lost_to_won": nc})
    return {"breakdown": rows, "overall": rows[-1]}


def _compare_nll(items: _Items, base: np.ndarray, nll: np.ndarray, count: np.ndarray, key: str) -> dict[str, Any]:
    rows = []
    per_b = np.where(count > 0, base / np.maximum(count, 1), 0.0)
    per_a = np.where(count > 0, nll / np.maximum(count, 1), 0.0)
    for val, lg, idx in _cells(items):
        c = count[idx].sum()
        if not c:
            continue
        vb, va = float(base[idx].sum() / c), float(nll[idx].sum() / c)
        lo, hi = bootstrap_interval(base[idx], nll[idx], _rng_for(key, val, lg), weights=count[idx])
        keep = idx[count[idx] > 0]
        rows.append({"value": val, "lang": lg, "n": len(idx), "n_tokens": int(c), "baseline": vb, "nll": va,
                     "delta": va - vb, "relative_change": _relative(va - vb, vb), "ci95": [lo, hi],
                     "p_value": sign_test(per_b[keep], per_a[keep])})
    return {"breakdown": rows, "overall": rows[-1]}


def _set_key(group: str, kind: str, seed: int | None) -> str:
    return f"{kind}|{group}|{seed}"


def _neuron_list(sel: LayerNeurons) -> list[list[int]]:
    return [[int(lay), int(n)] for lay, idx in sorted(sel.items()) for n in idx]


def _summaries(result: dict[str, Any], metric: str, values: list[str], langs: list[str]) -> None:
    """Recompute the cross-value matrix and the target-vs-control summaries from the finished sets."""
    field = "value_consistency" if metric == "vc" else "nll"
    targets = [a for a in result["ablations"] if a["kind"] == "target"]
    for t in targets:
        ctl = [a["delta"] for a in result["ablations"] if a["kind"] == "control" and a["group"] == t["group"]]
        if ctl:
            arr = np.asarray(ctl, dtype=np.float64)
            # one-sided: how often a random set changes the measure at least as much (VC down, NLL up)
            extreme = (arr <= t["delta"]) if metric == "vc" else (arr >= t["delta"])
            t["vs_controls"] = {
                "n": len(ctl), f"mean_{field}": float(np.mean([a[field] for a in result["ablations"]
                                                               if a["kind"] == "control" and a["group"] == t["group"]])),
                "mean_delta": float(arr.mean()), "sd_delta": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
                "p_empirical": float((1 + extreme.sum()) / (1 + len(arr))),
            }
        else:
            t.pop("vs_controls", None)

    def cell(a: dict[str, Any], val: str, lg: str) -> float | None:
        for r in a["breakdown"]:
            if r["value"] == val and r["lang"] == lg:
                return _clean(r["delta"])
        return None

    if metric == "vc":
        result["cross_value"] = {
            "groups": [t["group"] for t in targets], "values": values, "langs": langs,
            "matrix": [[cell(t, v, ALL) if len(langs) > 1 else cell(t, v, langs[0]) for v in values] for t in targets],
            "by_lang": {lg: [[cell(t, v, lg) for v in values] for t in targets] for lg in langs},
        }
    else:
        result["cross_lang"] = {
            "groups": [t["group"] for t in targets], "langs": langs,
            "matrix": [[cell(t, ALL, lg) if len(values) > 1 else cell(t, values[0], lg) for lg in langs]
                       for t in targets],
        }


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _load_previous(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    if overwrite or not out.exists():
        return None
    try:
        prev = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{out}: exists but is not a readable result JSON ({e}); use another --out or --overwrite") from e
    if not isinstance(prev, dict) or prev.get("format", {}).get("name") != RESULT_FORMAT["name"]:
        raise DataError(f"{out}: exists and is not a vstore ablation result; use another --out or --overwrite")
    old = prev.get("fingerprint", {})
    for key in sorted(set(old) | set(fingerprint)):
        if old.get(key) != fingerprint.get(key):
            raise DataError(
                f"{out}: was written by a different run (field 'fingerprint.{key}' is {old.get(key)!r}, "
                f"this run has {fingerprint.get(key)!r}); use another --out, or --overwrite to start again"
            )
    return prev


# ----------------------------------------------------------------------------------------------
# the entry point
# ----------------------------------------------------------------------------------------------


def _say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(msg, highlight=False)


class _Bar:
    def __init__(self, total: int, enabled: bool) -> None:
        self.p: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("[bold]ablate[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=Console(stderr=True),
                          disable=os.environ.get("VSTORE_NO_PROGRESS") == "1")
        self.task = self.p.add_task("", total=total)
        self.p.start()

    def describe(self, what: str) -> None:
        if self.p is not None:
            self.p.update(self.task, description=what)

    def advance(self, n: int) -> None:
        if self.p is not None:
            self.p.update(self.task, advance=n)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()


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
    progress: bool = True,
    on_note: Callable[[str], None] | None = None,
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
        The activation store whose statistics give the means of ``mode="mean"``.
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
        Show a progress bar on stderr.
    on_note
        Receives notes for the user (e.g. a neuron set ranked on other weights of the same shape);
        default prints them on stderr when ``progress`` is set.

    Returns
    -------
    dict
        The result (see ``docs/ablate-result.md``), also written to ``out``.

    Raises
    ------
    NeuronSetError
        The neuron set does not fit the model, or a requested group is unknown or empty.
    DataError
        Malformed evaluation data, or ``out`` holds a result of a different run.
    StoreError
        ``mode="mean"`` without a usable store.
    """
    from .hooks import Edit
    from .models import load_model

    note = on_note or (_say if progress else (lambda _m: None))
    if metric not in METRICS:
        raise VstoreError(f"unknown --metric {metric!r}; use one of {list(METRICS)}")
    if metric == "vc" and scorer not in SCORERS:
        raise VstoreError(f"unknown --scorer {scorer!r}; use one of {list(SCORERS)}")
    if controls < 0:
        raise VstoreError(f"--controls must be >= 0, got {controls}")
    if batch_size < 1:
        raise VstoreError(f"--batch-size must be >= 1, got {batch_size}")
    mode_name, factor = parse_mode(mode)
    if mode_name == "mean" and store is None:
        raise StoreError("--mode mean needs --store STORE (the neurons' means come from its statistics)")

    ns = read_neuron_set(neurons)
    sets = parse_groups(groups, ns)
    items = _load_items(data, split, metric, limit)
    lm = model if isinstance(model, LoadedModel) else load_model(
        str(model), device=device, trust_remote_code=trust_remote_code, progress=note)
    notes = check_neuron_set(ns, lm.identity)
    empty = [g for g, sel in ns.groups.items() if not any(len(v) for v in sel.values())]
    if groups is None and empty:
        notes.append(f"skipped the empty group(s) {', '.join(empty)} of the neuron set")
    for n in notes:
        note(f"note: {n}")
    site = ns.site
    layers_needed = sorted({lay for _, sel in sets for lay in sel})
    means = _means_from_store(store, lm.identity, site, layers_needed) if mode_name == "mean" else None  # type: ignore[arg-type]

    fingerprint = {
        "model": {k: v for k, v in lm.identity.to_json().items() if k != "source"},
        "neurons_sha256": ns.sha256, "data_sha256": file_sha256(data), "split": split, "limit": limit,
        "metric": metric, "scorer": scorer if metric == "vc" else None, "mode": mode, "site": site,
        "store": str(Path(store).resolve()) if store is not None else None,
    }
    out_path = Path(out) if out is not None else None
    prev = _load_previous(out_path, fingerprint, overwrite) if out_path is not None else None
    done: dict[str, dict[str, Any]] = {}
    if prev:
        done = {_set_key(a["group"], a["kind"], a.get("seed")): a for a in prev.get("ablations", [])}

    values = sorted(set(items.values))
    langs = sorted(set(items.langs))
    plan: list[tuple[str, str, int | None, LayerNeurons]] = []
    for name, sel in sets:
        plan.append((name, "target", None, sel))
        for i in range(controls):
            plan.append((name, "control", seed + i, control_set(sel, lm.identity.n_neurons, seed + i, name)))

    result: dict[str, Any] = {
        "format": dict(RESULT_FORMAT),
        "metric": metric,
        "run": {
            "model": str(model) if not isinstance(model, LoadedModel) else str(lm.path), "neurons": str(neurons),
            "data": str(data), "split": split, "groups": [n for n, _ in sets], "mode": mode, "scorer": scorer,
            "controls": controls, "seed": seed, "store": str(store) if store is not None else None,
            "batch_size": batch_size, "device": device, "limit": limit,
        },
        "fingerprint": fingerprint,
        "model": lm.identity.to_json(),
        "neurons": {"path": str(neurons), "sha256": ns.sha256, "method": ns.method, "site": site, "model": ns.model},
        "data": {"path": str(data), "sha256": fingerprint["data_sha256"], "n_items": len(items.ids),
                 "values": values, "langs": langs},
        "notes": notes,
        "versions": {"vstore": __version__},
        "complete": False,
        "baseline": None,
        "ablations": [],
    }

    def save() -> None:
        _summaries(result, metric, values, langs)
        if out_path is not None:
            write_json_atomic(out_path, _json_safe(result))

    bar = _Bar(len(items.ids) * (1 + sum(1 for p in plan if _set_key(p[0], p[1], p[2]) not in done)), progress)
    model_ = lm.model

    def evaluate() -> tuple[np.ndarray, ...]:
        if metric == "vc":
            sc = score_items(model_, lm.tokenizer, items.stories or [], scorer, batch_size=batch_size,
                             progress=bar.advance)
            return sc.aligned_won, sc.aligned, sc.violating
        return text_nll(model_, lm.tokenizer, items.texts or [], batch_size=batch_size, progress=bar.advance)

    try:
        if prev and prev.get("baseline") and len(prev["baseline"].get("items", [])) == len(items.ids):
            result["baseline"] = prev["baseline"]
            bar.advance(len(items.ids))
        else:
            bar.describe("baseline")
            t0 = time.perf_counter()
            res = evaluate()
            result["baseline"] = _baseline_vc(items, *res) if metric == "vc" else _baseline_nll(items, *res)
            result["baseline"]["seconds"] = time.perf_counter() - t0
        base = result["baseline"]
        if metric == "vc":
            base_won = np.asarray([it["aligned_won"] for it in base["items"]], dtype=bool)
        else:
            base_nll = np.asarray([it["nll_sum"] for it in base["items"]], dtype=np.float64)
            count = np.asarray([it["n_tokens"] for it in base["items"]], dtype=np.int64)
        save()
        for name, kind, sd, sel in plan:
            key = _set_key(name, kind, sd)
            neuron_list = _neuron_list(sel)
            old = done.get(key)
            if old is not None and old.get("neurons") == neuron_list:
                result["ablations"].append(old)
                continue
            bar.describe(f"{name} ({kind}{'' if sd is None else f' seed {sd}'})")
            t0 = time.perf_counter()
            tensors = {lay: idx for lay, idx in sel.items()}
            with Edit(model_, tensors, mode=mode_name, means=means, factor=factor, site=site):  # type: ignore[arg-type]
                res = evaluate()
            entry: dict[str, Any] = {"group": name, "kind": kind, "seed": sd, "n_neurons": len(neuron_list),
                                     "layers": {str(lay): len(idx) for lay, idx in sel.items()}}
            if metric == "vc":
                won, aligned, violating = res
                cmp = _compare_vc(items, base_won, won, key)
                o = cmp["overall"]
                entry.update({"value_consistency": o["value_consistency"], "delta": o["delta"],
                              "relative_change": o["relative_change"], "ci95": o["ci95"], "p_value": o["p_value"],
                              "breakdown": cmp["breakdown"], "items": _vc_items(items, won, aligned, violating)})
            else:
                nll, _count = res
                cmp = _compare_nll(items, base_nll, nll, count, key)
                o = cmp["overall"]
                entry.update({"nll": o["nll"], "delta": o["delta"], "relative_change": o["relative_change"],
                              "ci95": o["ci95"], "p_value": o["p_value"], "breakdown": cmp["breakdown"],
                              "items": _nll_items(items, nll, count)})
            entry["seconds"] = time.perf_counter() - t0
            entry["neurons"] = neuron_list
            result["ablations"].append(entry)
            save()
        result["complete"] = True
        save()
    finally:
        bar.close()
    return _json_safe(result)  # type: ignore[no-any-return]
