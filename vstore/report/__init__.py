"""`vstore report`: study run folders -> one self-contained HTML page and its PNG figures.

The run-folder layout and what each figure shows: docs/report.md. Figures are drawn with
matplotlib's Agg renderer (no display, no pyplot state); Chinese text uses a bundled CJK font.
"""

from __future__ import annotations

from ._build import Report, build_report, write_report
from ._runs import Run, load_run

__all__ = ["Report", "Run", "build_report", "load_run", "write_report"]
