"""vstore beside the tools people reach for: capture every layer's MLP activation to disk, then rank.

Usage (the peers come from the ``bench`` extra; run with a Python that has them)::

    python tools/bench_peers.py [--out DIR] [--limit 48] [--layers 6] [--hidden 256] [--inter 1024]
                                [--batch-size 8] [--max-length 256] [--skip nnsight,...] [--json FILE]

One run, one model, one set of texts, one machine. The model is a random-initialised Llama
(``--layers`` x ``--hidden``, MLP width ``--inter``; a byte-level BPE tokenizer trained on the
texts), saved as a local folder every peer loads. The texts are ``--limit`` evenly spaced stories of
the packaged sample (``data/sample.jsonl``, so every value is present), each once with its aligned and once with its violating
action, exactly as ``vstore build`` feeds them (read back from its store). The captured site is the
input of each layer's down projection (``act_fn(gate) * up``), which every peer names: vstore
``--site down_in``, TransformerLens ``blocks.{i}.mlp.hook_post``, nnsight ``mlp.down_proj.input``,
a forward pre-hook on ``mlp.down_proj``. Every capture stores float16 rows of the text tokens (no
special tokens, no padding) and runs alone in a child process:

``vstore``      ``vstore.build.build_store(site="down_in")``: a Zarr store, written by its writer thread;
``nnsight``     ``LanguageModel.trace`` saving each layer's input, each batch written with ``np.save``;
``transformer_lens``  ``TransformerBridge.run_with_cache(names_filter=...hook_post)``, then ``np.save``;
``hooks``       hand-written forward pre-hooks writing into one preallocated ``np.memmap``.

Reported per capture: ``tokens_per_s`` (rows / wall seconds from model load to the last byte written),
``peak_rss_bytes`` (the child's VmHWM), ``bytes_on_disk``, ``rankable_out_of_core`` (a note).
Then the same groups (the story's value) are ranked: ``vstore`` (``rank_store(..., "welch-t")``,
no cache), ``numpy_memmap`` (a hand-written loop over the hooks' memmap: per layer and row chunk,
per-group sum, sum of squares, > 0 count), ``xarray`` (``xr.open_zarr`` on the store + dask + flox
``groupby("value")`` mean and var). Each reports ``seconds`` and ``gb_per_s`` (activation bytes /
seconds). A step that fails or whose package is missing is recorded in ``errors`` and the run
goes on.

JSON (``--json FILE``): ``config`` (model shape, texts, rows, batch size, max length, cpu_count,
versions), ``capture`` (method -> figures above), ``rank`` (method -> figures above),
``ratios`` (``vstore_vs_<peer>_tokens_per_s``, ``vstore_vs_<peer>_rank``), ``errors``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

CAPTURES = ("vstore", "nnsight", "transformer_lens", "hooks")
OUT_OF_CORE = {
    "vstore": "yes: `vstore rank` streams the store, labels and row index included",
    "nnsight": "by hand: np.load(mmap_mode='r') per batch file; no labels or row index stored",
    "transformer_lens": "by hand: np.load(mmap_mode='r') per batch file; no labels or row index stored",
    "hooks": "by hand: one np.memmap (layers, rows, neurons); the row index is ours to keep",
}


def make_model(folder: Path, texts: list[str], layers: int, hidden: int, inter: int) -> None:
    """A random-initialised Llama and its tokenizer, saved to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import make_tokenizer

    tok = make_tokenizer(folder, extra_corpus=tuple(texts))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model.save_pretrained(str(folder), safe_serialization=True)


def batches(tok: Any, texts: list[str], batch_size: int, max_length: int) -> Any:
    """(input_ids, attention_mask, keep) per batch: right-padded, so padding never changes a text's
    tokens (causal attention); ``keep`` marks the text tokens (not special, not padding)."""
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length, return_special_tokens_mask=True)
        keep = (enc["attention_mask"] == 1) & (enc["special_tokens_mask"] == 0)
        yield enc["input_ids"], enc["attention_mask"], keep.numpy()


