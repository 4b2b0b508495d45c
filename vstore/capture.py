"""Streaming a model's activations into a part of a store: the forward loop, the row sink, the writer.

The forward pass runs on fixed batches (example ``i`` is always in batch ``i // batch_size``),
right-padded so that padding cannot move any real token's position. Hooks at the capture site hand
each layer's activation to :class:`RowSink`, which reduces it to its rows (tokens, or one pooled row
per example) inside the hook and stops the forward after the last captured layer. Rows leave the
device through non-blocking copies (pinned on CUDA), and a :class:`WriterThread` appends them to the
part while the model runs the next batch. On the CPU the rows go straight into a recycled host
buffer (:class:`HostBuffers`) and the producer appends them itself between batches
(:class:`InlineWriter`): torch's threads already keep every core busy.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import Example
from .errors import disk_full
from .progress import Task
from .store import DTYPES, PartWriter

__all__ = ["FLOAT16_MAX", "POOLINGS", "ExtraSite", "HostBuffers", "InlineWriter", "RowSink", "StreamResult", "WriterThread", "estimate_rows", "pool_rows",
           "stream_part"]

POOLINGS = ("token", "mean", "last")
FLOAT16_MAX = 65504.0
#: The smallest magnitude that becomes inf in float16 (round to nearest even: 65504 < x < 65520 stays finite).
FLOAT16_INF_FROM = 65520.0


def tokenize(tok: Any, texts: Sequence[str], max_length: int) -> dict[str, Any]:
    """A right-padded batch with its special-tokens mask."""
    return tok(list(texts), padding=True, truncation=True, max_length=max_length,
               return_special_tokens_mask=True, return_tensors="pt")


def estimate_rows(tok: Any, examples: Sequence[Example], pool: str, max_length: int) -> int:
    """Rows a build of ``examples`` writes (real tokens, or one per example when pooled)."""
    if pool != "token":
        return len(examples)
    total = 0
    for i in range(0, len(examples), 256):
        enc = tok([e.text for e in examples[i : i + 256]], truncation=True, max_length=max_length,
                  return_special_tokens_mask=True)
        total += sum(len(m) - sum(m) for m in enc["special_tokens_mask"])
    return total


def _bits(arr: np.ndarray) -> np.ndarray:
    return arr.view(np.uint16) if arr.dtype == np.int16 else arr  # bfloat16 travels as its bits


def pool_rows(acts: Any, ex_idx: np.ndarray) -> tuple[Any, Any, np.ndarray]:
    """Mean and last row of each example of a batch's token rows ``(L, rows, N)`` (rows in example order),
    as stored (the mean taken in float32 over the stored values); and the examples' batch indices."""
    import torch

    uniq, inverse = np.unique(ex_idx, return_inverse=True)
    last = np.r_[np.flatnonzero(np.diff(ex_idx)), len(ex_idx) - 1] if len(ex_idx) else np.zeros(0, np.int64)
    inv = torch.from_numpy(inverse.astype(np.int64)).to(acts.device)
    view = acts.view(torch.bfloat16) if acts.dtype == torch.int16 else acts
    total = torch.zeros((view.shape[0], len(uniq), view.shape[2]), dtype=torch.float32, device=acts.device)
    total.index_add_(1, inv, view.to(torch.float32))
    n = torch.bincount(inv, minlength=len(uniq)).clamp(min=1).to(torch.float32)
    mean = (total / n[None, :, None]).to(view.dtype)
    lastrows = acts[:, torch.from_numpy(last.astype(np.int64)).to(acts.device)]
    return (mean.view(torch.int16) if acts.dtype == torch.int16 else mean), lastrows, uniq


class HostBuffers:
    """Host buffers for the captured rows, reused from batch to batch.

    A fresh tensor per batch (tens of MB) is first touched page by page while the hooks fill it, and
    those page faults cost more than the copies themselves; a buffer the writer has copied into its
    chunk is handed back (:meth:`give`) and filled again by a later batch. Large buffers are backed
    by huge pages where the kernel offers them. At most ``queue_depth + 2`` buffers per site are
    ever in use with a writer thread (one being filled, the queued batches, the one being written),
    one with the inline writer.
    """

    #: spare room of a new buffer, so that a slightly longer batch does not need a new one
    HEADROOM = 1.25

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: Any) -> tuple[Any, np.ndarray]:
        """A tensor of ``shape`` and torch ``dtype`` (contents undefined), and the buffer to give back."""
        import torch

        from .store._chunks import aligned_zeros

        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = None
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
            if fits:  # the smallest that fits
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].nbytes))
            elif self._free:  # all too small for this batch: drop the smallest, so the pool stays bounded
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].nbytes))
        if buf is None:
            buf = aligned_zeros((max(64, int(nbytes * self.HEADROOM)),), np.uint8)
        flat = torch.from_numpy(buf[:nbytes])
        return flat.view(dtype).view(shape), buf

    def give(self, buf: np.ndarray) -> None:
        """Hand a buffer from :meth:`take` back once nothing reads the tensor made from it."""
        with self._lock:
            self._free.append(buf)


