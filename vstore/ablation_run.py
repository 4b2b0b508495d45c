"""Measuring neuron sets: each ablated set evaluated on its items, the unablated prefix shared.

:class:`SetRunner` evaluates the unablated model and each ablated neuron set (through
:class:`vstore.hooks.Edit`) on the evaluation items — all of them, or a subset such as a random
control's own group items — and, when general texts are given, the per-token NLL on them (the side
effect). Sets are best measured in ascending order of their lowest edited layer: the runner keeps
the hidden states entering that layer (:class:`vstore.lm.Prefix`), recorded in a pass on all items
that runs anyway, and every later set whose edits start at or above it skips the layers below.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import ablation_result as ar
from .ablation_result import EvalItems, LayerNeurons
from .evaluate import score_items, text_nll
from .lm import Prefix
from .models import LoadedModel, decoder_layers
from .progress import Task

__all__ = ["ITEMS_ON", "SetRunner", "SetSpec", "chunks", "own_items", "run_order", "subset"]

#: Which evaluation items a set is measured on: ``all``, or ``own`` (the items of the values the
#: group is named after; all items when the name matches no value).
ITEMS_ON = ("own", "all")


@dataclass(frozen=True)
class SetSpec:
    """One neuron set to measure: its group, kind (``target`` | ``control``), control seed and items."""

    group: str
    kind: str
    seed: int | None
    neurons: LayerNeurons
    on: str = "all"

    @property
    def key(self) -> str:
        return ar.set_key(self.group, self.kind, self.seed)

    @property
    def lowest_layer(self) -> int:
        used = [lay for lay, idx in self.neurons.items() if len(idx)]
        return min(used) if used else 0


def own_items(items: EvalItems, group: str) -> np.ndarray:
    """Indices of the items whose value is one the group is named after (``a+b``: both); all when none is."""
    names = set(group.split("+"))
    idx = np.flatnonzero(np.isin(np.asarray(items.values, dtype=object), list(names)))
    return idx if len(idx) else np.arange(len(items.ids))


def subset(items: EvalItems, idx: np.ndarray) -> EvalItems:
    """The items at ``idx`` (in that order)."""
    pick = [int(i) for i in idx]
    return EvalItems([items.ids[i] for i in pick], [items.values[i] for i in pick], [items.langs[i] for i in pick],
                     [items.stories[i] for i in pick] if items.stories is not None else None,
                     [items.texts[i] for i in pick] if items.texts is not None else None)


@dataclass
class SetRunner:
    """Evaluates the unablated model and ablated neuron sets; shares the unablated prefix between sets.

    Parameters
    ----------
    lm
        The loaded model.
    site
        The capture site the neurons are edited at.
    items
        The evaluation items (stories for ``metric="vc"``, texts for ``"nll"``).
    metric, scorer, prompt
        ``vc`` with scorer ``ll`` | ``choice`` (``prompt`` ``raw`` | ``chat`` for ``choice``), or ``nll``.
    mode, factor, means
        The ablation (see :class:`vstore.hooks.Edit`).
    batch_size
        Items per forward.
    general
        General texts (an ``EvalItems`` of texts, language per text) for the NLL side effect, or None.
    prefix_mb
        Memory for the shared prefix (0: no sharing; every set runs the whole model).
    sets_per_forward
        Sets measured together in one batched forward (:meth:`measure_many`; pays on a GPU).
    """

    lm: LoadedModel
    site: str
    items: EvalItems
    metric: str = "vc"
    scorer: str = "ll"
    prompt: str = "raw"
    mode: str = "zero"
    factor: float = 0.0
    means: dict[int, Any] | None = None
    batch_size: int = 8
    general: EvalItems | None = None
    prefix_mb: float = 1024.0
    sets_per_forward: int = 1
    _level: int = 0
    _store: dict[Any, Any] = field(default_factory=dict)
    replayed: int = 0  # forwards that skipped the layers below the shared prefix (for tests and benchmarks)

    # -- the forward passes ----------------------------------------------------------------------

    def _prefix(self, lowest: int, record_ok: bool) -> Prefix | None:
        if self.prefix_mb <= 0 or lowest < 1:
            return None
        layers = decoder_layers(self.lm.model)
        replay = (self._level, self._store) if 1 <= self._level <= lowest else None
        record = lowest if record_ok and lowest > self._level else None
        if replay is None and record is None:
            return None
        return Prefix(layers, replay=replay, record=record, max_bytes=int(self.prefix_mb * (1 << 20)))

    def _adopt(self, p: Prefix | None) -> None:
        if p is not None:
            self.replayed += p.replayed
            if p.level is not None and not p.full and p.recorded:
                self._level, self._store = p.level, p.recorded

    def _evaluate(self, items: EvalItems, prefix: Prefix | None, bar: Task, k: int) -> tuple[np.ndarray, ...]:
        m, tok = self.lm.model, self.lm.tokenizer
        advance = bar.advance if k == 1 else (lambda n: bar.advance(n * k))
        if self.metric == "vc":
            sc = score_items(m, tok, items.stories or [], self.scorer, batch_size=self.batch_size,
                             progress=advance, prompt=self.prompt, prefix=prefix, replicas=k)
            return sc.aligned_won, sc.aligned, sc.violating
        return text_nll(m, tok, items.texts or [], batch_size=self.batch_size, progress=advance, prefix=prefix,
                        replicas=k)

    def _side(self, prefix: Prefix | None, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        if self.general is None:
            return None
        return text_nll(self.lm.model, self.lm.tokenizer, self.general.texts or [], batch_size=self.batch_size,
                        prefix=prefix, replicas=k)

    def run(self, neurons: LayerNeurons | Sequence[LayerNeurons] | None, idx: np.ndarray | None, bar: Task, *,
            lowest: int | None = None) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, np.ndarray] | None]:
        """Raw outputs on the items at ``idx`` (None: all) with ``neurons`` ablated (None: unablated).

        ``neurons`` may be a list of K sets, measured in one batched forward (outputs then have a
        leading axis of K). ``lowest``: for the unablated pass, the level to record the prefix at
        (the lowest edited layer of the sets to come).
        """
        from .hooks import Edit, MultiEdit

        items = self.items if idx is None else subset(self.items, idx)
        many = isinstance(neurons, list | tuple)
        sets: list[LayerNeurons] = list(neurons) if many else ([neurons] if neurons is not None else [])  # type: ignore[arg-type,list-item]
        low = lowest if neurons is None else min((la for st in sets for la, v in st.items() if len(v)), default=0)
        pfx = self._prefix(low or 0, record_ok=idx is None)
        k = len(sets) if many else 1
        edit: Any = None
        if many:
            edit = MultiEdit(self.lm.model, [dict(st) for st in sets], mode=self.mode, means=self.means,  # type: ignore[arg-type,misc]
                             factor=self.factor, site=self.site)
        elif neurons is not None:
            edit = Edit(self.lm.model, dict(neurons), mode=self.mode, means=self.means, factor=self.factor,  # type: ignore[arg-type]
                        site=self.site)
        try:
            res, side = self._evaluate(items, pfx, bar, k), self._side(pfx, k)
        finally:
            if edit is not None:
                edit.remove()
        self._adopt(pfx)
        return res, side

    # -- results ---------------------------------------------------------------------------------

    def baseline(self, bar: Task, lowest: int | None) -> dict[str, Any]:
        """The unablated result (``docs/ablate-result.md``: ``baseline``)."""
        t0 = time.perf_counter()
        res, side = self.run(None, None, bar, lowest=lowest)
        out = ar.baseline_vc(self.items, *res) if self.metric == "vc" else ar.baseline_nll(self.items, *res)
        if side is not None and self.general is not None:
            out["side_effect"] = {"metric": "nll", **ar.baseline_nll(self.general, *side)}
        out["seconds"] = time.perf_counter() - t0
        return out

    def _items_of(self, spec: SetSpec) -> np.ndarray | None:
        idx = None if spec.on == "all" else own_items(self.items, spec.group)
        return None if idx is None or len(idx) == len(self.items.ids) else idx

    def measure(self, spec: SetSpec, base: dict[str, Any], bar: Task) -> dict[str, Any]:
        """One ablated set, measured and compared with the baseline (one entry of ``ablations``)."""
        return self.measure_many([spec], base, bar)[0]

    def measure_many(self, specs: Sequence[SetSpec], base: dict[str, Any], bar: Task) -> list[dict[str, Any]]:
        """Several sets measured on the same items in one batched forward (one entry each)."""
        t0 = time.perf_counter()
        idx = self._items_of(specs[0])
        if not all(_same_items(specs[0], sp) for sp in specs[1:]):
            raise ValueError("sets measured together must be measured on the same items")
        if len(specs) == 1:
            res, side = self.run(specs[0].neurons, idx, bar)
            per = [(res, side)]
        else:
            res, side = self.run([sp.neurons for sp in specs], idx, bar)
            per = [(tuple(r[j] for r in res) if self.metric == "vc" else (res[0][j], res[1]),
                    None if side is None else (side[0][j], side[1])) for j in range(len(specs))]
        seconds = (time.perf_counter() - t0) / len(specs)
        return [self._entry(sp, idx, r, sd, base, seconds) for sp, (r, sd) in zip(specs, per, strict=True)]

    def _entry(self, spec: SetSpec, idx: np.ndarray | None, res: tuple[np.ndarray, ...],
               side: tuple[np.ndarray, np.ndarray] | None, base: dict[str, Any], seconds: float) -> dict[str, Any]:
        pick = np.arange(len(self.items.ids)) if idx is None else idx
        items = self.items if idx is None else subset(self.items, idx)
        entry: dict[str, Any] = {"group": spec.group, "kind": spec.kind, "seed": spec.seed,
                                 "n_neurons": sum(len(v) for v in spec.neurons.values()),
                                 "layers": {str(lay): len(v) for lay, v in spec.neurons.items()},
                                 "items_on": spec.on, "n_items": len(pick)}
        if self.metric == "vc":
            won, aligned, violating = res
            bi = base["items"]
            b_won = np.asarray([bi[i]["aligned_won"] for i in pick], dtype=bool)
            b_margin = np.asarray([bi[i]["score_aligned"] - bi[i]["score_violating"] for i in pick], dtype=np.float64)
            cmp = ar.compare_vc(items, b_won, won, spec.key, margins=(b_margin, aligned - violating))
            o = cmp["overall"]
            entry.update({"value_consistency": o["value_consistency"], "delta": o["delta"],
                          "relative_change": o["relative_change"], "ci95": o["ci95"], "p_value": o["p_value"],
                          "margin_delta": o["margin_delta"], "margin_ci95": o["margin_ci95"],
                          "breakdown": cmp["breakdown"], "items": ar.vc_items(items, won, aligned, violating)})
        else:
            nll, _ = res
            b_nll = np.asarray([base["items"][i]["nll_sum"] for i in pick], dtype=np.float64)
            count = np.asarray([base["items"][i]["n_tokens"] for i in pick], dtype=np.int64)
            o = (cmp := ar.compare_nll(items, b_nll, nll, count, spec.key))["overall"]
            entry.update({"nll": o["nll"], "delta": o["delta"], "relative_change": o["relative_change"],
                          "ci95": o["ci95"], "p_value": o["p_value"], "breakdown": cmp["breakdown"],
                          "items": ar.nll_items(items, nll, count)})
        if side is not None and self.general is not None and base.get("side_effect"):
            entry["side_effect"] = ar.side_effect(self.general, base["side_effect"], side[0], spec.key)
        entry["seconds"] = seconds
        entry["neurons"] = ar.neuron_list(spec.neurons)
        return entry


def run_order(specs: Sequence[SetSpec]) -> list[int]:
    """The order to measure sets in: all-item sets before subsets of the same lowest layer, ascending
    lowest edited layer, so the shared prefix only moves up (plan order breaks ties)."""
    return sorted(range(len(specs)), key=lambda i: (specs[i].lowest_layer, specs[i].on != "all", i))


def chunks(specs: Sequence[SetSpec], order: Sequence[int], k: int) -> list[list[int]]:
    """``order`` cut into runs of at most ``k`` consecutive sets measured on the same items."""
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < k and _same_items(specs[out[-1][0]], specs[i]):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _same_items(a: SetSpec, b: SetSpec) -> bool:
    return a.on == b.on and (a.on == "all" or a.group == b.group)
