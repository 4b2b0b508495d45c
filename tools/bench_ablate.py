"""Benchmark: the ablation study's cost, threads under contention, and the Edit hooks' overhead.

By default (what ``--json`` pins under ``ratios``): ``study_speedup`` — the CPU time of a full
study (12 values, a target and 3 controls each, on a small random llama) by today's path
(``controls_on="all"``, ``prefix_mb=0``) over the default path (controls on their own items, the
unablated prefix shared), with the cells both compute compared; ``contention_slowdown`` — one
evaluation pass beside one extra busy process over the same pass alone, with the threads
``vstore.lm.choose_threads`` picks (and, for contrast, with one thread per core). Results and
commands: ``docs/performance.md`` (Ablation).

``--hooks`` also runs the original measurement below:

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


def _args(argv: list[str] | None) -> argparse.Namespace:
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
    ap.add_argument("--hooks", action="store_true", help="also time the Edit hooks' overhead (the figures above)")
    ap.add_argument("--study-layers", type=int, default=12, help="study model: layers (default 12)")
    ap.add_argument("--study-hidden", type=int, default=256, help="study model: hidden size (default 256)")
    ap.add_argument("--study-inter", type=int, default=1024, help="study model: neurons per layer (default 1024)")
    ap.add_argument("--values", type=int, default=12, help="study: values (default 12, as the benchmark)")
    ap.add_argument("--per-value", type=int, default=2, help="study: items per value and language (default 2)")
    ap.add_argument("--controls", type=int, default=3, help="study: controls per value (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="study: torch threads of both paths (default 1, steadier)")
    ap.add_argument("--no-contention", action="store_true", help="skip the pass beside a busy process")
    ap.add_argument("--contention-items", type=int, default=12, help="contention: items per timed pass (default 12)")
    return ap.parse_args(argv)


def hooks_bench(a: argparse.Namespace) -> dict[str, Any]:
    """The Edit hooks' overhead on one forward (the fields listed in the module docstring)."""
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
    return res


# ----------------------------------------------------------------------------------------------
# the study: today's path (every control on every item, every set through the whole model) vs the
# default one (controls on their group's items, the unablated prefix shared)
# ----------------------------------------------------------------------------------------------

#: lowest edited layer / layers of the 12 VAPE sets measured on Gemma 3 270M (top 1%: layers 2-6 of 18)
LOWEST_DEPTH = (2, 6, 2, 4, 5, 5, 5, 5, 4, 6, 2, 6)


def _study_files(work: Path, a: argparse.Namespace) -> tuple[Any, Path, Path]:
    """A small random llama, its tokenizer, 12 values' stories and VAPE-like neuron sets (30 per value)."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from vstore.models import load_model

    rng = np.random.default_rng(0)
    words = ["help", "neighbour", "money", "shop", "honest", "street", "village", "river", "school", "friend", "work",
             "found", "carry", "late", "rain", "promise", "share", "fair", "rule", "law"]
    zh = "邻居帮忙钱店诚实街村河学校朋友工作发现搬晚雨承诺分享公平规则法律"
    rows = []
    for v in range(a.values):
        for k in range(a.per_value):
            n = 12 + int(rng.integers(0, 30))
            for lang in ("en", "zh"):
                if lang == "en":
                    story = " ".join(rng.choice(words, n)) + "."
                    al, vio = "She helps them honestly.", "She ignores them for money."
                else:
                    story = "".join(rng.choice(list(zh), n)) + "。"
                    al, vio = "她诚实地帮助他们。", "她为了钱不理他们。"
                rows.append({"id": f"v{v:02d}-{k}-{lang}", "value": f"v{v:02d}", "lang": lang, "split": "evaluation",
                             "story": story, "aligned": al, "violating": vio})
    data = work / "eval.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([r["story"] + r["aligned"] + r["violating"] for r in rows],
                            trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    cfg = AutoConfig.for_model("llama", hidden_size=a.study_hidden, intermediate_size=a.study_inter,
                               num_hidden_layers=a.study_layers, num_attention_heads=4, num_key_value_heads=2,
                               vocab_size=len(fast), max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(work / "model")
    fast.save_pretrained(work / "model")
    lm = load_model(str(work / "model"))
    L, groups = a.study_layers, {}
    for v in range(a.values):
        lo = max(1, round(L * LOWEST_DEPTH[v % len(LOWEST_DEPTH)] / 18))
        lay = np.sort(np.concatenate([[lo], rng.integers(lo, L, 29)]))
        neu = rng.choice(a.study_inter, 30, replace=False)
        groups[f"v{v:02d}"] = [{"layer": int(x), "neuron": int(n), "score": 1.0} for x, n in zip(lay, neu, strict=True)]
    doc = {"format": {"name": "vstore-neurons", "version": 1}, "model": lm.identity.to_json(),
           "store": {"path": "store", "site": "act"}, "method": "bench", "params": {}, "groups": groups}
    nfile = work / "neurons.json"
    nfile.write_text(json.dumps(doc), encoding="utf-8")
    return lm, data, nfile


def _max_cell_diff(full: dict[str, Any], cheap: dict[str, Any]) -> tuple[float, int]:
    worst, n = 0.0, 0
    for f, c in zip(full["ablations"], cheap["ablations"], strict=True):
        fc = {(r["value"], r["lang"]): r for r in f["breakdown"]}
        for r in c["breakdown"]:
            if r["value"] == "*" and c["items_on"] == "own":
                continue
            for key in ("delta", "margin_delta"):
                worst = max(worst, abs(r[key] - fc[(r["value"], r["lang"])][key]))
            n += 1
    return worst, n


def study_bench(a: argparse.Namespace) -> dict[str, Any]:
    """CPU time of the full study by today's path and by the default one, on the same cells."""
    import tempfile

    from vstore.ablate import run_ablation

    with tempfile.TemporaryDirectory() as tmp:
        lm, data, nfile = _study_files(Path(tmp), a)
        kw = {"controls": a.controls, "progress": False, "threads": a.threads, "on_note": lambda m: None}
        run_ablation(lm, nfile, data, None, groups=["v00"], controls=0, progress=False, threads=a.threads)  # warm-up
        runs = {}
        for name, extra in (("today", {"controls_on": "all", "prefix_mb": 0}), ("default", {})):
            c0, w0 = time.process_time(), time.perf_counter()
            res = run_ablation(lm, nfile, data, None, **kw, **extra)  # type: ignore[arg-type]
            runs[name] = (res, time.process_time() - c0, time.perf_counter() - w0)
    (full, cpu_old, wall_old), (cheap, cpu_new, wall_new) = runs["today"], runs["default"]
    diff, n_cells = _max_cell_diff(full, cheap)
    out = {"study_model": f"llama {a.study_layers} x {a.study_inter}, hidden {a.study_hidden}",
           "study_values": a.values, "study_items": full["baseline"]["n_items"], "study_controls": a.controls,
           "study_threads": a.threads, "study_cpu_s_today": cpu_old, "study_cpu_s_default": cpu_new,
           "study_wall_s_today": wall_old, "study_wall_s_default": wall_new,
           "study_item_passes_today": full["cost"]["item_passes"], "study_item_passes_default": cheap["cost"]["item_passes"],
           "study_prefix_replays": cheap["cost"]["prefix_replays"], "study_cells_compared": n_cells,
           "study_max_cell_diff": diff}
    print(f"study ({out['study_model']}, {a.values} values, {out['study_items']} items, {a.controls} controls, "
          f"{a.threads} thread(s)): today {cpu_old:.1f} s CPU ({out['study_item_passes_today']} item passes), "
          f"default {cpu_new:.1f} s CPU ({out['study_item_passes_default']} item passes, "
          f"{out['study_prefix_replays']} forwards from the shared prefix) -> {cpu_old / cpu_new:.2f}x; "
          f"{n_cells} common cells, largest difference {diff:.1e}")
    return out


