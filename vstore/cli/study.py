"""``vstore study``: data -> build -> rank -> show -> compare -> scorer -> ablate -> dose -> report."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from ..evaluate import SCORERS
from ..methods import method_choices
from ..store import DTYPES
from ..study import run_study
from .common import add_common_model_args, console, console_err, say
from .progress import make_progress


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "study",
        help="the whole study: build, rank, show, compare, ablate, dose-response, report (resumable)",
        description=(
            "Build a store from the activation split, rank value neurons with several methods, write\n"
            "neuron cards and overlaps against chance, measure the baseline value consistency with each\n"
            "scorer and keep the one furthest above chance, ablate each value's neurons beside random\n"
            "controls (with the NLL side effect and the dose-response), and write an HTML report.\n"
            "Settings come from --config (a TOML file, see docs/study.md); the flags below override it.\n"
            "Defaults: the packaged Gemma 3 270M and the bundled benchmark. --quick: the bundled sample\n"
            "and fewer sets (the README's main job). Run again on the same --out: finished stages are\n"
            "skipped, and a changed setting redoes exactly the stages that read it."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--config", default=None, help="study config, TOML (docs/study.md)")
    p.add_argument("--data", default=None, help="story file/folder with both splits (default: bundled)")
    p.add_argument("--quick", action="store_true", help="quick profile: the bundled sample, one control, no dose")
    p.add_argument("--method", default=None, choices=method_choices(), metavar="M",
                   help="main scoring method (default vape; see vstore rank --help)")
    p.add_argument("--top-k", type=int, default=None, help="neurons per value (default: the method's selection)")
    p.add_argument("--scorer", choices=(*SCORERS, "auto"), default=None,
                   help="value-consistency scorer (default auto: the one whose baseline is furthest above chance)")
    p.add_argument("--controls", type=int, default=None, help="random control sets per value (default 3; quick 1)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="stored dtype (default float16)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    add_common_model_args(p, defaults=False)
    p.set_defaults(handler=cmd_study)


def _overrides(a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    ov: dict[str, dict[str, Any]] = {
        "model": {"name": a.model, "device": a.device},
        "data": {"path": a.data},
        "build": {"dtype": a.dtype, "batch_size": a.batch_size},
        "rank": {"main": a.method, "top_k": a.top_k},
        "ablate": {"scorer": a.scorer, "controls": a.controls, "seed": a.seed, "batch_size": a.batch_size},
    }
    return ov


def cmd_study(a: argparse.Namespace) -> int:
    s = run_study(a.out, a.config, quick=a.quick, overrides=_overrides(a), progress=make_progress(not a.no_progress),
                  say=say)
    main = (s.get("ablation") or {}).get("main") or {}
    if main:
        console.print(f"scorer {s['scorer']}; baseline value consistency {main['baseline']:.3f}", highlight=False)
        t = Table(title="value neurons switched off: change of the value's own consistency")
        for c in ("value", "neurons", "target change", "p (McNemar)", "control change"):
            t.add_column(c, justify="left" if c == "value" else "right")
        for value, row in main["per_value"].items():
            def f(x: Any, spec: str = "+.3f") -> str:
                return "-" if x is None else format(x, spec)
            t.add_row(value, str(row["n_neurons"]), f(row["own_delta"]), f(row["own_p"], ".3g"), f(row["control_delta"]))
        console.print(t)
    console_err.print(f"results in {a.out}/" + (f"; report {s['report']}" if s.get("report") else ""), highlight=False)
    return 0
