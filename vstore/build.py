"""`vstore build`: stream a model's FFN activations into a chunked Zarr store.

The forward pass runs on fixed batches (example ``i`` is always in batch ``i // batch_size``),
right-padded so that padding cannot move any real token's position. Hooks at the capture site
record each layer's activation and stop the forward after the last captured layer. Valid rows
(neither padding nor special tokens) leave the device through double-buffered (pinned on CUDA)
non-blocking copies; a writer thread appends them to the store while the model runs the next batch.
The store's counters advance after the data, at example boundaries, so a killed build resumes where
it stopped and ends identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .data import Example, file_sha256, load_examples
from .errors import DiskSpaceError, StoreError, StoreExistsError, VstoreError
from .models import DEFAULT_MODEL, SITES, LoadedModel, load_model
from .store import ITEMSIZE, STORAGE_DTYPES, PartWriter, Store, chunk_rows_for, is_store

__all__ = ["POOLINGS", "BuildResult", "build_store", "parse_layers"]

POOLINGS = ("token", "mean", "last")
FLOAT16_MAX = 65504.0


@dataclass
class BuildResult:
    """What a build did."""

    path: Path
    part: str
    examples: int
    rows: int
    tokens: int
    seconds: float
    bytes_written: int
    resumed_from: int
    overflow: dict[str, int] = field(default_factory=dict)


def parse_layers(spec: str | None, n_layers: int) -> list[int] | None:
    """Parse ``--layers`` (``all``, ``0,3,5``, ``4-8``, ``-1``) into sorted model layer indices."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    out: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        try:
            if "-" in item[1:]:
                a, b = item.split("-", 1) if not item.startswith("-") else ("-" + item[1:].split("-", 1)[0], item[1:].split("-", 1)[1])
                lo, hi = int(a) % n_layers, int(b) % n_layers
                out.update(range(lo, hi + 1))
            else:
                out.add(int(item))
        except ValueError as e:
            raise VstoreError(f"--layers: cannot parse {item!r} (use e.g. 'all', '0,3,5', '4-8', '-1')") from e
    bad = sorted(i for i in out if not -n_layers <= i < n_layers)
    if bad:
        raise VstoreError(f"--layers: {bad} out of range; the model has {n_layers} layers (0..{n_layers - 1})")
    return sorted({i % n_layers for i in out})


def _versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers
    import zarr

    return {
        "vstore": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "zarr": zarr.__version__, "numpy": numpy.__version__, "python": sys.version.split()[0],
    }


def _tokenize(tok: Any, texts: Sequence[str], max_length: int) -> dict[str, Any]:
    return tok(
        list(texts), padding=True, truncation=True, max_length=max_length,
        return_special_tokens_mask=True, return_tensors="pt",
    )


def _estimate_rows(tok: Any, examples: Sequence[Example], pool: str, max_length: int) -> int:
    if pool != "token":
        return len(examples)
    total = 0
    for i in range(0, len(examples), 256):
        enc = tok([e.text for e in examples[i : i + 256]], truncation=True, max_length=max_length,
                  return_special_tokens_mask=True)
        total += sum(len(m) - sum(m) for m in enc["special_tokens_mask"])
    return total


class _Writer(threading.Thread):
    """Drains the queue of host batches into the store; re-raises its error in the main thread."""

    def __init__(self, writer: PartWriter, q: queue.Queue[Any], commit_every: float) -> None:
        super().__init__(daemon=True, name="vstore-writer")
        self.writer, self.q, self.commit_every = writer, q, commit_every
        self.error: BaseException | None = None

    def run(self) -> None:
        last = time.monotonic()
        try:
            while True:
                item = self.q.get()
                if item is None:
                    self.writer.flush()
                    return
                host, example, position, token, done, event = item
                if event is not None:
                    event.synchronize()
                arr = host.numpy()
                if arr.dtype == np.int16:  # bfloat16 travels as its bits
                    arr = arr.view(np.uint16)
                self.writer.add(arr, example, position, token, done)
                if time.monotonic() - last >= self.commit_every:  # bound the work a kill can lose
                    self.writer.flush()
                    last = time.monotonic()
        except BaseException as e:  # surfaced by build_store
            self.error = e
            while self.q.get() is not None:  # keep draining so the producer never blocks on a dead writer
                pass


def _check_disk(path: Path, need: int) -> None:
    probe = path if path.exists() else path.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free * 0.95:
        raise DiskSpaceError(
            f"the store needs about {need / 1e9:.2f} GB but {probe} has {free / 1e9:.2f} GB free; "
            "free space, use fewer --layers, --dtype float16/bfloat16, or --pool mean|last"
        )


