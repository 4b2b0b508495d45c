"""Shared pieces of the report's figures: value names in both languages, and the 'not drawn' signal."""

from __future__ import annotations

import functools
from typing import Any

from ..data import bundled_values

__all__ = ["NotDrawn", "order_values", "value_label", "value_names"]


class NotDrawn(Exception):
    """A figure's inputs are missing or empty; the message says which (listed on the page)."""


@functools.lru_cache(maxsize=1)
def value_names() -> dict[str, tuple[str, str]]:
    """Value key -> (English name, Chinese name), from data/values.json."""
    return {v["key"]: (str(v.get("en", v["key"])), str(v.get("zh", ""))) for v in bundled_values()}


def value_label(key: str, sep: str = " ") -> str:
    """'Harmony 和谐' for a bundled value; the key itself for any other group."""
    en, zh = value_names().get(key, (key, ""))
    return f"{en}{sep}{zh}" if zh else en


def order_values(keys: Any) -> list[str]:
    """Keys in the benchmark's order (the 12 values as data/values.json lists them), others after, sorted."""
    known = list(value_names())
    ks = [str(k) for k in keys if str(k) != "*"]
    return [k for k in known if k in ks] + sorted(k for k in set(ks) if k not in known)
