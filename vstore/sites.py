"""Capture sites of a build and of a rank: several per pass, and the attribution site ``attr``.

``parse_sites`` reads ``--site act,down_in,resid``; ``site_entries_for`` writes the store's ``sites``
attribute (see ``docs/store-format.md``, Sites); ``stories_of`` finds each example's story item for
``--attribution``; ``site_for`` and ``site_extra`` are what ``vstore rank --site`` picks and records.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import Example, Story, load_stories
from .errors import StoreError, UsageError
from .models import SITES, site_width
from .store import Store, chunk_rows_for

__all__ = ["ATTRIBUTION_SITE", "parse_sites", "site_entries_for", "site_extra", "site_for", "stories_of"]

#: The site an attribution build adds (``--attribution``), stored float32.
ATTRIBUTION_SITE = "attr"


def parse_sites(site: str | Sequence[str]) -> list[str]:
    """``act``, ``act,down_in,resid`` or a list of sites: the capture sites, in the order given, each once."""
    names = [x.strip() for x in site.split(",")] if isinstance(site, str) else [str(x).strip() for x in site]
    bad = [x for x in names if x not in SITES]
    if not names or bad:
        raise UsageError(f"site: expected one or more of {', '.join(SITES)} (comma-separated), got {site!r}", "site")
    if len(set(names)) != len(names):
        raise UsageError(f"site: {site!r} names a site twice", "site")
    return names


def site_entries_for(model: Any, sites: list[str], dtype: str, attribution: str | None) -> list[dict[str, Any]]:
    """The ``sites`` attribute: every capture site in ``dtype``, then ``attr`` (float32), one row chunking."""
    chunk = chunk_rows_for(site_width(model, sites[0]), dtype)
    out: list[dict[str, Any]] = [{"name": s, "n_neurons": site_width(model, s), "dtype": dtype, "chunk_rows": chunk}
                                 for s in sites]
    if attribution is not None:
        out.append({"name": ATTRIBUTION_SITE, "n_neurons": out[0]["n_neurons"], "dtype": "float32",
                    "chunk_rows": chunk, "of": sites[0], "scorer": attribution})
    return out


def stories_of(examples: Sequence[Example], data: Path, split: str | None, limit: int | None,
                texts: Sequence[str] | None) -> list[Story]:
    """The story item of each example (attribution scores its two actions), in example order."""
    if data.suffix == ".txt":
        raise UsageError(f"attribution: {data} is plain text; it needs a story file whose items have both actions "
                         "(aligned and violating)", "attribution", "data")
    items = [s for s in load_stories(data) if split is None or s.split == split]
    by_id = {s.id: s for s in (items[:limit] if limit else items)}
    out = []
    for e in examples:
        sid = e.id.rsplit(":", 1)[0] if texts else e.id
        if sid not in by_id:
            raise StoreError(f"attribution: example {e.id!r} has no story item in {data}")
        out.append(by_id[sid])
    return out


def site_for(st: Store, method: str, method_site: str | None, site: str | None) -> str | None:
    """The site to rank: as asked, else the method's own (``attribution``: ``attr``), else the first."""
    if site is not None and method_site is not None and site != method_site:
        raise UsageError(f"site: method {method} ranks site {method_site!r}, not {site!r}", "site", "method")
    want = site if site is not None else method_site
    if want is not None and want not in st.sites:
        hint = " (build it with --attribution choice|ll)" if want == "attr" else ""
        raise UsageError(f"site: the store {st.path} holds no site {want!r}; its sites: {', '.join(st.sites)}{hint}",
                         "site")
    return want


def site_extra(st: Store) -> dict[str, Any]:
    """What the neuron set records of an ``attr`` site: the site attributed and the scorer."""
    info = st.site_info()
    if info["name"] != "attr":
        return {}
    return {"attribution": {"of": info.get("of"), "scorer": info.get("scorer")}}
