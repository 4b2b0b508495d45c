"""The GPU check behind tools/gpu_check.sh: the CUDA kernel against the PyTorch path and the CPU kernels,
then build and rank throughput, printed as one markdown table.

Usage::

    python tools/gpu_check.py [--device cuda|cpu] [--quick] [--json FILE]

``--device cpu --quick`` runs the same code on small sizes without a GPU (what ``gpu_check.sh
--dry-run`` does): the CUDA rows then say that the kernel is not available.

Checks (exit status 1 on any mismatch): for float16, bfloat16 and float32 blocks with NaN/Inf, -1
rows, empty groups, one row, an unaligned block and a large block, :func:`vstore.cuda_stats.update_moments`
(CUDA), :func:`vstore.cuda_stats.update_moments_torch` (on the device) and
:func:`vstore.kernels.accumulate_moments` (CPU) agree: counts exactly, sums within 1e-12 of the
column's absolute sum.

Measures:

``build``
    tokens/s of the build's device side on a random-initialised model with Gemma 3 270M's config
    (18 layers x 2,048 neurons, vocabulary 262,144) on random token ids: forward to the last layer,
    capture of every layer's activation, cast to float16 and copy to pinned host memory, with no
    statistics, with the CUDA kernel, and with the PyTorch path (store writes not included).
``rank``
    GB/s of activations reduced by each path over a large block already in device memory
    (CPU kernels: a host block, all cores).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vstore import cuda_stats, kernels
from vstore.stats import Moments

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GEMMA3_270M = {"vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
               "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
               "max_position_embeddings": 32768, "sliding_window": 512, "query_pre_attn_scalar": 256}
TINY = {**GEMMA3_270M, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "head_dim": 16}
N_GROUPS = 24


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block(rows: int, n: int, dtype: str, device: torch.device, seed: int, special: float = 0.02,
          run: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations with zeros, NaN and +-Inf, and group ids in runs of ``run`` rows (10% -1)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(rows, n, generator=gen) * 3
    u = torch.rand(rows, n, generator=gen)
    x[u < 0.1] = 0.0
    x[u < special] = float("nan")
    x[(u >= special) & (u < 1.5 * special)] = float("inf")
    x[(u >= 1.5 * special) & (u < 2 * special)] = float("-inf")
    runs = torch.randint(0, N_GROUPS, (rows // run + 1,), generator=gen).repeat_interleave(run)[:rows]
    gids = torch.where(torch.rand(rows, generator=gen) < 0.1, -1, runs).to(torch.int32)
    return x.to(TORCH_DTYPES[dtype]).to(device), gids.to(device)


def zeros(n_groups: int, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    i64, f64 = torch.int64, torch.float64
    return {"count": torch.zeros(n_groups, dtype=i64, device=device),
            "sum": torch.zeros(n_groups, n, dtype=f64, device=device),
            "sumsq": torch.zeros(n_groups, n, dtype=f64, device=device),
            "npos": torch.zeros(n_groups, n, dtype=i64, device=device),
            "nonfinite": torch.zeros(n_groups, n, dtype=i64, device=device)}


def cpu_kernels(acts: torch.Tensor, gids: torch.Tensor, n_groups: int) -> Moments:
    t = acts.cpu().contiguous()
    raw = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    acc = Moments.zeros(n_groups, t.shape[1])
    kernels.accumulate_moments(raw, gids.cpu().numpy(), acc, dtype=str(t.dtype).removeprefix("torch."))
    return acc


def mismatch(got: dict[str, torch.Tensor], want: dict[str, np.ndarray]) -> str:
    """'' when equal (counts exactly, sums to float64 rounding), else which fields differ and by how much."""
    bad = [k for k in ("count", "npos", "nonfinite") if not np.array_equal(got[k].cpu().numpy(), want[k])]
    scale = np.abs(want["sum"]).sum(axis=0) + np.abs(want["sumsq"]).sum(axis=0) + 1.0
    for k in ("sum", "sumsq"):
        err = np.abs(got[k].cpu().numpy() - want[k]) / scale
        if not (err <= 1e-12).all():
            bad.append(f"{k} (relative error {float(np.nanmax(err)):.3g})")
    return ", ".join(bad)


def check(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """Every path on every case; one result row per (case, dtype, path)."""
    cases = {"block": (997, 264), "one-row": (1, 16), "empty-groups": (5, 8), "unaligned": (301, 130),
             "large": (2048 if quick else 100_000, 256 if quick else 2048)}
    out = []
    for name, (rows, n) in cases.items():
        for dtype in TORCH_DTYPES:
            acts, gids = block(rows, n, dtype, torch.device("cpu"), seed=rows + n)
            want = cpu_kernels(acts, gids, N_GROUPS).arrays()
            a = acts.to(device)
            if name == "unaligned":  # contiguous, at an odd element offset: the kernel's scalar path
                flat = torch.empty(rows * n + 1, dtype=acts.dtype, device=device)
                a = flat[1:].view(rows, n)
                a.copy_(acts)
            g = gids.to(device)
            paths: dict[str, Callable[..., None]] = {"torch": cuda_stats.update_moments_torch}
            if device.type == "cuda" and cuda_stats.available():
                paths["cuda"] = cuda_stats.update_moments
            for path, fn in paths.items():
                acc = zeros(N_GROUPS, n, device)
                fn(a, g, **acc)
                sync(device)
                out.append({"case": name, "dtype": dtype, "path": path, "rows": rows, "neurons": n,
                            "mismatch": mismatch(acc, want)})
    return out


def timed(fn: Callable[[], None], device: torch.device, min_seconds: float, max_iters: int = 1000) -> float:
    """Median seconds of one call, over calls filling about ``min_seconds`` (after one warm-up)."""
    fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (time.perf_counter() - start < min_seconds or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rank_throughput(device: torch.device, quick: bool) -> dict[str, float]:
    """GB/s of activations reduced per path (16-bit activations, 24 groups in runs of 256 rows)."""
    rows, n = (8192, 256) if quick else (1 << 20, 2048)
    seconds = 0.3 if quick else 3.0
    out: dict[str, float] = {}
    gen = torch.Generator(device=device).manual_seed(0)
    acts = torch.randn(rows, n, generator=gen, device=device, dtype=torch.float16)
    runs = torch.arange(rows, device=device) // 256 % N_GROUPS
    gids = runs.to(torch.int32)
    nbytes = acts.numel() * acts.element_size()
    acc = zeros(N_GROUPS, n, device)
    if device.type == "cuda" and cuda_stats.available():
        out["cuda"] = nbytes / timed(lambda: cuda_stats.update_moments(acts, gids, **acc, check_groups=False),
                                     device, seconds) / 1e9
    out["torch"] = nbytes / timed(lambda: cuda_stats.update_moments_torch(acts, gids, **acc, check_groups=False),
                                  device, seconds) / 1e9
    host_rows = min(rows, 1 << 16)
    raw = acts[:host_rows].cpu().numpy()
    host_g = gids[:host_rows].cpu().numpy()
    mom = Moments.zeros(N_GROUPS, n)
    out["cpu"] = raw.nbytes / timed(lambda: kernels.accumulate_moments(raw, host_g, mom, dtype="float16"),
                                    torch.device("cpu"), seconds) / 1e9
    return out


def build_throughput(device: torch.device, quick: bool) -> dict[str, float]:
    """Tokens/s of forward + capture + float16 cast + copy to host, without and with statistics."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from vstore.hooks import Capture, run_until_stop

    cfg = TINY if quick else GEMMA3_270M
    batch, seq = (2, 32) if quick else (16, 512)
    seconds = 0.5 if quick else 6.0
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:  # initialise the weights where they will run (seconds on a GPU, not a minute on a CPU)
        model = Gemma3ForCausalLM(Gemma3TextConfig(**cfg)).to(dtype=dtype).eval()
    n, n_layers, tokens = cfg["intermediate_size"], cfg["num_hidden_layers"], batch * seq
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=device)
    gids = (torch.arange(batch, device=device) % N_GROUPS).repeat_interleave(seq).to(torch.int32)
    host = torch.empty(n_layers, tokens, n, dtype=torch.float16, pin_memory=device.type == "cuda")
    accs = [zeros(N_GROUPS, n, device) for _ in range(n_layers)]
    update = {"none": None, "cuda": cuda_stats.update_moments, "torch": cuda_stats.update_moments_torch}
    if not (device.type == "cuda" and cuda_stats.available()):
        del update["cuda"]

    def run(mode: str) -> Callable[[], None]:
        fn = update[mode]

        def on_output(layer: int, t: torch.Tensor) -> None:
            x = t.reshape(-1, n).to(torch.float16)
            host[layer].copy_(x, non_blocking=True)
            if fn is not None:
                fn(x, gids, **accs[layer], check_groups=False)

        def forward() -> None:
            with torch.inference_mode(), Capture(model, "act", stop=True, on_output=on_output):
                run_until_stop(model, input_ids=ids)

        return forward

    results: dict[str, list[float]] = {m: [] for m in update}
    for _ in range(3):  # alternate the modes so drift hits each alike
        for mode in update:
            results[mode].append(tokens / timed(run(mode), device, seconds / 3))
    return {m: statistics.median(v) for m, v in results.items()}


