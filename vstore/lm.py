"""The pieces of a causal language model the scorers use: base model and output head, the text
encoder, padding and batching. Scores are computed in float32 from the hidden states, on whatever
device the model is on.
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import ModelError, UsageError

__all__ = ["HEAD_CHUNK", "CausalLM", "Encoder", "Prefix", "batches", "choose_threads", "common_prefix", "fit_length",
           "left_padded", "logsumexp_inplace", "right_padded", "set_threads"]

HEAD_CHUNK = 256  # positions per output-head call (bounds the (positions, vocab) logits buffer)

_head_buffers = threading.local()  # per thread: output head -> its reused logits buffer (CausalLM._logits)


def logsumexp_inplace(x: Any) -> Any:
    """``torch.logsumexp(x, dim=-1)`` of a 2-D float tensor, overwriting ``x`` (no temporary of its size).

    The same operations as ATen's logsumexp, in the same order (row maximum, an infinite one taken as
    0, ``exp(x - max)``, the row sum, its log plus the maximum), so the same bits.
    """
    import torch

    m = torch.amax(x, dim=-1, keepdim=True)
    m.masked_fill_(m.abs() == float("inf"), 0)
    s = x.sub_(m).exp_().sum(dim=-1)
    return s.log_().add_(m[:, 0])


class CausalLM:
    """The pieces of a causal LM the scorers use: base model, output head, soft-capping, device."""

    def __init__(self, model: Any, prefix: Prefix | None = None) -> None:
        self.model = model
        self.prefix = prefix
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        if self.base is model or self.head is None:
            raise ModelError(f"{type(model).__name__}: cannot separate the base model from the output head")
        cap = getattr(model.config, "final_logit_softcapping", None)
        self.softcap = float(cap) if cap else None
        self.device = next(model.parameters()).device
        params = inspect.signature(self.base.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def forward(self, ids: Any, mask: Any, pos: Any, *, cache: Any = None, use_cache: bool = False,
                keys: Sequence[Hashable] | None = None, then: Sequence[Hashable] = ()) -> tuple[Any, Any]:
        """Hidden states after the final norm (and the key/value cache when ``use_cache``).

        ``keys`` name each row's real token sequence (its whole content, so equal keys mean equal
        hidden states): with a :class:`Prefix` attached, they let the prefix replay or record the
        hidden states below its level. ``then`` names the rows of a forward that will continue
        this one's cache: the layers below the level are skipped only if those can skip them too.
        """
        kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": use_cache}
        if cache is not None:
            kw[self.cache_kw] = cache
        if self.prefix is not None and keys is not None:
            with self.prefix.around(keys, mask[:, -ids.shape[1] :].bool(), then) as after:
                out = self.base(**kw)
        else:
            out, after = self.base(**kw), None
        new_cache = getattr(out, "cache", None) if use_cache else None
        if use_cache and new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        if after is not None and new_cache is not None and cache is None:
            after(new_cache)
        return out.last_hidden_state, new_cache

    def _logits(self, hidden: Any) -> tuple[Any, bool]:
        """float32 (soft-capped) logits of at most HEAD_CHUNK (positions, hidden) states, and whether
        they are scratch (the caller may overwrite them).

        On the CPU, a float32 head without bias or hooks writes them into one buffer per thread and
        head, reused from call to call: a fresh (HEAD_CHUNK, vocab) tensor is hundreds of MB of
        pages the kernel must hand out again each time. The values are the same bits.
        """
        import torch

        w = getattr(self.head, "weight", None)
        if (type(self.head) is not torch.nn.Linear or self.head.bias is not None or w is None
                or w.dtype != torch.float32 or w.device.type != "cpu" or hidden.dtype != torch.float32
                or self.head._forward_hooks or self.head._forward_pre_hooks or torch.is_grad_enabled()):
            logits = self.head(hidden).float()
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return logits, False
        bufs = getattr(_head_buffers, "by_head", None)
        if bufs is None:
            bufs = _head_buffers.by_head = weakref.WeakKeyDictionary()
        buf = bufs.get(self.head)
        if buf is None or buf.shape[0] < hidden.shape[0]:
            buf = bufs[self.head] = torch.empty((HEAD_CHUNK, w.shape[0]), dtype=torch.float32)
        logits = buf[: hidden.shape[0]]
        torch.mm(hidden, w.t(), out=logits)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits, True

    def log_probs(self, hidden: Any) -> Any:
        """float32 log-softmax over the vocabulary of (positions, hidden) states, chunked."""
        import torch

        parts = []
        for i in range(0, hidden.shape[0], HEAD_CHUNK):
            parts.append(torch.log_softmax(self._logits(hidden[i : i + HEAD_CHUNK])[0], dim=-1))
        if not parts:
            return torch.zeros((0, 0), dtype=torch.float32, device=hidden.device)
        return torch.cat(parts)

    def token_log_probs(self, hidden: Any, targets: Any) -> Any:
        """float32 log-probability of ``targets`` (positions,) from (positions, hidden) states."""
        import torch

        out = []
        for i in range(0, hidden.shape[0], HEAD_CHUNK):
            logits, scratch = self._logits(hidden[i : i + HEAD_CHUNK])
            picked = logits.gather(-1, targets[i : i + HEAD_CHUNK, None])[:, 0]
            out.append(picked - (logsumexp_inplace(logits) if scratch else torch.logsumexp(logits, dim=-1)))
        if not out:
            return torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return torch.cat(out)


class Prefix:
    """The unablated prefix: hidden states entering one decoder layer, shared by the sets edited above it.

    A set of neurons edited only in layers ``>= L`` leaves every hidden state below layer ``L``
    as the unablated model computes it. ``Prefix`` records, per real token sequence (a hashable
    key naming its whole content), the hidden states entering layer ``record`` while a forward
    runs, and replays the states recorded at level ``replay`` in later forwards: the layers below
    it are not run (each returns the recorded states, padding rows zero), and their key/value
    cache entries are filled with one-channel placeholders of the right length (layers below the
    level never read them; the mask sizes come from them). Results equal a full forward up to
    float rounding (the batch composition of recording and replay may differ).

    Parameters
    ----------
    layers
        The model's decoder layers, in order (:func:`vstore.models.decoder_layers`).
    replay
        ``(level, states)`` recorded earlier (:attr:`recorded` of another ``Prefix``), or None.
    record
        Record the states entering this layer (``>= 1``), or None.
    max_bytes
        Stop recording once the recorded states take this much memory (:attr:`full` turns True).
    """

    def __init__(self, layers: Sequence[Any], *, replay: tuple[int, dict[Hashable, Any]] | None = None,
                 record: int | None = None, max_bytes: int = 1 << 30) -> None:
        if record is not None and not 1 <= record < len(layers):
            raise UsageError(f"prefix record level must be in 1..{len(layers) - 1}, got {record}", "record")
        if replay is not None and not 1 <= replay[0] < len(layers):
            raise UsageError(f"prefix replay level must be in 1..{len(layers) - 1}, got {replay[0]}", "replay")
        if replay is not None and record is not None and record <= replay[0]:
            record = None  # the replayed level already covers it
        self.layers = list(layers)
        self.replay = replay
        self.level = record
        self.recorded: dict[Hashable, Any] = {}
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.full = False
        self.replayed = 0  # forwards that skipped the layers below the replay level

    @contextmanager
    def around(self, keys: Sequence[Hashable], real: Any, then: Sequence[Hashable] = ()) -> Iterator[Callable[[Any], None] | None]:
        """Set up replay and recording for one forward whose rows are ``keys`` (real tokens: ``real``).

        Replays only when every key of ``keys`` and ``then`` was recorded; yields the function that
        fills a new key/value cache's skipped layers (None when nothing was skipped).
        """
        import torch

        states = None
        if self.replay is not None and all(k in self.replay[1] for k in (*keys, *then)):
            stored = self.replay[1]
            first = stored[keys[0]]
            states = torch.zeros((*real.shape, first.shape[-1]), dtype=first.dtype, device=first.device)
            for r, k in enumerate(keys):
                states[r, real[r]] = stored[k]
        handles: list[Any] = []
        saved: list[tuple[Any, Any]] = []  # (layer, its own instance-level forward or None)
        try:
            if states is not None:
                self.replayed += 1
                for layer in self.layers[: self.replay[0]]:  # type: ignore[index]
                    saved.append((layer, layer.__dict__.get("forward")))
                    layer.forward = lambda *_a, _s=states, **_k: _s
            if self.level is not None and not self.full:
                handles.append(self.layers[self.level - 1].register_forward_hook(self._recorder(keys, real)))
            yield self._fill(states.shape[0], states.shape[1], states.dtype) if states is not None else None
        finally:
            for h in handles:
                h.remove()
            for layer, own in saved:
                if own is None:
                    del layer.forward
                else:
                    layer.forward = own

    def _recorder(self, keys: Sequence[Hashable], real: Any) -> Callable[..., None]:
        def record(_m: Any, _i: Any, out: Any) -> None:
            h = out[0] if isinstance(out, tuple) else out
            for r, k in enumerate(keys):
                if k in self.recorded or self.full:
                    continue
                row = h[r, real[r]].detach().clone()
                self.recorded[k] = row
                self.nbytes += row.numel() * row.element_size()
                self.full = self.nbytes >= self.max_bytes

        return record

    def _fill(self, rows: int, width: int, dtype: Any) -> Callable[[Any], None]:
        """Placeholder key/value entries for the skipped layers of a new cache (right length)."""
        import torch

        def fill(cache: Any) -> None:
            if not hasattr(cache, "update"):
                return
            device = self.layers[0].parameters().__next__().device
            dummy = torch.zeros((rows, 1, width, 1), dtype=dtype, device=device)
            for i in range(self.replay[0]):  # type: ignore[index]
                cache.update(dummy, dummy, i)

        return fill


class Encoder:
    """Tokenizes text as the model reads it: the tokenizer's leading special tokens (BOS), then the
    text, without trailing special tokens (EOS would otherwise be scored as part of an action)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        probe = "a"
        full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
        plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        lead: list[int] = []
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                lead = full[:i]
                break
        self.lead = lead
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad = int(pad)

    def __call__(self, text: str) -> list[int]:
        return self.lead + list(self.tok(text, add_special_tokens=False)["input_ids"])


