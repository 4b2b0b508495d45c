"""A font with Chinese glyphs for the figures (matplotlib) and the page (an embedded subset).

The font is Noto Sans SC (SIL Open Font License 1.1) from the registry package
``pylopdf-fonts-zh-cn``, a runtime dependency. Without it, any installed font that covers the value
names is used (Noto Sans CJK, Source Han Sans, WenQuanYi, SimHei ...); without any, Chinese text
would draw as boxes, so the report says so instead.
"""

from __future__ import annotations

import base64
import functools
import io
from pathlib import Path
from typing import Any

__all__ = ["PROBE", "cjk_font", "font_face_css", "rc_params"]

#: Characters every candidate must have (value names of the bundled benchmark).
PROBE = "富强民主文明和谐自由平等公正法治爱国敬业诚信友善"
_NAMES = ("noto sans sc", "noto sans cjk", "source han sans", "wenquanyi", "wqy", "simhei", "droid sans fallback",
          "ar pl", "noto serif cjk", "microsoft yahei", "pingfang")


def _covers(path: str, chars: str = PROBE) -> bool:
    try:
        from fontTools.ttLib import TTFont

        with TTFont(path, fontNumber=0, lazy=True) as f:
            cmap = f.getBestCmap() or {}
    except Exception:  # an unreadable or exotic font file: not a candidate
        return False
    return all(ord(c) in cmap for c in chars)


@functools.lru_cache(maxsize=1)
def cjk_font() -> tuple[Path, str] | None:
    """(file, family name) of a font with Chinese glyphs, registered with matplotlib; None if none."""
    from matplotlib import font_manager

    candidates: list[str] = []
    try:
        import pylopdf_fonts_zh_cn  # type: ignore[import-not-found]

        candidates.append(str(pylopdf_fonts_zh_cn.sans_path()))
    except ImportError:
        pass
    for entry in font_manager.fontManager.ttflist:
        if any(n in entry.name.lower() for n in _NAMES):
            candidates.append(entry.fname)
    for path in candidates:
        if Path(path).is_file() and _covers(path):
            font_manager.fontManager.addfont(path)
            return Path(path), font_manager.FontProperties(fname=path).get_name()
    return None


def rc_params() -> dict[str, Any]:
    """matplotlib settings for the report's figures: DejaVu Sans, falling back to the CJK font per glyph."""
    found = cjk_font()
    family = ["DejaVu Sans", found[1]] if found else ["DejaVu Sans"]
    return {"font.family": family, "axes.unicode_minus": True, "figure.dpi": 100, "savefig.dpi": 110,
            "axes.titlesize": 11, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
            "legend.fontsize": 8, "figure.titlesize": 12}


def font_face_css(text: str, family: str = "VstoreCJK") -> str:
    """A ``@font-face`` rule whose font is the CJK font cut down to the non-ASCII characters of ``text``.

    Embedded as a data URI, so the page renders Chinese without any font installed and without
    fetching anything. Empty when there is no CJK font or no such character.
    """
    found = cjk_font()
    chars = "".join(sorted({c for c in text if ord(c) > 0x2E7F}))
    if not found or not chars:
        return ""
    from fontTools import subset

    opts = subset.Options()
    opts.layout_features = ["*"]
    opts.name_IDs = ["*"]
    opts.notdef_outline = True
    font = subset.load_font(str(found[0]), opts, dontLoadGlyphNames=True)
    sub = subset.Subsetter(opts)
    sub.populate(text=chars)
    sub.subset(font)
    buf = io.BytesIO()
    font.save(buf)
    kind = "opentype" if buf.getvalue()[:4] == b"OTTO" else "truetype"
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f"@font-face {{ font-family: '{family}'; src: url(data:font/{'otf' if kind == 'opentype' else 'ttf'};"
            f"base64,{data}) format('{kind}'); }}")
