"""``vstore study``: build -> rank -> ablate in one command."""

from __future__ import annotations

import argparse

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
        help="the whole study: build a store, rank value neurons, ablate them (resumable)",
        description=(
            "Build a store from the activation split, rank value neurons with --method, and measure\n"
            "value consistency on the evaluation split with each value's neurons switched off, beside\n"
            "random controls. Defaults: the packaged Gemma 3 270M and the bundled benchmark.\n"
            "--quick uses the bundled sample (about ten minutes on a 2-core CPU)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder for the store and the results")
    p.add_argument("--data", default=None, help="story file/folder with both splits (default: bundled)")
    p.add_argument("--quick", action="store_true", help="quick profile: the bundled sample, one control")
    p.add_argument("--method", default="vape", choices=method_choices(), metavar="M",
                   help="scoring method for rank (default vape; see vstore rank --help)")
    p.add_argument("--top-k", type=int, default=None, help="neurons per value (default: the method's selection)")
    p.add_argument("--scorer", choices=SCORERS, default="ll", help="value-consistency scorer (default ll)")
    p.add_argument("--controls", type=int, default=None, help="random control sets per value (default 1 quick, 3 full)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16", help="stored dtype (default float16)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    add_common_model_args(p)
    p.set_defaults(handler=cmd_study)


def cmd_study(a: argparse.Namespace) -> int:
    s = run_study(
        a.out, model=a.model, data=a.data, quick=a.quick, method=a.method, top_k=a.top_k, scorer=a.scorer,
        controls=a.controls, dtype=a.dtype, batch_size=a.batch_size, device=a.device, seed=a.seed,
        progress=make_progress(not a.no_progress), say=say,
    )
    console.print(f"baseline value consistency {s['baseline_value_consistency']:.3f}", highlight=False)
    t = Table(title="value neurons switched off: change of the value's own consistency")
    for c in ("value", "neurons", "own VC change (target)", "own VC change (control)"):
        t.add_column(c, justify="right" if c != "value" else "left")
    for row in s["per_value"]:
        ctrl = row["control_change"]
        tgt = row["target_change"]
        t.add_row(row["value"], str(row["n_neurons"]), "-" if tgt is None else f"{tgt:+.3f}",
                  "-" if ctrl is None else f"{ctrl:+.3f}")
    console.print(t)
    console_err.print(f"results in {a.out}/summary.json, ablation.json, neurons.json")
    return 0