#: In place of a batch's host rows: they were written into the buffers :meth:`PartWriter.reserve` gave.
IN_PLACE: Any = object()


def _write_batch(writer: PartWriter, item: tuple[Any, ...], last: float, commit_every: float) -> float:
    """One queued batch into the part (waiting first for its device-to-host copies), then a commit when
    ``commit_every`` seconds have passed since ``last`` (bounds the work a kill can lose); returns the
    time of the last commit."""
    host, example, position, token, done, event, payload, pooled, recycle = item
    if event is not None:
        event.synchronize()
    if host is IN_PLACE:
        writer.add(None, example, position, token, done, payload=payload, in_place=True)
        host = None
    else:
        arr = {k: _bits(h.numpy()) for k, h in host.items()} if host is not None else None
        pool = (_bits(pooled[0].numpy()), _bits(pooled[1].numpy()), pooled[2]) if pooled is not None else None
        writer.add(arr, example, position, token, done, payload=payload, pooled=pool)
        del arr
    del host
    recycle()  # the rows are in the writer's chunk buffer: their host buffers can be refilled
    if time.monotonic() - last < commit_every:
        return last
    writer.flush()
    return time.monotonic()


class WriterThread(threading.Thread):
    """Drains a bounded queue of host batches into the part from its own thread (a build on a GPU:
    the host is free while the device computes); the error it met is kept for the main thread."""

    def __init__(self, writer: PartWriter, queue_depth: int, commit_every: float) -> None:
        super().__init__(daemon=True, name="vstore-writer")
        self.writer, self.commit_every = writer, commit_every
        self.q: queue.Queue[Any] = queue.Queue(maxsize=queue_depth)
        self.error: BaseException | None = None

    def put(self, item: tuple[Any, ...]) -> None:
        """Queue one batch (blocks while ``queue_depth`` batches wait)."""
        self.q.put(item)

    def close(self) -> None:
        """Write what is queued, flush, and wait for the thread."""
        self.q.put(None)
        self.join()

    def run(self) -> None:
        last = time.monotonic()
        ended = False  # the producer's end marker arrived: nothing more will be queued
        try:
            while True:
                item = self.q.get()
                if item is None:
                    ended = True
                    self.writer.flush()
                    return
                last = _write_batch(self.writer, item, last, self.commit_every)
        except BaseException as e:  # surfaced by the producer
            self.error = e
            while not ended and self.q.get() is not None:  # drain, so the producer never blocks on a dead writer
                pass


class InlineWriter:
    """The same work as :class:`WriterThread`, done by the producer between batches (a build on the
    CPU). There torch's threads keep every core busy, and a writer thread beside them slows the
    forward by more than its own CPU time (docs/performance.md); inline, each batch costs just its
    copy and its writes."""

    def __init__(self, writer: PartWriter, commit_every: float) -> None:
        self.writer, self.commit_every = writer, commit_every
        self.error: BaseException | None = None
        self._last = time.monotonic()

    def put(self, item: tuple[Any, ...]) -> None:
        """Write one batch now; an error is kept (as the thread keeps it) and ends the writing."""
        if self.error is not None:
            return
        try:
            self._last = _write_batch(self.writer, item, self._last, self.commit_every)
        except BaseException as e:  # surfaced by stream_part once the loop has stopped
            self.error = e

    def close(self) -> None:
        """Flush what is written (unless writing failed)."""
        if self.error is None:
            try:
                self.writer.flush()
            except BaseException as e:
                self.error = e


