"""The sites of a store seen from :class:`vstore.store.Store`: which it holds, their widths and dtypes,
and the one a reader is looking at (see ``docs/store-format.md``, Sites)."""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from ..errors import StoreError
from ._format import site_entries, site_path

__all__ = ["SiteView"]

_S = TypeVar("_S", bound="SiteView")


class SiteView:
    """The site side of a store: ``meta`` (its attributes), ``path``, ``view`` and the selected ``site``."""

    meta: dict[str, Any]
    path: Any
    site: str
    view: str

    def _resolve_site(self, site: str | None) -> str:
        names = self.sites
        if site is None:
            return names[0]
        if site not in names:
            raise StoreError(f"{self.path}: no site {site!r}; the store holds {', '.join(names)}")
        if site != names[0] and getattr(self, "view", "token") != "token":  # (set before the site is)
            raise StoreError(f"{self.path}: the pooled rows ({self.view}) are of the first site {names[0]!r} only")
        return site

    @property
    def n_neurons(self) -> int:
        """Values per row at the selected site (the MLP width for act/down_in, the hidden size for resid)."""
        return int(self.site_info()["n_neurons"])

    @property
    def dtype(self) -> str:
        """Logical dtype of the selected site's values (``float16``, ``bfloat16`` or ``float32``)."""
        return str(self.site_info()["dtype"])

    @property
    def sites(self) -> list[str]:
        """The sites the store holds, the first (``parts/NNNN/acts``) first."""
        return [str(e["name"]) for e in site_entries(self.meta)]

    def site_info(self, site: str | None = None) -> dict[str, Any]:
        """``name``, ``n_neurons``, ``dtype``, ``chunk_rows`` (and more, e.g. ``of`` for ``attr``) of a site."""
        name = self._resolve_site(site if site is not None else self.site)
        e = next(e for e in site_entries(self.meta) if e["name"] == name)
        return {**e, "chunk_rows": int(e.get("chunk_rows") or self.meta.get("chunk_rows") or 1),
                "path": site_path(self.meta, name)}

    def with_site(self: _S, site: str | None) -> _S:
        """This store seen at another site (the same group and attributes; ``None``: the first site)."""
        other = copy.copy(self)
        other.site = self._resolve_site(site)
        return other
