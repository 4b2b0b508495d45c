"""docs/architecture.md stays true: every module is on the map, and imports only go down the layers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from vstore.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "vstore"


def _layers() -> dict[str, int]:
    """Top-level module or package name -> layer, from the table of docs/architecture.md."""
    out: dict[str, int] = {}
    for line in (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*(\d+|—)\s*\|([^|]*)\|", line)
        if not m:
            continue
        layer = -1 if m.group(1) == "—" else int(m.group(1))
        for name in re.findall(r"`([\w/]+)`", m.group(2)):
            out[name.rstrip("/")] = layer
    return out


def _top(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """Top-level vstore modules a file imports (relative or absolute)."""
    pkg = list(path.relative_to(PKG.parent).parent.parts)  # the package a relative import starts from
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[list[str]] = []
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            targets = [[*base, a.name] for a in node.names] if not node.module else [base]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vstore":
            targets = [node.module.split(".")]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".") for a in node.names if a.name.split(".")[0] == "vstore"]
        for t in targets:
            if len(t) > 1:
                out.add(t[1])
    return out


def test_every_module_is_on_the_map() -> None:
    layers = _layers()
    names = {_top(p) for p in PKG.rglob("*.py")}
    assert sorted(names - set(layers)) == []
    assert sorted(n for n in set(layers) - names if n not in ("_C", "vstore")) == []


def test_imports_only_go_down() -> None:
    layers = _layers()
    assert {"store", "errors"} <= _imports(PKG / "kernels.py") and "stats" in _imports(PKG / "ablate.py")
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        me = _top(path)
        if layers.get(me, -1) < 0:
            continue
        for other in _imports(path) - {me, "_C", "__version__", "native_status"}:
            if other in layers and layers[other] >= layers[me] and layers[other] >= 0:
                wrong.append(f"{path.relative_to(ROOT)} (layer {layers[me]}) imports {other} (layer {layers[other]})")
    assert wrong == []


def test_rank_docs_list_every_method() -> None:
    text = (ROOT / "docs" / "rank.md").read_text(encoding="utf-8")
    assert [m for m in METHODS if f"`{m}`" not in text] == []


def test_only_the_command_line_draws() -> None:
    drawing = []
    for path in sorted(PKG.rglob("*.py")):
        if _top(path) == "cli":
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(from rich|import rich)", text, re.M) or "VSTORE_NO_PROGRESS" in text:
            drawing.append(str(path.relative_to(ROOT)))
    assert drawing == []


def test_nothing_is_unpickled() -> None:
    """Stores, neuron sets and results are read as JSON, Zarr and safetensors only; keep it so."""
    risky = re.compile(r"\bimport pickle\b|\bpickle\.|allow_pickle\s*=\s*True|torch\.load\(|\bmarshal\.|(?<![.\w])eval\(|(?<![.\w])exec\(")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in sorted(PKG.rglob("*.py"))
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if risky.search(line)]
    assert found == []
