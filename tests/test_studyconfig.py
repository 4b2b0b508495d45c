"""The study's TOML config: defaults, types, unknown keys, and which stages a change redoes."""

from __future__ import annotations

import pytest

from vstore.errors import UsageError
from vstore.studyconfig import DEFAULTS, STAGES, changed_keys, load_config, stage_fingerprints


def _write(tmp_path, text: str):
    p = tmp_path / "s.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_and_file_override(tmp_path):
    cfg = load_config(_write(tmp_path, '[ablate]\ncontrols = 5\n[rank]\nmethods = ["welch-t"]\n'))
    assert cfg["ablate"]["controls"] == 5
    assert cfg["rank"]["methods"] == ["vape", "welch-t"]  # the main method is always ranked
    assert cfg["model"] == DEFAULTS["model"]
    quick = load_config(None, quick=True)
    assert quick["data"]["path"] == "sample" and quick["ablate"]["dose"] == []
    # the command line wins over the file, None means "not given"
    cfg = load_config(_write(tmp_path, "[ablate]\ncontrols = 5\n"), overrides={"ablate": {"controls": 2, "seed": None}})
    assert cfg["ablate"]["controls"] == 2 and cfg["ablate"]["seed"] == 0


@pytest.mark.parametrize(("text", "words"), [
    ("[nope]\nx = 1\n", ["unknown section [nope]"]),
    ("[ablate]\ncontrol = 1\n", ["unknown key ablate.control", "controls"]),
    ("[ablate]\ncontrols = \"3\"\n", ["ablate.controls", "should be a int"]),
    ("[rank]\nper_language = 1\n", ["rank.per_language", "bool"]),
    ("[ablate]\nscorer = \"best\"\n", ["ablate.scorer", "auto"]),
    ("[ablate]\ndose = [0.01, 2]\n", ["ablate.dose", "(0, 1)"]),
    ("[rank]\nmain = \"nosuch\"\n", ["nosuch"]),
    ("[ablate\n", ["not valid TOML"]),
])
def test_bad_configs_name_the_key(tmp_path, text, words):
    with pytest.raises(UsageError) as e:
        load_config(_write(tmp_path, text))
    for w in words:
        assert w in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_a_change_redoes_exactly_the_stages_that_read_it():
    base = load_config(None)
    fp = stage_fingerprints(base, {"data:sha256": "x"})
    more = load_config(None, overrides={"ablate": {"controls": 7}})
    fp2 = stage_fingerprints(more, {"data:sha256": "x"})
    changed = [s for s in STAGES if fp[s] != fp2[s]]
    assert changed == ["ablate", "report"]
    assert changed_keys(base, more, "ablate") == ["ablate.controls"]
    # new data redoes everything downstream of it
    fp3 = stage_fingerprints(base, {"data:sha256": "y"})
    assert [s for s in STAGES if fp[s] != fp3[s]] == list(STAGES)
    # a rank change keeps the build and the scorer
    fp4 = stage_fingerprints(load_config(None, overrides={"rank": {"top_k": 9}}), {"data:sha256": "x"})
    assert [s for s in STAGES if fp[s] != fp4[s]] == ["rank", "show", "compare", "ablate", "dose", "report"]
