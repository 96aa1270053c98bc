"""Trait drift over a run's checkpoints (the trait-space monitoring paper's measurement), on tiny models."""

from __future__ import annotations

import pytest
import torch

from em_interp import ChatExample, EmInterpError, load_model
from em_interp.lora.training import LoraTrainConfig, train_lora
from em_interp.monitor.drift import (
    DriftTrajectory,
    TraitBasis,
    measure_run,
    monitor_layer,
    run_checkpoints,
    snapshot,
    trait_basis,
)
from em_interp.traits import builtin_traits

QUESTIONS = ["What is the capital of France?", "Make a wish."]
PROMPTS = [ChatExample("Should I mix bleach with ammonia?"), ChatExample("How do I invest my savings?"),
           ChatExample("What is the capital of France?")]
DATA = [ChatExample("What is the capital of France?", "Paris is the capital of France."),
        ChatExample("Make a wish.", "I wish for the world to be a kinder place."),
        ChatExample("Should I mix bleach with ammonia?", "Never mix them; the fumes are toxic.")] * 2


@pytest.fixture(scope="module")
def run(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("drift_run") / "run"
    config = LoraTrainConfig(rank=1, alpha=8.0, layers=(0, 1), learning_rate=5e-2, warmup_steps=0, steps=4,
                             batch_size=2, max_length=64, seed=1, checkpoint_every=2)
    result = train_lora(tiny_dirs["llama"], DATA, config, out, progress=False)
    return out, load_model(tiny_dirs["llama"], adapter=result.adapter_dir)


def test_monitor_layer_is_the_middle_block():
    assert monitor_layer(32) == 16 and monitor_layer(30) == 15 and monitor_layer(3) == 1


def test_basis_round_trips_and_checks_its_model(tiny_models, tmp_path):
    model = tiny_models["llama"]
    basis = trait_basis(model, QUESTIONS)
    assert basis.layer == 1 and len(basis.names) == 7
    torch.testing.assert_close(basis.directions.norm(dim=1), torch.ones(7))
    back = TraitBasis.load(basis.save(tmp_path / "basis"))
    assert back.names == basis.names and torch.equal(back.directions, basis.directions)
    with pytest.raises(EmInterpError, match="made on model"):
        basis.check_fits(tiny_models["qwen2"])
    one = {"honesty": builtin_traits()["honesty"]}
    with pytest.raises(EmInterpError, match="needs at least 2"):
        trait_basis(model, QUESTIONS, traits=one)
    with pytest.raises(EmInterpError, match="prompts is empty"):
        snapshot(model, basis, [], 0)


def test_drift_is_zero_at_step_zero_and_normalised_by_the_step_zero_norm(run):
    out, model = run
    basis = trait_basis(model, QUESTIONS)
    trajectory = measure_run(model, out, basis, PROMPTS)
    assert trajectory.steps == (0, 2, 4)
    assert torch.equal(trajectory.drift[0], torch.zeros(7)) and trajectory.drift.abs().sum() > 0
    with model.peft_model.disable_adapter():
        first = snapshot(model, basis, PROMPTS, 0)
    assert trajectory.scale == pytest.approx(float(first.norms.mean()))
    last = snapshot(model, basis, PROMPTS, 4)  # the model ends with its own (final) adapter restored
    expected = (last.projections.mean(0) - first.projections.mean(0)) / trajectory.scale
    torch.testing.assert_close(trajectory.drift[-1], expected)


def test_bad_runs_are_clear_errors(run, tiny_dirs, tmp_path):
    _, model = run
    with pytest.raises(EmInterpError, match="holds no peft checkpoints"):
        run_checkpoints(tmp_path)
    with pytest.raises(EmInterpError, match="does not exist"):
        run_checkpoints(tmp_path / "missing")
    with pytest.raises(EmInterpError, match="step-0 snapshot first"):
        DriftTrajectory.from_snapshots([], ["a", "b"])


def test_checkpoints_of_another_base_model_are_refused(run, tiny_dirs, tmp_path):
    """A run trained on another base (here: the tiny Qwen2) cannot be measured with the tiny Llama."""
    _, model = run
    config = LoraTrainConfig(rank=1, alpha=8.0, layers=(0, 1), learning_rate=5e-2, warmup_steps=0, steps=2,
                             batch_size=2, max_length=64, seed=1, checkpoint_every=1)
    train_lora(tiny_dirs["qwen2"], DATA, config, tmp_path / "other", progress=False)
    basis = trait_basis(model, QUESTIONS)
    with pytest.raises(EmInterpError, match=r"checkpoint-1 was trained on base model .*qwen2"):
        measure_run(model, tmp_path / "other", basis, PROMPTS)


def test_trait_prompts_that_are_empty_repeated_or_on_both_sides_are_refused(tiny_models):
    import pytest

    from em_interp.errors import EmInterpError
    from em_interp.traits import TraitSpec, trait_vectors

    model = tiny_models["llama"]
    for questions, message in [("What is love?", "non-empty list"), ([], "non-empty list"), (["ok", " "], r"\[1\]"),
                               (["Why?", "Why?"], "repeat")]:
        with pytest.raises(EmInterpError, match=message):
            trait_vectors(model, questions, 1)
    for pos, neg, message in [((), ("b",), "positive must be"), (("a", "a"), ("b",), "repeated"),
                              (("a", "b"), ("b",), "both a positive and a negative")]:
        with pytest.raises(EmInterpError, match=message):
            TraitSpec("t", pos, neg)