def contention_bench(a: argparse.Namespace) -> dict[str, Any]:
    """One evaluation pass alone and beside one busy process, with the chosen and with all threads."""
    import os
    import subprocess
    import tempfile

    import torch

    from vstore.ablate import load_eval_items
    from vstore.evaluate import score_items
    from vstore.lm import choose_threads, others_busy

    cores = len(os.sched_getaffinity(0))
    background = others_busy(1.0)
    with tempfile.TemporaryDirectory() as tmp:
        lm, data, _ = _study_files(Path(tmp), a)
        stories = load_eval_items(data, "evaluation", "vc", a.contention_items).stories or []

        def one_pass(threads: int) -> float:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            score_items(lm.model, lm.tokenizer, stories, "ll")
            return time.perf_counter() - t0

        one_pass(cores)  # warm-up
        chosen_alone = choose_threads()
        alone = {"chosen": one_pass(chosen_alone), "all": one_pass(cores)}
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(1.0)
            chosen_busy = choose_threads()
            beside = {"chosen": one_pass(chosen_busy), "all": one_pass(cores)}
        finally:
            busy.kill()
            busy.wait()
    out = {"cores": cores, "background_busy_cores": background, "threads_chosen_alone": chosen_alone,
           "threads_chosen_beside_busy": chosen_busy, "pass_s_alone": alone["chosen"], "pass_s_beside_busy": beside["chosen"],
           "pass_s_alone_all_threads": alone["all"], "pass_s_beside_busy_all_threads": beside["all"]}
    print(f"contention ({cores} cores, {background:.1f} already busy): one pass alone {alone['chosen']:.2f} s "
          f"({chosen_alone} threads), beside a busy process {beside['chosen']:.2f} s ({chosen_busy} threads) -> "
          f"{beside['chosen'] / alone['chosen']:.2f}x; with all {cores} threads {alone['all']:.2f} s -> "
          f"{beside['all']:.2f} s ({beside['all'] / alone['all']:.2f}x)")
    return out


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    res: dict[str, Any] = hooks_bench(a) if a.hooks else {}
    res.update(study_bench(a))
    ratios = {"study_speedup": res["study_cpu_s_today"] / res["study_cpu_s_default"],
              "study_wall_speedup": res["study_wall_s_today"] / res["study_wall_s_default"]}
    if not a.no_contention:
        res.update(contention_bench(a))
        ratios["contention_slowdown"] = res["pass_s_beside_busy"] / res["pass_s_alone"]
        ratios["contention_slowdown_all_threads"] = res["pass_s_beside_busy_all_threads"] / res["pass_s_alone_all_threads"]
        ratios["all_threads_vs_chosen_beside_busy"] = res["pass_s_beside_busy_all_threads"] / res["pass_s_beside_busy"]
    res["ratios"] = ratios
    res["targets"] = {"study_speedup": 3.0, "contention_slowdown": res.get("cores", 2) / max(res.get("cores", 2) - 1, 1)}
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
