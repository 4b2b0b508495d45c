"""Benchmark `vstore build`: capture overhead over a plain forward, and memory as data grows.

Usage::

    python tools/bench_build.py [--model gemma3-270m] [--examples 48] [--repeats 2] [--json FILE]

In one process, on the same batches of the bundled stories: a plain forward that stops after the
same last layer (no capture hooks, nothing copied or written), then ``build_store`` (capture, row
selection, device-to-host copies, writer thread, Zarr writes), alternated ``--repeats`` times; the
median of each is reported. Each build writes a new store (the last one is removed after its
timing: deleting an old store is not capture overhead). Then two separate ``vstore build``
processes over N and 4N examples report their peak RSS.

JSON figures (``--json FILE``):

``model``, ``examples``, ``tokens``
    what was measured
``plain_tokens_per_s``, ``build_tokens_per_s``
    median throughput of each
``plain_runs_tokens_per_s``, ``build_runs_tokens_per_s``
    each repeat's throughput, in the order run (plain and build alternate)
``capture_overhead``
    ``plain_tokens_per_s / build_tokens_per_s - 1`` (build time / plain forward time - 1 over the same
    tokens; issue 12's target <= 0.03)
``capture_overhead_pairs``
    each repeat's build seconds over the plain forward's seconds just before it, ``- 1`` (adjacent in
    time, so a machine that slows down or speeds up within the run moves both)
``capture_overhead_interval``
    a paired percentile bootstrap 95% interval (pairs resampled) of total build seconds over total
    plain seconds ``- 1``: how far this run's figure can be trusted on a machine this noisy (with
    two repeats it is wide; it is not the pinned figure, which is a ratio of medians)
``ratios``
    the pinned key ``capture_overhead`` (the same figure), so later runs can be compared
``rss_small_mb``, ``rss_large_mb``, ``rss_growth``
    peak RSS of whole build processes over N and 4N examples, and ``large / small - 1`` (target < 0.10).
    These runs truncate texts to ``--rss-max-length`` tokens (default 64, shorter than any bundled
    story) so every batch has the same shape: the peak then shows what grows with the data, not
    the length of the longest batch that happens to be drawn.
``store_bytes_small``, ``store_bytes_large``
    activation bytes each wrote
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def plain_forward(lm, examples, batch_size: int, max_length: int, last_layer: int) -> tuple[float, int]:
    """Seconds and tokens of a forward over the same batches, stopped after ``last_layer``."""
    import torch

    from vstore.hooks import StopForward, run_until_stop
    from vstore.models import decoder_layers

    def stop(*_a):
        raise StopForward

    handle = decoder_layers(lm.model)[last_layer].register_forward_hook(stop)
    tok = lm.tokenizer
    tok.padding_side = "right"
    tokens = 0
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for b0 in range(0, len(examples), batch_size):
                enc = tok([e.text for e in examples[b0 : b0 + batch_size]], padding=True, truncation=True,
                          max_length=max_length, return_special_tokens_mask=True, return_tensors="pt")
                special = enc.pop("special_tokens_mask")
                run_until_stop(lm.model, **enc)
                tokens += int((enc["attention_mask"].bool() & ~special.bool()).sum())
    finally:
        handle.remove()
    return time.perf_counter() - t0, tokens


def rss_of_build(model: str, data: Path, limit: int, batch_size: int, max_length: int, out: Path) -> tuple[float, int]:
    """Peak RSS (MB) of a separate `vstore build` process, and the bytes its store holds."""
    code = (
        "import resource, sys, json; from vstore.build import build_store; "
        f"r = build_store({str(out)!r}, model={model!r}, data={str(data)!r}, limit={limit}, "
        f"batch_size={batch_size}, max_length={max_length}, progress=False, overwrite=True); "
        "print(json.dumps([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, r.bytes_written]))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    rss_kb, nbytes = json.loads(res.stdout.strip().splitlines()[-1])
    return rss_kb / 1024, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--data", default=None, help="story file (default: the bundled benchmark)")
    ap.add_argument("--examples", type=int, default=48, help="N: examples for the timing and the small RSS run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rss-max-length", type=int, default=64, help="token cap for the RSS runs (same-shape batches)")
    ap.add_argument("--no-rss", action="store_true", help="skip the two peak-RSS build processes")
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args()

    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from vstore.build import build_store
    from vstore.data import bundled_stories, load_examples
    from vstore.inference import bootstrap_interval
    from vstore.models import load_model

    data = Path(a.data) if a.data else bundled_stories()
    lm = load_model(a.model)
    examples = load_examples(data, limit=a.examples)
    last = lm.identity.n_layers - 1
    plain, build, tokens = [], [], 0
    plain_s: list[float] = []
    build_s: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        plain_forward(lm, examples[: a.batch_size], a.batch_size, a.max_length, last)  # warm-up
        for i in range(a.repeats):
            sec, tokens = plain_forward(lm, examples, a.batch_size, a.max_length, last)
            plain.append(tokens / sec)
            plain_s.append(sec)
            out = Path(tmp) / f"s{i}"  # a new store: removing the last one is not part of a build
            r = build_store(out, model=lm, data=data, limit=a.examples, batch_size=a.batch_size,
                            max_length=a.max_length, progress=False)
            build.append(r.tokens / r.seconds)
            build_s.append(r.seconds)
            shutil.rmtree(out)
        rss_s = rss_l = float("nan")
        bytes_s = bytes_l = 0
        if not a.no_rss:
            rss_s, bytes_s = rss_of_build(a.model, data, a.examples, a.batch_size, a.rss_max_length, Path(tmp) / "small")
            rss_l, bytes_l = rss_of_build(a.model, data, 4 * a.examples, a.batch_size, a.rss_max_length,
                                          Path(tmp) / "large")
    figs = {
        "model": a.model, "examples": a.examples, "tokens": tokens,
        "plain_tokens_per_s": statistics.median(plain), "build_tokens_per_s": statistics.median(build),
        "plain_runs_tokens_per_s": plain, "build_runs_tokens_per_s": build,
        "rss_small_mb": rss_s, "rss_large_mb": rss_l, "store_bytes_small": bytes_s, "store_bytes_large": bytes_l,
    }
    figs["capture_overhead"] = figs["plain_tokens_per_s"] / figs["build_tokens_per_s"] - 1
    figs["capture_overhead_pairs"] = [b / p - 1 for p, b in zip(plain_s, build_s, strict=True)]
    lo, hi = bootstrap_interval(np.array(plain_s), np.array(build_s), np.random.default_rng(0),
                                weights=np.array(plain_s))
    figs["capture_overhead_interval"] = [lo, hi]
    figs["rss_growth"] = rss_l / rss_s - 1
    figs["ratios"] = {"capture_overhead": figs["capture_overhead"]}
    t = Table(title=f"vstore build vs plain forward ({a.model}, {a.examples} examples, {tokens} tokens)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("plain forward to last layer", f"{figs['plain_tokens_per_s']:,.0f} tok/s")
    t.add_row("vstore build", f"{figs['build_tokens_per_s']:,.0f} tok/s")
    t.add_row("capture overhead (target <= 3%)", f"{figs['capture_overhead']:+.1%}")
    t.add_row("  each pair (build / the plain forward before it - 1)",
              ", ".join(f"{x:+.1%}" for x in figs["capture_overhead_pairs"]))
    t.add_row("  95% interval over pairs (total build / total plain - 1)", f"{lo:+.1%} .. {hi:+.1%}")
    if a.no_rss:
        t.add_row("peak RSS", "not measured (--no-rss)")
    else:
        t.add_row(f"peak RSS, {a.examples} examples", f"{rss_s:,.0f} MB ({bytes_s / 1e6:,.0f} MB stored)")
        t.add_row(f"peak RSS, {4 * a.examples} examples", f"{rss_l:,.0f} MB ({bytes_l / 1e6:,.0f} MB stored)")
        t.add_row("RSS growth at 4x data (target < 10%)", f"{figs['rss_growth']:+.1%}")
    Console().print(t)
    if a.json:
        Path(a.json).write_text(json.dumps(figs, indent=1))


if __name__ == "__main__":
    main()
