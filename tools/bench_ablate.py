"""Benchmark: the cost of ablation hooks (vstore.hooks.Edit) on a model's forward pass.

Runs the same batches through the model unhooked and under ``Edit`` in each mode (``zero``, ``mean``,
``scale``). Each round times the unhooked forward and then each hooked one right after it (the
order of the hooked variants rotates), so machine noise hits a pair alike; the overhead of a mode
is the median over rounds of (hooked / unhooked) - 1. On a shared machine whole-forward timings
are noisy, so the hook's own cost is also measured in isolation: the capture-site modules called
on an activation-shaped tensor with and without the hook, summed over layers, divided by the
median unhooked forward (``isolated_*``). Target: overhead <= 5%.

The forward is the one the scorers run (:mod:`vstore.evaluate`): the base model (decoder stack and
final norm) without the output head, which is the stricter comparison; ``--full`` times the whole
causal LM including the logits over the vocabulary.

Usage::

    python tools/bench_ablate.py                       # synthetic Gemma-3-270M-shaped llama, random weights
    python tools/bench_ablate.py --model gemma3-270m   # the packaged model (dequantized once, cached)
    python tools/bench_ablate.py --json bench.json --batch-size 8 --seq-len 256 --neurons 0.01

JSON fields (``--json FILE``):

``device``, ``threads``, ``model`` (spec or ``synthetic``), ``architecture``, ``n_layers``,
``n_neurons``, ``batch_size``, ``seq_len``, ``full`` (bool), ``neurons_per_layer`` (ablated per
layer), ``repeats``, ``warmup``, ``base_ms`` (median unhooked forward, milliseconds), ``zero_ms``,
``mean_ms``, ``scale_ms`` (median hooked forwards), ``overhead_zero``, ``overhead_mean``,
``overhead_scale`` (median over rounds of hooked / unhooked - 1), ``overhead_max`` (the largest of
them), ``isolated_zero_ms``, ``isolated_mean_ms``, ``isolated_scale_ms`` (the hooks' own time per
forward, all layers), ``isolated_overhead_zero``, ``isolated_overhead_mean``,
``isolated_overhead_scale`` (that time / ``base_ms``), ``target_overhead`` (0.05), ``meets_target``
(bool: ``overhead_max`` <= target), ``isolated_meets_target`` (bool: the largest isolated overhead <=
target), ``samples_ms`` (every forward timing per variant).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 0.05


def _synthetic(layers: int, hidden: int, inter: int, vocab: int) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=vocab,
                               max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _isolated(model: Any, neurons: dict[int, Any], means: dict[int, Any], shape: Any, repeats: int,
              sync: Any) -> dict[str, float]:
    """The hooks' own time per forward (ms, all layers): capture-site modules with minus without Edit."""
    import torch

    from vstore.hooks import Edit
    from vstore.models import capture_modules

    mods = capture_modules(model, "act")
    n = next(iter(means.values())).shape[0]
    x = torch.randn(*shape, n, dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)

    def call_all() -> float:
        sync()
        t0 = time.perf_counter()
        for _i, m, _k in mods:
            m(x)
        sync()
        return (time.perf_counter() - t0) * 1e3

    out = {}
    for mode, kw in (("zero", {}), ("mean", {"means": means}), ("scale", {"factor": 0.5})):
        diffs = []
        for _ in range(repeats):
            plain = call_all()
            with Edit(model, neurons, mode=mode, **kw):
                diffs.append(call_all() - plain)
        out[mode] = max(0.0, statistics.median(diffs))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="synthetic", help="'synthetic' (default) or a vstore model spec (alias, folder)")
    ap.add_argument("--layers", type=int, default=18, help="synthetic model: layers (default 18, as Gemma 3 270M)")
    ap.add_argument("--hidden", type=int, default=640, help="synthetic model: hidden size (default 640)")
    ap.add_argument("--inter", type=int, default=2048, help="synthetic model: neurons per layer (default 2048)")
    ap.add_argument("--vocab", type=int, default=32000, help="synthetic model: vocabulary (default 32000)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--neurons", type=float, default=0.01, help="ablated per layer: a fraction (<1) or a count")
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="time the whole causal LM (with logits), not the base model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    a = ap.parse_args(argv)

    import torch

    from vstore.hooks import Edit
    from vstore.models import _architecture, _n_neurons, decoder_layers, load_model

    if a.model == "synthetic":
        model = _synthetic(a.layers, a.hidden, a.inter, a.vocab).to(a.device)
    else:
        model = load_model(a.model, device=a.device).model
    arch = _architecture(model.config)
    layers = decoder_layers(model, arch)
    n_neurons = _n_neurons(layers[0], arch)
    k = int(a.neurons) if a.neurons >= 1 else max(1, round(a.neurons * n_neurons))
    gen = torch.Generator().manual_seed(0)
    neurons = {i: torch.randperm(n_neurons, generator=gen)[:k].sort().values for i in range(len(layers))}
    means = {i: torch.randn(n_neurons, generator=gen) for i in range(len(layers))}
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (a.batch_size, a.seq_len), generator=gen).to(a.device)
    mask = torch.ones_like(ids)
    fwd = model if a.full else model.base_model

    def sync() -> None:
        if str(a.device).startswith("cuda"):
            torch.cuda.synchronize()

    def run(variant: str) -> float:
        ctx: Any
        if variant == "base":
            ctx = None
        elif variant == "mean":
            ctx = Edit(model, neurons, mode="mean", means=means)
        elif variant == "scale":
            ctx = Edit(model, neurons, mode="scale", factor=0.5)
        else:
            ctx = Edit(model, neurons, mode="zero")
        sync()
        t0 = time.perf_counter()
        if ctx is None:
            fwd(input_ids=ids, attention_mask=mask)
        else:
            with ctx:
                fwd(input_ids=ids, attention_mask=mask)
        sync()
        return (time.perf_counter() - t0) * 1e3

    variants = ["base", "zero", "mean", "scale"]
    hooked = variants[1:]
    samples: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in hooked}
    with torch.inference_mode():
        for _ in range(a.warmup):
            for v in variants:
                run(v)
        for r in range(a.repeats):
            for v in hooked[r % 3:] + hooked[: r % 3]:
                base = run("base")
                t = run(v)
                samples["base"].append(base)
                samples[v].append(t)
                ratios[v].append(t / base)
        iso = _isolated(model, neurons, means, ids.shape, a.repeats * 5, sync)
    med = {v: statistics.median(s) for v, s in samples.items()}
    over = {v: statistics.median(ratios[v]) - 1 for v in hooked}
    iso_over = {v: iso[v] / med["base"] for v in hooked}
    res = {
        "device": str(a.device), "threads": torch.get_num_threads(), "model": a.model, "architecture": arch,
        "n_layers": len(layers), "n_neurons": n_neurons, "batch_size": a.batch_size, "seq_len": a.seq_len,
        "full": a.full, "neurons_per_layer": k, "repeats": a.repeats, "warmup": a.warmup,
        "base_ms": med["base"], "zero_ms": med["zero"], "mean_ms": med["mean"], "scale_ms": med["scale"],
        "overhead_zero": over["zero"], "overhead_mean": over["mean"], "overhead_scale": over["scale"],
        "overhead_max": max(over.values()),
        **{f"isolated_{v}_ms": iso[v] for v in hooked},
        **{f"isolated_overhead_{v}": iso_over[v] for v in hooked},
        "target_overhead": TARGET, "meets_target": max(over.values()) <= TARGET,
        "isolated_meets_target": max(iso_over.values()) <= TARGET,
        "samples_ms": samples,
    }
    print(f"{arch} {len(layers)} layers x {n_neurons} neurons, batch {a.batch_size} x {a.seq_len} tokens, "
          f"{k} neurons/layer ablated, {a.device}, {torch.get_num_threads()} threads, {'full LM' if a.full else 'base model'}")
    print(f"  unhooked forward  {med['base']:9.1f} ms (median of {len(samples['base'])})")
    for v in hooked:
        print(f"  Edit {v:<5}        {med[v]:9.1f} ms  overhead {over[v]:+.1%} (median paired ratio); "
              f"hooks alone {iso[v]:7.2f} ms = {iso_over[v]:+.2%}")
    print(f"  target overhead <= {TARGET:.0%}: paired {'met' if res['meets_target'] else 'NOT met'}, "
          f"isolated {'met' if res['isolated_meets_target'] else 'NOT met'}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
