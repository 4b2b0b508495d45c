"""How the examples of a store fall into groups: a label column, a filter, a contrast, a subset.

Rows are grouped through their example (``rows/example`` -> the example's label code). A grouping
is a label column (``by``), optionally filtered (``where``), optionally restricted to the two sides
of a contrast (``contrast``; groups are then ``<group>|<side>``), optionally restricted to a subset
of examples (``example_mask``, e.g. one half of a split). ``where`` and ``contrast`` are normalised
here, once, whatever form the caller gave them in.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import StoreError, UsageError
from ..store import Store

__all__ = ["SIDE_SEP", "STATS_VERSION", "Contrast", "Grouping", "Where", "make_grouping", "normalise_contrast",
           "normalise_where"]

STATS_VERSION = 2  # 2: NaN/Inf left out per neuron (nonfinite is (layers, groups, neurons))
SIDE_SEP = "|"

Where = dict[str, list[str]]
Contrast = tuple[str, list[str]]


def normalise_where(where: Mapping[str, Sequence[str] | str] | None) -> Where:
    """``{column: values}`` with every value a string, each once, in the order given."""
    out: Where = {}
    for k, v in (where or {}).items():
        vals = [v] if isinstance(v, str) else list(v)
        col = out.setdefault(str(k), [])
        col.extend(str(x) for x in vals if str(x) not in col)
    return out


def normalise_contrast(contrast: tuple[str, Sequence[str]] | str | None) -> Contrast | None:
    """``("column", [a, b])`` from that tuple or from ``"column=a,b"``.

    Raises
    ------
    UsageError
        Not two different sides.
    """
    if contrast is None:
        return None
    if isinstance(contrast, str):
        col, _, vals = contrast.partition("=")
        sides = [v.strip() for v in vals.split(",") if v.strip()]
        col = col.strip()
    else:
        col, sides = str(contrast[0]), [str(s) for s in contrast[1]]
    if not col or len(sides) != 2 or sides[0] == sides[1]:
        raise UsageError(f"contrast: expected a column and two different values (e.g. {col or 'polarity'}=a,b), "
                         f"got {contrast!r}", "contrast")
    return col, sides


@dataclass(frozen=True)
class Grouping:
    """How the examples of a store fall into groups.

    ``codes`` holds, per example, its group index in ``[0, len(names))`` or -1 (not used).
    """

    by: str | None
    where: Where
    contrast: Contrast | None
    base: list[str]
    sides: list[str] | None
    names: list[str]
    codes: npt.NDArray[np.int32]
    mask_digest: str | None

    def spec(self, store: Store) -> dict[str, Any]:
        """The grouping as JSON, with the store's committed rows (the cache identity)."""
        return {
            "version": STATS_VERSION,
            **self.grouping_spec(),
            "committed": store.committed_key,
            "n_examples": int(store.meta.get("n_examples", 0)),
            # a site other than the first is part of the identity (the first keeps version-1 keys)
            **({"site": store.site} if store.site != store.sites[0] else {}),
        }

    def grouping_spec(self) -> dict[str, Any]:
        """The grouping alone (without the committed rows)."""
        return {
            "by": self.by,
            "where": {k: sorted(v) for k, v in sorted(self.where.items())},
            "contrast": [self.contrast[0], list(self.contrast[1])] if self.contrast else None,
            "mask": self.mask_digest,
        }

    def key(self, store: Store) -> str:
        """Cache key: a readable prefix and a digest of :meth:`spec`."""
        digest = hashlib.sha1(json.dumps(self.spec(store), sort_keys=True).encode()).hexdigest()[:16]
        prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", self.by or "all")
        return f"{prefix}-{digest}"

    def with_mask(self, store: Store, example_mask: np.ndarray) -> Grouping:
        """The same groups, restricted to the examples of ``example_mask``."""
        return make_grouping(store, self.by, where=self.where, contrast=self.contrast, example_mask=example_mask)


def _codes_of(store: Store, column: str, values: Sequence[str], param: str) -> tuple[np.ndarray, list[int]]:
    codes, cats = store.labels(column)
    unknown = [v for v in values if v not in cats]
    if unknown:
        raise StoreError(f"{store.path}: {param} {column}: no value(s) {unknown}; values: {', '.join(cats)}")
    return codes, [cats.index(v) for v in values]


def make_grouping(
    store: Store,
    by: str | None,
    *,
    where: Mapping[str, Sequence[str] | str] | None = None,
    contrast: tuple[str, Sequence[str]] | str | None = None,
    example_mask: np.ndarray | None = None,
) -> Grouping:
    """Assign every example of ``store`` a group (or -1).

    Parameters
    ----------
    store
        The store.
    by
        Label column whose categories are the groups; None: one group named ``all``.
    where
        Keep only examples whose label ``column`` is one of the given values, for every column.
    contrast
        ``(column, [side_a, side_b])`` or ``"column=a,b"``: keep only examples on either side;
        groups become ``<group>|<side>``.
    example_mask
        Boolean per example: keep only these (the group list is decided before the mask, so
        complementary masks give the same groups).

    Raises
    ------
    StoreError
        An unknown label column or value.
    UsageError
        A contrast without two different sides, or a mask of the wrong shape.
    """
    n = int(store.meta.get("n_examples", 0))
    where_n = normalise_where(where)
    con = normalise_contrast(contrast)
    keep = np.ones(n, dtype=bool)
    for col, vals in where_n.items():
        codes, wanted = _codes_of(store, col, vals, "where")
        keep &= np.isin(codes[:n], wanted)
    side_idx = np.zeros(n, dtype=np.int64)
    if con is not None:
        codes, (a, b) = _codes_of(store, con[0], con[1], "contrast")
        c = codes[:n]
        keep &= (c == a) | (c == b)
        side_idx = np.where(c == b, 1, 0)
    if by is None:
        base, base_idx = ["all"], np.zeros(n, dtype=np.int64)
    else:
        codes, cats = store.labels(by)
        c = codes[:n].astype(np.int64)
        keep &= c >= 0
        present = sorted(set(c[keep].tolist()))
        base = [cats[i] for i in present]
        remap = np.full(len(cats) + 1, -1, dtype=np.int64)
        remap[present] = np.arange(len(present))
        base_idx = remap[np.where(c >= 0, c, len(cats))]
    mask_digest = None
    if example_mask is not None:
        m = np.asarray(example_mask, dtype=bool)
        if m.shape != (n,):
            raise UsageError(f"example_mask: expected shape ({n},) (one per example), got {m.shape}", "example_mask")
        keep &= m
        mask_digest = hashlib.sha1(np.packbits(m).tobytes() + str(n).encode()).hexdigest()[:16]
    sides = con[1] if con else None
    S = len(sides) if sides else 1
    final = np.where(keep, base_idx * S + side_idx, -1).astype(np.int32)
    names = [f"{b}{SIDE_SEP}{s}" for b in base for s in sides] if sides else list(base)
    return Grouping(by, where_n, con, base, sides, names, final, mask_digest)
