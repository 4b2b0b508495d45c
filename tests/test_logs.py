"""Readable in logs: off a terminal, tables print at full width and long stages print plain progress
lines; the byte count a build prints is the bytes on disk. Output is captured through real pipes."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

from vstore.cli.progress import PlainProgress, duration, make_progress

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "VSTORE_NO_PROGRESS", "FORCE_COLOR",
                                                              "TTY_COMPATIBLE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


_WIDE_TABLE = """
from rich.table import Table
from vstore.cli.common import console
t = Table(title="wide")
for i in range(18):
    t.add_column(f"layer {i}", justify="right")
t.add_column("95% CI of delta")
t.add_row(*[f"{i * 1234.5:,.1f}" for i in range(18)], "[-0.123, +0.456]")
console.print(t)
"""


def test_tables_print_at_full_width_through_a_pipe() -> None:
    out = subprocess.run([sys.executable, "-c", _WIDE_TABLE], capture_output=True, text=True, env=_env(),
                         timeout=120, check=True).stdout
    assert "…" not in out and "[-0.123, +0.456]" in out and "20,986.5" in out
    assert max(len(line) for line in out.splitlines()) > 200
    # an explicit COLUMNS still wins (and shows what a log got before: cells cut to "…")
    narrow = subprocess.run([sys.executable, "-c", _WIDE_TABLE], capture_output=True, text=True,
                            env=_env(COLUMNS="80"), timeout=120, check=True).stdout
    assert "…" in narrow and max(len(line) for line in narrow.splitlines()) <= 80


def test_a_real_command_prints_whole_tables_through_a_pipe(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("fx", ROOT / "tools" / "make_report_fixture.py")
    assert spec and spec.loader
    fx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fx)
    runs = fx.make_fixture(tmp_path / "runs", models=fx.MODELS[:1], dose=False)
    res = subprocess.run([sys.executable, "-m", "vstore", "report", str(runs[0]), "--out", str(tmp_path / "r.html")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    assert "…" not in res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith("│ gemma3-270m")]
    assert len(rows) == 3 + 12  # baseline zh, en, * and one line per value: no cell wrapped onto a second line
    assert all("[" in r and "]" in r for r in rows)


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_plain_progress_prints_a_line_every_interval() -> None:
    buf, clock = io.StringIO(), _Clock()
    p = PlainProgress(buf, every=30, clock=clock)
    t = p.task("build", 5678, unit="rows")
    for _ in range(10):
        clock.t += 4.1
        t.advance(123.4)  # 41 s, 1,234 rows at the tenth call
    t.describe("1,200 tok/s")
    clock.t += 30
    t.advance(0)
    p.finish(t)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "build: 0/5,678 rows (0%), 0 s"
    assert lines[1].startswith("build: 987/5,678 rows (17%), 33 s, ETA")  # the first line past 30 s
    assert lines[2] == "build: 1,234/5,678 rows (22%), 71 s, ETA 4 min; 1,200 tok/s"
    assert lines[3] == "build: 1,234/5,678 rows (22%), 71 s, ETA 4 min; 1,200 tok/s (end)"
    assert len(lines) == 4


def test_plain_progress_of_bytes_and_durations() -> None:
    buf, clock = io.StringIO(), _Clock()
    p = PlainProgress(buf, every=0, clock=clock)
    t = p.task("statistics", 4e9, unit="bytes", done=1e9)
    clock.t = 60
    t.advance(1e9)
    assert buf.getvalue().splitlines()[1] == "statistics: 2.0 GB/4.0 GB (50%), 60 s, ETA 2 min"
    assert [duration(s) for s in (0.4, 89, 91, 5399, 5401)] == ["0 s", "89 s", "2 min", "90 min", "1.5 h"]


def test_make_progress_is_plain_off_a_terminal() -> None:
    code = ("import os; os.environ.pop('VSTORE_NO_PROGRESS', None)\n"
            "from vstore.cli.progress import make_progress\n"
            "print(type(make_progress()).__name__, make_progress(False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120,
                         check=True).stdout
    assert out.split() == ["PlainProgress", "None"]
    assert make_progress() is None  # the test suite sets VSTORE_NO_PROGRESS=1


def test_build_through_a_pipe_prints_progress_and_the_bytes_on_disk(tiny_model: Path, stories: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "store"
    res = subprocess.run([sys.executable, "-m", "vstore", "build", "--model", str(tiny_model), "--data", str(stories),
                          "--out", str(out), "--batch-size", "2"],
                         capture_output=True, text=True, env=_env(VSTORE_PROGRESS_EVERY="0"), timeout=600)
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    progress = [ln for ln in lines if re.match(r"build: \d+/\d+ examples \(\d+%\), \d+ s", ln)]
    assert len(progress) >= 3 and progress[-1].endswith("(end)") and "MB written" in progress[-1]
    m = re.search(r"the store is ([\d,]+) bytes on disk", res.stderr)
    assert m, res.stderr
    on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert int(m.group(1).replace(",", "")) == on_disk
