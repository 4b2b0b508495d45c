"""`vstore report`: a self-contained page, figures from whatever a run folder holds, numbers equal to
the inputs, Chinese that renders, and the page opened in a real headless Chromium."""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from vstore.cli import main
from vstore.report import build_report, write_report
from vstore.report._build import CROSS_FIGURES, MODEL_FIGURES

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_report_fixture", ROOT / "tools" / "make_report_fixture.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _fixture_module().make_fixture(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def report(runs: list[Path], tmp_path_factory: pytest.TempPathFactory):
    return build_report(runs, tmp_path_factory.mktemp("out") / "report.html")


def _imgs(text: str) -> list[str]:
    return re.findall(r'<img[^>]+src=["\']([^"\']+)', text)


def test_page_is_self_contained_and_embeds_every_figure(report) -> None:
    text = report.path.read_text(encoding="utf-8")
    srcs = _imgs(text)
    assert len(report.figures) == 2 * len(MODEL_FIGURES) + len(CROSS_FIGURES)
    assert len(srcs) == len(report.figures)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    on_disk = {p.read_bytes() for p in report.figures}
    assert {base64.b64decode(s.split(",", 1)[1]) for s in srcs} == on_disk
    assert all(b.startswith(PNG) for b in on_disk)
    assert not re.search(r'(src|href)=["\']?(https?:)?//', text)
    assert not re.search(r"<script|<link|@import|url\((?!data:)", text, re.I)
    assert report.not_drawn == [] and report.problems == []
    assert "和谐" in text and "Harmony" in text  # value names in both languages


def test_card_text_is_escaped(report) -> None:
    text = report.path.read_text(encoding="utf-8")
    assert "&lt;b&gt;&amp;<mark>" in text  # the fixture's contexts end in "<b>&" before the token
    assert "<b>&<mark>" not in text


def _hand_run(root: Path) -> Path:
    """A run folder with exactly known numbers: baseline rows, one target, two controls."""
    run = root / "hand"
    (run / "neurons").mkdir(parents=True)
    ns = {"format": {"name": "vstore-neurons", "version": 1}, "method": "welch-t",
          "model": {"name": "m", "n_layers": 4, "n_neurons": 8},
          "groups": {"harmony": [{"layer": 1, "neuron": 2, "score": 1.0}, {"layer": 3, "neuron": 0, "score": 0.5}],
                     "justice": [{"layer": 1, "neuron": 2, "score": 2.0}]}}
    (run / "neurons" / "welch-t.json").write_text(json.dumps(ns))
    base = {"breakdown": [{"value": "harmony", "lang": "zh", "n": 20, "value_consistency": 0.75},
                          {"value": "*", "lang": "zh", "n": 20, "value_consistency": 0.75, "p_chance": 0.04,
                           "ci95": [0.53, 0.89], "above_chance": True},
                          {"value": "*", "lang": "en", "n": 20, "value_consistency": 0.75}]}

    def abl(kind: str, seed: int | None, own: float, top: float, margin: float | None) -> dict:
        row = {"value": "harmony", "lang": "*", "n": 20, "delta": own, "ci95": [own - 0.1, own + 0.1]}
        if margin is not None:
            row["margin_delta"] = margin
        return {"group": "harmony", "kind": kind, "seed": seed, "n_neurons": 2, "delta": top,
                "breakdown": [row], "side_effect": {"nll": {"zh": {"baseline": 3.0, "ablated": 3.0 + abs(top)}}}}

    doc = {"format": {"name": "vstore-ablation", "version": 1}, "metric": "vc", "baseline": base,
           "ablations": [abl("target", None, -0.2, -0.05, -0.3), abl("control", 0, 0.05, 0.05, -0.1),
                         abl("control", 1, -0.15, -0.15, None)]}
    (run / "ablation.json").write_text(json.dumps(doc))
    return run


def test_numbers_equal_the_hand_computed_ones(tmp_path: Path) -> None:
    rep = build_report([_hand_run(tmp_path)], tmp_path / "r.html")
    zh = next(r for r in rep.baseline if r["lang"] == "zh")
    assert zh["vc"] == 0.75 and zh["ci95"] == (0.53, 0.89) and zh["p_chance"] == 0.04 and zh["above_chance"]
    # the per-value row has no ci95: the Wilson interval of 15/20 is [0.531, 0.888], above chance
    assert zh["values_not_above"] == [] and zh["n_values"] == 1
    en = next(r for r in rep.baseline if r["lang"] == "en")  # an older row without p_chance: exact binomial
    assert en["p_chance"] == pytest.approx(2 * sum(math.comb(20, k) for k in range(15, 21)) / 2**20)
    assert [r["lang"] for r in rep.baseline] == ["zh", "en"]  # no "*" row in the file: none invented
    (e,) = rep.effects
    assert e["delta"] == -0.2 and e["ci95"] == pytest.approx((-0.3, -0.1))  # the own-value row, not the all-items delta
    assert e["control_delta"] == pytest.approx(np.mean([0.05, -0.15]))
    assert e["margin"] == -0.3 and e["control_margin"] == -0.1  # controls without a margin are left out
    assert e["nll"] == {"zh": pytest.approx(0.05)} and e["control_nll"] == {"zh": pytest.approx(0.1)}


def test_missing_inputs_are_listed_with_a_reason(tmp_path: Path) -> None:
    run = _hand_run(tmp_path)
    (run / "ablation.json").unlink()
    (run / "compare.json").write_text("{not json")
    rep = build_report([run], tmp_path / "r.html")
    drawn = {p.name for p in rep.figures}
    assert drawn == {"m-heatmap.png", "all-models-depth.png"}
    why = dict(rep.not_drawn)
    assert why["m: Value-consistency change under ablation"] == "no ablation.json"
    assert why["all models: Baseline per model"].startswith("fewer than two runs")
    assert "m: neuron cards" in why
    assert any("compare.json: not readable JSON" in p for p in rep.problems)
    text = rep.path.read_text(encoding="utf-8")
    assert "Not drawn" in text and "no ablation.json" in text and len(_imgs(text)) == 2


def test_write_report_returns_the_page(tmp_path: Path) -> None:
    run = _hand_run(tmp_path)
    out = write_report([run], tmp_path / "x" / "report.html", figures_dir=tmp_path / "pngs")
    assert out == tmp_path / "x" / "report.html" and out.is_file()
    names = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert names == ["all-models-depth.png", "m-ablation.png", "m-baseline.png", "m-heatmap.png", "m-margin.png",
                     "m-side-effect.png"]


def test_chinese_draws_without_missing_glyphs() -> None:
    import matplotlib
    from matplotlib.figure import Figure

    from vstore.report._fonts import cjk_font, rc_params

    assert cjk_font() is not None, "no font with Chinese glyphs: the runtime dependency pylopdf-fonts-zh-cn is missing"
    with matplotlib.rc_context(rc_params()), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = Figure()
        fig.add_subplot().set_title("和谐 Harmony 公正 — 社会主义核心价值观 −0.5")
        fig.savefig(__import__("io").BytesIO(), format="png")
    assert [str(w.message) for w in caught if "missing from" in str(w.message)] == []
    # and the check can fail: without the CJK fallback the same title warns
    with matplotlib.rc_context({**rc_params(), "font.family": ["DejaVu Sans"]}), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig = Figure()
        fig.add_subplot().set_title("和谐")
        fig.savefig(__import__("io").BytesIO(), format="png")
    assert any("missing from" in str(w.message) for w in caught)


def test_cli_prints_the_key_numbers(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "r.html")]) == 0
    out, err = capsys.readouterr()
    assert "baseline value consistency against chance" in out and "value neurons vs random controls" in out
    assert "gemma3-270m" in out and "qwen2.5-0.5b" in out and "…" not in out
    assert "wrote" in err and (tmp_path / "figures").is_dir()
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")]) == 2


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell"):
        if path := shutil.which(name):
            return path
    return None


_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)).map(i => i.alt);
  const out = document.createElement("pre");
  out.id = "vstore-check";
  out.textContent = JSON.stringify({n: imgs.length, bad: bad});
  document.body.prepend(out);
});
</script>"""


def test_page_opens_in_headless_chromium(report, tmp_path: Path) -> None:
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it when it can)")
    # the page itself has no script: a copy with a checker added, loaded from disk (no network)
    wrapper = tmp_path / "check.html"
    wrapper.write_text(report.path.read_text(encoding="utf-8").replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*base, "--dump-dom", wrapper.as_uri()], capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="vstore-check">(.*?)</pre>', dom.stdout)
    assert m, f"chromium printed no check result (rc {dom.returncode}): {dom.stderr[-500:]}"
    result = json.loads(m.group(1).replace("&quot;", '"'))
    assert result == {"n": len(report.figures), "bad": []}
    shot = tmp_path / "screenshot.png"
    subprocess.run([*base, "--window-size=1280,2400", f"--screenshot={shot}", report.path.as_uri()],
                   capture_output=True, timeout=180)
    assert shot.read_bytes()[:8] == PNG
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # not a blank page
