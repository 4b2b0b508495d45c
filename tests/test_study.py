"""`vstore study` on a tiny model: every stage through the library and the CLI, skip and redo on a rerun."""

from __future__ import annotations

import json

import pytest
import tiny_models

from vstore.cli import main
from vstore.errors import UsageError
from vstore.store import Store
from vstore.study import run_study


def _both_splits(tmp_path):
    act, ev = tmp_path / "a.jsonl", tmp_path / "e.jsonl"
    tiny_models.make_stories(act, per_value=3)
    tiny_models.make_stories(ev, per_value=2, split="evaluation", seed=2)
    both = tmp_path / "both.jsonl"
    both.write_text(act.read_text(encoding="utf-8") + ev.read_text(encoding="utf-8"), encoding="utf-8")
    return both


def _config(model, data, **ablate):
    return {"model": {"name": str(model)}, "data": {"path": str(data)},
            "rank": {"methods": ["mean-diff"], "main": "mean-diff", "top_k": 4, "exclusive": 2},
            "show": {"top_neurons": 1, "top": 3, "context": 2},
            "ablate": {"scorer": "auto", "controls": 1, "side_effect": False, "dose": [0.05], "dose_controls": 1,
                       **ablate}}


def test_study_runs_every_stage_and_resumes(tiny_model, tmp_path):
    data = _both_splits(tmp_path)
    out = tmp_path / "study"
    notes: list[str] = []
    s = run_study(out, _config(tiny_model, data), progress=None, say=notes.append)
    assert Store(out / "store").state == "complete" and Store(out / "store").n_examples == 18
    for f in ("neurons/mean-diff.json", "neurons/mean-diff-zh.json", "neurons/mean-diff-en.json",
              "neurons/mean-diff-exclusive.json", "cards.json", "compare.json", "scorer.json", "ablation.json",
              "ablation-exclusive.json", "dose/dose.json", "report.html", "summary.json", "study.json"):
        assert (out / f).exists(), f
    sc = json.loads((out / "scorer.json").read_text())
    assert set(sc["measured"]) == {"ll", "choice"} and s["scorer"] == sc["chosen"]
    lower = {k: m["chance"]["by_lang"]["*"]["ci95"][0] for k, m in sc["measured"].items()}
    assert lower[sc["chosen"]] == max(lower.values())  # the scorer furthest above chance
    ab = json.loads((out / "ablation.json").read_text())
    assert ab["complete"] and ab["run"]["scorer"] == sc["chosen"]
    assert {a["kind"] for a in ab["ablations"]} == {"target", "control"}
    assert set(s["ablation"]["main"]["per_value"]) == set(tiny_models.VALUES)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))
    assert any("[9/9] report" in n for n in notes)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page
    # a rerun skips every stage and leaves the results as they are
    mtime = (out / "ablation.json").stat().st_mtime_ns
    notes.clear()
    s2 = run_study(out, _config(tiny_model, data), progress=None, say=notes.append)
    assert sum("done before, skipping" in n for n in notes) == 9
    assert (out / "ablation.json").stat().st_mtime_ns == mtime and s2["ablation"] == s["ablation"]
    # one changed key redoes exactly the stages that read it, and says which key
    notes.clear()
    run_study(out, _config(tiny_model, data, controls=2), progress=None, say=notes.append)
    redone = [n for n in notes if "redoing" in n]
    assert len(redone) == 2 and "ablate: redoing: config changed (ablate.controls)" in redone[0]
    assert "report: redoing: an earlier stage was redone" in redone[1]
    ab2 = json.loads((out / "ablation.json").read_text())
    # a redone rank that ranks the same keeps its files, so the ablation of them resumes
    sha = (out / "neurons" / "mean-diff.json").read_bytes()
    notes.clear()
    run_study(out, {**_config(tiny_model, data, controls=2), "rank": {**_config(tiny_model, data)["rank"], "exclusive": 0}},
              progress=None, say=notes.append)
    assert (out / "neurons" / "mean-diff.json").read_bytes() == sha and any("keeping it" in n for n in notes)
    assert sum(a["kind"] == "control" for a in ab2["ablations"]) == 2 * sum(a["kind"] == "control" for a in ab["ablations"])


def test_study_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "s.toml"
    bad.write_text("[ablate]\ncontrol = 2\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"ablate\.control"):
        run_study(tmp_path / "o", bad, say=lambda m: None)
    assert main(["study", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2


def test_study_cli(tiny_model, tmp_path, capsys):
    data = _both_splits(tmp_path)
    cfg = tmp_path / "s.toml"
    cfg.write_text('[rank]\nmethods = ["welch-t"]\nmain = "welch-t"\nexclusive = 0\nper_language = false\n'
                   '[ablate]\nscorer = "ll"\ncontrols = 0\nside_effect = false\ndose = []\n', encoding="utf-8")
    rc = main(["study", "--out", str(tmp_path / "s"), "--config", str(cfg), "--model", str(tiny_model),
               "--data", str(data), "--top-k", "3", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "baseline value consistency" in out and "integrity" in out
    assert json.loads((tmp_path / "s" / "study.json").read_text())["config"]["rank"]["top_k"] == 3
    assert main(["study", "--out", str(tmp_path / "x"), "--model", str(tmp_path / "nope"), "--data", str(data),
                 "--config", str(cfg)]) == 2
