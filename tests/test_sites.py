"""Several capture sites in one pass: one array per site, each equal to a build of that site alone;
version-1 stores unchanged; ``rank --site``; resumable; ``resid`` edited by the ablation hooks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import zarr

from vstore.build import build_store
from vstore.cli import main
from vstore.errors import StoreError, UsageError
from vstore.rank import rank_store
from vstore.store import Store


def _site(path: Path, site: str) -> np.ndarray:
    st = Store(path)
    return np.concatenate([np.asarray(st.acts(p.name, site)[:, : p.committed_rows]) for p in st.parts], axis=1)


def _resid_oracle(model_dir: Path, texts: list[str]) -> list[np.ndarray]:
    """Per text, (layers, tokens, hidden): each decoder layer's output, by our own hooks, unpadded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h
    out = []
    for t in texts:
        got: list[np.ndarray] = []
        hs = [m.register_forward_hook(lambda m, i, o, got=got: got.append(
            (o[0] if isinstance(o, tuple) else o)[0].detach().numpy().copy())) for m in layers]
        try:
            with torch.no_grad():
                model(**tok(t, return_tensors="pt"))
        finally:
            for h in hs:
                h.remove()
        out.append(np.stack(got))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sites_in_one_pass_equal_single_site_builds(family, tiny_model_factory, stories, tmp_path):
    model = tiny_model_factory(family)
    multi = tmp_path / "multi"
    build_store(multi, model=str(model), data=stories, dtype="float32", site="act,down_in,resid", batch_size=3,
                progress=False)
    st = Store(multi)
    assert st.sites == ["act", "down_in", "resid"] and st.meta["site"] == "act"
    hidden = 32
    assert [st.site_info(s)["n_neurons"] for s in st.sites] == [48, 48, hidden]
    g = zarr.open_group(str(multi), mode="r")
    assert g["parts/0000/acts"].shape[2] == 48 and g["parts/0000/sites/resid"].shape[2] == hidden
    for site in ("act", "down_in"):
        single = tmp_path / site
        build_store(single, model=str(model), data=stories, dtype="float32", site=site, batch_size=3, progress=False)
        np.testing.assert_array_equal(_site(multi, site), _site(single, site))
    resid = _site(multi, "resid")
    ex, pos = st.rows("0000", "example"), st.rows("0000", "position")
    ref = _resid_oracle(model, st.texts())
    worst = max(float(np.abs(resid[:, r] - ref[e][:, p]).max()) for r, (e, p) in enumerate(zip(ex, pos, strict=True)))
    assert worst < 1e-4


def test_single_site_store_is_version_1_unchanged(tiny_model, stories, tmp_path):
    build_store(tmp_path / "s", model=str(tiny_model), data=stories, dtype="float32", progress=False)
    meta = json.loads((tmp_path / "s" / "zarr.json").read_text())["attributes"]["vstore"]
    assert meta["format_version"] == 1 and "sites" not in meta
    assert not (tmp_path / "s" / "parts" / "0000" / "sites").exists()
    st = Store(tmp_path / "s")
    assert st.sites == ["act"] and st.site == "act" and st.n_neurons == 48
    with pytest.raises(StoreError, match="no site 'resid'"):
        st.with_site("resid")
    with pytest.raises(UsageError, match="holds no site 'attr'"):
        rank_store(tmp_path / "s", "value", "attribution", top_k=3)


def test_rank_site_picks_one_and_records_it(tiny_model, stories, tmp_path):
    build_store(tmp_path / "m", model=str(tiny_model), data=stories, dtype="float16", site="act,resid", progress=False)
    build_store(tmp_path / "r", model=str(tiny_model), data=stories, dtype="float16", site="resid", progress=False)
    build_store(tmp_path / "a", model=str(tiny_model), data=stories, dtype="float16", site="act", progress=False)
    for method in ("mean-diff", "auroc", "vape"):
        kw = {"top_rate": 0.1} if method == "vape" else {"top_k": 5}
        got = rank_store(tmp_path / "m", "value", method, site="resid", **kw)
        want = rank_store(tmp_path / "r", "value", method, **kw)
        assert got.groups == want.groups and got.data["store"]["site"] == "resid", method
        assert got.data["n_neurons"] == 32
        first = rank_store(tmp_path / "m", "value", method, **kw)  # default: the first site
        assert first.groups == rank_store(tmp_path / "a", "value", method, **kw).groups
        assert first.data["store"]["site"] == "act"
    # both sites' statistics live in the cache side by side
    assert len(Store(tmp_path / "m").stats_keys()) >= 2
    again = rank_store(tmp_path / "m", "value", "mean-diff", site="resid", top_k=5)
    assert again.from_cache and again.data["store"]["site"] == "resid"
    with pytest.raises(StoreError, match="no site 'down_in'"):
        Store(tmp_path / "m", site="down_in")


