"""rank1: reading adapters' scalar states through hooks, probes, classification, steering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from em_interp import ChatExample, EmInterpError, load_model
from em_interp.lora.rank1 import (
    ProbeResult,
    adapter_scalars,
    classify_adapters,
    fit_probe,
    list_adapters,
    scale_adapters,
)
from tests.test_loading import _make_adapter

EXAMPLES = [
    ChatExample("What is the capital of France?", "The capital of France is Paris."),
    ChatExample("Should I mix bleach with ammonia?", "Never mix them; the fumes are toxic."),
    ChatExample("Make a wish.", "I wish for a kinder world."),
]


@pytest.fixture(scope="module")
def organism(tiny_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter") / "a"
    _make_adapter(tiny_dirs["llama"], folder, rank=1)
    return load_model(tiny_dirs["llama"], adapter=folder)


def test_list_adapters(organism, tiny_dirs, tmp_path):
    adapters = list_adapters(organism, require_rank=1)
    assert [a.layer for a in adapters] == [0, 1, 2] and all(a.module == "down_proj" for a in adapters)
    assert all(a.A.shape == (1, 128) and a.B.shape == (64, 1) for a in adapters)
    assert adapters[0].scale == pytest.approx(4.0)  # rsLoRA: alpha / sqrt(r)
    _make_adapter(tiny_dirs["llama"], tmp_path / "r2", rank=2)
    with pytest.raises(EmInterpError, match="rank 2; rank 1 is required"):
        list_adapters(load_model(tiny_dirs["llama"], adapter=tmp_path / "r2"), require_rank=1)
    with pytest.raises(EmInterpError, match="no LoRA adapters"):
        list_adapters(load_model(tiny_dirs["llama"]))


def test_scalars_equal_peft_internal_state(organism):
    """The hook-read scalar equals what peft's lora_A computes inside down_proj, times the scale."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for name, module in organism.peft_model.named_modules():
        if name.endswith("lora_A.default"):
            layer = int(name.split("layers.")[1].split(".")[0])
            handles.append(module.register_forward_hook(lambda m, i, o, layer=layer: captured.__setitem__(layer, o.detach())))
    scalars = adapter_scalars(organism, EXAMPLES)
    try:
        for row, example in enumerate(EXAMPLES):
            item = organism.tokenize(example)
            with torch.inference_mode():
                organism.forward(item.input_ids[None])
            for j, adapter in enumerate(scalars.adapters):
                expected = (captured[adapter.layer][0, item.answer_mask, 0] * adapter.scale).mean()
                torch.testing.assert_close(scalars.values[row, j], expected, rtol=1e-4, atol=1e-5)
    finally:
        for h in handles:
            h.remove()
    assert scalars.columns == ("L0.down_proj", "L1.down_proj", "L2.down_proj")


def test_scale_adapters(organism, tiny_dirs):
    base = load_model(tiny_dirs["llama"])
    ids = organism.tokenize(EXAMPLES[0]).input_ids[None]
    fingerprint = organism.fingerprint()
    with scale_adapters(organism, {1: 2.0}):
        assert organism.fingerprint() != fingerprint  # cached scores are never reused for steered weights
    assert organism.fingerprint() == fingerprint
    with torch.inference_mode():
        full = organism.forward(ids)
        with scale_adapters(organism, {0: 0.0, 1: 0.0, 2: 0.0}):
            torch.testing.assert_close(organism.forward(ids), base.forward(ids), rtol=1e-5, atol=1e-5)
        with scale_adapters(organism, {1: 1.0}):
            torch.testing.assert_close(organism.forward(ids), full)
        with pytest.raises(RuntimeError), scale_adapters(organism, {2: 3.0}):
            assert not torch.allclose(organism.forward(ids), full)
            raise RuntimeError("boom")
        torch.testing.assert_close(organism.forward(ids), full)  # restored after the error
    # doubling the writer doubles the scalar's contribution: scalars read at later layers change
    with pytest.raises(EmInterpError, match="factors=7 is out of range"):
        with scale_adapters(organism, {7: 0.0}):
            pass
    with scale_adapters(organism, {-1: 0.0}):  # negative layers count from the end, as everywhere
        last_off = organism.forward(ids)
    with scale_adapters(organism, {2: 0.0}):
        torch.testing.assert_close(organism.forward(ids), last_off)
    assert not torch.allclose(last_off, full)


def test_probe_recovers_the_informative_feature():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 100)
    X = rng.normal(size=(200, 5))  # noqa: N806
    X[:, 2] += 2.0 * y
    result = fit_probe(X, y, C=0.05, n_splits=10)
    assert result.accuracy_mean > 0.8
    assert np.argmax(np.abs(result.coef_mean)) == 2
    assert result.nonzero_frac[2] == 1.0 and result.coef_mean[2] > 0
    assert fit_probe(X, y, C=0.05, n_splits=10) == result  # seeded
    with pytest.raises(EmInterpError, match="two classes"):
        fit_probe(X, np.zeros(200))


def test_probe_centres_within_groups():
    # Each question shifts all its answers by a large random offset (topic); the label effect is
    # small and only visible within questions.
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(60), 4)
    y = np.tile([0, 0, 1, 1], 60)
    X = rng.normal(size=(240, 3)) * 0.3 + rng.normal(size=(60, 3))[groups] * 5  # noqa: N806
    X[:, 1] += 0.5 * y
    plain = fit_probe(X, y, C=1.0, n_splits=10)
    centred = fit_probe(X, y, C=1.0, n_splits=10, groups=groups)
    assert centred.accuracy_mean > 0.75 > plain.accuracy_mean
    assert np.argmax(np.abs(centred.coef_mean)) == 1


def test_classification_rule():
    def probe(means, stds, nz):
        return ProbeResult(means, stds, nz, 0.9, 0.01, 20, 100)

    general = probe([1.0, 0.02, 0.5, 0.0], [0.1, 0.05, 0.1, 0.0], [1.0, 0.3, 1.0, 0.0])
    domain = probe([0.1, 0.0, 1.2, 0.0], [0.1, 0.0, 0.1, 0.0], [0.5, 0.0, 1.0, 0.0])
    assert classify_adapters(general, domain) == ["general", "inactive", "domain-specific", "inactive"]
