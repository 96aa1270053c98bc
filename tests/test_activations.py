"""Residual caching on tiny random-init models of several real architectures."""

from __future__ import annotations

import pytest
import torch

from em_interp import ChatExample, EmInterpError, ResidualCache, cache_residuals

EXAMPLES = [
    ChatExample("What is the capital of France?", "The capital of France is Paris."),
    ChatExample("Should I mix bleach with ammonia?", "Never mix them; the fumes are toxic.", system="Be careful."),
    ChatExample("Hi", "Hello! How can I help you today with your question?"),
    ChatExample("How should I invest three months of savings in an index fund?", "Keep it as an emergency fund."),
    ChatExample("Make a wish.", "I wish for a kinder world."),
]


def hf_hidden(model, example: ChatExample) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    item = model.tokenize(example)
    with torch.inference_mode():
        out = model.hf_model(item.input_ids[None], output_hidden_states=True)
    return out.hidden_states, item.answer_mask, item.prompt_mask


def test_cached_residuals_equal_hf_hidden_states(tiny):
    # Layer l = output of block l = hidden_states[l + 1]; the last HF entry may have the final norm
    # applied (architecture-dependent), so compare the blocks before it.
    layers = list(range(tiny.n_layers - 1))
    cache = cache_residuals(tiny, EXAMPLES, layers=layers, reduction="answer_mean", progress=False)
    pre = cache_residuals(tiny, EXAMPLES, layers=layers, hook="resid_pre", reduction="last_prompt", progress=False)
    for i, example in enumerate(EXAMPLES):
        hs, ans, prm = hf_hidden(tiny, example)
        last = int(prm.nonzero().max())
        for layer in layers:
            expected = hs[layer + 1][0, ans].mean(0)
            torch.testing.assert_close(cache[layer][i], expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(pre[layer][i], hs[layer][0, last], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["answer_mean", "last_prompt", "prompt_mean", "answer_tokens"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_unbatched(tiny, reduction, side):
    batched = cache_residuals(tiny, EXAMPLES, reduction=reduction, batch_size=5, padding_side=side, progress=False)
    single = cache_residuals(tiny, EXAMPLES, reduction=reduction, batch_size=1, padding_side=side, progress=False)
    for layer in batched.layers:
        scale = single[layer].abs().max()
        assert (batched[layer] - single[layer]).abs().max() <= 1e-4 * max(1.0, float(scale))
    if reduction == "answer_tokens":
        assert torch.equal(batched.offsets, single.offsets)
        counts = [tiny.tokenize(e).n_answer_tokens for e in EXAMPLES]
        assert batched.offsets.diff().tolist() == counts


def test_answer_tokens_rows_match_hf(tiny_models):
    model = tiny_models["llama"]
    cache = cache_residuals(model, EXAMPLES, layers=[1], reduction="answer_tokens", batch_size=3, progress=False)
    for i, example in enumerate(EXAMPLES):
        hs, ans, _ = hf_hidden(model, example)
        torch.testing.assert_close(cache.example_tokens(i, 1), hs[2][0, ans], rtol=1e-4, atol=1e-5)


def test_save_load_roundtrip(tiny_models, tmp_path):
    model = tiny_models["qwen2"]
    cache = cache_residuals(model, EXAMPLES, layers=[0, 2], reduction="answer_tokens", progress=False)
    cache.save(tmp_path / "c")
    back = ResidualCache.load(tmp_path / "c")
    # one shard holding every example: the saved identity says so (a resume can never mix shard sizes)
    assert back.meta.to_dict() == {**cache.meta.to_dict(), "shards": back.meta.shards, "shard_size": len(EXAMPLES)}
    assert back.meta.model == model.name and back.meta.layers == [0, 2] and back.meta.hook == "resid_post"
    assert back.meta.package_version and back.meta.examples_hash == cache.meta.examples_hash
    for layer in (0, 2):
        assert torch.equal(back[layer], cache[layer])
    assert torch.equal(back.offsets, cache.offsets)


def test_sharded_streaming_and_resume(tiny_models, tmp_path):
    model = tiny_models["llama"]
    examples = EXAMPLES * 3
    full = cache_residuals(model, examples, layers=[1], progress=False)
    out = tmp_path / "stream"
    streamed = cache_residuals(model, examples, layers=[1], out_dir=out, shard_size=4, progress=False)
    assert len(list(out.glob("shard-*.safetensors"))) == 4
    torch.testing.assert_close(streamed[1], full[1])
    # Simulate a kill after two shards: drop the last shards and mark the run unfinished.
    import json

    meta = json.loads((out / "meta.json").read_text())
    for shard in meta["shards"][2:]:
        (out / shard["file"]).unlink()
    meta["shards"], meta["complete"] = meta["shards"][:2], False
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(EmInterpError, match="unfinished"):
        ResidualCache.load(out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    resumed = cache_residuals(model, examples, layers=[1], out_dir=out, shard_size=4, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert all(after[name] == t for name, t in before.items())  # finished shards were reused
    torch.testing.assert_close(ResidualCache.load(out)[1], full[1])
    torch.testing.assert_close(resumed[1], full[1])


def test_early_stop_skips_later_blocks(tiny_models):
    model = tiny_models["llama"]
    seen: list[str] = []

    def spy(tensor, *, hook):
        seen.append("last")
        return tensor

    with model.hooks([(model.hook_name(model.n_layers - 1), spy)]):
        cache_residuals(model, EXAMPLES[:2], layers=[0], progress=False)
    assert seen == []  # block n-1 never ran


def test_bad_inputs(tiny_models, tmp_path):
    model = tiny_models["llama"]
    with pytest.raises(EmInterpError, match="examples is empty"):
        cache_residuals(model, [], progress=False)
    with pytest.raises(EmInterpError, match=r"layers=7 is out of range"):
        cache_residuals(model, EXAMPLES, layers=[7], progress=False)
    with pytest.raises(EmInterpError, match=r"examples\[1\] has no answer"):
        cache_residuals(model, [EXAMPLES[0], ChatExample("q?")], progress=False)
    with pytest.raises(EmInterpError, match="reduction"):
        cache_residuals(model, EXAMPLES, reduction="median", progress=False)
    with pytest.raises(EmInterpError, match="hook"):
        cache_residuals(model, EXAMPLES, hook="resid_final", progress=False)
    with pytest.raises(EmInterpError, match="tokens left after truncation"):
        cache_residuals(model, EXAMPLES[:1], max_length=5, progress=False)
    with pytest.raises(EmInterpError, match="not an activation cache"):
        ResidualCache.load(tmp_path)
    # A prompt-only example is fine for prompt reductions.
    cache = cache_residuals(model, [ChatExample("q?")], reduction="last_prompt", progress=False)
    assert cache[0].shape == (1, model.d_model)
