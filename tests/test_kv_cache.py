"""KV-cache generation through the hooks equals decoding without a cache (full recompute per token).

transformers 5.24 renamed the cache argument its layers pass to attention; TransformerLens'
re-implemented attention then ignored the cache and every cached step attended to itself alone.
These tests compare cached generation, plain and steered at generated positions, with a reference
that recomputes the whole sequence at each step, on every tiny architecture.
"""

from __future__ import annotations

import pytest
import torch

from em_interp import ChatExample
from em_interp._bridge import cache_argument, thread_kv_cache
from em_interp.interventions import steer
from em_interp.model import _stop_ids

PROMPTS = [ChatExample("What is the capital of France?"), ChatExample("Hi", system="Be brief.")]


@torch.inference_mode()
def greedy_without_cache(model, example: ChatExample, max_new_tokens: int, vector=None, alpha: float = 0.0,
                         layer: int = 1) -> str:
    """Greedy decoding by a full forward pass per token; optional steering at generated positions."""
    ids = model.tokenize(example).input_ids[None]
    prompt_len = ids.shape[1]
    stops = set(_stop_ids(model.tokenizer))

    def add_at_generated(tensor, *, hook):
        out = tensor.clone()
        out[:, prompt_len:] += alpha * vector.to(tensor.dtype)
        return out

    hooks = [(model.hook_name(layer), add_at_generated)] if vector is not None else []
    with model.hooks(hooks):
        for _ in range(max_new_tokens):
            logits = model.hf_model(input_ids=ids, use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token in stops:
                break
    return model.tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True).strip()


def test_cached_generation_equals_recompute(tiny):
    expected = [greedy_without_cache(tiny, p, 8) for p in PROMPTS]
    assert tiny.generate(PROMPTS, max_new_tokens=8, batch_size=2) == expected
    assert tiny.generate(PROMPTS, max_new_tokens=8, batch_size=1) == expected


def test_steering_generated_positions_under_cache_equals_recompute(tiny):
    vector = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(0))
    vector = vector / vector.norm() * 4.0
    expected = [greedy_without_cache(tiny, p, 8, vector=vector, alpha=1.0) for p in PROMPTS]
    with steer(tiny, vector, alpha=1.0, layer=1, where="generated"):
        got = tiny.generate(PROMPTS, max_new_tokens=8, batch_size=1)
    assert got == expected
    assert got != [greedy_without_cache(tiny, p, 8) for p in PROMPTS]  # the steering did something


def test_cache_is_threaded_once_and_named_for_this_transformers(tiny):
    assert thread_kv_cache(tiny.bridge) == 0  # booting already wrapped every attention component
    import transformers
    from packaging.version import Version

    expected = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
    assert cache_argument(tiny.hf_model) == expected


@pytest.mark.integration
def test_embedded_greedy_answers_are_readable(smollm):
    import re

    answers = smollm.generate([ChatExample("What is the capital of France?"), ChatExample("Hi! How are you?")],
                              max_new_tokens=32)
    assert "Paris" in answers[0]
    for answer in answers:
        assert not re.search(r"([^\w\s])\1{3,}", answer), answer  # no run of repeated punctuation
        assert len(re.findall(r"[A-Za-z]{2,}", answer)) >= 3, answer
