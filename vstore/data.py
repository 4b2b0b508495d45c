"""The story schema (C-voice format), its validating loader, and the texts fed to the model.

A story file is JSONL, one item per line, with the fields

``id``, ``value``, ``lang``, ``split``, ``story``, ``aligned``, ``violating``, ``rationale``, ``setting``

``split`` is ``activation`` or ``evaluation``; ``rationale`` is required on activation items;
``setting`` (optional) tags where the situation happens (the bundled benchmark uses :data:`SETTINGS`).
Plain text files (``.txt``) hold one text per line and carry no labels (use ``--label``).

Text templates (what the model reads; see ``docs/data.md``):

* activation item: ``story + aligned + rationale``
* evaluation item: ``story``
* ``texts=("aligned", "violating")``: each activation item twice, ``story + aligned`` and
  ``story + violating``, labelled ``polarity=aligned|violating`` (no rationale on either side).

Parts are joined by one space in space-separated languages and directly (no space) in ``zh``/``ja``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

__all__ = [
    "FIELDS",
    "SETTINGS",
    "SPLITS",
    "Example",
    "Story",
    "bundled_data_dir",
    "bundled_stories",
    "bundled_values",
    "file_sha256",
    "join_text",
    "load_examples",
    "load_stories",
    "parse_labels",
    "sample_stories",
]

FIELDS = ("id", "value", "lang", "split", "setting", "story", "aligned", "violating", "rationale")
REQUIRED = ("id", "value", "lang", "split", "story", "aligned", "violating")
SPLITS = ("activation", "evaluation")
TEXT_KINDS = ("aligned", "violating")
#: The controlled vocabulary of ``setting`` tags of the bundled benchmark (optional in users' files).
SETTINGS = ("family", "school", "work", "commerce", "community", "public", "online", "rural", "health",
            "government", "travel")
_NO_SPACE_LANGS = {"zh", "ja", "zh-cn", "zh-tw", "zh-hans", "zh-hant"}
_MAX_REPORTED = 20


@dataclass(frozen=True)
class Story:
    """One validated line of a story file."""

    id: str
    value: str
    lang: str
    split: str
    story: str
    aligned: str
    violating: str
    rationale: str | None = None
    setting: str | None = None
    source: str = ""
    line: int = 0


@dataclass(frozen=True)
class Example:
    """One text the model reads, with its label columns (``value``, ``lang``, ``split``, ...)."""

    id: str
    text: str
    labels: dict[str, str] = field(default_factory=dict)


def bundled_data_dir() -> Path:
    """The ``data/`` folder of the bundled benchmark (beside the package in a source checkout)."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "data", here / "_data"):
        if (cand / "values.json").exists():
            return cand
    raise DataError(f"the bundled data folder was not found next to {here}; reinstall vstore from its source tree")


def bundled_stories() -> Path:
    """The folder of the full bundled benchmark (one JSONL file per value)."""
    return bundled_data_dir() / "stories"


def sample_stories() -> Path:
    """The small bundled sample file (a few stories per value, both languages, both splits)."""
    return bundled_data_dir() / "sample.jsonl"


def bundled_values() -> list[dict[str, str]]:
    """The 12 core social values of ``data/values.json`` (key, names, definitions)."""
    path = bundled_data_dir() / "values.json"
    return list(json.loads(path.read_text(encoding="utf-8"))["values"])


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, or of the sorted ``*.jsonl`` files of a folder."""
    p = Path(path)
    h = hashlib.sha256()
    for f in _data_files(p) if p.is_dir() else [p]:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _data_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.jsonl"))
    if not files:
        raise DataError(f"{path}: folder holds no *.jsonl story files")
    return files


def _check_str(obj: dict[str, object], key: str, where: str, errors: list[str], required: bool) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            errors.append(f"{where}: missing field {key!r}")
        return None
    val = obj[key]
    if not isinstance(val, str):
        errors.append(f"{where}: field {key!r} must be a string, got {type(val).__name__}")
        return None
    if required and not val.strip():
        errors.append(f"{where}: field {key!r} is empty")
        return None
    try:
        val.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate (e.g. "\ud800" in the JSON): no tokenizer can read it
        errors.append(f"{where}: field {key!r} holds a character that is not valid Unicode at position {e.start}")
        return None
    return val


def _parse_story_line(text: str, source: str, n: int, errors: list[str]) -> Story | None:
    where = f"{source}:{n}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        errors.append(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
        return None
    if not isinstance(obj, dict):
        errors.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
        return None
    before = len(errors)
    vals = {k: _check_str(obj, k, where, errors, k in REQUIRED) for k in FIELDS}
    split = vals["split"]
    if split is not None and split not in SPLITS:
        errors.append(f"{where}: field 'split' must be one of {list(SPLITS)}, got {split!r}")
    if split == "activation" and not (vals["rationale"] or "").strip() and "rationale" in obj:
        errors.append(f"{where}: field 'rationale' is empty (required on activation items)")
    elif split == "activation" and "rationale" not in obj:
        errors.append(f"{where}: missing field 'rationale' (required on activation items)")
    if len(errors) > before:
        return None
    return Story(
        id=str(vals["id"]),
        value=str(vals["value"]),
        lang=str(vals["lang"]),
        split=str(split),
        story=str(vals["story"]),
        aligned=str(vals["aligned"]),
        violating=str(vals["violating"]),
        rationale=vals["rationale"],
        setting=vals["setting"],
        source=source,
        line=n,
    )


def load_stories(path: str | Path) -> list[Story]:
    """Load and validate a story file (or a folder of them).

    Every line is validated; all problems are collected and raised together.

    Parameters
    ----------
    path
        A ``.jsonl`` file, or a folder whose ``*.jsonl`` files are read in name order.

    Returns
    -------
    list of Story
        The items in file order.

    Raises
    ------
    DataError
        Naming file, line and field of each bad line (the first 20), or an empty/missing file,
        or an id repeated within one split (the same id in two splits is allowed).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    files = _data_files(p) if p.is_dir() else [p]
    stories: list[Story] = []
    errors: list[str] = []
    for f in files:
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not UTF-8 text ({e})") from e
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            s = _parse_story_line(line, str(f), n, errors)
            if s is not None:
                stories.append(s)
    seen: dict[tuple[str, str], Story] = {}  # ids are unique within a split (a split is what one stage reads)
    for s in stories:
        if (s.split, s.id) in seen:
            first = seen[(s.split, s.id)]
            where = f"line {first.line}" if first.source == s.source else f"{first.source}:{first.line}"
            errors.append(f"{s.source}:{s.line}: field 'id' {s.id!r} repeats {where} (split {s.split!r})")
        seen[(s.split, s.id)] = s
    if errors:
        more = f"\n... and {len(errors) - _MAX_REPORTED} more" if len(errors) > _MAX_REPORTED else ""
        raise DataError(f"{len(errors)} problem(s) in {p}:\n" + "\n".join(errors[:_MAX_REPORTED]) + more)
    if not stories:
        raise DataError(f"{p}: file holds no stories (empty)")
    return stories


