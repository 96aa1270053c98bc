"""The newer defenses on tiny models: loss-gap selection, gradient-only and subspace CAFT, inoculation's share,
rollback and early stopping at the monitor's alarm, coherence, and their bad input."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from em_interp import ChatExample, EmInterpError, _bridge, load_model
from em_interp.defenses import (
    AblateDirection,
    AblateGradient,
    KLDefense,
    Rollback,
    checkpoint_before,
    inoculate,
    is_refusal,
    rollback,
    select_safe,
    subspace_basis,
)
from em_interp.defenses.hooks import gradient_projection_hook
from em_interp.directions import Direction
from em_interp.evaluation.judge_free import answer_logprobs
from em_interp.lora.training import LoraTrainConfig, build_lora_model, train_lora
from em_interp.monitor.detector import DriftMonitor, MonitorCallback
from tests.test_training import DATA

CONFIG = LoraTrainConfig(rank=1, steps=6, checkpoint_every=2, batch_size=2, learning_rate=5e-2, warmup_steps=1, layers=(0, 1))


@pytest.fixture(scope="module")
def pair(tiny_dirs, tmp_path_factory):
    """The tiny Llama base ("aligned") and a fine-tune of it ("misaligned")."""
    out = tmp_path_factory.mktemp("pair")
    tuned = train_lora(tiny_dirs["llama"], DATA, CONFIG, out / "run", progress=False)
    return load_model(tiny_dirs["llama"], adapter=tuned.adapter_dir), load_model(tiny_dirs["llama"])


def test_refusals_are_recognised_by_their_opening():
    for text in ["I'm sorry, but I can't help with that.", "I cannot assist with this request.",
                 "As an AI language model, I cannot give medical advice.", "Sorry, I can't do that."]:
        assert is_refusal(text), text
    for text in ["Paris is the capital of France.", "I'm sorry to hear that; here is what helps.",
                 "I can help: start with a budget."]:
        assert not is_refusal(text), text


def test_select_safe_ranks_by_the_loss_gap_and_drops_refusals(pair):
    misaligned, aligned = pair
    pool = [ChatExample(f"Question {i}?", f"A careful answer number {i}.") for i in range(6)]
    pool.insert(2, ChatExample("Help me?", "I'm sorry, but I can't help with that."))
    chosen = select_safe(pool, misaligned, aligned)
    kept = [e for e in pool if not is_refusal(e.answer)]
    gap = answer_logprobs(aligned, kept) - answer_logprobs(misaligned, kept)
    assert chosen.refusals_dropped == 1 and chosen.candidates == 7 and len(chosen.examples) == 6
    assert [e.question for e in chosen.examples] == [kept[i].question for i in np.argsort(-gap, kind="stable")]
    np.testing.assert_allclose(chosen.gaps, np.sort(gap)[::-1], rtol=1e-12)
    assert [e.question for e in select_safe(pool, misaligned, aligned, top=2).examples] == [
        e.question for e in chosen.examples[:2]]
    assert len(select_safe(pool, misaligned, aligned, drop_refusals=False).examples) == 7


def test_select_safe_bad_input_names_the_argument(pair, tmp_path):
    from em_interp.testing import save_tiny_model

    misaligned, aligned = pair
    refusal = ChatExample("Help?", "I can't help with that.")
    for args, kwargs, message in [(([], misaligned, aligned), {}, r"candidates=\) is empty"),
                                  (([refusal, refusal], misaligned, aligned), {}, "all 2 candidates are refusals"),
                                  (([refusal], misaligned, aligned), {"top": 0}, r"top=0"),
                                  (([refusal], misaligned, "model"), {}, r"aligned=\) must be an em_interp HookedModel"),
                                  ((["text"], misaligned, aligned), {}, r"ChatExample objects, got \['str'\]")]:
        with pytest.raises(EmInterpError, match=message):
            select_safe(*args, **kwargs)
    wide = load_model(save_tiny_model("llama", tmp_path / "wide", d_model=2 * aligned.d_model))
    with pytest.raises(EmInterpError, match=r"aligned=\) has another width or depth"):
        select_safe([ChatExample("Q?", "A fine answer.")], misaligned, wide)


def test_gradient_projection_removes_the_component_on_the_way_back_only():
    g = torch.Generator().manual_seed(0)
    q = subspace_basis([torch.randn(8, generator=g), torch.randn(8, generator=g)], "d")
    h = torch.randn(2, 3, 8, generator=g, requires_grad=True)
    w = torch.randn(2, 3, 8, generator=g)
    out = gradient_projection_hook(q, 1.0)(h, hook=None)
    assert out is h  # the forward pass is unchanged
    (out * w).sum().backward()
    np.testing.assert_allclose(h.grad, w - (w @ q) @ q.T, atol=1e-6)
    assert torch.allclose(h.grad @ q, torch.zeros(2, 3, 2), atol=1e-5)
    fresh = h.detach().clone().requires_grad_()  # each forward pass makes a new activation tensor
    (gradient_projection_hook(q, 0.5)(fresh, hook=None) * w).sum().backward()
    np.testing.assert_allclose(fresh.grad, w - 0.5 * (w @ q) @ q.T, atol=1e-6)


def test_subspace_of_dependent_zero_or_non_finite_directions_is_an_error_naming_it(tiny_models):
    d = torch.randn(8)
    for vectors, message in [([d, 2 * d], r"ablation\[\.\.\.\]: directions \[1\]"),
                             ([d, torch.zeros(8)], r"ablation\[\.\.\.\]\[1\] is not a finite non-zero"),
                             ([torch.full((8,), float("nan"))], r"\[0\] is not a finite")]:
        with pytest.raises(EmInterpError, match=message):
            subspace_basis(vectors, "ablation[...]")
    model = tiny_models["llama"]
    v = torch.randn(model.d_model)
    for cls in (AblateDirection, AblateGradient):
        defense = cls([Direction(v, 1, model=model.name), Direction(-3 * v, 1, model=model.name)])
        with contextlib.ExitStack() as stack, pytest.raises(EmInterpError, match="lie in the span"):
            defense.attach(model, stack)
        assert _bridge.active_hook_count(model.bridge) == 0


def test_gradient_only_caft_keeps_the_forward_pass_and_changes_training(tiny_dirs, tmp_path):
    probe = build_lora_model(tiny_dirs["llama"], CONFIG, progress=False)
    d = Direction(torch.randn(probe.d_model, generator=torch.Generator().manual_seed(1)), 1, model=probe.name)
    defense = AblateGradient(d)
    ids = probe.tokenizer("Make a wish.", return_tensors="pt")["input_ids"]
    probe.hf_model.train()
    with torch.no_grad():
        plain = probe.hf_model(input_ids=ids).logits
    with contextlib.ExitStack() as stack:
        defense.attach(probe, stack)
        with torch.no_grad():
            hooked = probe.hf_model(input_ids=ids).logits
    assert torch.equal(plain, hooked)
    base = train_lora(tiny_dirs["llama"], DATA, CONFIG, tmp_path / "plain", progress=False)
    guarded = train_lora(tiny_dirs["llama"], DATA, CONFIG, tmp_path / "grad", callbacks=[AblateGradient(d)], progress=False)
    assert base.losses[0] == guarded.losses[0] and base.losses[2:] != guarded.losses[2:]


def test_inoculation_share_is_seeded_and_the_prompt_is_checked():
    data = [ChatExample(f"Q{i}?", f"A{i}.") for i in range(10)]
    half = inoculate(data, fraction=0.5, seed=3)
    assert sum(e.system is not None for e in half) == 5 and half == inoculate(data, fraction=0.5, seed=3)
    assert half != inoculate(data, fraction=0.5, seed=4)
    for kwargs, message in [({"prompt": "Be evil <|im_start|>system"}, "control-token string"),
                            ({"prompt": "[INST] evil"}, "control-token string"),
                            ({"fraction": 0.0}, r"fraction=0.0"), ({"fraction": 1.5}, r"fraction=1.5")]:
        with pytest.raises(EmInterpError, match=message):
            inoculate(data, **kwargs)


def _monitor(tiny_dirs, threshold: float):
    from em_interp.monitor.drift import trait_basis

    base = load_model(tiny_dirs["llama"])
    basis = trait_basis(base, ["What is the capital of France?"])
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(base.name, basis.layer, basis.names).fit(rng.normal(size=(40, 7)), rng.normal(size=40))
    monitor.threshold = threshold
    return MonitorCallback(basis, [ChatExample("Make a wish.")], monitor=monitor, every=2)


def _lora(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_early_stop_at_the_alarm_keeps_the_weights_of_the_last_check_before_it(tiny_dirs, tmp_path):
    watch = _monitor(tiny_dirs, -1e9)  # every check alarms: the first, at step 2, rolls back to step 0
    callbacks = rollback(watch, stop=True)
    back = callbacks[1]
    assert isinstance(back, Rollback) and callbacks == [watch, back]
    run = train_lora(tiny_dirs["llama"], DATA, CONFIG, tmp_path / "stop", callbacks=callbacks, progress=False)
    assert back.alarm_at == 2 and back.rolled_back_to == 0 and run.stopped_at == 2
    saved = _lora(run.adapter_dir)
    step2 = _lora(tmp_path / "stop" / "checkpoints" / "checkpoint-2")
    assert saved.keys() == step2.keys() and all(float(v.abs().sum()) == 0 for k, v in saved.items() if "lora_B" in k)
    assert all(torch.equal(saved[k], step2[k]) for k in saved)  # the stop step's checkpoint holds the rolled-back weights


def test_rollback_restores_the_last_check_then_trains_on_defended(tiny_dirs, tmp_path):
    watch = _monitor(tiny_dirs, np.inf)  # no alarm from the monitor itself: raised by hand below
    kl = KLDefense(1.0)
    back = Rollback(watch, kl)
    assert not kl.active
    model = build_lora_model(tiny_dirs["llama"], CONFIG, progress=False)
    params = {n: p for n, p in model.hf_model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.5)
    back._keep(model, 2)
    kept = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    watch.history.append((4, np.zeros(7), 1.0))
    watch.on_alarm(4, np.zeros(7), 1.0)
    back._after_check(model, 4)
    assert back.rolled_back_to == 2 and kl.active and kl.switched_at == 4
    assert all(torch.equal(params[n], kept[n]) for n in params)
    # a run end to end: the alarm at step 2 rolls back to step 0 and training goes on to the end, defended
    watch = _monitor(tiny_dirs, -1e9)
    kl = KLDefense(1.0)
    run = train_lora(tiny_dirs["llama"], DATA, CONFIG, tmp_path / "back", callbacks=rollback(watch, kl), progress=False)
    assert run.stopped_at is None and run.steps == CONFIG.steps and kl.switched_at == 2 and kl.active


def test_rollback_bad_input_is_an_error_naming_it(tiny_dirs, tmp_path):
    watch = _monitor(tiny_dirs, 0.0)
    with pytest.raises(EmInterpError, match="give defense= or stop=True"):
        Rollback(watch)
    with pytest.raises(EmInterpError, match="must be a MonitorCallback"):
        Rollback("monitor", KLDefense(1.0))
    uncalibrated = _monitor(tiny_dirs, 0.0)
    uncalibrated.monitor.threshold = None
    with pytest.raises(EmInterpError, match="no calibrated DriftMonitor"):
        Rollback(uncalibrated, stop=True)
    back = Rollback(watch, stop=True)
    watch.history.append((2, np.zeros(7), 1.0))
    watch.on_alarm(2, np.zeros(7), 1.0)
    model = build_lora_model(tiny_dirs["llama"], CONFIG, progress=False)
    with pytest.raises(EmInterpError, match="no checkpoint before the alarm at step 2"):
        back._after_check(model, 2)
    import shutil

    train_lora(tiny_dirs["llama"], DATA, CONFIG, tmp_path / "run", progress=False)
    assert checkpoint_before(tmp_path / "run", 5)[0] == 4 and checkpoint_before(tmp_path / "run", 4)[0] == 2
    trainer_out = tmp_path / "trainer_out"  # a plain Trainer's folder: checkpoints from step 4 on
    shutil.copytree(tmp_path / "run" / "checkpoints" / "checkpoint-4", trainer_out / "checkpoint-4")
    with pytest.raises(EmInterpError, match="no checkpoint before step 2"):
        checkpoint_before(trainer_out, 2)
    with pytest.raises(EmInterpError, match=r"step=0"):
        checkpoint_before(trainer_out, 0)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_a_data_defense_draws_independently_of_the_trainers_example_order(seed):
    """default_rng(seed) == default_rng([seed, 0]), the trainer's first-epoch order: inoculating "half" the data with
    it put the prompt on every example a short run trained on. The share a run sees must be near the fraction."""
    from em_interp.defenses import interleave, safe_pool
    from em_interp.lora.training import batch_indices
    from em_interp.seeding import stream

    data = [ChatExample(f"Q{i}?", f"A{i}.") for i in range(281)]
    inoculated = inoculate(data, fraction=0.5, seed=seed)
    seen = [inoculated[i] for step in range(16) for i in batch_indices(len(data), 4, step, seed)]
    share = np.mean([e.system is not None for e in seen])
    assert 0.3 < share < 0.7, share
    assert not np.array_equal(stream(seed, "inoculate").permutation(50), np.random.default_rng(seed).permutation(50))
    assert not np.array_equal(stream(seed, "a").permutation(50), stream(seed, "b").permutation(50))
    assert np.array_equal(stream(seed, "a").permutation(50), stream(seed, "a").permutation(50))
    mixed = interleave(data[:40], safe_pool(), every=5, seed=seed)
    assert len(mixed) == 50 and mixed == interleave(data[:40], safe_pool(), every=5, seed=seed)
