"""Split-half stability: two complementary halves of the items of a store.

An item's examples (its polarities, its zh/en parallels) always land in the same half, so the two
halves share no story.
"""

from __future__ import annotations

import numpy as np

from ..store import Store

__all__ = ["item_stem", "split_halves"]


def item_stem(example_id: str, lang: str | None = None) -> str:
    """The item an example comes from: its id without ``:<polarity>`` and without ``-<lang>``.

    ``justice-a01-zh:aligned`` -> ``justice-a01``, so an item's polarities and its zh/en parallels
    share a stem.
    """
    stem = example_id.split(":", 1)[0]
    if lang:
        for sep in ("-", "_", "."):
            if stem.endswith(f"{sep}{lang}"):
                return stem[: -len(lang) - 1]
    return stem


def split_halves(store: Store, *, seed: int = 0, by: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two complementary example masks that split the items (by :func:`item_stem`) in half.

    Every example of an item lands in the same half. Items are shuffled with ``seed`` and dealt
    alternately within each group of ``by`` (the most common label of the item's examples), so each
    group is split as evenly as its items allow.
    """
    n = int(store.meta.get("n_examples", 0))
    ids = store.ids()[:n]
    langs: list[str | None] = [None] * n
    if "lang" in store.label_columns():
        codes, cats = store.labels("lang")
        langs = [cats[c] if c >= 0 else None for c in codes[:n]]
    stems = [item_stem(i, lg) for i, lg in zip(ids, langs, strict=True)]
    uniq = sorted(set(stems))
    stem_index = {s: i for i, s in enumerate(uniq)}
    ex_stem = np.array([stem_index[s] for s in stems], dtype=np.int64)
    if by is not None:
        codes, _ = store.labels(by)
        grp = np.full(len(uniq), -1, dtype=np.int64)
        for s in range(len(uniq)):
            c = codes[:n][ex_stem == s]
            c = c[c >= 0]
            if c.size:
                vals, cnt = np.unique(c, return_counts=True)
                grp[s] = vals[np.argmax(cnt)]
    else:
        grp = np.zeros(len(uniq), dtype=np.int64)
    rng = np.random.default_rng(seed)
    half = np.zeros(len(uniq), dtype=np.int64)
    for g in np.unique(grp):
        members = np.flatnonzero(grp == g)
        members = members[rng.permutation(members.size)]
        half[members[1::2]] = 1
    h = half[ex_stem]
    return h == 0, h == 1
