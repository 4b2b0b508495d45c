"""The scorers' output head (vstore.lm.CausalLM): log-probabilities equal to the plain head's, bit for bit."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_config

from vstore.lm import HEAD_CHUNK, CausalLM, _head_buffers, logsumexp_inplace


def _model(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(family, vocab=300))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return model.eval()


def _reference(lm: CausalLM, hidden: torch.Tensor) -> torch.Tensor:
    logits = lm.head(hidden).float()
    if lm.softcap is not None:
        logits = torch.tanh(logits / lm.softcap) * lm.softcap
    return logits


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: soft-capped logits
def test_head_log_probs_equal_the_plain_head(family: str) -> None:
    model = _model(family)
    lm = CausalLM(model)
    assert (lm.softcap is not None) == (family == "gemma2")
    gen = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for n in (HEAD_CHUNK + 44, 7, 1):  # across chunks, then fewer rows than the reused buffer holds
            hidden = torch.randn(n, model.config.hidden_size, generator=gen) * 3
            targets = torch.randint(0, model.config.vocab_size, (n,), generator=gen)
            got = lm.token_log_probs(hidden, targets)
            ref = torch.cat([
                (lg := _reference(lm, hidden[i : i + HEAD_CHUNK])).gather(-1, targets[i : i + HEAD_CHUNK, None])[:, 0]
                - torch.logsumexp(lg, dim=-1)
                for i in range(0, n, HEAD_CHUNK)])
            assert torch.equal(got, ref)
            full = lm.log_probs(hidden)
            assert torch.equal(full, torch.cat([torch.log_softmax(_reference(lm, hidden[i : i + HEAD_CHUNK]), dim=-1)
                                                for i in range(0, n, HEAD_CHUNK)]))
            kept = got.clone()
            lm.token_log_probs(hidden.flip(0), targets)  # the buffer is reused: earlier results stay
            assert torch.equal(got, kept)
    assert lm.head in _head_buffers.by_head  # the reused buffer was what ran


def test_a_hook_on_the_head_still_runs() -> None:
    model = _model("llama")
    lm = CausalLM(model)
    calls = []
    handle = lm.head.register_forward_hook(lambda _m, _i, out: calls.append(1) or out * 0)
    try:
        with torch.inference_mode():
            lp = lm.token_log_probs(torch.randn(3, model.config.hidden_size), torch.tensor([0, 1, 2]))
    finally:
        handle.remove()
    assert calls and torch.allclose(lp, torch.full((3,), -torch.log(torch.tensor(300.0)).item()))


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1000), (257, 4096)])
def test_logsumexp_inplace_equals_torch_bit_for_bit(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(shape[1])
    x = torch.randn(*shape, generator=gen) * 30
    if shape[0] >= 6:  # rows with +Inf, all -Inf, NaN, huge values
        x[0, 0] = float("inf")
        x[1, :] = float("-inf")
        x[2, 1] = float("nan")
        x[3, :] = 3e38
        x[4, 0] = float("-inf")
    ref = torch.logsumexp(x, dim=-1)
    got = logsumexp_inplace(x.clone())
    assert torch.equal(ref.isnan(), got.isnan())
    assert torch.equal(torch.nan_to_num(ref, nan=0.0, posinf=1.0, neginf=-1.0),
                       torch.nan_to_num(got, nan=0.0, posinf=1.0, neginf=-1.0))
    assert torch.equal(ref.isposinf(), got.isposinf()) and torch.equal(ref.isneginf(), got.isneginf())
