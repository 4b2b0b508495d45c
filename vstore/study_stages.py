"""The stages of ``vstore study`` (:mod:`vstore.study` runs them in order; ``docs/study.md``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .atomic import write_atomic, write_json_atomic
from .data import bundled_stories, file_sha256, sample_stories
from .errors import OutputError
from .models import LoadedModel, load_model
from .progress import Note, Progress
from .studyconfig import STAGES, changed_keys, stage_fingerprints

__all__ = ["StudyRun", "choose_scorer", "run_all"]

STATE_FORMAT = {"name": "vstore-study", "version": 1}


class StudyRun:
    """One run folder: its config, its recorded stage states, and the model (loaded when first needed)."""

    def __init__(self, out_dir: str | Path, cfg: dict[str, dict[str, Any]], *, progress: Progress | None,
                 say: Note) -> None:
        self.out = Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"{self.out} exists and is not a folder; the study writes a folder (choose another --out)")
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg, self.progress, self.say = cfg, progress, say
        self.state_path = self.out / "study.json"
        self.state = self._load_state()
        self._lm: LoadedModel | None = None
        self.fingerprints = stage_fingerprints(cfg, self._inputs())
        self.redone: list[str] = []

    # --- state ---------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        try:
            st = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"format": STATE_FORMAT, "stages": {}}
        if not isinstance(st, dict) or st.get("format", {}).get("name") != STATE_FORMAT["name"]:
            raise OutputError(f"{self.state_path} is not a vstore study state; choose another --out")
        st.setdefault("stages", {})
        return st

    def _save(self) -> None:
        self.state["format"] = STATE_FORMAT
        self.state["config"] = self.cfg
        if self._lm is not None:
            self.state["model"] = self._lm.identity.to_json()
        write_json_atomic(self.state_path, self.state)

    def _inputs(self) -> dict[str, str]:
        src = self.source_data
        return {"data:sha256": file_sha256(src)}

    @property
    def source_data(self) -> Path:
        """The story file/folder the config names (the bundled benchmark by default)."""
        p = self.cfg["data"]["path"]
        return sample_stories() if p == "sample" else bundled_stories() if not p else Path(p)

    @property
    def lm(self) -> LoadedModel:
        """The model, loaded on first use (a fully finished rerun never loads it)."""
        if self._lm is None:
            m = self.cfg["model"]
            self._lm = load_model(m["name"], device=m["device"], progress=self.say)
        return self._lm

    def path(self, *parts: str) -> Path:
        """A path inside the run folder."""
        return self.out.joinpath(*parts)

    # --- stages --------------------------------------------------------------------------------
    def stage(self, name: str, fn: Callable[[], dict[str, Any] | None], outputs: list[Path]) -> dict[str, Any]:
        """Run stage ``name`` unless it finished with this fingerprint and its outputs exist."""
        idx = STAGES.index(name) + 1
        rec = self.state["stages"].get(name, {})
        fp = self.fingerprints[name]
        if rec.get("done") and rec.get("fingerprint") == fp and all(p.exists() for p in outputs):
            self.say(f"[{idx}/{len(STAGES)}] {name}: done before, skipping")
            return dict(rec.get("result") or {})
        if rec.get("done"):
            keys = changed_keys(rec.get("config") or {}, self.cfg, name)
            why = f"config changed ({', '.join(keys)})" if keys else \
                "an earlier stage was redone" if any(s in self.redone for s in STAGES[:idx - 1]) else \
                "its inputs changed or an output is missing"
            self.say(f"[{idx}/{len(STAGES)}] {name}: redoing: {why}")
        else:
            self.say(f"[{idx}/{len(STAGES)}] {name}")
        self.redone.append(name)
        t0 = time.perf_counter()
        self.state["stages"][name] = {"done": False, "fingerprint": fp}
        self._save()
        result = fn() or {}
        self.state["stages"][name] = {
            "done": True, "fingerprint": fp, "seconds": round(time.perf_counter() - t0, 1),
            "config": {k: self.cfg[k] for k in self.cfg}, "result": result,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self._save()
        return result



_ALL = 10**9  # "every item" for subset_stories


def _data(run: StudyRun) -> dict[str, Any]:
    from .datatools import subset_stories

    d = run.cfg["data"]
    src = run.source_data
    if not d["activation_per_group"] and not d["evaluation_per_group"]:
        return {"path": str(src), "source": str(src)}
    per = {"activation": d["activation_per_group"] or _ALL, "evaluation": d["evaluation_per_group"] or _ALL}
    written = subset_stories(src, run.path("data.jsonl"), per)
    return {"path": str(run.path("data.jsonl")), "source": str(src), "items": written}


def _data_path(run: StudyRun) -> Path:
    return Path(run.state["stages"]["data"]["result"]["path"])


def _build(run: StudyRun) -> dict[str, Any]:
    from .build import build_store
    from .data import load_examples
    from .store import Store, is_store

    b = run.cfg["build"]
    store = run.path("store")
    data = _data_path(run)
    complete = is_store(store) and Store(store).state == "complete"
    if complete:
        st = Store(store)
        examples = load_examples(data, split="activation")
        same = st.ids() == [e.id for e in examples] and st.texts() == [e.text for e in examples] and \
            st.meta.get("model", {}).get("sha256") == run.lm.identity.sha256
        if same:
            run.say(f"  the store {store} is complete and holds this data's activation stories and this model; keeping it")
            return {"store": str(store), "kept": True, "rows": int(st.n_rows)}
        run.say(f"  the store {store} holds other data or another model; rebuilding it")
    res = build_store(store, model=run.lm, data=data, split="activation", dtype=b["dtype"],
                      layers=None if b["layers"] == "all" else b["layers"], batch_size=b["batch_size"],
                      max_length=b["max_length"], device=run.cfg["model"]["device"], progress=run.progress,
                      on_note=run.say, overwrite=complete)
    return {"store": str(store), "rows": int(res.rows), "examples": int(res.examples)}


def _rank_sets(run: StudyRun) -> list[tuple[str, dict[str, Any]]]:
    """(file stem, rank_store keywords) of every neuron set the study ranks."""
    r = run.cfg["rank"]
    top_k = r["top_k"] or None
    sets = [(m, {"method": m, "top_k": top_k}) for m in r["methods"]]
    if r["per_language"]:
        sets += [(f"{r['main']}-{lang}", {"method": r["main"], "top_k": top_k, "where": {"lang": lang}})
                 for lang in ("zh", "en")]
    if r["exclusive"]:
        sets.append((f"{r['main']}-exclusive", {"method": r["main"], "top_k": top_k, "exclusive": r["exclusive"]}))
    return sets


def _rank(run: StudyRun) -> dict[str, Any]:
    from .rank import rank_store, write_rank_result

    out: dict[str, Any] = {}
    folder = run.path("neurons")
    for stem, kw in _rank_sets(run):
        run.say(f"  ranking {stem}")
        res = rank_store(run.path("store"), "value", kw.pop("method"), seed=run.cfg["ablate"]["seed"],
                         progress=run.progress, **kw)
        path = folder / f"{stem}.json"
        if _same_ranking(path, res):  # keep the file and its digest: finished ablations of it resume
            run.say(f"  {path.name} holds this very ranking; keeping it")
        else:
            write_rank_result(res, path)
        out[stem] = {"path": str(path), "neurons": {g: len(v) for g, v in res.groups.items()}}
    return out


def _same_ranking(path: Path, res: Any) -> bool:
    """Whether ``path`` (and its ``.npz``) hold this very ranking: everything but when it was written."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    new = json.loads(json.dumps(res.data))
    return isinstance(old, dict) and {**old, "created": None} == {**new, "created": None} \
        and path.with_suffix(".npz").exists()


