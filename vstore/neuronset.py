"""The neuron set (JSON format ``vstore-neurons`` version 1): one class that reads, validates, writes
and queries it.

``vstore rank`` writes a set; ``vstore ablate`` and ``rank --method random`` read one. Every check of
a set lives here: the format and types on loading, the layer and neuron ranges against the set's
own ``model`` section, and against a model or a store when asked (:meth:`NeuronSet.validate`,
:meth:`NeuronSet.check_model`). The format is documented in ``docs/neuron-set.md``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .atomic import write_atomic
from .errors import NeuronSetError
from .models import SITES

__all__ = ["FORMAT", "LayerNeurons", "NeuronKeys", "NeuronSet", "jaccard", "neuron_keys", "overlap"]

FORMAT = {"name": "vstore-neurons", "version": 1}

#: Neurons of one set per model layer: layer index -> sorted int64 neuron indices.
LayerNeurons = dict[int, np.ndarray]


class _Identity(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def architecture(self) -> str: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def n_neurons(self) -> int: ...
    @property
    def sha256(self) -> str: ...


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class NeuronSet:
    """A validated neuron-set document.

    Attributes
    ----------
    data
        The JSON document: ``format``, ``model``, ``store``, ``method``, ``params``, ``groups``
        (``{name: [{"layer", "neuron", "score", ...}, ...]}``) and what produced it.
    path
        The file it was read from or written to (None if neither).
    sha256
        The digest of the file's bytes (None for a set not read from a file).
    """

    data: dict[str, Any]
    path: Path | None = None
    sha256: str | None = None

    # -- reading and writing -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, n_layers: int | None = None, n_neurons: int | None = None,
             layers: Sequence[int] | None = None) -> NeuronSet:
        """Read and validate a neuron-set file (see :meth:`validate` for the optional bounds).

        Raises
        ------
        NeuronSetError
            Naming the file and the field that is wrong.
        """
        p = Path(path)
        try:
            raw = p.read_bytes()
            text = raw.decode("utf-8")
        except FileNotFoundError:
            raise NeuronSetError(f"{p}: no such neuron-set file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise NeuronSetError(f"{p}: cannot read: {e}") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise NeuronSetError(f"{p}: line {e.lineno}: not valid JSON ({e.msg})") from None
        ns = cls.from_dict(doc, source=str(p))
        ns.path, ns.sha256 = p, hashlib.sha256(raw).hexdigest()
        return ns.validate(n_layers=n_layers, n_neurons=n_neurons, layers=layers)

    @classmethod
    def from_dict(cls, doc: Any, *, source: str = "neuron set") -> NeuronSet:
        """Validate a document (format, types, ranges against its own ``model``) and wrap it."""
        _check_document(doc, source)
        return cls(doc)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document."""
        return self.data

    def save(self, path: str | Path) -> Path:
        """Write the document as JSON, atomically; returns the path."""
        p = Path(path)
        text = json.dumps(self.data, ensure_ascii=False, indent=1)
        write_atomic(p, lambda f: f.write(text.encode("utf-8")))
        self.path = p
        return p

    # -- checks ------------------------------------------------------------------------------------
    def _fail(self, where: str, what: str) -> NeuronSetError:
        return NeuronSetError(f"{self.path or 'neuron set'}: {where}: {what}")

    def validate(self, *, n_layers: int | None = None, n_neurons: int | None = None,
                 layers: Sequence[int] | None = None) -> NeuronSet:
        """Check every item against a model's ``n_layers`` / ``n_neurons`` or a store's ``layers``."""
        allowed = {int(x) for x in layers} if layers is not None else None
        for g, items in self.groups.items():
            for i, it in enumerate(items):
                here = f"groups.{g}[{i}]"
                if n_layers is not None and it["layer"] >= n_layers:
                    raise self._fail(f"{here}.layer", f"layer {it['layer']} is beyond the model's {n_layers} layers")
                if allowed is not None and it["layer"] not in allowed:
                    raise self._fail(f"{here}.layer", f"layer {it['layer']} is not one of {sorted(allowed)}")
                if n_neurons is not None and it["neuron"] >= n_neurons:
                    raise self._fail(f"{here}.neuron",
                                     f"neuron {it['neuron']} is beyond the model's {n_neurons} neurons")
        return self

    def require_model(self) -> NeuronSet:
        """Insist on the ``model`` fields a set needs to be checked against a model."""
        for key in ("architecture", "n_layers", "n_neurons"):
            if key not in self.model:
                raise self._fail(f"model.{key}", "missing (needed to check the set against a model)")
        return self

    def check_model(self, identity: _Identity) -> list[str]:
        """Check the set against a model by architecture, layer count and neuron count.

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
        self.require_model()
        for key in ("architecture", "n_layers", "n_neurons"):
            want, have = self.model.get(key), getattr(identity, key)
            if want != have:
                raise self._fail(f"model.{key}", f"is {want!r} but the model {identity.name!r} has {have!r}: this "
                                 f"neuron set was ranked for another model ({self.model.get('name', '?')})")
        sha = self.model.get("sha256")
        if sha and identity.sha256 and sha != identity.sha256:
            return [f"the neuron set was ranked on model weights {str(sha)[:12]} and this model's are "
                    f"{identity.sha256[:12]} (same architecture and shape: accepted)"]
        return []

    # -- what it holds -----------------------------------------------------------------------------
    @property
    def groups(self) -> dict[str, list[dict[str, Any]]]:
        """Group name -> items (``layer``, ``neuron``, ``score``, ...), best first."""
        return self.data["groups"]  # type: ignore[no-any-return]

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.data.get("model") or {})

    @property
    def method(self) -> str:
        return str(self.data.get("method", ""))

    @property
    def layers(self) -> list[int]:
        """Model layer indices of the store the set was ranked on (empty if not recorded)."""
        return [int(x) for x in self.data.get("layers", [])]

    @property
    def site(self) -> str:
        """The capture site the set's neurons live at, where they are ablated (``act`` unless its store
        says otherwise; a set ranked on an ``attr`` site: the site attributed, ``store.attribution.of``)."""
        store = self.data.get("store") if isinstance(self.data.get("store"), dict) else {}
        site = str((store or {}).get("site") or "act")
        if site == "attr":
            attribution = (store or {}).get("attribution")
            site = str((attribution or {}).get("of") or "act") if isinstance(attribution, dict) else "act"
        if site not in SITES:
            raise self._fail("store.site", f"unknown capture site {site!r}; vstore knows {', '.join(SITES)}")
        return site

    def per_layer(self) -> dict[str, dict[int, int]]:
        """Neurons per model layer, per group."""
        out: dict[str, dict[int, int]] = {}
        for g, items in self.groups.items():
            c: dict[int, int] = {}
            for it in items:
                c[int(it["layer"])] = c.get(int(it["layer"]), 0) + 1
            out[g] = c
        return out

    def layer_neurons(self, group: str) -> LayerNeurons:
        """The neurons of one group per model layer (duplicates dropped)."""
        return _union([self.groups[group]])

    def empty_groups(self) -> list[str]:
        return [g for g, items in self.groups.items() if not items]

    def select(self, spec: str | Sequence[str] | None) -> list[tuple[str, LayerNeurons]]:
        """The sets to ablate: ``None`` = each non-empty group in turn; ``"a,b"``; ``"a+b"`` = a union.

        Raises
        ------
        NeuronSetError
            An unknown group name, a requested group (or union) without neurons, or only empty groups.
        """
        if spec is None:
            names = [g for g, items in self.groups.items() if items]
            if not names:
                raise self._fail("groups", "every group is empty, no neurons to ablate")
        else:
            parts = spec.split(",") if isinstance(spec, str) else [str(x) for x in spec]
            names = [x.strip() for x in parts if x.strip()]
        if not names:
            raise NeuronSetError(f"{self.path or 'neuron set'}: no group to ablate (groups is empty)")
        out: list[tuple[str, LayerNeurons]] = []
        for name in dict.fromkeys(names):
            members = [x.strip() for x in name.split("+")]
            for m in members:
                if m not in self.groups:
                    raise self._fail("groups", f"has no group {m!r}; it has: {', '.join(sorted(self.groups))}")
            sel = _union(self.groups[m] for m in members)
            if not sel:
                raise self._fail(f"groups.{name}", "is empty: no neurons to ablate")
            out.append((name, sel))
        return out


def _union(item_lists: Iterable[Sequence[Mapping[str, Any]]]) -> LayerNeurons:
    per: dict[int, set[int]] = {}
    for items in item_lists:
        for it in items:
            per.setdefault(int(it["layer"]), set()).add(int(it["neuron"]))
    return {lay: np.asarray(sorted(v), dtype=np.int64) for lay, v in sorted(per.items()) if v}


def _check_document(doc: Any, source: str) -> None:
    def fail(where: str, what: str) -> NeuronSetError:
        return NeuronSetError(f"{source}: {where}: {what}")

    if not isinstance(doc, dict):
        raise fail("top level", f"expected a JSON object, got {type(doc).__name__}")
    fmt = doc.get("format")
    if not isinstance(fmt, dict) or fmt.get("name") != FORMAT["name"]:
        got = fmt.get("name") if isinstance(fmt, dict) else fmt
        raise fail("format.name", f"expected {FORMAT['name']!r}, got {got!r}")
    if fmt.get("version") != FORMAT["version"]:
        raise fail("format.version", f"expected {FORMAT['version']}, got {fmt.get('version')!r}")
    model = doc.get("model")
    if not isinstance(model, dict):
        raise fail("model", f"expected an object, got {type(model).__name__}")
    for k in ("n_layers", "n_neurons"):
        if k in model and (not _is_int(model[k]) or model[k] < 0):
            raise fail(f"model.{k}", f"expected a non-negative integer, got {model[k]!r}")
    if not isinstance(doc.get("method"), str):
        raise fail("method", f"expected a string, got {doc.get('method')!r}")
    groups = doc.get("groups")
    if not isinstance(groups, dict):
        raise fail("groups", f"expected an object {{group: [items]}}, got {type(groups).__name__}")
    for g, items in groups.items():
        if not isinstance(items, list):
            raise fail(f"groups.{g}", f"expected a list of items, got {type(items).__name__}")
        for i, it in enumerate(items):
            here = f"groups.{g}[{i}]"
            if not isinstance(it, dict):
                raise fail(here, f"expected an object with layer, neuron, score, got {it!r}")
            for k in ("layer", "neuron"):
                if not _is_int(it.get(k)) or it[k] < 0:
                    raise fail(f"{here}.{k}", f"expected a non-negative integer, got {it.get(k)!r}")
            sv = it.get("score")
            if not isinstance(sv, int | float) or isinstance(sv, bool):
                raise fail(f"{here}.score", f"expected a number, got {sv!r}")
            it["score"] = float(sv)
            for k, bound in (("layer", model.get("n_layers")), ("neuron", model.get("n_neurons"))):
                if bound is not None and it[k] >= bound:
                    raise fail(f"{here}.{k}", f"{k} {it[k]} out of range (model.n_{k}s = {bound})")


NeuronKeys = set[tuple[int, int]]


def neuron_keys(items: Iterable[Mapping[str, Any]] | NeuronKeys) -> NeuronKeys:
    """The ``(layer, neuron)`` pairs of a neuron list (a set of pairs is returned as it is)."""
    if isinstance(items, set):
        return items
    return {(int(x["layer"]), int(x["neuron"])) for x in items}


def overlap(a: Iterable[Mapping[str, Any]] | NeuronKeys, b: Iterable[Mapping[str, Any]] | NeuronKeys) -> tuple[int, int]:
    """``(shared, union)``: neurons in both lists and in either, by ``(layer, neuron)``."""
    sa, sb = neuron_keys(a), neuron_keys(b)
    return len(sa & sb), len(sa | sb)


def jaccard(a: Iterable[Mapping[str, Any]] | NeuronKeys, b: Iterable[Mapping[str, Any]] | NeuronKeys) -> float | None:
    """Jaccard index of two neuron lists (or sets of pairs) by (layer, neuron); None when both are empty.

    This is the one Jaccard of vstore: split halves, ``rank``'s specificity and ``compare`` use it.
    """
    shared, union = overlap(a, b)
    if not union:
        return None
    return shared / union