def build_store(
    out: str | Path,
    *,
    model: str | LoadedModel = DEFAULT_MODEL,
    data: str | Path | None = None,
    split: str | None = "activation",
    texts: Sequence[str] | None = None,
    pool: str = "token",
    dtype: str = "float16",
    layers: str | Sequence[int] | None = None,
    site: str = "act",
    batch_size: int = 8,
    max_length: int = 512,
    limit: int | None = None,
    device: str = "cpu",
    labels: dict[str, str] | None = None,
    append: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    compressor: str = "none",
    trust_remote_code: bool = False,
    progress: bool = True,
    queue_depth: int = 2,
    commit_every: float = 30.0,
) -> BuildResult:
    """Run the model over a dataset and write its activations into a store.

    Parameters
    ----------
    out
        Store folder.
    model
        Alias, ``.gguf``, folder or hub id (see :func:`vstore.models.load_model`), or a loaded model.
    data
        Story file/folder or ``.txt``; default: the bundled benchmark.
    split
        Stories of this split only (plain text is never filtered).
    texts
        ``("aligned", "violating")`` to write each item once per action, labelled ``polarity``.
    pool
        ``token`` (one row per real token), ``mean`` or ``last`` (one row per example).
    dtype
        Stored dtype: ``float16``, ``bfloat16`` or ``float32``.
    layers
        Model layer indices (or a ``--layers`` string); default all.
    site
        ``act`` (activation-function output) or ``down_in`` (down-projection input).
    append
        Add the data as a new part of an existing complete store (same model, site, dtype, pooling).
    overwrite
        Replace an existing store.
    resume
        Insist on resuming an incomplete store (an incomplete store is resumed anyway).
    commit_every
        Seconds between commits of a partial chunk (whole chunks commit as they fill): the most
        work a killed build can lose.

    Returns
    -------
    BuildResult

    Raises
    ------
    DataError, ModelError, StoreExistsError, StoreError, DiskSpaceError
    """
    import torch

    from .data import bundled_stories
    from .hooks import Capture, run_until_stop

    t_start = time.perf_counter()
    out = Path(out)
    if pool not in POOLINGS:
        raise VstoreError(f"--pool must be one of {list(POOLINGS)}, got {pool!r}")
    if dtype not in STORAGE_DTYPES:
        raise VstoreError(f"--dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    if site not in SITES:
        raise VstoreError(f"--site must be one of {list(SITES)}, got {site!r}")
    if batch_size < 1 or max_length < 1:
        raise VstoreError("--batch-size and --max-length must be positive")
    if append and overwrite:
        raise VstoreError("--append and --overwrite cannot be combined")
    data_path = Path(data) if data is not None else bundled_stories()
    examples = load_examples(data_path, split=split, texts=texts, labels=labels, limit=limit)

    # what to do with an existing store: decide before the (slow) model load
    existing = Store(out, mode="r+") if is_store(out) else None
    if existing is None and out.exists() and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise StoreExistsError(f"{out} exists and is not a vstore store; choose another --out")
    if existing is None and (append or resume):
        raise StoreError(f"--{'append' if append else 'resume'}: no store at {out}")
    if existing is not None and not overwrite:
        if append and existing.state != "complete":
            raise StoreError(f"{out} is incomplete; resume it (run the same build again) before --append")
        if not append and existing.state == "complete":
            if resume:
                raise StoreError(f"--resume: {out} is already complete")
            raise StoreExistsError(f"{out} is a complete store; pass --overwrite to rebuild it or --append to add data")
    if existing is not None and overwrite:
        existing = None

    lm = model if isinstance(model, LoadedModel) else load_model(
        model, device=device, trust_remote_code=trust_remote_code, progress=_say if progress else None
    )
    ident = lm.identity
    layer_list = parse_layers(layers, ident.n_layers) if isinstance(layers, str) or layers is None else sorted(
        {int(i) % ident.n_layers for i in layers}
    )
    layer_list = layer_list if layer_list is not None else list(range(ident.n_layers))
    tok = lm.tokenizer
    tok.padding_side = "right"
    dataset = {
        "paths": [str(data_path.resolve())], "sha256": file_sha256(data_path), "examples": len(examples),
        "split": split, "texts": list(texts) if texts else None, "labels": labels or {}, "limit": limit,
    }
    build_args = {"batch_size": batch_size, "max_length": max_length, "device": device, "pool": pool}
    base_meta = {
        "model": ident.to_json(), "site": site, "layers": layer_list, "dtype": dtype, "pooling": pool,
        "storage_dtype": STORAGE_DTYPES[dtype], "compressor": compressor,
        "chunk_rows": chunk_rows_for(ident.n_neurons, dtype), "versions": _versions(),
    }

    if existing is not None and not append:  # resume
        store = existing
        last = store.meta["parts"][-1] if store.meta["parts"] else None
        _check_same(store, base_meta, ident)
        if last is None or last.get("dataset", {}).get("sha256") != dataset["sha256"] or last.get("build") != build_args \
                or last.get("dataset", {}).get("examples") != len(examples):
            raise StoreError(
                f"{out} is an incomplete build of other data or arguments; rerun it with the same ones, "
                "or pass --overwrite"
            )
        part = last["name"]
        example_start = int(last["example_start"])
        store.trim_examples()
    else:
        if existing is not None:  # append
            store = existing
            _check_same(store, base_meta, ident)
        else:
            rows_est = _estimate_rows(tok, examples, pool, max_length)
            _check_disk(out, rows_est * len(layer_list) * ident.n_neurons * ITEMSIZE[dtype] + rows_est * 16)
            store = Store.create(out, base_meta, overwrite=overwrite)
        store.trim_examples()
        example_start = store.add_examples(
            [e.id for e in examples], [e.text for e in examples], [e.labels for e in examples]
        )
        part = store.start_part(
            len(examples), example_start, {"dataset": dataset, "build": build_args}, compressor=compressor
        )
    if existing is not None and append:
        rows_est = _estimate_rows(tok, examples, pool, max_length)
        _check_disk(out, rows_est * len(layer_list) * ident.n_neurons * ITEMSIZE[dtype])

    writer = PartWriter(store, part)
    first = writer.committed_examples
    resumed_from = first
    q: queue.Queue[Any] = queue.Queue(maxsize=queue_depth)
    wthread = _Writer(writer, q, commit_every)
    wthread.start()
    on_cuda = str(device).startswith("cuda")
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    overflow = dict(writer.overflow)
    tokens_seen = 0
    bar = _Progress(len(examples), first, enabled=progress)
    sink = _RowSink(layer_list, pool, torch_dtype, check_overflow=dtype == "float16")
    try:
        with torch.inference_mode(), Capture(lm.model, site, layer_list, stop=True, on_output=sink) as _cap:
            for b0 in range((first // batch_size) * batch_size, len(examples), batch_size):
                if wthread.error is not None:
                    break
                batch = examples[b0 : b0 + batch_size]
                enc = _tokenize(tok, [e.text for e in batch], max_length)
                special = enc.pop("special_tokens_mask").bool()
                valid = enc["attention_mask"].bool() & ~special
                skip = max(0, first - b0)  # examples of this batch committed before a resume
                ex_idx, pos, tokn = sink.prepare(valid, enc["input_ids"], skip, lm.identity.n_neurons, device)
                enc = {k: v.to(device) for k, v in enc.items()}
                run_until_stop(lm.model, **enc)
                acts = sink.out
                if sink.overflow:
                    for lyr, n in sink.overflow.items():
                        overflow[str(lyr)] = overflow.get(str(lyr), 0) + n
                    sink.overflow.clear()
                    writer.overflow = overflow
                if dtype == "bfloat16":
                    acts = acts.view(torch.int16)
                # device -> host: pinned, non-blocking on CUDA (the writer waits on the event);
                # the queue bound (queue_depth) keeps at most that many batches in flight
                host = torch.empty(acts.shape, dtype=acts.dtype, pin_memory=on_cuda)
                host.copy_(acts, non_blocking=on_cuda)
                event = None
                if on_cuda:
                    event = torch.cuda.Event()
                    event.record()
                q.put((host, (ex_idx + b0 + example_start).astype(np.int64), pos, tokn, b0 + len(batch), event))
                tokens_seen += int(valid.sum())
                bar.update(len(batch) - skip, tokens_seen, writer.bytes_written)
    finally:
        q.put(None)
        wthread.join()
        bar.close()
    if wthread.error is not None:
        raise wthread.error
    store.commit(part, len(examples), writer.written, overflow=overflow)
    store.finish_part(part)
    if overflow:
        _say(f"warning: {sum(overflow.values())} activation value(s) beyond ±65504 became ±inf in float16 "
             f"(per layer: {overflow}); use --dtype bfloat16 or float32")
    return BuildResult(
        out, part, len(examples) - resumed_from, writer.written, tokens_seen, time.perf_counter() - t_start,
        writer.bytes_written, resumed_from, overflow,
    )


def _check_same(store: Store, meta: dict[str, Any], ident: Any) -> None:
    have = store.meta
    problems = []
    for key in ("site", "dtype", "pooling", "layers"):
        if have.get(key) != meta[key]:
            problems.append(f"{key}: store has {have.get(key)!r}, this build {meta[key]!r}")
    hm = have.get("model", {})
    for key in ("architecture", "n_layers", "n_neurons", "sha256"):
        if hm.get(key) != getattr(ident, key):
            problems.append(f"model {key}: store has {hm.get(key)!r}, this build {getattr(ident, key)!r}")
    if problems:
        raise StoreError(f"{store.path}: this build does not match the store: " + "; ".join(problems))


class _RowSink:
    """Reduces each captured layer to its rows inside the hook, straight into one output tensor
    (layers, rows, neurons) of the stored dtype, so no full (batch, tokens, neurons) activation
    outlives its layer."""

    def __init__(self, layers: Sequence[int], pool: str, dtype: Any, *, check_overflow: bool) -> None:
        self.pos = {lyr: i for i, lyr in enumerate(layers)}
        self.pool, self.dtype = pool, dtype
        self.check_overflow = check_overflow
        self.overflow: dict[int, int] = {}  # model layer -> values beyond the float16 range
        self.out: Any = None

    def prepare(
        self, valid: Any, input_ids: Any, skip: int, n_neurons: int, device: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fix the rows of the next forward; returns per row its batch example, position, token."""
        import torch

        valid = valid.clone()
        valid[:skip] = False
        if self.pool == "token":
            b, t = valid.nonzero(as_tuple=True)
            meta = (b.numpy(), t.numpy().astype(np.int32), input_ids[b, t].numpy().astype(np.int32))
            self.index: tuple[Any, ...] = (b.to(device), t.to(device))
        else:
            keep = valid.any(dim=1).nonzero(as_tuple=True)[0]
            T = valid.shape[1]
            last = (T - 1 - valid.flip(dims=[1]).int().argmax(dim=1))[keep]
            if self.pool == "mean":
                w = valid[keep].to(torch.float32)
                self.index = (keep.to(device), (w / w.sum(dim=1, keepdim=True).clamp(min=1)).to(device))
                n = len(keep)
                meta = (keep.numpy(), np.full(n, -1, np.int32), np.full(n, -1, np.int32))
            else:
                self.index = (keep.to(device), last.to(device))
                meta = (keep.numpy(), last.numpy().astype(np.int32), input_ids[keep, last].numpy().astype(np.int32))
        self.out = torch.empty((len(self.pos), len(meta[0]), n_neurons), dtype=self.dtype, device=device)
        return meta

    def __call__(self, layer: int, t: Any) -> None:
        import torch

        if self.pool == "mean":
            keep, w = self.index
            src = _weighted_mean(t[keep], w)
        else:
            src = t[self.index]
        if self.check_overflow and src.numel():
            lo, hi = torch.aminmax(src)  # one cheap pass in float32; count exactly only when needed
            if hi > FLOAT16_MAX or lo < -FLOAT16_MAX:
                self.overflow[layer] = self.overflow.get(layer, 0) + int((src.abs() > FLOAT16_MAX).sum())
        self.out[self.pos[layer]].copy_(src)


def _weighted_mean(x: Any, w: Any) -> Any:
    """Weighted mean over tokens: x (B, T, N), w (B, T) -> (B, N), in float32."""
    return (w.unsqueeze(1).to(x.dtype) @ x).squeeze(1)


def _say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(msg, highlight=False)


class _Progress:
    """A rich progress bar: examples, tokens/s and bytes written (off when not a terminal)."""

    def __init__(self, total: int, done: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(
            TextColumn("[bold]build"), BarColumn(), MofNCompleteColumn(), TextColumn("examples"),
            TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[bytes]}"), TimeRemainingColumn(),
            transient=False, disable=os.environ.get("VSTORE_NO_PROGRESS") == "1",
        )
        self.task = self.p.add_task("build", total=total, completed=done, rate="", bytes="")
        self.p.start()

    def update(self, n: int, tokens: int, nbytes: int) -> None:
        if not self.enabled:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.p.update(self.task, advance=n, rate=f"{tokens / dt:,.0f} tok/s", bytes=f"{nbytes / 1e6:,.1f} MB written")

    def close(self) -> None:
        if self.enabled:
            self.p.stop()