def test_cli_build_sites_and_rank_site(tiny_model, stories, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["build", "--model", str(tiny_model), "--data", str(stories), "--out", str(out), "--dtype",
                 "float32", "--site", "act,resid", "--no-progress"]) == 0
    assert main(["rank", str(out), "--by", "value", "--site", "resid", "--method", "cohen-d", "--top-k", "4",
                 "--out", str(tmp_path / "n.json"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "n.json").read_text())["store"]["site"] == "resid"
    assert main(["build", "--model", str(tiny_model), "--data", str(stories), "--out", str(tmp_path / "x"),
                 "--site", "act,bogus", "--no-progress"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["verify", str(out), "--no-progress"]) == 0
    assert main(["info", str(out)]) == 0
    assert "resid (32 x float32)" in capsys.readouterr().out


def test_killed_multi_site_build_resumes_identical(tiny_model, tmp_path):
    data = tmp_path / "many.jsonl"
    tiny_models.make_stories(data, per_value=4)
    args = [sys.executable, "-m", "vstore", "build", "--model", str(tiny_model), "--data", str(data),
            "--dtype", "float32", "--site", "act,down_in,resid", "--attribution", "ll", "--batch-size", "1",
            "--commit-every", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "--out", str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    out = tmp_path / "k"
    # stop between the chunk files of two sites (4 sites x 2 layers per write), then inside a later write
    for n in (5, 21):
        r = subprocess.run([*args, "--out", str(out)], env={**env, "VSTORE_FAULT": f"after-layer:{n}"},
                           capture_output=True)
        assert r.returncode == 99
    res = subprocess.run([*args, "--out", str(out)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumed at example" in res.stderr
    for site in ("act", "down_in", "resid", "attr"):
        np.testing.assert_array_equal(_site(out, site), _site(tmp_path / "ref", site))
    assert np.abs(_site(out, "attr")).max() > 0
    a, b = Store(out), Store(tmp_path / "ref")
    assert np.array_equal(a.rows("0000", "example"), b.rows("0000", "example"))


def test_edit_at_resid_zeroes_the_layer_output(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from vstore.hooks import Capture, Edit

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad(), Edit(model, {0: [3, 7]}, site="resid"), Capture(model, "resid", [0, 1]) as cap:
        model(input_ids=ids)
    assert float(cap.outputs[0][..., [3, 7]].abs().max()) == 0.0
    assert float(cap.outputs[0][..., 0].abs().max()) > 0.0
    with torch.no_grad(), Capture(model, "resid", [1]) as ref:
        model(input_ids=ids)
    assert not torch.equal(ref.outputs[1], cap.outputs[1])  # the edit reached the next layer


def test_ablate_a_resid_set(tiny_model, stories, eval_stories, tmp_path):
    from vstore.ablate import run_ablation

    build_store(tmp_path / "s", model=str(tiny_model), data=stories, dtype="float32", site="act,resid", progress=False)
    rank_store(tmp_path / "s", "value", "mean-diff", site="resid", top_k=3, out=tmp_path / "n.json")
    res = run_ablation(str(tiny_model), tmp_path / "n.json", eval_stories, out=tmp_path / "r.json", controls=2,
                       scorer="ll", progress=None)
    assert res["neurons"]["site"] == "resid"
    controls = [a for a in res["ablations"] if a["kind"] == "control"]
    assert len(controls) == 2 * len([a for a in res["ablations"] if a["kind"] == "target"])
    # random controls are drawn from the resid width (32 hidden dimensions), not the MLP width (48)
    assert max(n for a in res["ablations"] for _, n in a["neurons"]) < 32
