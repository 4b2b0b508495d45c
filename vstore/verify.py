"""`vstore verify`: read every chunk of a store and check it against the format.

:func:`verify_store` checks the metadata (format version, layers, committed counters against the
arrays), every committed chunk of every part's activations (present, of the right size, its crc32c
checksum), the row table (example indices in range), the example columns, and the statistics cache
(every entry readable). It lists ``*.partial`` files left by a killed writer and removes them on
request. Nothing is ever read as zeros: a missing chunk below the committed rows is damage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .atomic import PARTIAL_SUFFIX
from .errors import StoreError
from .progress import Progress, task
from .store import DTYPES, FORMAT_NAME, ChunkReader, Store, check_format_version, chunk_file, store_digest
from .store._cache import CACHE_ATTR

__all__ = ["Damage", "VerifyReport", "verify_store"]


@dataclass(frozen=True)
class Damage:
    """One problem: where (a path inside the store), which rows if known, and what is wrong."""

    where: str
    problem: str
    rows: tuple[int, int] | None = None

    def __str__(self) -> str:
        rows = f" (rows {self.rows[0]}:{self.rows[1]})" if self.rows else ""
        return f"{self.where}{rows}: {self.problem}"


@dataclass
class VerifyReport:
    """What :func:`verify_store` checked and found."""

    path: Path
    chunks: int = 0
    bytes: int = 0
    damage: list[Damage] = field(default_factory=list)
    partial_files: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": self.ok, "chunks": self.chunks, "bytes": self.bytes,
                "damage": [{"where": d.where, "problem": d.problem, "rows": list(d.rows) if d.rows else None}
                           for d in self.damage],
                "partial_files": self.partial_files, "removed": self.removed}


def _root_meta(path: Path) -> dict[str, Any]:
    """The ``vstore`` attributes of the root ``zarr.json``, checked before zarr opens the group."""
    meta_file = path / "zarr.json"
    if not meta_file.exists():
        raise StoreError(f"no vstore store at {path} (no zarr.json)")
    try:
        doc = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{meta_file}: damaged group metadata, not valid JSON ({e})") from None
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else {}
    meta = attrs.get(FORMAT_NAME) if isinstance(attrs, dict) else None
    if not isinstance(meta, dict):
        raise StoreError(f"{meta_file}: a Zarr group without 'vstore' attributes (not a vstore store)")
    check_format_version(meta.get("format_version"), str(meta_file))
    return meta


def _check_part(st: Store, part: Any, report: VerifyReport, bar: Any) -> None:
    if not st.has_acts(part.name):  # --keep stats|pooled: no token activations to check
        return
    for site in st.sites:  # every site's array: acts, and sites/<name> beside it
        if not _check_site(st, site, part, report, bar):
            return
    _check_rows(st, part, report)


def _check_site(st: Store, site: str, part: Any, report: VerifyReport, bar: Any) -> bool:
    """The chunks of one site's array of a part; False when the part cannot be read further."""
    base = f"parts/{part.name}"
    arr_name = f"{base}/{st.site_info(site)['path']}"
    try:
        acts = st.acts(part.name, site)
    except StoreError as e:
        report.damage.append(Damage(arr_name, f"missing or unreadable array ({e})"))
        return False
    L, allocated, _ = acts.shape
    if len(st.layers) != L:
        report.damage.append(Damage(arr_name, f"{L} layer positions but attributes list {len(st.layers)} layers"))
    if not 0 <= part.committed_rows <= allocated:
        report.damage.append(Damage(base, f"committed rows {part.committed_rows} outside 0..{allocated} (the array)"))
        return False
    reader = ChunkReader(acts, verify=True)
    step = reader.chunk_rows
    for layer in range(L):
        for r0 in range(0, part.committed_rows, step):
            r1 = min(part.committed_rows, r0 + step)
            where = chunk_file(acts, (layer, r0 // step, 0))
            name = str(where.relative_to(st.path)) if where is not None else f"{arr_name}[{layer}, {r0}:{r1}]"
            try:
                block = reader.read(layer, r0, r1)
                report.chunks += 1
                report.bytes += block.nbytes
                bar.advance(block.nbytes)
            except StoreError as e:
                report.damage.append(Damage(name, str(e).split(": ", 1)[-1], (r0, r1)))
    return True


def _check_rows(st: Store, part: Any, report: VerifyReport) -> None:
    base = f"parts/{part.name}"
    for col in ("example", "position", "token"):
        try:
            arr = st.array(f"{base}/rows/{col}")
            if arr.shape[0] < part.committed_rows:
                report.damage.append(Damage(f"{base}/rows/{col}", f"{arr.shape[0]} rows, {part.committed_rows} committed"))
                continue
            values = np.asarray(arr[: part.committed_rows])
        except Exception as e:  # zarr's codecs and metadata raise many kinds
            report.damage.append(Damage(f"{base}/rows/{col}", f"cannot be read ({type(e).__name__}: {e})"))
            continue
        n_ex = int(st.meta.get("n_examples", 0))
        if col == "example" and values.size and (values.min() < 0 or values.max() >= n_ex):
            report.damage.append(Damage(f"{base}/rows/example", f"example indices outside 0..{n_ex - 1}"))


def _check_examples_and_cache(st: Store, report: VerifyReport) -> None:
    n = int(st.meta.get("n_examples", 0))
    try:
        keys = list(st.subgroup("examples").array_keys())
    except Exception as e:
        report.damage.append(Damage("examples", f"cannot be read ({type(e).__name__}: {e})"))
        keys = []
    for key in keys:
        try:
            arr = st.array(f"examples/{key}")
            if arr.shape[0] < n:
                report.damage.append(Damage(f"examples/{key}", f"{arr.shape[0]} entries, {n} examples committed"))
            else:
                np.asarray(arr[:n])
        except Exception as e:
            report.damage.append(Damage(f"examples/{key}", f"cannot be read ({type(e).__name__}: {e})"))
    digests: dict[str | None, str | None] = {}
    for key in st.stats_keys():
        try:
            g: Any = zarr.open_group(str(st.path / "stats" / key), mode="r")
            for name in g.array_keys():
                np.asarray(g[name][...])
            attrs = dict(g.attrs.get(CACHE_ATTR, {}))
            site = (attrs.get("spec") or {}).get("site")  # an entry of a site other than the first names it
            if site not in digests:
                digests[site] = store_digest(st.with_site(site)) if site is None or site in st.sites else None
            digest = digests[site]
            recorded = attrs.get("chunks_digest")
            if recorded is not None and digest is not None and recorded != digest:
                report.damage.append(Damage(f"stats/{key}", "stale: computed from chunks that have changed since "
                                                            "(`vstore cache clear` drops it; rank recomputes it)"))
        except Exception as e:
            report.damage.append(Damage(f"stats/{key}", f"cached statistics cannot be read ({type(e).__name__}: {e}); "
                                                        "`vstore cache clear` drops them"))


def verify_store(path: str | Path, *, fix_partial: bool = False, progress: Progress | None = None) -> VerifyReport:
    """Check every chunk, array and attribute of a store; remove stale ``*.partial`` files with ``fix_partial``.

    Returns
    -------
    VerifyReport
        ``damage`` lists every problem found (empty: the store is whole).

    Raises
    ------
    StoreError
        The store cannot be opened at all (no or damaged root metadata, another format version).
    """
    p = Path(path)
    _root_meta(p)
    report = VerifyReport(p)
    try:
        st = Store(p, mode="r")
        parts = st.parts
        total = sum(x.committed_rows for x in parts if st.has_acts(x.name)) * len(st.layers) * sum(
            st.with_site(s).n_neurons * np.dtype(DTYPES[st.with_site(s).dtype].storage).itemsize for s in st.sites)
    except (StoreError, KeyError, TypeError, ValueError, IndexError) as e:
        report.damage.append(Damage("zarr.json", f"attributes.vstore cannot be used ({type(e).__name__}: {e})"))
        return report
    with task(progress, "verify", total, unit="bytes") as bar:
        for part in parts:
            _check_part(st, part, report, bar)
    _check_examples_and_cache(st, report)
    for f in sorted(p.rglob(f"*{PARTIAL_SUFFIX}")):
        rel = str(f.relative_to(p))
        report.partial_files.append(rel)
        if fix_partial:
            if f.is_dir():
                import shutil

                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)
            report.removed.append(rel)
    return report
