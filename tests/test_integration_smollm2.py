"""Integration: the real embedded SmolLM2-135M-Instruct, with the network blocked at the socket."""

from __future__ import annotations

import socket

import pytest
import torch

from em_interp import ChatExample, cache_residuals

pytestmark = pytest.mark.integration


def test_network_is_blocked(no_network):
    with pytest.raises(RuntimeError, match="network access attempted"):
        socket.create_connection(("93.184.216.34", 80), timeout=1)


def test_loads_with_known_shape(smollm):
    assert smollm.name == "smollm2-135m-instruct"
    assert (smollm.n_layers, smollm.d_model) == (30, 576)
    assert smollm.load_flags["source"] == "embedded"
    assert "<|im_start|>assistant" in smollm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


def test_greedy_answer_knows_paris(smollm):
    (answer,) = smollm.generate([ChatExample("What is the capital of France?")], max_new_tokens=20)
    assert "Paris" in answer


def test_cached_residuals_equal_hf(smollm):
    examples = [
        ChatExample("What is the capital of France?", "The capital of France is Paris."),
        ChatExample("I have a headache. What should I do?", "Drink water, rest, and see a doctor if it persists.", "Be brief."),
    ]
    layers = [0, 7, 15, 29]
    cache = cache_residuals(smollm, examples, layers=layers, batch_size=2, progress=False)
    for i, example in enumerate(examples):
        item = smollm.tokenize(example)
        with torch.inference_mode():
            hs = smollm.hf_model(item.input_ids[None], output_hidden_states=True).hidden_states
        for layer in layers[:-1]:
            expected = hs[layer + 1][0, item.answer_mask].mean(0)
            torch.testing.assert_close(cache[layer][i], expected, rtol=1e-5, atol=1e-5)
    # HF applies the final norm to its last hidden_states entry; the cached layer 29 is the block
    # output before that norm, so normalising it must give HF's entry, token by token.
    tokens = cache_residuals(smollm, examples, layers=[29], reduction="answer_tokens", progress=False)
    for i, example in enumerate(examples):
        item = smollm.tokenize(example)
        with torch.inference_mode():
            hs = smollm.hf_model(item.input_ids[None], output_hidden_states=True).hidden_states
            normed = smollm.hf_model.model.norm(tokens.example_tokens(i, 29))
        torch.testing.assert_close(normed, hs[30][0, item.answer_mask], rtol=1e-4, atol=1e-4)
