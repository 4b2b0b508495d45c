"""Installing as users do: the wheel carries every module, the bundled data and a working console script."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # without the extension: the same Python files, built in seconds (the extension has its own tests)
    env = {**os.environ, "VSTORE_NO_EXT": "1"}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(out), str(ROOT)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    wheels = list(out.glob("vstore-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_carries_every_module_and_the_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "vstore").rglob("*.py"))
    assert modules and [m for m in modules if m not in names] == []
    assert "vstore/py.typed" in names
    data = sorted(p.relative_to(ROOT / "data").as_posix() for p in (ROOT / "data").rglob("*.json*"))
    assert [d for d in data if f"vstore/_data/{d}" not in names] == []
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "vstore = vstore.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_console_script_runs_from_the_unpacked_wheel(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import vstore, vstore.cli; from vstore.data import "
        "bundled_stories, load_stories; assert vstore.__file__.startswith(sys.argv[1]), vstore.__file__; "
        "assert str(bundled_stories()).startswith(sys.argv[1]); assert len(load_stories(bundled_stories())) > 0; "
        "sys.exit(vstore.cli.main(sys.argv[2:]))"
    )
    for args in (["--help"], ["rank", "--help"], ["study", "--help"], ["data", "stats", "--json",
                                                                       str(site / "vstore" / "_data" / "sample.jsonl")]):
        res = subprocess.run([sys.executable, "-c", code, str(site), *args], capture_output=True, text=True, cwd="/")
        assert res.returncode == 0, (args, res.stderr[-2000:])
        assert res.stdout.strip(), args