def table(device: torch.device, checks: list[dict[str, Any]], rank: dict[str, float],
          build: dict[str, float], quick: bool) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    ext = cuda_stats.info()
    lines = [f"GPU check on {name} (torch {torch.__version__}, CUDA runtime of vstore._cuda "
             f"{ext['runtime_version']}, driver {ext['driver_version']}{', quick sizes' if quick else ''})", "",
             "| measure | path | value |", "|---|---|---|"]
    for path in sorted({c["path"] for c in checks}):
        rows = [c for c in checks if c["path"] == path]
        bad = [f"{c['case']}/{c['dtype']}: {c['mismatch']}" for c in rows if c["mismatch"]]
        lines.append(f"| agrees with the CPU kernels ({len(rows)} cases) | {path} | "
                     f"{'yes' if not bad else 'NO: ' + '; '.join(bad)} |")
    if "cuda" not in {c["path"] for c in checks}:
        lines.append(f"| agrees with the CPU kernels | cuda | not run: kernel not available ({ext['error'] or 'no GPU'}) |")
    for path, gbs in rank.items():
        lines.append(f"| rank: activations reduced | {path} | {gbs:.3g} GB/s |")
    base = build.get("none", math.nan)
    for mode, tps in build.items():
        ratio = "" if mode == "none" else f" ({tps / base:.2f} x without statistics)"
        label = "no statistics" if mode == "none" else f"statistics by {mode}"
        lines.append(f"| build: forward + capture + copy to host | {label} | {tps:,.0f} tokens/s{ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small sizes (a dry run on CPU)")
    ap.add_argument("--json", type=Path, help="also write every figure as JSON")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    checks = check(device, args.quick)
    rank = rank_throughput(device, args.quick)
    build = build_throughput(device, args.quick)
    print(table(device, checks, rank, build, args.quick))
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "quick": args.quick, "cuda": cuda_stats.info(),
                                         "checks": checks, "rank_gb_per_s": rank, "build_tokens_per_s": build},
                                        indent=2) + "\n")
    failed = [c for c in checks if c["mismatch"]]
    if device.type == "cuda" and not cuda_stats.available():
        print("FAILED: vstore._cuda is not available on this CUDA machine", file=sys.stderr)
        return 2
    if failed:
        print(f"FAILED: {len(failed)} mismatches", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
