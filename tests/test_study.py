"""`vstore study`: build -> rank -> ablate on a tiny model, resumable, through the library and the CLI."""

from __future__ import annotations

import json

import tiny_models

from vstore.cli import main
from vstore.store import Store
from vstore.study import run_study


def _both_splits(tmp_path):
    act, ev = tmp_path / "a.jsonl", tmp_path / "e.jsonl"
    tiny_models.make_stories(act, per_value=3)
    tiny_models.make_stories(ev, per_value=2, split="evaluation", seed=2)
    both = tmp_path / "both.jsonl"
    both.write_text(act.read_text(encoding="utf-8") + ev.read_text(encoding="utf-8"), encoding="utf-8")
    return both


def test_study_runs_every_stage_and_resumes(tiny_model, tmp_path):
    data = _both_splits(tmp_path)
    out = tmp_path / "study"
    s = run_study(out, model=str(tiny_model), data=data, method="mean-diff", top_k=4, controls=1,
                  progress=False, say=lambda m: None)
    assert Store(out / "store").state == "complete" and Store(out / "store").n_examples == 18
    assert set(s["neurons_per_value"]) == set(tiny_models.VALUES)
    assert all(n == 4 for n in s["neurons_per_value"].values())
    assert sorted(r["value"] for r in s["per_value"]) == sorted(tiny_models.VALUES)  # each value once
    ab = json.loads((out / "ablation.json").read_text())
    assert ab["complete"] and len(ab["baseline"]["items"]) == 12
    assert {a["kind"] for a in ab["ablations"]} == {"target", "control"}
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))
    # run again: the complete store is kept (not rebuilt), results are the same
    mtime = (out / "store" / "parts" / "0000" / "acts" / "zarr.json").stat().st_mtime_ns
    notes: list[str] = []
    s2 = run_study(out, model=str(tiny_model), data=data, method="mean-diff", top_k=4, controls=1,
                   progress=False, say=notes.append)
    assert (out / "store" / "parts" / "0000" / "acts" / "zarr.json").stat().st_mtime_ns == mtime
    assert any("keeping it" in n for n in notes)
    assert s2["per_value"] == s["per_value"]
    assert all(a.get("seconds") for a in ab["ablations"])
    assert json.loads((out / "ablation.json").read_text())["ablations"] == ab["ablations"]  # resumed, not redone


def test_study_cli(tiny_model, tmp_path, capsys):
    data = _both_splits(tmp_path)
    rc = main(["study", "--out", str(tmp_path / "s"), "--model", str(tiny_model), "--data", str(data),
               "--method", "welch-t", "--top-k", "3", "--controls", "0", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "baseline value consistency" in out and "integrity" in out
    assert main(["study", "--out", str(tmp_path / "x"), "--model", str(tmp_path / "nope"), "--data", str(data)]) == 2
