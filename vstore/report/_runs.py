"""Reading study run folders (docs/report.md): every file optional, every field read defensively."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NeuronSetError, UsageError
from ..neuronset import NeuronSet

__all__ = ["LANGS", "Run", "fnum", "load_run", "set_lang"]

#: Languages in the order the report shows them (others follow, sorted).
LANGS = ("zh", "en")
#: The neuron set a run's per-model figures use first (then the first file by name).
MAIN_SETS = ("vape", "vape-exclusive", "welch-t")


def fnum(x: Any) -> float | None:
    """``x`` as a finite float, or None (missing, null, a string, NaN, a bool)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def set_lang(label: str, where: Any) -> str | None:
    """The one language a neuron set was ranked on (``where.lang`` or a ``-zh`` / ``-en`` label)."""
    if isinstance(where, dict):
        lang = where.get("lang")
        if isinstance(lang, list) and len(lang) == 1:
            lang = lang[0]
        if isinstance(lang, str):
            return lang
    m = re.search(r"(?:^|[-_/:])(zh|en)$", label)
    return m.group(1) if m else None


@dataclass
class Run:
    """One study run folder, as far as it could be read."""

    path: Path
    name: str
    n_layers: int | None = None
    n_neurons: int | None = None
    study: dict[str, Any] | None = None
    sets: dict[str, NeuronSet] = field(default_factory=dict)
    cards: dict[str, Any] | None = None
    compare: dict[str, Any] | None = None
    ablation: dict[str, Any] | None = None
    dose: dict[float, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def main_set(self) -> tuple[str, NeuronSet] | None:
        """The set the per-model figures show (``vape`` first), or None without neuron sets."""
        for label in (*MAIN_SETS, *sorted(self.sets)):
            if label in self.sets:
                return label, self.sets[label]
        return None


def _read_json(path: Path, problems: list[str], fmt: str | None = None) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path.name}: not readable JSON ({e})")
        return None
    if not isinstance(doc, dict):
        problems.append(f"{path.name}: expected a JSON object, got {type(doc).__name__}")
        return None
    name = doc.get("format", {}).get("name") if isinstance(doc.get("format"), dict) else None
    if fmt is not None and name not in (fmt, None):
        problems.append(f"{path.name}: format {name!r}, expected {fmt!r}; not used")
        return None
    return doc


def _dose_size(stem: str) -> float | None:
    try:
        v = float(stem.rstrip("%")) / (100 if stem.endswith("%") else 1)
    except ValueError:
        return None
    return v if math.isfinite(v) and v > 0 else None


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else None


def load_run(path: str | Path) -> Run:
    """Read one run folder; what is missing stays None, what is broken is listed in ``problems``.

    Raises
    ------
    UsageError
        When ``path`` is not a folder.
    """
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{p}: not a run folder (expected a folder written by `vstore study`)", "run_dirs")
    problems: list[str] = []
    run = Run(p, p.name, problems=problems)
    run.study = _read_json(p / "study.json", problems)
    files = sorted((p / "neurons").glob("*.json")) if (p / "neurons").is_dir() else []
    if (p / "neurons.json").is_file():  # the layout of studies before the run-folder contract
        files.append(p / "neurons.json")
    for f in files:
        try:
            run.sets[f.stem] = NeuronSet.load(f)
        except NeuronSetError as e:
            problems.append(f"{f.relative_to(p)}: {e}")
    run.cards = _read_json(p / "cards.json", problems, "vstore-cards")
    run.compare = _read_json(p / "compare.json", problems, "vstore-compare")
    run.ablation = _read_json(p / "ablation.json", problems, "vstore-ablation")
    for f in sorted((p / "dose").glob("*.json")) if (p / "dose").is_dir() else []:
        if f.stem == "dose":  # run_dose's index of the sizes; the sizes are read from their own files
            continue
        size = _dose_size(f.stem.removeprefix("size-").replace("pct", "%"))
        doc = _read_json(f, problems, "vstore-ablation")
        if size is None:
            problems.append(f"dose/{f.name}: the file name is not a set size (e.g. 0.01.json or size-1%.json)")
        elif doc is not None:
            run.dose[size] = doc
    models = [d.get("model") for d in (run.study, run.ablation, run.cards) if d]
    models += [ns.model for ns in run.sets.values()]
    for m in models:
        if isinstance(m, dict):
            if isinstance(m.get("name"), str) and m["name"] and run.name == p.name:
                run.name = Path(m["name"]).name
            run.n_layers = run.n_layers or _int(m.get("n_layers"))
            run.n_neurons = run.n_neurons or _int(m.get("n_neurons"))
    return run