def child(method: str, model_dir: Path, work: Path, texts_file: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """One capture, timed from model load to the last byte written."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    texts = [] if method == "vstore" else json.loads(texts_file.read_text())["texts"]
    out = work / method
    t0 = time.perf_counter()
    rows = 0
    if method == "vstore":
        from vstore.build import build_store
        from vstore.store import Store

        build_store(out, model=str(model_dir), data=str(work / "stories.jsonl"), split=None,
                    texts=("aligned", "violating"), site="down_in", batch_size=cfg["batch_size"],
                    max_length=cfg["max_length"], overwrite=True)
        rows = Store(out).n_rows
    else:
        out.mkdir(parents=True, exist_ok=True)
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        tok.padding_side = "right"
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        layers = model.model.layers
        if method == "hooks":
            rows = _hooks(model, tok, texts, out, cfg)
        elif method == "nnsight":
            from nnsight import LanguageModel

            lm = LanguageModel(model, tokenizer=tok)
            for b, (ids, mask, keep) in enumerate(batches(tok, texts, cfg["batch_size"], cfg["max_length"])):
                saved: list[Any] = []
                with lm.trace({"input_ids": ids, "attention_mask": mask}):
                    for layer in lm.model.layers:
                        saved.append(layer.mlp.down_proj.input.save())
                acts = np.stack([s.detach().numpy()[keep] for s in saved]).astype(np.float16)
                np.save(out / f"batch{b:05d}.npy", acts)
                rows += acts.shape[1]
        elif method == "transformer_lens":
            from transformer_lens.model_bridge import TransformerBridge

            bridge = TransformerBridge.boot_transformers(str(model_dir), hf_model=model, tokenizer=tok, device="cpu")
            names = {f"blocks.{i}.mlp.hook_post" for i in range(len(layers))}
            for b, (ids, _mask, keep) in enumerate(batches(tok, texts, cfg["batch_size"], cfg["max_length"])):
                _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n in names)
                acts = np.stack([cache[f"blocks.{i}.mlp.hook_post"].numpy()[keep]
                                 for i in range(len(layers))]).astype(np.float16)
                np.save(out / f"batch{b:05d}.npy", acts)
                rows += acts.shape[1]
                del cache
        else:
            raise ValueError(method)
    seconds = time.perf_counter() - t0
    hwm = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"seconds": seconds, "rows": rows, "tokens_per_s": rows / seconds, "peak_rss_bytes": hwm,
            "bytes_on_disk": size, "rankable_out_of_core": OUT_OF_CORE[method]}


def _hooks(model: Any, tok: Any, texts: list[str], out: Path, cfg: dict[str, Any]) -> int:
    """Forward pre-hooks on every down projection, written into one preallocated memmap."""
    layers = model.model.layers
    enc = [keep for _, _, keep in batches(tok, texts, cfg["batch_size"], cfg["max_length"])]
    n_rows = int(sum(k.sum() for k in enc))
    n = model.config.intermediate_size
    mm = np.lib.format.open_memmap(out / "acts.npy", mode="w+", dtype=np.float16, shape=(len(layers), n_rows, n))
    example = np.lib.format.open_memmap(out / "example.npy", mode="w+", dtype=np.int64, shape=(n_rows,))
    state = {"keep": None, "r0": 0}

    def hook(i: int) -> Any:
        def fn(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().numpy()[state["keep"]]
            mm[i, state["r0"] : state["r0"] + x.shape[0]] = x
        return fn

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for b, (ids, mask, keep) in enumerate(batches(tok, texts, cfg["batch_size"], cfg["max_length"])):
            state["keep"] = keep
            model.model(input_ids=ids, attention_mask=mask)
            k = int(keep.sum())
            example[state["r0"] : state["r0"] + k] = (b * cfg["batch_size"] + np.nonzero(keep)[0])
            state["r0"] += k
    finally:
        for h in handles:
            h.remove()
    mm.flush()
    example.flush()
    return n_rows


def numpy_memmap_rank(folder: Path, codes: np.ndarray, n_groups: int, step: int = 4096) -> None:
    """Per layer and row chunk of the hooks' memmap: per-group sums, sums of squares, > 0 counts."""
    acts = np.load(folder / "acts.npy", mmap_mode="r")
    grp = codes[np.load(folder / "example.npy")]
    L, T, N = acts.shape
    s, q, c = (np.zeros((L, n_groups, N)) for _ in range(3))
    for li in range(L):
        for r0 in range(0, T, step):
            x = np.asarray(acts[li, r0 : r0 + step], dtype=np.float32)
            g = grp[r0 : r0 + step]
            for gi in range(n_groups):
                xs = x[g == gi]
                s[li, gi] += xs.sum(axis=0, dtype=np.float64)
                q[li, gi] += (xs.astype(np.float64) ** 2).sum(axis=0)
                c[li, gi] += (xs > 0).sum(axis=0)


def run_child(method: str, args: argparse.Namespace, model_dir: Path, texts_file: Path) -> dict[str, Any]:
    res = Path(args.out) / f"{method}.result.json"
    cmd = [sys.executable, __file__, "--child", method, "--out", args.out, "--limit", str(args.limit),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0 or not res.exists():
        raise RuntimeError((done.stderr or done.stdout).strip().splitlines()[-1] if (done.stderr or done.stdout)
                           else f"exit {done.returncode}")
    return json.loads(res.read_text())  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/vstore-bench-peers")
    p.add_argument("--limit", type=int, default=48, help="stories of the sample (each gives two texts)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--timeout", type=int, default=600, help="seconds per capture child")
    p.add_argument("--skip", default="", help="comma-separated: nnsight,transformer_lens,hooks,numpy_memmap,xarray")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    out = Path(a.out)
    model_dir, texts_file = out / "model", out / "texts.json"
    cfg = {"limit": a.limit, "batch_size": a.batch_size, "max_length": a.max_length}
    if a.child:
        result = child(a.child, model_dir, out, texts_file, cfg)
        (out / f"{a.child}.result.json").write_text(json.dumps(result))
        return 0
    return _parent(a, out, model_dir, texts_file)


def _parent(a: argparse.Namespace, out: Path, model_dir: Path, texts_file: Path) -> int:
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    out.mkdir(parents=True, exist_ok=True)
    lines = [line for line in (ROOT / "data" / "sample.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = lines[:: max(1, len(lines) // a.limit)][: a.limit]  # evenly spaced: every value is present
    (out / "stories.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    stories = [json.loads(line) for line in lines]
    if not (model_dir / "config.json").exists():
        corpus = [s[k] for s in stories for k in ("story", "aligned", "violating")]
        make_model(model_dir, corpus, a.layers, a.hidden, a.inter)
    report: dict[str, Any] = {"capture": {}, "rank": {}, "errors": {}}

    def capture(method: str) -> None:
        try:
            r = run_child(method, a, model_dir, texts_file)
        except Exception as e:  # a peer that cannot install or run is a row of the table, not the end
            report["errors"][method] = f"{type(e).__name__}: {e}"
            print(f"{method:>18}: failed: {report['errors'][method]}", flush=True)
            return
        report["capture"][method] = r
        print(f"{method:>18}: {r['tokens_per_s']:9.0f} tokens/s  peak RSS {r['peak_rss_bytes'] / 1e6:6.0f} MB  "
              f"{r['bytes_on_disk'] / 1e6:7.1f} MB on disk  ({r['seconds']:.1f} s, {r['rows']} rows)", flush=True)

    capture("vstore")
    if "vstore" not in report["capture"]:
        print("vstore build failed: nothing to compare", flush=True)
        return 1
    import zarr

    store = out / "vstore"
    g = zarr.open_group(str(store), mode="r")
    texts = [str(t) for t in np.asarray(g["examples/text"][:])]
    codes = np.asarray(g["examples/value"][:]).astype(np.int64)
    n_groups = len(g["examples/value"].attrs["categories"])
    texts_file.write_text(json.dumps({"texts": texts}, ensure_ascii=False))
    for method in CAPTURES[1:]:
        if method not in skip:
            capture(method)
    _rank(report, store, out / "hooks", codes, n_groups, skip)
    _finish(report, a, texts, n_groups)
    return 0


def _rank(report: dict[str, Any], store: Path, hooks: Path, codes: np.ndarray, n_groups: int, skip: set[str]) -> None:
    from bench_rank import xarray_route

    from vstore.rank import rank_store
    from vstore.store import ITEMSIZE, Store

    st = Store(store)
    nbytes = st.n_rows * len(st.layers) * st.n_neurons * ITEMSIZE[st.dtype]
    steps = {"vstore": lambda: rank_store(store, "value", "welch-t", use_cache=False, top_k=10),
             "numpy_memmap": lambda: numpy_memmap_rank(hooks, codes, n_groups),
             "xarray": lambda: xarray_route(store)}
    for name, fn in steps.items():
        if name in skip or (name == "numpy_memmap" and "hooks" not in report["capture"]):
            continue
        try:
            fn()  # warm: page cache, imports, Numba/dask start-up
            t = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t
        except Exception as e:
            report["errors"][f"rank_{name}"] = f"{type(e).__name__}: {e}"
            print(f"{'rank ' + name:>18}: failed: {e}", flush=True)
            continue
        report["rank"][name] = {"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9}
        print(f"{'rank ' + name:>18}: {nbytes / seconds / 1e9:7.3f} GB/s  ({seconds:.2f} s)", flush=True)
    report["rank_bytes"] = nbytes


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "nnsight", "transformer-lens", "xarray", "dask", "flox", "zarr", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _finish(report: dict[str, Any], a: argparse.Namespace, texts: list[str], n_groups: int) -> None:
    cap, rank = report["capture"], report["rank"]
    ratios: dict[str, float] = {}
    for m in CAPTURES[1:]:
        if m in cap:
            ratios[f"vstore_vs_{m}_tokens_per_s"] = cap["vstore"]["tokens_per_s"] / cap[m]["tokens_per_s"]
    for m in ("numpy_memmap", "xarray"):
        if m in rank and "vstore" in rank:
            ratios[f"vstore_vs_{m}_rank"] = rank["vstore"]["gb_per_s"] / rank[m]["gb_per_s"]
    report["ratios"] = ratios
    report["config"] = {"model": {"family": "llama (random-initialised)", "layers": a.layers, "hidden": a.hidden,
                                  "intermediate": a.inter}, "texts": len(texts), "groups": n_groups,
                        "rows": cap["vstore"]["rows"], "batch_size": a.batch_size, "max_length": a.max_length,
                        "cpu_count": os.cpu_count(), "versions": _versions()}
    for k, v in ratios.items():
        print(f"{k:>36}: {v:6.2f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