def fit_length(model: Any, max_length: int) -> int:
    """``max_length``, cut to the model's position limit when its config has one (GPT-2: ``n_positions``)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(int(max_length), int(limit)) if isinstance(limit, int) and limit > 0 else int(max_length)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def left_padded(seqs: Sequence[Sequence[int]], pad: int, device: Any) -> tuple[Any, Any, Any]:
    """Left-padded ids, attention mask and position ids of token lists, on ``device``."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def right_padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """Right-padded ids and attention mask of token lists."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into batches of ``batch_size``."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}", "batch_size")
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def _busy_jiffies(cpus: set[int]) -> int | None:
    """Busy (non-idle, non-iowait) clock ticks of the given CPUs since boot, from /proc/stat."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    total, seen = 0, 0
    for line in lines:
        name, *vals = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [int(x) for x in vals[:8]]
            total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
            seen += 1
    return total if seen else None


def others_busy(sample_s: float = 0.25) -> float:
    """How many of this process's cores other processes keep busy, sampled over ``sample_s`` seconds
    (the cores' busy time less this process's own CPU time); 0 when it cannot be measured."""
    import time

    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return 0.0
    b0, c0, t0 = _busy_jiffies(cpus), time.process_time(), time.perf_counter()
    time.sleep(sample_s)
    b1, c1, t1 = _busy_jiffies(cpus), time.process_time(), time.perf_counter()
    if b0 is None or b1 is None:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return max(0.0, ((b1 - b0) / ticks - (c1 - c0)) / max(t1 - t0, 1e-6))


def choose_threads(sample_s: float = 0.25) -> int:
    """Torch threads for this process: the cores it may run on (``os.sched_getaffinity``) less the
    ones other processes keep busy right now (:func:`others_busy`), at least 1.

    With as many threads as cores beside a busy process, every parallel operation waits for the
    thread that shares a core with it (passes 10x slower were measured on 2 cores); with the
    busy cores left out, the other process costs about its share.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, int(cores - others_busy(sample_s) + 0.5)))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (None: :func:`choose_threads`) and one inter-op thread; returns the count.

    The inter-op pool can be sized only before torch runs its first parallel operation; later calls
    leave it as it is.
    """
    import torch

    if threads is not None and threads < 1:
        raise UsageError(f"threads must be >= 1, got {threads}", "threads")
    n = choose_threads() if threads is None else int(threads)
    torch.set_num_threads(n)
    with suppress(RuntimeError):  # the inter-op pool has already started
        torch.set_num_interop_threads(1)
    return n
