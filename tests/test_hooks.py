"""The scoped hook layer (vstore.hooks): Edit against hand-edited weights, Capture, and no hook left."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest_ablate import down_weight_zeroed, family_model
from tiny_models import FAMILIES

from vstore.errors import ModelError
from vstore.hooks import Capture, Edit, StopForward, _count_hooks, no_hooks_left, run_until_stop
from vstore.models import decoder_layers

NEURONS = {0: [1, 5, 17, 40], 1: [0, 3, 47]}


def _ids(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 64, (2, 9), generator=g)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {f: family_model(f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_edit_equals_zeroed_down_projection(models: dict, family: str) -> None:
    model = models[family]
    ids = _ids()
    zeroed = copy.deepcopy(model)
    down_weight_zeroed(zeroed, family, NEURONS)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with no_hooks_left(model), Edit(model, NEURONS, mode="zero"):
            hooked = model(input_ids=ids).logits
        ref = zeroed(input_ids=ids).logits
    assert not torch.allclose(plain, ref), "the ablation must change the logits for the test to mean anything"
    torch.testing.assert_close(hooked, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_mean_and_scale_match_their_definitions(models: dict, family: str) -> None:
    model = models[family]
    ids = _ids(1)
    n_neurons = 48
    means = {la: torch.linspace(-1.0, 1.0, n_neurons) for la in NEURONS}
    with torch.no_grad(), Capture(model) as cap:
        model(input_ids=ids)
        plain = {k: v.clone() for k, v in cap.outputs.items()}
    for mode, kw in (("mean", {"means": means}), ("scale", {"factor": 0.25})):
        # Edit is registered first, so the Capture after it records the edited activation
        with torch.no_grad(), Edit(model, NEURONS, mode=mode, **kw), Capture(model) as cap:
            model(input_ids=ids)
            got = cap.outputs
        for layer in range(2):
            idx = NEURONS[layer]
            other = [i for i in range(n_neurons) if i not in idx]
            if layer == 0:  # below the first edit, everything else is untouched
                torch.testing.assert_close(got[layer][..., other], plain[layer][..., other])
            if mode == "mean":
                want = means[layer][idx].expand_as(got[layer][..., idx])
                torch.testing.assert_close(got[layer][..., idx], want)
        if mode == "scale":
            torch.testing.assert_close(got[0][..., NEURONS[0]], plain[0][..., NEURONS[0]] * 0.25)


def test_scale_equals_scaled_down_projection(models: dict) -> None:
    model = models["llama"]
    ids = _ids(2)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for layer, idx in NEURONS.items():
            scaled.model.layers[layer].mlp.down_proj.weight[:, idx] *= 3.0
        with Edit(model, NEURONS, mode="scale", factor=3.0):
            hooked = model(input_ids=ids).logits
        ref = scaled(input_ids=ids).logits
    torch.testing.assert_close(hooked, ref, atol=1e-5, rtol=1e-5)


def test_down_in_site_zero_equals_act_site_zero(models: dict) -> None:
    model = models["qwen2"]
    ids = _ids(3)
    with torch.no_grad():
        with Edit(model, NEURONS, site="act"):
            a = model(input_ids=ids).logits
        with Edit(model, NEURONS, site="down_in"):
            b = model(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["edit", "capture"])
def test_no_hook_remains_after_an_exception(models: dict, kind: str) -> None:
    model = models["llama"]
    before = _count_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        ctx = Edit(model, NEURONS, mode="zero") if kind == "edit" else Capture(model)
        with ctx:
            assert _count_hooks(model) > before
            model(input_ids=_ids())
            raise RuntimeError("boom")
    assert _count_hooks(model) == before
    # and the model computes what an unhooked model computes
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, fresh(input_ids=_ids()).logits)


def test_no_hook_remains_after_normal_exit(models: dict) -> None:
    model = models["gpt_neox"]
    with no_hooks_left(model), torch.no_grad(), Edit(model, NEURONS, mode="scale", factor=2.0), \
            Capture(model, "down_in"):
        model(input_ids=_ids())
    assert _count_hooks(model) == 0


def test_no_hooks_left_reports_a_leak(models: dict) -> None:
    model = models["llama"]
    with pytest.raises(AssertionError, match="hook"), no_hooks_left(model):
        edit = Edit(model, NEURONS)
    edit.remove()
    assert _count_hooks(model) == 0


def test_capture_stop_skips_the_layers_above(models: dict) -> None:
    model = models["llama"]
    ran = []
    last = decoder_layers(model)[1]
    h = last.register_forward_hook(lambda *_: ran.append(1))
    try:
        with torch.no_grad(), Capture(model, layers=[0], stop=True) as cap:
            assert run_until_stop(model, input_ids=_ids()) is None
        assert set(cap.outputs) == {0} and cap.outputs[0].shape == (2, 9, 48)
        assert ran == []
    finally:
        h.remove()
    assert _count_hooks(model) == 0


def test_capture_records_the_act_fn_output(models: dict) -> None:
    model = models["mistral"]
    ids = _ids(4)
    got = []
    mlp = model.model.layers[1].mlp
    h = mlp.act_fn.register_forward_hook(lambda _m, _i, o: got.append(o.detach().clone()))
    try:
        with torch.no_grad(), Capture(model, layers=[1]) as cap:
            model(input_ids=ids)
    finally:
        h.remove()
    torch.testing.assert_close(cap.outputs[1], got[0])


def test_edit_bad_arguments(models: dict) -> None:
    model = models["llama"]
    with pytest.raises(ValueError, match="mode"):
        Edit(model, NEURONS, mode="halve")
    with pytest.raises(ValueError, match="means"):
        Edit(model, NEURONS, mode="mean")
    with pytest.raises(ModelError, match="out of range"):
        Edit(model, {7: [1]})
    with pytest.raises(ModelError, match="site"):
        Edit(model, NEURONS, site="attn")
    assert _count_hooks(model) == 0
    with Edit(model, {0: []}) as e:  # nothing to edit: no hook at all
        assert _count_hooks(model) == 0
    e.remove()


def test_stop_forward_outside_run_until_stop_propagates(models: dict) -> None:
    model = models["llama"]
    with pytest.raises(StopForward), torch.no_grad(), Capture(model, layers=[0], stop=True):
        model(input_ids=_ids())
    assert _count_hooks(model) == 0


@pytest.mark.parametrize("mode", ["zero", "mean", "scale"])
def test_in_place_edit_under_inference_mode_equals_cloning_edit(models: dict, mode: str) -> None:
    model, ids = models["llama"], _ids(5)
    kw = {"means": {0: torch.full((48,), 0.5), 1: torch.full((48,), -0.25)}} if mode == "mean" else {}
    with torch.no_grad(), Edit(model, NEURONS, mode=mode, factor=3.0, **kw):
        cloned = model(input_ids=ids).logits
    with torch.inference_mode(), Edit(model, NEURONS, mode=mode, factor=3.0, **kw):
        in_place = model(input_ids=ids).logits
    torch.testing.assert_close(in_place, cloned, rtol=0, atol=0)


def test_capture_registered_before_edit_sees_unedited_values(models: dict) -> None:
    model, ids = models["llama"], _ids(6)
    with torch.inference_mode(), Capture(model) as plain:
        model(input_ids=ids)
        want = {k: v.clone() for k, v in plain.outputs.items()}
    with torch.inference_mode(), Capture(model) as cap, Edit(model, NEURONS):
        model(input_ids=ids)
        for layer in (0,):  # layer 0 runs before any edit reaches the residual stream
            torch.testing.assert_close(cap.outputs[layer], want[layer], rtol=0, atol=0)
    with torch.inference_mode(), Edit(model, NEURONS), Capture(model) as after:
        model(input_ids=ids)
        assert (after.outputs[0][..., NEURONS[0]] == 0).all()
