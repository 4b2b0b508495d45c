"""Named fault points for the fault suite: ``VSTORE_FAULT=POINT:N`` ends the process at the N-th time
the code passes ``POINT`` (``os._exit``: no cleanup, no flush, exactly as a kill would).

Unset (always, outside ``tools/fault_suite.py``), a point costs one comparison.
"""

from __future__ import annotations

import os

__all__ = ["POINTS", "fault_point"]

#: Where the writers can be stopped: around a file's rename, an attribute update, a chunk write, a commit.
POINTS = ("before-rename", "after-rename", "before-attrs", "after-attrs", "after-layer", "before-commit")

_SPEC = os.environ.get("VSTORE_FAULT", "")
_NAME, _, _N = _SPEC.partition(":")
_LEFT = int(_N) if _N.isdigit() else 0


def fault_point(name: str) -> None:
    """End the process here if ``VSTORE_FAULT`` names this point and its count is reached."""
    global _LEFT
    if _LEFT <= 0 or name != _NAME:
        return
    _LEFT -= 1
    if _LEFT == 0:
        os._exit(99)