class RowSink:
    """Reduces each captured layer to its rows inside the hook, straight into one output tensor
    (layers, rows, neurons) of the stored dtype, so no full (batch, tokens, neurons) activation
    outlives its layer."""

    #: at most this many contiguous row ranges are copied range by range (else one gather)
    MAX_RANGES = 256

    def __init__(self, layers: Sequence[int], pool: str, dtype: Any, *, check_overflow: bool,
                 buffers: HostBuffers | None = None) -> None:
        self.pos = {lyr: i for i, lyr in enumerate(layers)}
        self.pool, self.dtype = pool, dtype
        self.check_overflow = check_overflow
        self.overflow: dict[int, int] = {}  # model layer -> values beyond the float16 range
        self.nonfinite: dict[int, int] = {}  # model layer -> NaN/Inf values the model produced
        self.out: Any = None
        self.buffers = buffers
        self.buffer: np.ndarray | None = None  # what `out` lives in, from `buffers` (None: its own)
        self.ranges: list[tuple[int, int, int]] | None = None  # (out row, end, flat source row)
        # where the rows go: (first row, end, (layers, rows, N) tensor) pieces; one piece is `out`
        self.pieces: list[tuple[int, int, Any]] = []
        self._shape: tuple[int, int, int] = (0, 0, 0)
        self._device = "cpu"

    def prepare(
        self, valid: Any, input_ids: Any, skip: int, n_neurons: int, device: str, *, allocate: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fix the rows of the next forward; returns per row its batch example, position, token.

        With ``allocate``, the rows go into a new ``out`` tensor; else :meth:`place` says where."""
        import torch

        valid = valid.clone()
        valid[:skip] = False
        self.ranges = None
        if self.pool == "token":
            b, t = valid.nonzero(as_tuple=True)
            meta = (b.numpy(), t.numpy().astype(np.int32), input_ids[b, t].numpy().astype(np.int32))
            # flat (batch * T + position) rows: one index_select, half the time of a 2-D gather
            flat = b * valid.shape[1] + t
            self.index: tuple[Any, ...] = (flat.to(device),)
            # right-padded text tokens are a few contiguous ranges (one per example): copied range by
            # range, the rows go straight into `out` with no gathered intermediate
            f = flat.numpy()
            cut = np.flatnonzero(np.diff(f) != 1) + 1
            if len(cut) < self.MAX_RANGES:
                starts, ends = np.r_[0, cut], np.r_[cut, len(f)]
                self.ranges = [(int(a), int(e), int(f[a])) for a, e in zip(starts, ends, strict=True) if e > a]
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
        self._shape, self._device = (len(self.pos), len(meta[0]), n_neurons), device
        self.out = self.buffer = None
        self.pieces = []
        if allocate:
            self.allocate()
        return meta

    def allocate(self) -> None:
        """Rows of the prepared batch into a new ``out`` tensor (from ``buffers`` on the CPU)."""
        import torch

        if self.buffers is not None and torch.device(self._device).type == "cpu":
            self.out, self.buffer = self.buffers.take(self._shape, self.dtype)
        else:
            self.out = torch.empty(self._shape, dtype=self.dtype, device=self._device)
        self.pieces = [(0, self._shape[1], self.out)]

    def place(self, views: Sequence[np.ndarray]) -> None:
        """Write the rows straight into these host arrays (each (layers, rows, N), in row order; a
        :meth:`vstore.store.PartWriter.reserve` result), instead of an ``out`` tensor."""
        import torch

        self.pieces, r0 = [], 0
        for v in views:
            t = torch.from_numpy(v)
            t = t.view(self.dtype) if t.dtype != self.dtype else t  # bfloat16 is stored as its bits
            self.pieces.append((r0, r0 + v.shape[1], t))
            r0 += v.shape[1]

    def _rows(self, t: Any) -> Any:
        """The rows of ``t`` (batch, tokens, N) that this batch stores, in the model's dtype."""
        import torch

        if self.pool == "mean":
            keep, w = self.index
            return (w.unsqueeze(1).to(t.dtype) @ t[keep]).squeeze(1)  # weighted mean over tokens, float32
        if self.pool == "token":
            return torch.index_select(t.reshape(-1, t.shape[-1]), 0, self.index[0])
        return t[self.index]

    def __call__(self, layer: int, t: Any) -> None:
        import torch

        at = self.pos[layer]
        src = None
        dsts = []
        for p0, p1, piece in self.pieces:
            dst = piece[at]
            dsts.append(dst)
            if self.ranges is not None:
                flat = t.reshape(-1, t.shape[-1])
                for a, e, f in self.ranges:  # the part of each contiguous range that falls in this piece
                    a1, e1 = max(a, p0), min(e, p1)
                    if a1 < e1:
                        dst[a1 - p0 : e1 - p0].copy_(flat[f + a1 - a : f + e1 - a])
            else:
                src = self._rows(t) if src is None else src
                dst.copy_(src[p0:p1])
        if not any(d.numel() for d in dsts):
            return
        # One pass over the stored values: NaN/Inf there means the model made one or a value overflowed
        # the stored dtype; only then are both counted exactly, on the model's values.
        finite = True
        for dst in dsts:
            if dst.numel():
                lo, hi = torch.aminmax(dst)
                finite = finite and bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
        if finite:
            return
        src = self._rows(t) if src is None else src
        if not bool(torch.isfinite(src).all()):
            self.nonfinite[layer] = self.nonfinite.get(layer, 0) + int((~torch.isfinite(src)).sum())
        if self.check_overflow:
            big = int((src.abs() >= FLOAT16_INF_FROM).sum())
            if big:
                self.overflow[layer] = self.overflow.get(layer, 0) + big


@dataclass
class StreamResult:
    """What streaming a part did."""

    tokens: int
    overflow: dict[str, int]
    nonfinite: dict[str, int]


#: Called once per batch with the batch's first example index and its token ids (B, T); returns
#: model layer -> (B, T, N) values on the same grid (the build's attribution site).
ExtraSite = Callable[[int, Any], dict[int, Any]]


def stream_part(
    lm: Any, examples: Sequence[Example], writer: PartWriter, *, layers: Sequence[int], site: str | Sequence[str],
    pool: str, dtype: str, batch_size: int, max_length: int, device: str, example_start: int, queue_depth: int,
    commit_every: float, bar: Task, live: Any = None, extra: Mapping[str, ExtraSite] | None = None,
    writer_thread: bool | None = None,
) -> StreamResult:
    """Run the model over the examples not yet committed in ``writer``'s part and append their rows.

    ``site`` is one capture site or several (captured in one forward, each into its array of the
    part); ``extra`` adds sites computed per batch by a callback (the attribution), stored float32.
    ``live`` (a :class:`vstore.stats.live.LiveStats`) reduces every batch of the first site, as
    stored, to its statistics on the device; a part that keeps no activations moves only those (and
    its pooled rows) to the host. On CUDA a writer thread appends the rows (at most ``queue_depth``
    batches wait for it); on the CPU they are appended between batches (``writer_thread`` overrides
    that choice). Raises whatever the writer met (a full disk, say) once the forward loop has stopped.
    """
    import torch

    sites = [site] if isinstance(site, str) else list(site)
    extra = dict(extra or {})
    first = writer.committed_examples
    on_cuda = str(device).startswith("cuda")
    wthread: WriterThread | InlineWriter
    if on_cuda if writer_thread is None else writer_thread:
        wthread = WriterThread(writer, queue_depth, commit_every)
        wthread.start()
    else:
        wthread = InlineWriter(writer, commit_every)
    overflow = dict(writer.overflow)
    tokens_seen = 0
    # on the CPU, written between batches: rows go straight into the writer's chunk buffers where it can
    # take them (no host buffer, no copy); the build's statistics and pooled rows need the batch whole
    in_place = isinstance(wthread, InlineWriter) and not on_cuda and writer.keep == "all" and live is None
    t0 = time.perf_counter()
    sinks = {s: RowSink(layers, pool, getattr(torch, DTYPES[dtype].torch), check_overflow=dtype == "float16",
                        buffers=HostBuffers()) for s in sites}
    sinks.update({s: RowSink(layers, pool, torch.float32, check_overflow=False, buffers=HostBuffers())
                  for s in extra})
    widths = {s: int(writer.store.site_info(s)["n_neurons"]) for s in sinks}
    in_place = in_place and set(sinks) == set(writer.arrays)
    try:
        with torch.inference_mode():
            for b0 in range((first // batch_size) * batch_size, len(examples), batch_size):
                if wthread.error is not None:
                    break
                batch = examples[b0 : b0 + batch_size]
                enc = tokenize(lm.tokenizer, [e.text for e in batch], max_length)
                valid = enc["attention_mask"].bool() & ~enc.pop("special_tokens_mask").bool()
                skip = max(0, first - b0)  # examples of this batch committed before a resume
                for s, sink in sinks.items():
                    ex_idx, pos, tokn = sink.prepare(valid, enc["input_ids"], skip, widths[s], device,
                                                     allocate=not in_place)
                views = None
                if in_place:  # the rows straight into the writer's chunk buffers, where it can take them
                    try:
                        views = writer.reserve(len(ex_idx))
                    except BaseException as e:  # a failed chunk write: surfaced as the writer's error
                        wthread.error = e
                        break
                    for s, sink in sinks.items():
                        if views is not None:
                            sink.place([v[s] for v in views])
                        else:
                            sink.allocate()
                _capture(lm.model, sites, sinks, layers, {k: v.to(device) for k, v in enc.items()})
                for s, fn in extra.items():
                    for lyr, t in fn(b0, enc["input_ids"]).items():
                        sinks[s](lyr, t)
                for sink in sinks.values():
                    for lyr, n in sink.overflow.items():
                        overflow[str(lyr)] = overflow.get(str(lyr), 0) + n
                    if sink.overflow:
                        sink.overflow.clear()
                        writer.overflow = overflow
                example = (ex_idx + b0 + example_start).astype(np.int64)
                if views is not None:  # the rows are in the chunk buffers already
                    wthread.put((IN_PLACE, example, pos, tokn, b0 + len(batch), None, None, None, _nothing))
                else:
                    _hand_over(wthread, sinks, sites, writer, live, on_cuda,
                               (example, pos, tokn, b0 + len(batch)), ex_idx, b0 + example_start)
                for sink in sinks.values():  # the writer owns these rows now
                    sink.out = sink.buffer = None
                    sink.pieces = []
                tokens_seen += int(valid.sum())
                bar.advance(len(batch) - skip)
                rate = tokens_seen / max(time.perf_counter() - t0, 1e-9)
                bar.describe(f"{rate:,.0f} tok/s, {writer.bytes_written / 1e6:,.1f} MB written")
    finally:
        wthread.close()
    merged: dict[int, int] = {}
    for sink in sinks.values():
        for k, v in sink.nonfinite.items():
            merged[k] = merged.get(k, 0) + v
    nonfinite = {str(k): v for k, v in sorted(merged.items())}
    if wthread.error is not None:
        err = _write_error(wthread.error, writer)
        if err is wthread.error:
            raise err
        raise err from wthread.error
    return StreamResult(tokens_seen, overflow, nonfinite)


def _capture(model: Any, sites: Sequence[str], sinks: Mapping[str, RowSink], layers: Sequence[int],
             inputs: dict[str, Any]) -> None:
    """One forward with a capture per site, stopped after the site whose module runs last."""
    from .hooks import Capture, run_until_stop
    from .models import SITES

    last = max(sites, key=SITES.index)  # within a layer: act, then down_in, then the layer's output
    with contextlib.ExitStack() as hooks:
        for s in sites:
            hooks.enter_context(Capture(model, s, list(layers), stop=s == last, on_output=sinks[s]))
        run_until_stop(model, **inputs)


def _hand_over(wthread: WriterThread | InlineWriter, sinks: Mapping[str, RowSink], sites: Sequence[str],
               writer: PartWriter, live: Any, on_cuda: bool, rows: tuple[np.ndarray, np.ndarray, np.ndarray, int],
               ex_idx: np.ndarray, first_example: int) -> None:
    """Queue a batch's rows from the sinks' ``out`` tensors to the writer, with the build's statistics
    of it (``live``) and its pooled rows (``--keep pooled``); ``rows``: (example, position, token,
    examples done)."""
    import torch

    outs = {s: sink.out.view(torch.int16) if sink.out.dtype == torch.bfloat16 else sink.out
            for s, sink in sinks.items()}
    acts = outs[sites[0]]
    example = rows[0]
    payload = live.batch(acts, torch.from_numpy(example).to(acts.device)) if live is not None else None
    # device -> host: pinned, non-blocking on CUDA (the writer waits on the event);
    # the queue bound (queue_depth) keeps at most that many batches in flight
    host = {s: _to_host(o, on_cuda) for s, o in outs.items()} if writer.keep == "all" else None
    pooled = None
    if writer.keep == "pooled":
        mean, last, uniq = pool_rows(acts, ex_idx)
        pooled = (_to_host(mean, on_cuda), _to_host(last, on_cuda), (uniq + first_example).astype(np.int64))
    event = None
    if on_cuda:
        event = torch.cuda.Event()
        event.record()
    held = [(sink.buffers, sink.buffer) for sink in sinks.values()
            if sink.buffers is not None and sink.buffer is not None]
    wthread.put((host, *rows, event, payload, pooled, functools.partial(_give_back, held)))


def _nothing() -> None:
    """Nothing to give back (rows written in place)."""


def _give_back(held: list[tuple[HostBuffers, np.ndarray]]) -> None:
    for buffers, buf in held:
        buffers.give(buf)


def _to_host(t: Any, on_cuda: bool) -> Any:
    import torch

    if t.device.type == "cpu":  # already on the host, and each batch's tensors are new: no copy
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=on_cuda)
    host.copy_(t, non_blocking=on_cuda)
    return host


def _write_error(error: BaseException, writer: PartWriter) -> BaseException:
    """A full disk or a file-size limit as one clear :class:`DiskSpaceError`; anything else as it is."""
    return disk_full(error, str(writer.store.path),
                     f"part {writer.part} keeps its {writer.committed_examples} committed example(s): free space "
                     "and run the same build again to resume") or error
