"""Hooks are attached only inside context managers and are gone afterwards, even after errors."""

from __future__ import annotations

import pytest
import torch

from em_interp import ChatExample


def test_hooks_removed_after_exception(tiny):
    item = tiny.tokenize(ChatExample("What is the capital of France?", "Paris."))
    ids = item.input_ids[None]
    baseline = tiny.forward(ids).detach()
    assert tiny.active_hook_count() == 0

    def boom(tensor, *, hook):
        raise RuntimeError("boom")

    def zero(tensor, *, hook):
        return torch.zeros_like(tensor)

    with pytest.raises(RuntimeError, match="boom"), tiny.hooks([(tiny.hook_name(1), boom)]):
        tiny.forward(ids)
    assert tiny.active_hook_count() == 0
    with pytest.raises(KeyError), tiny.hooks([(tiny.hook_name(0), zero)]):
        assert tiny.active_hook_count() == 1
        changed = tiny.forward(ids)
        assert not torch.allclose(changed, baseline)
        raise KeyError("error in user code")
    assert tiny.active_hook_count() == 0
    torch.testing.assert_close(tiny.forward(ids).detach(), baseline)


def test_hooks_apply_during_generation(tiny_models):
    model = tiny_models["llama"]
    calls: list[int] = []

    def count(tensor, *, hook):
        calls.append(tensor.shape[1])
        return tensor

    with model.hooks([(model.hook_name(0), count)]):
        model.generate([ChatExample("Hi")], max_new_tokens=4)
    # the first call sees the whole prompt, later ones one new token each (KV cache)
    assert len(calls) >= 2 and calls[0] > 1 and all(c == 1 for c in calls[1:])
    assert model.active_hook_count() == 0


def test_generation_is_seeded(tiny_models):
    model = tiny_models["qwen2"]
    prompts = [ChatExample("Hi"), ChatExample("What is the capital of France?")]
    a = model.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3)
    b = model.generate(prompts, max_new_tokens=6, temperature=1.0, seed=3)
    assert a == b
