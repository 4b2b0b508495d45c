"""Write data/sample.jsonl: the first few stems of each value of the bundled benchmark.

Usage: python tools/make_sample.py [--activation 4] [--evaluation 3]

The sample serves the quick profile, the quick start and tests; every line is an item of the full
benchmark, unchanged (zh and en of a stem together).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--activation", type=int, default=4, help="activation stems per value")
    ap.add_argument("--evaluation", type=int, default=2, help="evaluation stems per value")
    a = ap.parse_args()
    keep = {"activation": a.activation, "evaluation": a.evaluation}
    lines = []
    for f in sorted((ROOT / "data" / "stories").glob("*.jsonl")):
        stems: dict[str, list[str]] = {"activation": [], "evaluation": []}
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            stem = re.sub(r"-(zh|en)$", "", r["id"])
            seen = stems[r["split"]]
            if stem not in seen:
                seen.append(stem)
            if seen.index(stem) < keep[r["split"]]:
                lines.append(line)
    (ROOT / "data" / "sample.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} items to data/sample.jsonl")


if __name__ == "__main__":
    main()
