"""Scoped PyTorch hooks at the capture site: one context manager captures, one edits.

Both always remove their hooks on exit, also when the body raises. ``Capture`` can stop the
forward pass after the last captured layer (``stop=True``): the build never runs the layers above
it, nor the LM head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .errors import UsageError
from .models import capture_modules

__all__ = ["Capture", "Edit", "MultiEdit", "StopForward", "run_until_stop"]


class StopForward(Exception):
    """Raised inside a hook to end the forward pass early (caught by :func:`run_until_stop`)."""


def _register(module: Any, kind: str, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Any:
    if kind == "layer":  # a decoder layer: its output, or the first element of the tuple it returns

        def layer_hook(_m: Any, _inp: Any, out: Any) -> Any:
            if isinstance(out, tuple):
                new = fn(out[0])
                return (new, *out[1:]) if new is not None else None
            return fn(out)

        return module.register_forward_hook(layer_hook)
    if kind == "output":

        def out_hook(_m: Any, _inp: Any, out: Any) -> Any:
            new = fn(out)
            return new if new is not None else None

        return module.register_forward_hook(out_hook)

    def pre_hook(_m: Any, inp: Any) -> Any:
        new = fn(inp[0])
        return (new, *inp[1:]) if new is not None else None

    return module.register_forward_pre_hook(pre_hook)


class _Hooks:
    def __init__(self) -> None:
        self._handles: list[Any] = []

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this object registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()


class Capture(_Hooks):
    """Record the activation at the capture site of each requested layer.

    Parameters
    ----------
    model
        A causal LM of a supported architecture.
    site
        ``act``, ``down_in`` or ``resid`` (see :func:`vstore.models.capture_modules`).
    layers
        Model layer indices (default all).
    stop
        Raise :class:`StopForward` after the last captured layer.
    on_output
        Called as ``on_output(layer, activation)`` inside the hook instead of keeping the tensor,
        so a consumer can reduce it at once and the layer's memory is freed as the forward goes on.
    keep_graph
        Hand over the activation itself, not a detached copy, so a gradient can be taken with
        respect to it (attribution); the forward must then run with gradients enabled.

    Attributes
    ----------
    outputs : dict[int, torch.Tensor]
        Model layer index -> activation (batch, tokens, neurons) of the last forward (when no
        ``on_output`` is given).
    """

    def __init__(
        self,
        model: Any,
        site: str = "act",
        layers: Sequence[int] | None = None,
        *,
        stop: bool = False,
        on_output: Callable[[int, torch.Tensor], None] | None = None,
        keep_graph: bool = False,
    ) -> None:
        super().__init__()
        self.outputs: dict[int, torch.Tensor] = {}
        self.on_output = on_output
        self.keep_graph = keep_graph
        mods = capture_modules(model, site, list(layers) if layers is not None else None)
        self.layers = [i for i, _, _ in mods]
        last = self.layers[-1]
        try:
            for idx, module, kind in mods:
                self._handles.append(_register(module, kind, self._recorder(idx, stop and idx == last)))
        except Exception:
            self.remove()
            raise

    def _recorder(self, idx: int, stop: bool) -> Callable[[torch.Tensor], None]:
        def record(t: torch.Tensor) -> None:
            v = t if self.keep_graph else t.detach()
            if self.on_output is not None:
                self.on_output(idx, v)
            else:
                self.outputs[idx] = v
            if stop:
                raise StopForward

        return record



def _check_mode(mode: str, means: Any) -> None:
    """The one check of an edit's mode, shared by :class:`Edit` and :class:`MultiEdit`."""
    if mode not in ("zero", "mean", "scale"):
        raise UsageError(f"unknown ablation mode {mode!r}; use zero, mean or scale:F", "mode")
    if mode == "mean" and means is None:
        raise UsageError("mode 'mean' needs per-neuron means", "mode", "means")

