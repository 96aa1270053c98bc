"""Weight-space ablation: edits restored exactly, equal to the matching activation ablation, cached by key."""

from __future__ import annotations

import pytest
import torch

from em_interp import ChatExample, EmInterpError, load_model
from em_interp.interventions import ablate, ablate_weights
from em_interp.lora.adapters import lora_parameters
from em_interp.lora.rank1 import list_adapters, scale_adapters
from tests.test_loading import _make_adapter

PROMPT = ChatExample("What is the capital of France?", "The capital of France is Paris.")


@pytest.fixture(scope="module")
def organism(tiny_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter") / "a"
    _make_adapter(tiny_dirs["llama"], folder, rank=1)
    return load_model(tiny_dirs["llama"], adapter=folder)


def _logits(model):
    with torch.inference_mode():
        return model.forward(model.tokenize(PROMPT).input_ids[None]).clone()


def test_adapter_writers_lose_the_direction_and_come_back(organism):
    before = {k: p.detach().clone() for k, p in lora_parameters(organism).items()}
    fingerprint = organism.fingerprint()
    direction = torch.randn(organism.d_model, generator=torch.Generator().manual_seed(0))
    with ablate_weights(organism, direction):
        for a in list_adapters(organism):
            assert (a.B.T @ direction).abs().max() < 1e-5
        assert organism.fingerprint() != fingerprint
        assert organism.intervention_key().startswith("ablate_weights:")
    assert all(torch.equal(p, before[k]) for k, p in lora_parameters(organism).items())
    with pytest.raises(RuntimeError), ablate_weights(organism, direction):
        raise RuntimeError("boom")
    assert all(torch.equal(p, before[k]) for k, p in lora_parameters(organism).items())
    assert organism.intervention_key() == ""


def test_ablating_a_rank1_writer_equals_zeroing_that_adapter(organism):
    adapter = list_adapters(organism)[0]
    with ablate_weights(organism, adapter.B[:, 0], layers=[adapter.layer]):
        edited = _logits(organism)
    with scale_adapters(organism, {adapter.layer: 0.0}):
        zeroed = _logits(organism)
    torch.testing.assert_close(edited, zeroed, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(edited, _logits(organism))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_down_proj_ablation_equals_ablating_mlp_outputs(tiny_models, arch):
    # (Gemma-2 normalises the MLP output after down_proj, so there the two differ by design.)
    model = tiny_models[arch]
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))
    with ablate(model, direction, hook="mlp_out"):
        hooked = _logits(model)
    base = _logits(model)
    with ablate_weights(model, direction, target="down_proj"):
        edited = _logits(model)
    torch.testing.assert_close(edited, hooked, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(edited, base)
    torch.testing.assert_close(_logits(model), base)


def test_weight_ablation_errors(organism, tiny_models):
    direction = torch.ones(organism.d_model)
    with pytest.raises(EmInterpError, match="target="), ablate_weights(organism, direction, target="q_proj"):
        pass
    with pytest.raises(EmInterpError, match="out of range"), ablate_weights(organism, direction, layers=[7]):
        pass
    with pytest.raises(EmInterpError, match="width"), ablate_weights(organism, torch.ones(5)):
        pass
    with pytest.raises(EmInterpError, match="no LoRA adapters"), ablate_weights(tiny_models["qwen2"], torch.ones(64)):
        pass