def _main_set(run: StudyRun) -> Path:
    return run.path("neurons", f"{run.cfg['rank']['main']}.json")


def _show(run: StudyRun) -> dict[str, Any]:
    from .cards import neuron_cards

    s = run.cfg["show"]
    cards = neuron_cards(run.path("store"), _main_set(run), top_neurons=s["top_neurons"], top=s["top"],
                         context=s["context"], progress=run.progress, on_note=run.say)
    write_json_atomic(run.path("cards.json"), cards)
    return {"cards": len(cards.get("cards", []))}


def _compare(run: StudyRun) -> dict[str, Any]:
    from .compare import compare_sets

    stems = [stem for stem, _ in _rank_sets(run)]
    res = compare_sets([run.path("neurons", f"{stem}.json") for stem in stems], labels=stems,
                       similarity=[run.path("store")], progress=run.progress, on_note=run.say)
    write_json_atomic(run.path("compare.json"), res)
    return {"sets": stems}


def _scorer(run: StudyRun) -> dict[str, Any]:
    """With ``scorer = "auto"``: the unablated value consistency with each scorer, against chance."""
    a = run.cfg["ablate"]
    if a["scorer"] != "auto":  # the ablation's own baseline measures it
        write_json_atomic(run.path("scorer.json"), {"measured": {}, "chosen": a["scorer"], "rule": "set in the config"})
        return {"chosen": a["scorer"]}
    from .ablate import load_eval_items
    from .ablation_result import baseline_vc
    from .evaluate import SCORERS, score_items
    from .lm import set_threads

    set_threads()
    items = load_eval_items(_data_path(run), "evaluation", "vc", None)
    assert items.stories is not None
    measured = {}
    for scorer in SCORERS:
        run.say(f"  baseline value consistency with the {scorer} scorer ({len(items.ids)} items)")
        sc = score_items(run.lm.model, run.lm.tokenizer, items.stories, scorer, batch_size=a["batch_size"],
                         prompt=a["prompt"])
        base = baseline_vc(items, sc.aligned_won, sc.aligned, sc.violating)
        measured[scorer] = {"value_consistency": base["value_consistency"], "n_items": base["n_items"],
                            "chance": base["chance"], "breakdown": base["breakdown"]}
    chosen = choose_scorer(measured)
    write_json_atomic(run.path("scorer.json"), {
        "measured": measured, "chosen": chosen, "prompt": a["prompt"],
        "rule": "the scorer whose value consistency over both languages has the highest lower Wilson 95% bound"})
    for s_, m in measured.items():
        ov = m["chance"]["by_lang"]["*"]
        run.say(f"  {s_}: {ov['value_consistency']:.3f} [{ov['ci95'][0]:.3f}, {ov['ci95'][1]:.3f}]"
                f"{'' if ov['above_chance'] else ' (not above chance)'}")
    run.say(f"  scorer: {chosen}")
    return {"chosen": chosen}