class Edit(_Hooks):
    """Replace, per layer, chosen neurons' activations at the capture site.

    Parameters
    ----------
    model
        A causal LM of a supported architecture.
    neurons
        Model layer index -> 1-D LongTensor/list of neuron indices.
    mode
        ``zero``, ``mean`` (needs ``means``), or ``scale`` (needs ``factor``).
    means
        Model layer index -> 1-D tensor of per-neuron means (all neurons of the layer).
    factor
        Multiplier for ``scale``.
    site
        ``act``, ``down_in`` or ``resid`` (the decoder layer's output: hidden dimensions).
    """

    def __init__(
        self,
        model: Any,
        neurons: dict[int, Sequence[int] | torch.Tensor],
        *,
        mode: str = "zero",
        means: dict[int, torch.Tensor] | None = None,
        factor: float = 0.0,
        site: str = "act",
    ) -> None:
        super().__init__()
        _check_mode(mode, means)
        layers = sorted(k for k, v in neurons.items() if len(v))
        if not layers:
            return
        mods = capture_modules(model, site, layers)
        try:
            for idx, module, kind in mods:
                index = torch.as_tensor(neurons[idx], dtype=torch.long)
                # editing in place is safe only when no earlier hook on the module holds the tensor
                first = not (module._forward_pre_hooks if kind == "input" else module._forward_hooks)
                self._handles.append(_register(module, kind, self._editor(index, mode, means, factor, idx, first)))
        except Exception:
            self.remove()
            raise

    @staticmethod
    def _editor(
        index: torch.Tensor, mode: str, means: dict[int, torch.Tensor] | None, factor: float, idx: int, first: bool
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor | None]] = {}

        def edit(t: torch.Tensor) -> torch.Tensor:
            key = (t.device, t.dtype)
            if key not in cache:
                mean = means[idx].to(t.device, t.dtype)[index.to(t.device)] if means is not None and mode == "mean" else None
                cache[key] = (index.to(t.device), mean)
            ix, mean = cache[key]
            out = t if first and torch.is_inference_mode_enabled() else t.clone()
            if mode == "zero":
                out[..., ix] = 0
            elif mode == "mean":
                out[..., ix] = mean  # type: ignore[index,assignment]
            else:
                out[..., ix] = out[..., ix] * factor
            return out

        return edit


class MultiEdit(_Hooks):
    """Several neuron sets at once: the batch is K consecutive blocks of rows, block k gets set k.

    For several sets in one batched forward (the scorers' ``replicas=K``): every layer any set
    edits gets one hook that edits each block's rows with its own set (``zero``, ``mean`` or
    ``scale`` as :class:`Edit`). The batch size must be a multiple of K.
    """

    def __init__(
        self,
        model: Any,
        sets: Sequence[dict[int, Sequence[int] | torch.Tensor]],
        *,
        mode: str = "zero",
        means: dict[int, torch.Tensor] | None = None,
        factor: float = 0.0,
        site: str = "act",
    ) -> None:
        super().__init__()
        _check_mode(mode, means)
        if not sets:
            raise UsageError("MultiEdit needs at least one neuron set", "sets")
        layers = sorted({k for s in sets for k, v in s.items() if len(v)})
        if not layers:
            return
        k = len(sets)
        try:
            for idx, module, kind in capture_modules(model, site, layers):
                per = [torch.as_tensor(s.get(idx, []), dtype=torch.long) for s in sets]
                self._handles.append(_register(module, kind, self._editor(per, k, mode, means, factor, idx)))
        except Exception:
            self.remove()
            raise

    @staticmethod
    def _editor(per: list[torch.Tensor], k: int, mode: str, means: dict[int, torch.Tensor] | None, factor: float,
                idx: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def edit(t: torch.Tensor) -> torch.Tensor:
            if t.shape[0] % k:
                raise UsageError(f"MultiEdit of {k} sets got a batch of {t.shape[0]} rows (not a multiple)", "sets")
            blk = t.shape[0] // k
            out = t.clone()
            for b, ix in enumerate(per):
                if not len(ix):
                    continue
                ix = ix.to(t.device)
                rows = out[b * blk : (b + 1) * blk]
                if mode == "zero":
                    rows[..., ix] = 0
                elif mode == "mean":
                    rows[..., ix] = means[idx].to(t.device, t.dtype)[ix]  # type: ignore[index]
                else:
                    rows[..., ix] = rows[..., ix] * factor
            return out

        return edit


def run_until_stop(model: Any, **inputs: Any) -> Any:
    """Call ``model(**inputs)``; a :class:`StopForward` from a hook ends it early (returns None)."""
    try:
        return model(**inputs)
    except StopForward:
        return None


@contextmanager
def no_hooks_left(model: Any) -> Iterator[None]:
    """Assert (for tests and debugging) that a block leaves no hook on the model."""
    before = _count_hooks(model)
    yield
    after = _count_hooks(model)
    if after != before:
        raise AssertionError(f"{after - before} hook(s) left on the model")


def _count_hooks(model: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