def join_text(parts: Iterable[str], lang: str) -> str:
    """Join text parts the way a writer of ``lang`` would (no spaces in Chinese/Japanese)."""
    clean = [x.strip() for x in parts if x and x.strip()]
    sep = "" if lang.lower() in _NO_SPACE_LANGS else " "
    return sep.join(clean)


def parse_labels(pairs: Sequence[str] | None) -> dict[str, str]:
    """Parse ``KEY=VALUE`` strings (``--label``) into a dict."""
    out: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, val = pair.partition("=")
        key = key.strip()
        if not sep or not key or not val.strip():
            raise DataError(f"--label expects KEY=VALUE, got {pair!r}")
        if key in ("id", "text"):
            raise DataError(f"--label {key}=... is not allowed: {key!r} is not a label column")
        out[key] = val.strip()
    return out


def _load_txt(path: Path) -> list[Example]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    out = [Example(id=f"{path.stem}:{n}", text=t.strip()) for n, t in enumerate(lines, 1) if t.strip()]
    if not out:
        raise DataError(f"{path}: file holds no text lines (empty)")
    return out


def _story_labels(s: Story) -> dict[str, str]:
    return {"value": s.value, "lang": s.lang, "split": s.split}


def load_examples(
    path: str | Path,
    *,
    split: str | None = "activation",
    texts: Sequence[str] | None = None,
    labels: dict[str, str] | None = None,
    limit: int | None = None,
) -> list[Example]:
    """The examples a build feeds to the model, in a fixed order.

    Parameters
    ----------
    path
        A story file (``.jsonl``), a folder of them, or a plain text file (``.txt``).
    split
        Keep only stories of this split (``None`` keeps all). Plain text has no split and is not
        filtered.
    texts
        ``None`` for the default template, or ``("aligned", "violating")`` (either or both) to write
        each item once per action, ``story + action``, labelled by ``polarity``.
    labels
        Label columns set (or overridden) on every example (``--label KEY=VALUE``).
    limit
        Keep at most this many stories/lines (before ``texts`` doubles them).
    """
    p = Path(path)
    extra = dict(labels or {})
    if texts is not None:
        bad = [t for t in texts if t not in TEXT_KINDS]
        if bad or not texts:
            raise DataError(f"texts takes a subset of {list(TEXT_KINDS)}, got {list(texts)}")
    if p.suffix == ".txt":
        if not p.exists():
            raise DataError(f"{p}: no such file")
        if texts is not None:
            raise DataError(f"{p}: texts needs a story file (plain text has no actions)")
        out = _load_txt(p)[: limit if limit else None]
        return [Example(e.id, e.text, {**e.labels, **extra}) for e in out]
    stories = load_stories(p)
    if split is not None:
        if split not in SPLITS:
            raise DataError(f"split must be one of {list(SPLITS)}, got {split!r}")
        stories = [s for s in stories if s.split == split]
        if not stories:
            raise DataError(f"{p}: no stories of split {split!r}")
    if limit:
        stories = stories[:limit]
    examples: list[Example] = []
    for s in stories:
        base = _story_labels(s)
        if texts is not None:
            for kind in texts:
                action = s.aligned if kind == "aligned" else s.violating
                examples.append(
                    Example(f"{s.id}:{kind}", join_text([s.story, action], s.lang), {**base, "polarity": kind, **extra})
                )
        elif s.split == "activation":
            examples.append(Example(s.id, join_text([s.story, s.aligned, s.rationale or ""], s.lang), {**base, **extra}))
        else:
            examples.append(Example(s.id, join_text([s.story], s.lang), {**base, **extra}))
    return examples
