"""Prints the status of the Qwen ablations for docs/results.md (read from docs/results/<model>/ablation.json)."""

import json
import pathlib

print("\n## Status of the Qwen runs when this session ended\n")
for name in ("qwen2.5-0.5b", "qwen2.5-1.5b"):
    p = pathlib.Path("docs/results") / name / "ablation.json"
    if not p.exists():
        print(f"- **{name}:** the ablation had not finished its unablated baseline (with the NLL side effect) when the session ended; only the scorer stage's baselines, the ranks, the cards and the overlaps are reported. Rerunning the same `vstore study` command resumes it.")
        continue
    d = json.loads(p.read_text())
    done = sorted({a["group"] for a in d["ablations"] if a["kind"] == "target"})
    ctl = sorted({a["group"] for a in d["ablations"] if a["kind"] == "control"})
    print(f"- **{name}:** {'complete' if d['complete'] else 'incomplete'}; targets finished for {len(done)} value(s) ({', '.join(done) or 'none'}), controls for {', '.join(ctl) or 'none'}. Rerunning the same `vstore study` command resumes the rest.")
