"""The neuron-set JSON (format ``vstore-neurons`` version 1): its name and its validating reader.

``vstore rank`` writes such a file; ``vstore ablate`` and ``rank --method random`` read it. The
format is documented in ``docs/neuron-set.md``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import NeuronSetError

__all__ = ["FORMAT", "load_neuron_set"]

FORMAT = {"name": "vstore-neurons", "version": 1}


def _fail(path: Path, where: str, what: str) -> NeuronSetError:
    return NeuronSetError(f"{path}: {where}: {what}")


def load_neuron_set(
    path: str | Path,
    *,
    n_layers: int | None = None,
    n_neurons: int | None = None,
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Read and validate a neuron-set JSON (format ``vstore-neurons`` version 1).

    Parameters
    ----------
    path
        The JSON file.
    n_layers, n_neurons
        When given, every item's layer must be < ``n_layers`` and neuron < ``n_neurons`` (the model's).
    layers
        When given, every item's layer must be one of these model layer indices.

    Returns
    -------
    dict
        The document, with every item's ``layer`` and ``neuron`` as int and ``score`` as float.

    Raises
    ------
    NeuronSetError
        Naming the file and the field that is wrong.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NeuronSetError(f"{p}: no such neuron-set file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NeuronSetError(f"{p}: cannot read: {e}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise NeuronSetError(f"{p}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict):
        raise _fail(p, "top level", f"expected a JSON object, got {type(doc).__name__}")
    fmt = doc.get("format")
    if not isinstance(fmt, dict) or fmt.get("name") != FORMAT["name"]:
        raise _fail(p, "format.name", f"expected {FORMAT['name']!r}, got {fmt.get('name') if isinstance(fmt, dict) else fmt!r}")
    if fmt.get("version") != FORMAT["version"]:
        raise _fail(p, "format.version", f"expected {FORMAT['version']}, got {fmt.get('version')!r}")
    model = doc.get("model")
    if not isinstance(model, dict):
        raise _fail(p, "model", f"expected an object, got {type(model).__name__}")
    for k in ("n_layers", "n_neurons"):
        if k in model and (not isinstance(model[k], int) or isinstance(model[k], bool) or model[k] < 0):
            raise _fail(p, f"model.{k}", f"expected a non-negative integer, got {model[k]!r}")
    if not isinstance(doc.get("method"), str):
        raise _fail(p, "method", f"expected a string, got {doc.get('method')!r}")
    groups = doc.get("groups")
    if not isinstance(groups, dict):
        raise _fail(p, "groups", f"expected an object {{group: [items]}}, got {type(groups).__name__}")
    allowed = set(int(x) for x in layers) if layers is not None else None
    for g, items in groups.items():
        if not isinstance(items, list):
            raise _fail(p, f"groups.{g}", f"expected a list of items, got {type(items).__name__}")
        for i, it in enumerate(items):
            here = f"groups.{g}[{i}]"
            if not isinstance(it, dict):
                raise _fail(p, here, f"expected an object with layer, neuron, score, got {it!r}")
            for k in ("layer", "neuron"):
                v = it.get(k)
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise _fail(p, f"{here}.{k}", f"expected a non-negative integer, got {v!r}")
            sv = it.get("score")
            if not isinstance(sv, int | float) or isinstance(sv, bool):
                raise _fail(p, f"{here}.score", f"expected a number, got {sv!r}")
            if n_layers is not None and it["layer"] >= n_layers:
                raise _fail(p, f"{here}.layer", f"layer {it['layer']} is beyond the model's {n_layers} layers")
            if allowed is not None and it["layer"] not in allowed:
                raise _fail(p, f"{here}.layer", f"layer {it['layer']} is not one of {sorted(allowed)}")
            if n_neurons is not None and it["neuron"] >= n_neurons:
                raise _fail(p, f"{here}.neuron", f"neuron {it['neuron']} is beyond the model's {n_neurons} neurons")
            it["score"] = float(sv)
    return doc
