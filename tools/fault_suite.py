"""Fault suite: kill, starve, corrupt and race vstore on a tiny model, and count what happened.

Usage::

    python tools/fault_suite.py [--kills 20] [--quick] [--work DIR] [--json FILE]

Every try runs the real command line in a child process and is classified:

``clean``
    it did what it should, or ended in one error line (exit 2) naming the problem;
``traceback``
    a Python traceback reached the user;
``hang``
    it did not end within its time limit;
``silent wrong``
    it succeeded (exit 0) on damaged input, or its result differs from the reference;
``data lost``
    a resumed store differs from an uninterrupted build (committed data lost or changed).

Scenarios: SIGKILL of a build at ``--kills`` distinct moments (each resumed, the final store compared
bitwise with the reference), a build ended at named code points (``VSTORE_FAULT``: before and after
a file's rename, before and after an attribute update, after a chunk write, before a commit; each at
several occurrences, each resumed), a file-size limit (``RLIMIT_FSIZE``) mid-build then a resume, a small
tmpfs filled while a build runs (where tmpfs can be mounted) then a resume, chunks
flipped / truncated / deleted, damaged metadata, three identical ranks at once, and a rank while a
build runs. The table goes to ``docs/reliability.md``; the target is zero in the last four columns.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

COLUMNS = ("tries", "clean", "traceback", "hang", "silent wrong", "data lost")
VSTORE = [sys.executable, "-m", "vstore"]


class Tally:
    """Outcomes per scenario."""

    def __init__(self) -> None:
        self.rows: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.notes: list[str] = []

    def add(self, scenario: str, outcome: str, note: str = "") -> None:
        self.rows[scenario]["tries"] += 1
        self.rows[scenario][outcome] += 1
        if outcome != "clean":
            self.notes.append(f"{scenario}: {outcome}: {note}")

    def total(self) -> collections.Counter[str]:
        out: collections.Counter[str] = collections.Counter()
        for c in self.rows.values():
            out.update(c)
        return out

    def table(self) -> str:
        head = "| scenario | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
        rows = [f"| {s} | " + " | ".join(str(c[k]) for k in COLUMNS) + " |" for s, c in self.rows.items()]
        t = self.total()
        return head + "\n".join([*rows, "| **all** | " + " | ".join(f"**{t[k]}**" for k in COLUMNS) + " |"])


def run(args: Sequence[str], timeout: float, preexec: Callable[[], None] | None = None) -> tuple[int | None, str]:
    """(exit code or None on timeout, stderr) of one CLI call."""
    env = {**os.environ, "VSTORE_NO_PROGRESS": "1"}
    try:
        p = subprocess.run([*VSTORE, *args], capture_output=True, text=True, timeout=timeout, env=env,
                           preexec_fn=preexec)
        return p.returncode, p.stderr
    except subprocess.TimeoutExpired:
        return None, ""


def classify(rc: int | None, err: str, *, expect_ok: bool) -> str:
    if rc is None:
        return "hang"
    if "Traceback" in err:
        return "traceback"
    if expect_ok:
        return "clean" if rc == 0 else "silent wrong"
    return "clean" if rc == 2 else "silent wrong"


def acts_of(store: Path) -> tuple[np.ndarray, np.ndarray]:
    from vstore.store import Store

    st = Store(store)
    acts = np.concatenate([np.asarray(st.acts(p.name)[:, : p.committed_rows]) for p in st.parts], axis=1)
    tokens = np.concatenate([st.rows(p.name, "token") for p in st.parts])
    return acts, tokens


def same_store(a: Path, b: Path) -> bool:
    xa, ta = acts_of(a)
    xb, tb = acts_of(b)
    return xa.shape == xb.shape and np.array_equal(xa, xb) and np.array_equal(ta, tb)


def state(store: Path) -> str:
    try:
        return str(json.loads((store / "zarr.json").read_text())["attributes"]["vstore"]["state"])
    except (OSError, ValueError, KeyError):
        return ""


def kills(work: Path, build: list[str], ref: Path, n: int, tally: Tally, timeout: float) -> None:
    """Kill a build at n moments spread over its run, resuming each time; then compare with the reference."""
    out = work / "k"
    shutil.rmtree(out, ignore_errors=True)
    t_ref = float((work / "ref.seconds").read_text())
    for i in range(n):
        delay = t_ref * (0.15 + 0.8 * i / max(1, n - 1))
        p = subprocess.Popen([*VSTORE, *build, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "VSTORE_NO_PROGRESS": "1"}, text=True)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            tally.add("kill -9 during build", "hang", f"try {i}")
            continue
        tally.add("kill -9 during build", "traceback" if "Traceback" in err else "clean", err[-300:])
        if state(out) == "complete":
            shutil.rmtree(out)  # finished before the kill: start again, to kill later ones mid-way
    rc, err = run([*build, "--out", str(out)], timeout)
    if classify(rc, err, expect_ok=True) != "clean":
        tally.add("resume after kills", classify(rc, err, expect_ok=True), err[-300:])
        return
    tally.add("resume after kills", "clean" if same_store(ref, out) else "data lost",
              "the resumed store differs from an uninterrupted build")


def fault_points(work: Path, build: list[str], ref: Path, tally: Tally, timeout: float, per_point: int) -> None:
    """End a build at named code points (``vstore._faults``: around renames, attribute updates, chunk
    writes, commits), each at several occurrences, resuming after each; then compare with the reference."""
    from vstore._faults import POINTS

    out = work / "points"
    shutil.rmtree(out, ignore_errors=True)
    for point in POINTS:
        for k in range(per_point):
            n = 1 + k * (k + 2)  # 1, 4, 9, 16: early and late in the build
            env = {**os.environ, "VSTORE_NO_PROGRESS": "1", "VSTORE_FAULT": f"{point}:{n}"}
            try:
                p = subprocess.run([*VSTORE, *build, "--out", str(out)], capture_output=True, text=True,
                                   timeout=timeout, env=env)
            except subprocess.TimeoutExpired:
                tally.add("stopped at a named point", "hang", f"{point}:{n}")
                continue
            tally.add("stopped at a named point", "traceback" if "Traceback" in p.stderr else "clean",
                      f"{point}:{n}: {p.stderr[-200:]}")
            if state(out) == "complete":
                shutil.rmtree(out)
    rc, err = run([*build, "--out", str(out)], timeout)
    if classify(rc, err, expect_ok=True) != "clean":
        tally.add("resume after named points", classify(rc, err, expect_ok=True), err[-300:])
        return
    tally.add("resume after named points", "clean" if same_store(ref, out) else "data lost", "differs")


def file_size_limit(work: Path, build: list[str], ref: Path, tally: Tally, timeout: float) -> None:
    """A build under RLIMIT_FSIZE (a full disk), then the same build with room: resumed and identical.

    The limit is per file, so it is set below the size of the reference's chunk files.
    """
    biggest = max(f.stat().st_size for f in _chunks(ref))
    for limit in (biggest // 4, biggest - 1):
        out = work / f"fsize-{limit}"
        shutil.rmtree(out, ignore_errors=True)

        def cap(limit: int = limit) -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        rc, err = run([*build, "--out", str(out)], timeout, preexec=cap)
        ok = rc == 2 and "Traceback" not in err and ("disk" in err.lower() or "too large" in err.lower())
        tally.add("file-size limit", "clean" if ok else classify(rc, err, expect_ok=False), err[-300:])
        left = list(out.rglob("*.partial"))
        if left:
            tally.add("file-size limit", "data lost", f"{len(left)} .partial files left")
        rc, err = run([*build, "--out", str(out)], timeout)
        if classify(rc, err, expect_ok=True) != "clean":
            tally.add("resume after the limit", classify(rc, err, expect_ok=True), err[-300:])
        else:
            tally.add("resume after the limit", "clean" if same_store(ref, out) else "data lost", "differs")


def full_tmpfs(work: Path, build: list[str], ref: Path, tally: Tally, timeout: float) -> None:
    """A real full disk: a small tmpfs that a filler file fills while the build runs; then room again.

    Skipped (and said so) where tmpfs cannot be mounted (not root, or a container that forbids it).
    """
    mnt = work / "tmpfs"
    mnt.mkdir(exist_ok=True)
    # room for the whole store and the temporary of one chunk rewrite (what the build's own check asks)
    size = sum(f.stat().st_size for f in ref.rglob("*") if f.is_file()) + 2 * max(f.stat().st_size for f in _chunks(ref))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        tally.notes.append("tmpfs: cannot be mounted here; the full-disk scenario was skipped")
        return
    try:
        out = mnt / "s"
        p = subprocess.Popen([*VSTORE, *build, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "VSTORE_NO_PROGRESS": "1"}, text=True)
        deadline = time.monotonic() + timeout
        while not (out / "zarr.json").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the store exists: its checks passed, the writes are about to start
        filler = mnt / "filler"
        with open(filler, "wb") as f, contextlib.suppress(OSError):  # take every byte that is left
            while True:
                f.write(b"\0" * (1 << 20))
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            tally.add("disk full (tmpfs)", "hang", "the build did not end")
            return
        full = p.returncode == 2 and "Traceback" not in err and "no space left" in err.lower()
        if p.returncode == 0:
            tally.notes.append("tmpfs: the build ended before the disk was full; the scenario missed its fault")
        tally.add("disk full (tmpfs)", "clean" if full or p.returncode == 0 else classify(p.returncode, err,
                                                                                          expect_ok=False), err[-300:])
        left = list(out.rglob("*.partial")) if out.exists() else []
        if left:
            tally.add("disk full (tmpfs)", "data lost", f"{len(left)} .partial files keep the disk full")
        filler.unlink()
        rc, err = run([*build, "--out", str(out)], timeout)
        if classify(rc, err, expect_ok=True) != "clean":
            tally.add("resume after the disk was full", classify(rc, err, expect_ok=True), err[-300:])
        else:
            tally.add("resume after the disk was full", "clean" if same_store(ref, out) else "data lost", "differs")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _chunks(store: Path) -> list[Path]:
    return sorted(p for p in (store / "parts" / "0000" / "acts" / "c").rglob("*") if p.is_file())


def corruption(work: Path, ref: Path, tally: Tally, timeout: float, per_kind: int) -> None:
    """Damaged chunks and metadata: rank must refuse (exit 2, naming it), verify must report (exit 1)."""
    def damaged(name: str, hurt: Callable[[Path], None]) -> None:
        s = work / f"c-{name}"
        shutil.rmtree(s, ignore_errors=True)
        shutil.copytree(ref, s)
        hurt(s)
        rc, err = run(["rank", str(s), "--by", "value", "--method", "mean-diff", "--out", str(work / "c.json"),
                       "--no-cache"], timeout)
        tally.add(f"damaged {name.split(':')[0]}: rank", classify(rc, err, expect_ok=False), err[-300:])
        rc, err = run(["verify", str(s)], timeout)
        ok = rc in (1, 2) and "Traceback" not in err
        tally.add(f"damaged {name.split(':')[0]}: verify", "clean" if ok else classify(rc, err, expect_ok=False),
                  err[-300:])

    files = _chunks(ref)
    picks = [files[i * len(files) // per_kind] for i in range(per_kind)]
    for k, f in enumerate(picks):
        rel = f.relative_to(ref)

        def flip(s: Path, rel: Path = rel) -> None:
            b = bytearray((s / rel).read_bytes())
            b[len(b) // 2] ^= 0xFF
            (s / rel).write_bytes(bytes(b))

        def truncate(s: Path, rel: Path = rel) -> None:
            b = (s / rel).read_bytes()
            (s / rel).write_bytes(b[: len(b) // 3])

        def delete(s: Path, rel: Path = rel) -> None:
            (s / rel).unlink()

        for name, hurt in (("chunk flipped", flip), ("chunk truncated", truncate), ("chunk deleted", delete)):
            damaged(f"{name}:{k}", hurt)

    def meta(path: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
        def hurt(s: Path) -> None:
            f = s / path
            doc = json.loads(f.read_text())
            f.write_text(json.dumps(change(doc)))
        return hurt

    def attrs(update: Callable[[dict], None]) -> Callable[[Any], Any]:
        def change(doc: Any) -> Any:
            update(doc["attributes"]["vstore"])
            return doc
        return change

    cases: list[tuple[str, Callable[[Path], None]]] = [
        ("metadata truncated", lambda s: (s / "zarr.json").write_text((s / "zarr.json").read_text()[:50])),
        ("metadata version string", meta("zarr.json", attrs(lambda m: m.update(format_version="1")))),
        ("metadata negative rows", meta("zarr.json", attrs(lambda m: m["parts"][0].update(committed_rows=-1)))),
        ("metadata layers short", meta("zarr.json", attrs(lambda m: m.update(layers=m["layers"][:1])))),
        ("array metadata truncated", lambda s: (s / "parts/0000/acts/zarr.json").write_text("{")),
        ("rows table deleted", lambda s: shutil.rmtree(s / "parts/0000/rows/example")),
    ]
    for name, hurt in cases:
        damaged(name, hurt)


def races(work: Path, ref: Path, build: list[str], tally: Tally, timeout: float, tries: int) -> None:
    """Three identical ranks at once; a rank while a build of the same store runs."""
    for i in range(tries):
        s = work / f"race-{i}"
        shutil.rmtree(s, ignore_errors=True)
        shutil.copytree(ref, s)
        procs = [subprocess.Popen([*VSTORE, "rank", str(s), "--by", "value", "--method", "welch-t", "--top-k", "3",
                                   "--out", str(work / f"race-{i}-{j}.json")], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, "VSTORE_NO_PROGRESS": "1"})
                 for j in range(3)]
        outs = [p.communicate(timeout=timeout) for p in procs]
        errs = [e for _, e in outs]
        if any(p.returncode != 0 for p in procs):
            tally.add("3 ranks at once", "traceback" if any("Traceback" in e for e in errs) else "silent wrong",
                      " | ".join(e[-200:] for e in errs))
            continue
        groups = [json.loads((work / f"race-{i}-{j}.json").read_text())["groups"] for j in range(3)]
        tally.add("3 ranks at once", "clean" if groups[0] == groups[1] == groups[2] else "silent wrong", "differ")
    out = work / "during"
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.Popen([*VSTORE, *build, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env={**os.environ, "VSTORE_NO_PROGRESS": "1"}, text=True)
    time.sleep(float((work / "ref.seconds").read_text()) * 0.5)
    rc, err = run(["rank", str(out), "--by", "value", "--method", "welch-t", "--out", str(work / "d.json"),
                   "--no-cache"], timeout)
    fine = rc in (0, 2) and "Traceback" not in err
    tally.add("rank during a build", "clean" if fine else classify(rc, err, expect_ok=True), err[-300:])
    _, err = p.communicate(timeout=timeout)
    tally.add("the build beside it", "clean" if p.returncode == 0 and same_store(ref, out)
              else ("traceback" if "Traceback" in err else "data lost"), err[-300:])


def run_suite(work: Path, *, n_kills: int = 20, quick: bool = False, timeout: float = 180.0) -> Tally:
    """Run every scenario in ``work``; returns the tally."""
    import tiny_models

    work.mkdir(parents=True, exist_ok=True)
    model = tiny_models.make_model(work / "model", "llama", layers=3, inter=96)
    data = work / "data.jsonl"
    tiny_models.make_stories(data, per_value=12 if quick else 40)
    build = ["build", "--model", str(model), "--data", str(data), "--dtype", "float32", "--batch-size", "1",
             "--commit-every", "0"]
    ref = work / "ref"
    shutil.rmtree(ref, ignore_errors=True)
    t0 = time.perf_counter()
    rc, err = run([*build, "--out", str(ref)], timeout)
    if rc != 0:
        raise SystemExit(f"the reference build failed: {err[-500:]}")
    (work / "ref.seconds").write_text(str(time.perf_counter() - t0))
    tally = Tally()
    kills(work, build, ref, n_kills, tally, timeout)
    fault_points(work, build, ref, tally, timeout, per_point=2 if quick else 4)
    file_size_limit(work, build, ref, tally, timeout)
    full_tmpfs(work, build, ref, tally, timeout)
    corruption(work, ref, tally, timeout, per_kind=1 if quick else 3)
    races(work, ref, build, tally, timeout, tries=1 if quick else 3)
    return tally


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="distinct kill moments during a build (default 20)")
    ap.add_argument("--quick", action="store_true", help="fewer stories, damage kinds and races")
    ap.add_argument("--work", default="/tmp/vstore-fault-suite", help="scratch folder (deleted first)")
    ap.add_argument("--json", default=None, help="write the tally here")
    a = ap.parse_args(argv)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    tally = run_suite(work, n_kills=a.kills, quick=a.quick)
    print(tally.table())
    for n in tally.notes:
        print("note:", n)
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": {k: dict(v) for k, v in tally.rows.items()},
                                            "total": dict(tally.total()), "notes": tally.notes}, indent=1))
    bad = sum(tally.total()[k] for k in COLUMNS[2:])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