def choose_scorer(measured: dict[str, dict[str, Any]]) -> str:
    """The scorer whose overall value consistency has the highest lower 95% bound.

    A scorer whose interval includes chance (0.5) in every language is still chosen when no scorer
    does better; the report marks it (``above_chance`` false).
    """
    return max(measured, key=lambda s: (measured[s]["chance"]["by_lang"]["*"]["ci95"][0], s == "ll"))


def _scorer_name(run: StudyRun) -> str:
    return str(run.state["stages"]["scorer"]["result"]["chosen"])


def _general_text(run: StudyRun) -> dict[str, str]:
    """The first ``ablate.side_effect_texts`` packaged general texts per language, as files in the run."""
    from .generaltext import general_texts

    out = {}
    for lang, texts in general_texts(run.cfg["ablate"]["side_effect_texts"]).items():
        path = run.path("general", f"{lang}.txt")
        if not path.exists() or path.read_text(encoding="utf-8") != "\n".join(texts) + "\n":
            path.parent.mkdir(parents=True, exist_ok=True)
            blob = ("\n".join(texts) + "\n").encode("utf-8")

            def write(f: Any, b: bytes = blob) -> None:
                f.write(b)
            write_atomic(path, write)
        out[lang] = str(path)
    return out


def _ablate_one(run: StudyRun, neurons: Path, out: Path, *, controls: int, groups: list[str] | None,
                side_effect: bool, targets_on: str) -> dict[str, Any]:
    from .ablate import run_ablation

    a = run.cfg["ablate"]
    return run_ablation(run.lm, neurons, _data_path(run), out, scorer=_scorer_name(run), prompt=a["prompt"],
                        groups=groups or None, controls=controls, seed=a["seed"], batch_size=a["batch_size"],
                        device=run.cfg["model"]["device"], side_effect="nll" if side_effect else None,
                        general_text=_general_text(run) if side_effect else None, targets_on=targets_on,
                        progress=run.progress, on_note=run.say)


