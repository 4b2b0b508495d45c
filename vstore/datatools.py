"""Data tools behind ``vstore data``: validate, summarise and import story files."""

from __future__ import annotations

import csv
import json
import statistics
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .data import FIELDS, Story, load_stories
from .errors import DataError

__all__ = ["import_stories", "parse_mapping", "story_stats", "validate_stories"]


def validate_stories(path: str | Path) -> list[Story]:
    """Validate a story file; returns its items or raises :class:`DataError` (file, line, field)."""
    return load_stories(path)


def story_stats(path: str | Path) -> dict[str, Any]:
    """Counts per (value, lang, split) and story length distributions per language.

    Lengths are in characters for ``zh`` and in words otherwise.
    """
    stories = load_stories(path)
    counts = Counter((s.value, s.lang, s.split) for s in stories)
    lengths: dict[str, list[int]] = {}
    for s in stories:
        n = len(s.story) if s.lang.startswith("zh") else len(s.story.split())
        lengths.setdefault(s.lang, []).append(n)
    dist = {
        lang: {"unit": "chars" if lang.startswith("zh") else "words", "min": min(v), "median": statistics.median(v),
               "max": max(v), "mean": statistics.fmean(v)}
        for lang, v in lengths.items()
    }
    aligned_longer = sum(len(s.aligned) > len(s.violating) for s in stories) / len(stories)
    return {
        "items": len(stories),
        "values": sorted({s.value for s in stories}),
        "langs": sorted({s.lang for s in stories}),
        "splits": sorted({s.split for s in stories}),
        "counts": [{"value": v, "lang": lang, "split": sp, "n": n} for (v, lang, sp), n in sorted(counts.items())],
        "story_length": dist,
        "aligned_longer_share": aligned_longer,
    }


def parse_mapping(spec: str) -> dict[str, str]:
    """Parse ``--map story=COL,aligned=COL,...`` into {schema field: source column}."""
    out: dict[str, str] = {}
    for item in spec.split(","):
        key, sep, col = item.partition("=")
        key, col = key.strip(), col.strip()
        if not sep or not key or not col:
            raise DataError(f"--map expects FIELD=COLUMN pairs separated by commas, got {item!r}")
        if key not in FIELDS:
            raise DataError(f"--map: {key!r} is not a schema field; fields: {', '.join(FIELDS)}")
        out[key] = col
    return out


def _read_rows(src: Path) -> list[tuple[int, dict[str, Any]]]:
    if not src.exists():
        raise DataError(f"{src}: no such file")
    if src.suffix.lower() in (".csv", ".tsv"):
        with open(src, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if src.suffix.lower() == ".tsv" else ",")
            return [(n, dict(r)) for n, r in enumerate(reader, 2)]
    rows = []
    for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{src}:{n}: malformed JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{src}:{n}: expected a JSON object")
        rows.append((n, obj))
    return rows


def import_stories(
    src: str | Path, out: str | Path, mapping: Mapping[str, str], labels: Mapping[str, str] | None = None
) -> int:
    """Convert a user's JSONL/CSV into the story schema; returns the number of items written.

    Parameters
    ----------
    src
        ``.jsonl``, ``.csv`` or ``.tsv`` file.
    out
        Output ``.jsonl`` (written atomically, and only when every row is valid).
    mapping
        {schema field: source column}; ``id`` defaults to ``<src stem>-<line>``.
    labels
        Constant fields for every item (e.g. ``split=evaluation``, ``lang=zh``).
    """
    src, out = Path(src), Path(out)
    labels = dict(labels or {})
    for key in labels:
        if key not in FIELDS:
            raise DataError(f"--label: {key!r} is not a schema field; fields: {', '.join(FIELDS)}")
    items = []
    for n, row in _read_rows(src):
        item: dict[str, Any] = {}
        for field, col in mapping.items():
            if col not in row:
                raise DataError(f"{src}:{n}: column {col!r} (for field {field!r}) not found; columns: {', '.join(map(str, row))}")
            val = row[col]
            item[field] = "" if val is None else str(val)
        item.update(labels)
        item.setdefault("id", f"{src.stem}-{n}")
        if item.get("split") == "evaluation":
            item.pop("rationale", None)
        items.append({k: item[k] for k in FIELDS if k in item})
    with atomic_path(out) as tmp:
        tmp.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
        try:
            load_stories(tmp)
        except DataError as e:
            raise DataError(f"importing {src} would give invalid stories (lines are those of the output):\n{e}") from None
    return len(items)
