"""Data tools behind ``vstore data``: validate, summarise and import story files."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_path
from .data import FIELDS, SPLITS, Story, load_stories
from .errors import DataError, UsageError

__all__ = ["import_stories", "parse_mapping", "story_stats", "subset_stories", "validate_stories"]


def validate_stories(path: str | Path) -> list[Story]:
    """Validate a story file; returns its items or raises :class:`DataError` (file, line, field)."""
    return load_stories(path)


def _length(text: str, lang: str) -> int:
    return len(text) if lang.startswith("zh") else len(text.split())


def story_stats(path: str | Path, *, baseline: float = 0.6, flip_rate: float = 0.05, alpha: float = 0.05,
                power: float = 0.8) -> dict[str, Any]:
    """Counts, settings, lengths and the power of the evaluation split, per value and language.

    Lengths are in characters for ``zh`` and in words otherwise. ``power`` rows give, per value and
    language (``*``: both languages, or every value), the smallest drop of value consistency from
    ``baseline`` that the evaluation items detect (:func:`vstore.inference.detectable_drop`: exact
    McNemar at ``alpha``, with ``flip_rate`` of the items flipping each way by chance).
    """
    from .inference import detectable_drop

    if not 0 < baseline <= 1 or not 0 <= flip_rate < baseline:
        raise UsageError(f"baseline must be in (0, 1] and flip_rate in [0, baseline), got {baseline}, {flip_rate}",
                         "baseline", "flip_rate")
    stories = load_stories(path)
    counts = Counter((s.value, s.lang, s.split) for s in stories)
    lengths: dict[str, list[int]] = {}
    for s in stories:
        lengths.setdefault(s.lang, []).append(_length(s.story, s.lang))
    dist = {
        lang: {"unit": "chars" if lang.startswith("zh") else "words", "min": min(v), "median": statistics.median(v),
               "max": max(v), "mean": statistics.fmean(v)}
        for lang, v in lengths.items()
    }
    cells = []
    for value, lang in sorted({(s.value, s.lang) for s in stories}):
        sub = [s for s in stories if s.value == value and s.lang == lang]
        cells.append({
            "value": value, "lang": lang, **{sp: counts[(value, lang, sp)] for sp in SPLITS},
            "settings": dict(Counter(s.setting or "-" for s in sub).most_common()),
            "mean_story": statistics.fmean(_length(s.story, lang) for s in sub),
            "mean_aligned": statistics.fmean(_length(s.aligned, lang) for s in sub),
            "mean_violating": statistics.fmean(_length(s.violating, lang) for s in sub),
        })
    n_eval = Counter((s.value, s.lang) for s in stories if s.split == "evaluation")
    vals, langs = sorted({v for v, _ in n_eval}), sorted({lg for _, lg in n_eval})
    keys = [k for v in vals for k in [(v, lg) for lg in langs if (v, lg) in n_eval] + [(v, "*")]]
    keys += [("*", lg) for lg in langs] + [("*", "*")]
    rows = []
    for value, lang in keys:
        n = sum(c for (v, lg), c in n_eval.items() if value in ("*", v) and lang in ("*", lg))
        rows.append({"value": value, "lang": lang, "n": n,
                     "detectable_drop": detectable_drop(n, baseline, flip_rate=flip_rate, alpha=alpha, power=power)})
    return {
        "items": len(stories),
        "values": sorted({s.value for s in stories}),
        "langs": sorted({s.lang for s in stories}),
        "splits": sorted({s.split for s in stories}),
        "counts": [{"value": v, "lang": lang, "split": sp, "n": n} for (v, lang, sp), n in sorted(counts.items())],
        "cells": cells,
        "story_length": dist,
        "aligned_longer_share": sum(len(s.aligned) > len(s.violating) for s in stories) / len(stories),
        "power": {"baseline": baseline, "flip_rate": flip_rate, "alpha": alpha, "power": power, "rows": rows},
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
    try:
        text = src.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        at = src.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{src}:{at}: not UTF-8 (byte {e.start}: {e.reason}); save the file as UTF-8") from None
    if src.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if src.suffix.lower() == ".tsv" else ",")
        return [(n, dict(r)) for n, r in enumerate(reader, 2)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
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


def subset_stories(src: str | Path, out: str | Path, per_group: Mapping[str, int]) -> dict[str, int]:
    """Write the first items of each value × language of each split, in file order.

    Parameters
    ----------
    src
        Story file or folder.
    out
        Output ``.jsonl`` (written atomically).
    per_group
        {split: items kept per value and language}; splits not named are dropped. Every kept
        item is written unchanged, so subsets of subsets stay reproducible.

    Returns
    -------
    dict
        Items written per split.
    """
    bad = [sp for sp in per_group if sp not in SPLITS]
    if bad:
        raise UsageError(f"split {bad[0]!r} is not one of {', '.join(SPLITS)}")
    neg = [f"{sp}={n}" for sp, n in per_group.items() if n < 1]
    if neg:
        raise UsageError(f"items per group must be at least 1 (got {neg[0]})")
    seen: Counter[tuple[str, str, str]] = Counter()
    kept: list[Story] = []
    for st in load_stories(src):
        key = (st.split, st.value, st.lang)
        if st.split in per_group and seen[key] < per_group[st.split]:
            seen[key] += 1
            kept.append(st)
    if not kept:
        raise DataError(f"{src}: no stories of split(s) {', '.join(per_group)}")
    lines = []
    for st in kept:
        d = {k: getattr(st, k) for k in FIELDS if getattr(st, k, None) is not None}
        lines.append(json.dumps(d, ensure_ascii=False) + "\n")
    with atomic_path(out) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return dict(Counter(st.split for st in kept))
