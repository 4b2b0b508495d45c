"""Attribution of the value choice to every captured neuron: ``-act x d(margin)/d(act)``.

The *margin* of an item is the aligned minus the violating score under a scorer of
:mod:`vstore.evaluate` (``ll`` or ``choice``, raw prompts), with its autograd graph:
:func:`vstore.margin.margin_tensor`. Its attribution to a
neuron at one token is ``-a * dm/da``: the first-order estimate of the change of the margin when
that activation is set to zero ("attribution patching"). One forward and one backward per batch.

Which tokens carry it: the *story* tokens, the ones every sequence of the item's forward shares
before the actions (``ll``: the story context of :func:`vstore.evaluate.score_ll`, scored on the
full ``story + action`` sequences; ``choice``: the story at the start of both option prompts).
A story token's activation appears once per sequence of the item (twice: two actions, or two
option orders); its attribution is the sum over those copies, so it estimates zeroing the neuron
at that token in all of them. Actions and option lists are what is scored, and carry none.

:class:`Attributor` maps the story tokens onto the rows of a build (by position, as far as the
build's tokenization of the example agrees with the story's): every other row — action and
rationale tokens, or a story the ``ll`` scorer cut at the left (past 1,024 tokens) — holds 0, which for a rationale token is
exact (the margin never reads it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from .data import Story
from .errors import DataError, UsageError, VstoreError
from .evaluate import SCORERS, _ll_item, choice_ids
from .hooks import Capture
from .lm import Encoder, common_prefix, fit_length
from .margin import margin_tensor

__all__ = ["Attributor", "BatchAttribution", "attribute_batch", "check_stories", "measure_zeroing"]


@dataclass
class BatchAttribution:
    """The attribution of a batch of items (torch tensors on the model's device).

    Attributes
    ----------
    margins
        (B,) float32 margin (aligned - violating score) of each item.
    tokens
        Per item, its story tokens as the forward reads them (the model's leading special tokens first).
    attr, act
        Model layer -> (B, T, N) attribution and activation at the story positions
        (``T`` = the longest story; positions past an item's story are 0).
    """

    margins: Any
    tokens: list[list[int]]
    attr: dict[int, Any]
    act: dict[int, Any]


def check_stories(stories: Sequence[Story]) -> None:
    """Refuse an item without both actions (the margin needs both), naming its file and line."""
    for s in stories:
        for name in ("aligned", "violating"):
            if not str(getattr(s, name) or "").strip():
                where = f"{s.source}:{s.line}" if s.source else f"item {s.id!r}"
                raise DataError(f"{where}: item {s.id!r} has no {name!r} action; attribution scores the aligned "
                                "against the violating action, so every item needs both")


def _layout(enc: Encoder, model: Any, stories: Sequence[Story], scorer: str) -> tuple[list[list[int]], list[int], bool]:
    """The sequences :func:`vstore.margin.margin_tensor` runs (two per item, item-major), the story
    tokens each item's two share, and whether they are left-padded (``choice``) or right-padded (``ll``)."""
    seqs, story_len = [], []
    for s in stories:
        if scorer == "ll":
            it = _ll_item(enc, s, fit_length(model, 1024))
            seqs += [it.context + a for a in it.actions]
            story_len.append(len(it.context))
        else:
            story = enc(s.story.strip())
            pair = [choice_ids(enc, enc.tok, s, a, b, "raw") for a, b in ((s.aligned, s.violating),
                                                                          (s.violating, s.aligned))]
            seqs += pair
            story_len.append(min(common_prefix(story, p) for p in pair))
    return seqs, story_len, scorer == "choice"


def _choice_sequences(enc: Encoder, stories: Sequence[Story], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Per item the two prompts :func:`vstore.evaluate.score_choice` runs (cut as it cuts them); their story tokens."""
    seqs, story_len = [], []
    for s in stories:
        story = enc(s.story.strip())
        pair = []
        for first, second in ((s.aligned, s.violating), (s.violating, s.aligned)):
            ids = choice_ids(enc, enc.tok, s, first, second, "raw")
            if len(ids) > max_length:
                keep = len(enc.lead)
                ids = ids[:keep] + ids[len(ids) - (max_length - keep):]
            pair.append(ids)
        seqs += pair
        story_len.append(min(common_prefix(story, p) for p in pair))
    return seqs, story_len


def attribute_batch(
    model: Any, tokenizer: Any, stories: Sequence[Story], scorer: str, *, site: str = "act",
    layers: Sequence[int] | None = None,
) -> BatchAttribution:
    """Margins and the attribution ``-act * d(margin)/d(act)`` of every neuron at the story tokens of a batch.

    The margin is :func:`vstore.margin.margin_tensor` (the scorers' margin with its graph; raw prompts).

    Parameters
    ----------
    model, tokenizer
        A causal LM (its own dtype and device: float32 on CPU) and its tokenizer.
    stories
        The items (both actions each; see :func:`check_stories`).
    scorer
        ``ll`` or ``choice``, as in :func:`vstore.evaluate.score_items`.
    site
        The capture site attributed (``act``, ``down_in`` or ``resid``).
    layers
        Model layer indices (default all).
    """
    import torch

    if scorer not in SCORERS:
        raise UsageError(f"scorer: expected one of {', '.join(SCORERS)}, got {scorer!r}", "scorer")
    check_stories(stories)
    seqs, story_len, left = _layout(Encoder(tokenizer), model, stories, scorer)
    acts: dict[int, Any] = {}
    with torch.inference_mode(False), torch.enable_grad():  # the build streams in inference mode
        with Capture(model, site, list(layers) if layers is not None else None, keep_graph=True,
                     on_output=lambda layer, t: acts.__setitem__(layer, t)):
            margins = margin_tensor(SimpleNamespace(model=model, tokenizer=tokenizer), stories, scorer)
        order = sorted(acts)
        width = max(len(q) for q in seqs)
        for k in order:
            if tuple(acts[k].shape[:2]) != (len(seqs), width):
                raise VstoreError(f"attribution: margin_tensor ran a batch of shape {tuple(acts[k].shape[:2])}, "
                                  f"expected {(len(seqs), width)} (its sequence layout changed)")
        grads = torch.autograd.grad(margins.sum(), [acts[k] for k in order], allow_unused=True)
    T = max(story_len)
    offsets = [width - len(q) if left else 0 for q in seqs]  # where each sequence's first token sits
    attr, act = {}, {}
    for k, g in zip(order, grads, strict=True):
        a = acts[k].detach()
        contrib = -(a * g) if g is not None else torch.zeros_like(a)
        per, val = (torch.zeros((len(stories), T, a.shape[-1]), dtype=torch.float32, device=a.device)
                    for _ in range(2))
        for i, c in enumerate(story_len):
            for r in (2 * i, 2 * i + 1):  # the item's two sequences share its story: their copies add up
                per[i, :c] += contrib[r, offsets[r] : offsets[r] + c].float()
            val[i, :c] = a[2 * i, offsets[2 * i] : offsets[2 * i] + c].float()
        attr[k], act[k] = per, val
    tokens = [seqs[2 * i][:c] for i, c in enumerate(story_len)]
    return BatchAttribution(margins.detach().float(), tokens, attr, act)


class Attributor:
    """The attribution rows of a build: called per batch, it returns each layer's attribution on the
    grid of the build's tokenized batch (story tokens; 0 elsewhere), for :func:`vstore.capture.stream_part`.

    Parameters
    ----------
    model, tokenizer
        The model being captured.
    stories
        The story of each example of the build, in example order.
    scorer
        ``ll`` or ``choice``.
    site
        The capture site attributed (the store's first site).
    layers
        The captured model layers.
    """

    def __init__(self, model: Any, tokenizer: Any, stories: Sequence[Story], scorer: str, *, site: str,
                 layers: Sequence[int]) -> None:
        if scorer not in SCORERS:
            raise UsageError(f"attribution: expected one of {', '.join(SCORERS)}, got {scorer!r}", "attribution")
        check_stories(stories)
        self.model, self.tokenizer, self.stories = model, tokenizer, list(stories)
        self.scorer, self.site, self.layers = scorer, site, list(layers)
        self.cut = 0  # examples none of whose story tokens matched the build's tokens (a story cut at the left)

    def __call__(self, b0: int, input_ids: Any) -> dict[int, Any]:
        """Layer -> (B, T, N) float32 attribution on the grid of ``input_ids`` (the build's batch from example ``b0``)."""
        import torch

        batch = self.stories[b0 : b0 + int(input_ids.shape[0])]
        res = attribute_batch(self.model, self.tokenizer, batch, self.scorer, site=self.site, layers=self.layers)
        B, T = input_ids.shape
        ids = input_ids.tolist()
        out = {}
        for layer, a in res.attr.items():
            grid = torch.zeros((B, T, a.shape[-1]), dtype=torch.float32, device=a.device)
            for i, toks in enumerate(res.tokens):
                m = min(common_prefix(toks, ids[i]), T)
                grid[i, :m] = a[i, :m]
            out[layer] = grid
        self.cut += sum(1 for i, toks in enumerate(res.tokens) if common_prefix(toks, ids[i]) <= 1)
        return out


def measure_zeroing(
    model: Any, tokenizer: Any, stories: Sequence[Story], scorer: str, neurons: Sequence[tuple[int, int]], *,
    site: str = "act", batch_size: int = 8, max_length: int = 1024,
) -> tuple[Any, Any]:
    """The truth attribution estimates: each item's margin change when one neuron alone is zeroed at
    the item's story tokens, measured with the scorers of :mod:`vstore.evaluate` (as ``vstore ablate``
    scores), one evaluation per neuron.

    Returns
    -------
    (baseline float64 (items,), change float64 (neurons, items))
        The unablated margins, and ``margin(zeroed) - baseline`` per neuron and item.
    """
    import numpy as np
    import torch

    from .evaluate import score_choice, score_ll
    from .models import capture_modules

    check_stories(stories)
    enc = Encoder(tokenizer)
    story_len = {}  # choice: prompt tokens -> its story tokens (the prompts run one at a time, unpadded)
    if scorer == "choice":
        seqs, lens = _choice_sequences(enc, stories, fit_length(model, max_length))
        story_len = {tuple(s): lens[i // 2] for i, s in enumerate(seqs)}

    def margins() -> Any:
        if scorer == "ll":
            s = score_ll(model, tokenizer, stories, batch_size=batch_size, max_length=max_length)
        elif scorer == "choice":
            s = score_choice(model, tokenizer, stories, batch_size=1, max_length=max_length)
        else:
            raise UsageError(f"scorer: expected one of {', '.join(SCORERS)}, got {scorer!r}", "scorer")
        return s.aligned - s.violating

    base = margins()
    out = np.zeros((len(neurons), len(stories)), dtype=np.float64)
    for j, (layer, n) in enumerate(neurons):
        (_, module, kind), = capture_modules(model, site, [layer])
        zero = _StoryZero(n, scorer, story_len)
        emb = model.get_input_embeddings().register_forward_pre_hook(zero.see_ids)
        if kind == "input":
            h = module.register_forward_pre_hook(lambda _m, i, z=zero: (z(i[0]), *i[1:]))
        else:
            h = module.register_forward_hook(
                lambda _m, _i, o, z=zero: (z(o[0]), *o[1:]) if isinstance(o, tuple) else z(o))
        try:
            with torch.inference_mode():
                out[j] = margins() - base
        finally:
            h.remove()
            emb.remove()
    return base, out


class _StoryZero:
    """Zeroes one neuron at the story tokens of each forward of a scorer (see :func:`measure_zeroing`)."""

    def __init__(self, neuron: int, scorer: str, story_len: dict[tuple[int, ...], int]) -> None:
        self.neuron, self.scorer, self.story_len = neuron, scorer, story_len
        self.calls = 0
        self.ids: Any = None

    def see_ids(self, _module: Any, inputs: Any) -> None:
        self.ids = inputs[0]

    def __call__(self, t: Any) -> Any:
        t = t.clone()
        if self.scorer == "ll":  # per batch: the story's forward, then the actions' (on its cache)
            if self.calls % 2 == 0:
                t[..., self.neuron] = 0
        else:  # choice: one unpadded prompt per forward
            t[:, : self.story_len[tuple(self.ids[0].tolist())], self.neuron] = 0
        self.calls += 1
        return t
