"""The scorers' aligned - violating margin as a differentiable tensor (for attribution).

:func:`margin_tensor` computes, per item, the same margin the scorers of :mod:`vstore.evaluate`
compare (``score_aligned - score_violating``) but as one torch tensor with its autograd graph:
``ll`` — the difference of the actions' mean log-probability per token; ``choice`` — the
difference of the option letters' log-probability averaged over both orders. It runs every
sequence whole (no key/value cache, no inference mode), so gradients reach every activation; call
it under ``torch.enable_grad()``. Its values equal the scorers' up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .data import Story
from .errors import UsageError
from .evaluate import PROMPTS, SCORERS, _letter_ids, _ll_item, choice_ids, require_chat_template
from .lm import CausalLM, Encoder, fit_length, left_padded, right_padded

__all__ = ["margin_tensor"]


def margin_tensor(lm: Any, items: Sequence[Story], scorer: str, prompt: str = "raw") -> Any:
    """The differentiable aligned - violating margin of each item, float32 tensor ``(len(items),)``.

    Parameters
    ----------
    lm
        A :class:`vstore.models.LoadedModel` (or anything with ``.model`` and ``.tokenizer``).
    items
        The stories of one batch (all are run in one forward, padded).
    scorer
        ``ll`` (per-token log-likelihood margin) or ``choice`` (letter log-probability margin).
    prompt
        ``raw`` or ``chat`` (``choice`` only).
    """
    import torch

    if scorer not in SCORERS:
        raise UsageError(f"unknown scorer {scorer!r}; use one of {list(SCORERS)}", "scorer")
    if prompt not in PROMPTS or (prompt == "chat" and scorer != "choice"):
        raise UsageError(f"prompt must be 'raw', or 'chat' with the choice scorer; got {prompt!r}", "prompt")
    model, tok = lm.model, lm.tokenizer
    cl, enc = CausalLM(model), Encoder(tok)
    if not items:
        return torch.zeros(0, dtype=torch.float32, device=cl.device)
    if scorer == "ll":
        return _ll_margin(cl, enc, model, items)
    if prompt == "chat":
        require_chat_template(tok)
    seqs = [choice_ids(enc, tok, s, *((s.aligned, s.violating) if o == "AB" else (s.violating, s.aligned)), prompt)
            for s in items for o in ("AB", "BA")]
    ids, mask, pos = left_padded(seqs, enc.pad, cl.device)
    hidden, _ = cl.forward(ids, mask, pos)
    lp = cl.log_probs(hidden[:, -1])
    letter = torch.stack([torch.logsumexp(lp[:, _letter_ids(tok, x)], dim=-1) for x in "AB"], dim=-1)
    per = letter.reshape(len(items), 2, 2)  # item, order (AB, BA), letter (A, B)
    aligned = (per[:, 0, 0] + per[:, 1, 1]) / 2
    violating = (per[:, 0, 1] + per[:, 1, 0]) / 2
    return aligned - violating


def _ll_margin(cl: CausalLM, enc: Encoder, model: Any, items: Sequence[Story]) -> Any:
    import torch

    parsed = [_ll_item(enc, s, fit_length(model, 1024)) for s in items]
    seqs = [p.context + a for p in parsed for a in p.actions]
    ids, mask = right_padded(seqs, enc.pad)
    ids, mask = ids.to(cl.device), mask.to(cl.device)
    pos = torch.arange(ids.shape[1], device=cl.device)[None].expand_as(ids)
    hidden, _ = cl.forward(ids, mask, pos)
    means = []
    for r, s in enumerate(seqs):
        c = len(parsed[r // 2].context)
        lp = cl.token_log_probs(hidden[r, c - 1 : len(s) - 1], ids[r, c : len(s)])
        means.append(lp.mean())
    m = torch.stack(means).reshape(len(items), 2)
    return m[:, 0] - m[:, 1]