def _ablate(run: StudyRun) -> dict[str, Any]:
    a = run.cfg["ablate"]
    out = {}
    main = _ablate_one(run, _main_set(run), run.path("ablation.json"), controls=a["controls"], groups=a["groups"],
                       side_effect=a["side_effect"], targets_on=a["targets_on"])
    out["main"] = _headline(main)
    excl = run.path("neurons", f"{run.cfg['rank']['main']}-exclusive.json")
    if run.cfg["rank"]["exclusive"] and excl.exists():
        res = _ablate_one(run, excl, run.path("ablation-exclusive.json"), controls=a["controls"],
                          groups=a["groups"], side_effect=False, targets_on=a["targets_on"])
        out["exclusive"] = _headline(res)
    return out


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    per = {}
    for t in (x for x in result["ablations"] if x["kind"] == "target"):
        own = next((r for r in t.get("breakdown", []) if r["value"] == t["group"] and r["lang"] == "*"), None)
        ctrl = [r for c in result["ablations"] if c["kind"] == "control" and c["group"] == t["group"]
                for r in c.get("breakdown", []) if r["value"] == t["group"] and r["lang"] == "*"]
        per[t["group"]] = {
            "n_neurons": t["n_neurons"], "own_delta": own and own.get("delta"), "own_p": own and own.get("p_value"),
            "control_delta": sum(r["delta"] for r in ctrl) / len(ctrl) if ctrl else None,
        }
    return {"baseline": result["baseline"]["value_consistency"], "per_value": per}


def _dose(run: StudyRun) -> dict[str, Any]:
    from .dose import run_dose
    from .rank import rank_store, write_rank_result

    a, r = run.cfg["ablate"], run.cfg["rank"]
    if not a["dose"]:
        run.say("  no dose-response (ablate.dose = [])")
        return {"sizes": []}
    paths, labels = [], []
    for rate in a["dose"]:
        tag = f"{rate:g}"
        path = run.path("neurons", f"dose-{tag}.json")
        run.say(f"  ranking {r['main']} at top rate {tag}")
        res = rank_store(run.path("store"), "value", r["main"], top_rate=rate, seed=a["seed"], progress=run.progress)
        if not _same_ranking(path, res):
            write_rank_result(res, path)
        paths.append(path)
        labels.append(tag)
    doc = run_dose(run.lm, paths, _data_path(run), run.path("dose"), labels=labels,
                   groups=a["dose_groups"] or a["groups"] or None, controls=a["dose_controls"], seed=a["seed"],
                   scorer=_scorer_name(run), prompt=a["prompt"], batch_size=a["batch_size"],
                   device=run.cfg["model"]["device"], progress=run.progress, on_note=run.say)
    keep = ("label", "n_neurons_mean", "own_delta_mean", "other_delta_mean", "own_minus_other",
            "control_own_delta_mean", "margin_own_mean", "control_margin_own_mean")
    return {"sizes": [{k: x.get(k) for k in keep} for x in doc.get("sizes", [])]}


def _report(run: StudyRun) -> dict[str, Any]:
    from .report import write_report

    page = write_report([run.out], run.path("report.html"))
    run.say(f"  report: {page}")
    return {"report": str(page)}


def run_all(run: StudyRun) -> dict[str, Any]:
    """Run every stage of ``run`` in order (skipping finished ones) and write ``summary.json``."""
    cfg = run.cfg
    if cfg["ablate"]["side_effect"]:  # fail before the build, not after it, when the texts are not installed
        from .generaltext import general_texts

        general_texts(1)
    run.stage("data", lambda: _data(run), [])
    run.stage("build", lambda: _build(run), [run.path("store")])
    run.stage("rank", lambda: _rank(run), [run.path("neurons", f"{s}.json") for s, _ in _rank_sets(run)])
    run.stage("show", lambda: _show(run), [run.path("cards.json")])
    run.stage("compare", lambda: _compare(run), [run.path("compare.json")])
    run.stage("scorer", lambda: _scorer(run), [run.path("scorer.json")])
    ablated = run.stage("ablate", lambda: _ablate(run), [run.path("ablation.json")])
    dose = run.stage("dose", lambda: _dose(run), [run.path("dose", "dose.json")] if cfg["ablate"]["dose"] else [])
    report: dict[str, Any] = {}
    if cfg["report"]["enabled"]:
        report = run.stage("report", lambda: _report(run), [run.path("report.html")])
    summary = {
        "model": run.state.get("model"), "scorer": _scorer_name(run),
        "neurons": run.state["stages"]["rank"]["result"], "ablation": ablated, "dose": dose,
        "report": report.get("report"),
    }
    write_json_atomic(run.path("summary.json"), json.loads(json.dumps(summary, default=str)))
    return summary
