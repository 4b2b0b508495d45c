"""The whole study, stage by stage: data -> build -> rank -> show -> compare -> scorer -> ablate ->
dose -> report, configured by a TOML file (:mod:`vstore.studyconfig`, ``docs/study.md``).

``run_study(out_dir, config)`` writes the run folder described in ``docs/study.md``. Every stage
records a fingerprint of the config keys and inputs it read in ``study.json`` when it finishes; run
again, a finished stage whose fingerprint is unchanged is skipped, and a changed key redoes exactly
the stages that read it (and those after them), saying which key changed. Inside a stage, the
store build and every ablation resume from what a killed run left.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .progress import Note, Progress
from .study_stages import StudyRun, run_all
from .studyconfig import load_config

__all__ = ["run_study"]


def run_study(
    out_dir: str | Path,
    config: str | Path | Mapping[str, Mapping[str, Any]] | None = None,
    *,
    quick: bool = False,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    progress: Progress | None = None,
    say: Note = print,
) -> dict[str, Any]:
    """Run (or resume) the whole study into ``out_dir``.

    Parameters
    ----------
    out_dir
        The run folder (``docs/study.md`` lists what it holds).
    config
        A TOML file, or an already loaded config (:func:`vstore.studyconfig.load_config`), or
        ``None`` for the defaults (the packaged Gemma 3 270M and the bundled benchmark).
    quick
        Start from the quick profile (the bundled sample, one control, no dose-response).
    overrides
        ``{section: {key: value}}`` applied last (``None`` values are ignored), e.g. from the CLI.

    Returns
    -------
    dict
        The summary also written to ``summary.json``.
    """
    if isinstance(config, Mapping):
        cfg = load_config(None, quick=quick, overrides={**config, **(overrides or {})})
    else:
        cfg = load_config(config, quick=quick, overrides=overrides)
    run = StudyRun(out_dir, cfg, progress=progress, say=say)
    return run_all(run)
