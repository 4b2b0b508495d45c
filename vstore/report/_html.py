"""The report page: one self-contained HTML document (inline CSS, PNG data URIs, an embedded font
subset; no script, no external link)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

from ._common import order_values, value_label
from ._runs import Run, fnum

__all__ = ["CSS", "card_section", "figure_html", "fmt", "page", "table_html"]

CSS = """
body { font-family: 'VstoreCJK', 'DejaVu Sans', 'Noto Sans', Arial, sans-serif; margin: 24px auto; max-width: 1200px;
       color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ccc; padding-bottom: 4px; margin-top: 2em; }
h3 { margin-top: 1.5em; }
figure { margin: 1em 0 2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; vertical-align: top; }
td { white-space: nowrap; } th { background: #f3f3f3; }
div.scroll { overflow-x: auto; } td.l, th.l { text-align: left; }
.bad { color: #b00; } .good { color: #070; } .muted { color: #777; }
mark { background: #ffe08a; padding: 0 2px; font-weight: bold; }
.ctx { font-family: 'VstoreCJK', 'DejaVu Sans Mono', monospace; text-align: left; white-space: pre-wrap; }
ul.notdrawn li { margin: 2px 0; }
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(x: Any, spec: str = ".3f") -> str:
    v = fnum(x)
    return "–" if v is None else format(v, spec)


def fmt_ci(ci: Sequence[float] | None, spec: str = ".3f") -> str:
    return "–" if not ci else f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def table_html(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A table; cells are escaped unless given as ``("html", markup)``."""
    def cell(tag: str, i: int, c: Any) -> str:
        cls = ' class="l"' if i < left else ""
        body = c[1] if isinstance(c, tuple) and c and c[0] == "html" else esc(c)
        return f"<{tag}{cls}>{body}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "\n".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table></div>'


def figure_html(png: bytes, title: str, caption: str, file_name: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{esc(title)}.</b> {esc(caption)} <span class=\"muted\">(also {esc(file_name)})</span>"
            f"</figcaption></figure>")


def _context(top: dict[str, Any]) -> str:
    return (f"{esc(top.get('left', ''))}<mark>{esc(top.get('token', ''))}</mark>{esc(top.get('right', ''))}")


def card_section(run: Run, per_value: int = 3, contexts: int = 4) -> str:
    """Neuron cards of the top neurons per value: top-activating tokens in context and the neuron's
    mean activation on its own group against the other groups."""
    cards = [c for c in (run.cards or {}).get("cards", []) if isinstance(c, dict) and isinstance(c.get("group"), str)]
    out = []
    for g in order_values({c["group"] for c in cards}):
        mine = sorted((c for c in cards if c["group"] == g), key=lambda c: c.get("rank", 0) if isinstance(c.get("rank"), int) else 0)
        rows = []
        for c in mine[:per_value]:
            by_raw = c.get("by_group")
            by: dict[str, Any] = by_raw if isinstance(by_raw, dict) else {}
            own = by.get(g) if isinstance(by.get(g), dict) else {}
            others = [fnum(v.get("mean")) for k, v in by.items() if k != g and isinstance(v, dict)]
            others_f = [x for x in others if x is not None]
            means = (f"{fmt((own or {}).get('mean'))} vs {fmt(sum(others_f) / len(others_f)) if others_f else '–'}")
            tops = [t for t in c.get("top", []) if isinstance(t, dict)][:contexts]
            ctx = "<br>".join(f"<span class=\"muted\">{fmt(t.get('activation'), '.2f')}</span> {_context(t)} "
                              f"<span class=\"muted\">({esc(t.get('example', ''))})</span>" for t in tops)
            rows.append([f"L{c.get('layer')} / {c.get('neuron')}", fmt(c.get("score")), means,
                         ("html", f'<div class="ctx">{ctx or "–"}</div>')])
        out.append(f"<h4>{esc(value_label(g))}</h4>" + table_html(
            ["layer / neuron", "score", "mean act. own vs others", "top activations in context (token marked)"], rows))
    ctx_k = (run.cards or {}).get("context")
    intro = (f"<p>The top {per_value} neurons per value of <code>{esc((run.cards or {}).get('neurons_file', '?'))}</code>, "
             f"each with its {contexts} highest activations and {esc(ctx_k)} tokens of context either side.</p>")
    return intro + "\n".join(out)


def page(title: str, font_css: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{font_css}\n{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")
