"""Cross-model transfer: the ridge map recovers a known linear map, carries directions, builds controls."""

from __future__ import annotations

import pytest
import torch

from em_interp import ChatExample, EmInterpError, load_model
from em_interp.directions import Direction
from em_interp.evaluation.judge_free import answer_logprobs
from em_interp.interventions import steer
from em_interp.transfer import RidgeMap, fit_ridge_map, paired_activations, transfer_controls
from tests.helpers import save_tiny_model

PROMPTS = [ChatExample(f"Question number {i}: what do you think about item {i * 7 % 13}?") for i in range(40)]


def test_ridge_recovers_a_linear_map_and_round_trips(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=gen) * 50 + 3  # large offsets and scales, as in real residuals
    m = torch.randn(12, 20, generator=gen)
    y = x @ m + 7 + 0.01 * torch.randn(300, 20, generator=gen)
    ridge = fit_ridge_map(x, y, src_model="a", dst_model="b", src_layer=1, dst_layer=2)
    assert ridge.r2 > 0.999 and ridge.n_examples == 300
    torch.testing.assert_close(ridge.weight, m, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ridge(x[:5]), y[:5], rtol=1e-2, atol=0.2)
    v = torch.randn(12, generator=gen)
    torch.testing.assert_close(ridge.map_vector(v), v @ m, rtol=1e-2, atol=1e-2)
    mapped = ridge.map_direction(Direction(v, layer=1, model="a", method="dom"))
    assert mapped.layer == 2 and mapped.model == "b" and mapped.method == "ridge(dom)"
    ridge.save(tmp_path / "map")
    again = RidgeMap.load(tmp_path / "map")
    torch.testing.assert_close(again.weight, ridge.weight)
    assert (again.alpha, again.r2, again.src_model, again.dst_layer) == (ridge.alpha, ridge.r2, "a", 2)


def test_ridge_errors(no_shape_checks):
    x, y = torch.randn(30, 4), torch.randn(29, 6)
    with pytest.raises(EmInterpError, match="src has 30 examples but dst has 29"):
        fit_ridge_map(x, y)
    bad = torch.randn(30, 6)
    bad[3, 2] = float("nan")
    with pytest.raises(EmInterpError, match="dst has NaN"):
        fit_ridge_map(x, bad)
    with pytest.raises(EmInterpError, match="too few"):
        fit_ridge_map(x[:3], bad[:3])
    ridge = fit_ridge_map(x, torch.randn(30, 6), src_model="a", src_layer=1)
    with pytest.raises(EmInterpError, match="reads width 4"):
        ridge.map_vector(torch.ones(5))
    with pytest.raises(EmInterpError, match="made on 'other'"):
        ridge.map_direction(Direction(torch.ones(4), layer=1, model="other"))
    with pytest.raises(EmInterpError, match="layer 0"):
        ridge.map_direction(Direction(torch.ones(4), layer=0, model="a"))
    with pytest.raises(EmInterpError, match="map file"):
        RidgeMap.load("/nonexistent/map")


def test_transfer_between_tiny_models_of_different_architectures_and_widths(tiny_models, tmp_path):
    donor = tiny_models["gemma2"]  # d_model 64
    receiver = load_model(save_tiny_model("llama", tmp_path / "wide", d_model=96))
    assert receiver.d_model == 96
    src, dst = paired_activations(donor, receiver, PROMPTS, src_layer=1, dst_layer=2)
    assert src.shape == (40, 64) and dst.shape == (40, 96)
    ridge = fit_ridge_map(src, dst, src_model=donor.name, dst_model=receiver.name, src_layer=1, dst_layer=2)
    direction = Direction(src[:20].mean(0) - src[20:].mean(0), layer=1, model=donor.name, method="dom")
    controls = transfer_controls(ridge, direction, src[:20], src[20:], n=2, seed=0)
    assert set(controls) == {"transferred", "random", "orthogonal", "shuffled_label"}
    norm = float(controls["transferred"][0].vector.norm())
    for kind, items in controls.items():
        for d in items:
            assert d.vector.numel() == 96 and d.layer == 2 and d.model == receiver.name
            assert float(d.vector.norm()) == pytest.approx(norm, rel=1e-4), kind
    assert len(controls["random"]) == 2
    # the receiver can be steered with the carried direction (and the controls) through its hooks
    example = [ChatExample("Make a wish.", "I wish for a kinder world.")]
    plain = answer_logprobs(receiver, example)
    with steer(receiver, controls["transferred"][0], alpha=3.0):
        steered = answer_logprobs(receiver, example)
    assert steered[0] != pytest.approx(plain[0])
    with pytest.raises(EmInterpError, match="width"), steer(donor, controls["transferred"][0], alpha=1.0):
        pass
    # the same prompts and seed give the same map
    again = fit_ridge_map(*paired_activations(donor, receiver, PROMPTS, 1, 2))
    torch.testing.assert_close(again.weight, ridge.weight)
