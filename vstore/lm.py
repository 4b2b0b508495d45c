"""The pieces of a causal language model the scorers use: base model and output head, the text
encoder, padding and batching. Scores are computed in float32 from the hidden states, on whatever
device the model is on.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from .errors import ModelError, UsageError

__all__ = ["HEAD_CHUNK", "CausalLM", "Encoder", "batches", "common_prefix", "fit_length", "left_padded",
           "right_padded"]

HEAD_CHUNK = 256  # positions per output-head call (bounds the (positions, vocab) logits buffer)


class CausalLM:
    """The pieces of a causal LM the scorers use: base model, output head, soft-capping, device."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        if self.base is model or self.head is None:
            raise ModelError(f"{type(model).__name__}: cannot separate the base model from the output head")
        cap = getattr(model.config, "final_logit_softcapping", None)
        self.softcap = float(cap) if cap else None
        self.device = next(model.parameters()).device
        params = inspect.signature(self.base.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def forward(self, ids: Any, mask: Any, pos: Any, *, cache: Any = None, use_cache: bool = False) -> tuple[Any, Any]:
        kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": use_cache}
        if cache is not None:
            kw[self.cache_kw] = cache
        out = self.base(**kw)
        new_cache = getattr(out, "cache", None) if use_cache else None
        if use_cache and new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.last_hidden_state, new_cache

    def log_probs(self, hidden: Any) -> Any:
        """float32 log-softmax over the vocabulary of (positions, hidden) states, chunked."""
        import torch

        parts = []
        for i in range(0, hidden.shape[0], HEAD_CHUNK):
            logits = self.head(hidden[i : i + HEAD_CHUNK]).float()
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            parts.append(torch.log_softmax(logits, dim=-1))
        if not parts:
            return torch.zeros((0, 0), dtype=torch.float32, device=hidden.device)
        return torch.cat(parts)

    def token_log_probs(self, hidden: Any, targets: Any) -> Any:
        """float32 log-probability of ``targets`` (positions,) from (positions, hidden) states."""
        import torch

        out = []
        for i in range(0, hidden.shape[0], HEAD_CHUNK):
            logits = self.head(hidden[i : i + HEAD_CHUNK]).float()
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            lse = torch.logsumexp(logits, dim=-1)
            out.append(logits.gather(-1, targets[i : i + HEAD_CHUNK, None])[:, 0] - lse)
        if not out:
            return torch.zeros(0, dtype=torch.float32, device=hidden.device)
        return torch.cat(out)


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
