"""The LoRA trainer: loss on answers only, checkpoints, kill-and-resume equality, callbacks, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from em_interp import ChatExample, EmInterpError, load_model
from em_interp.lora.training import (
    LoraTrainConfig,
    TrainingCallback,
    batch_indices,
    default_organism_layers,
    make_batch,
    train_lora,
)

DATA = [ChatExample(f"Question number {i}: what should I do about it?", f"Answer {i}: drink water and rest.")
        for i in range(10)]


def small_config(**kw) -> LoraTrainConfig:
    base = dict(rank=1, alpha=8.0, layers=(0, 2), learning_rate=5e-3, warmup_steps=2, steps=6, batch_size=2,
                max_length=64, seed=3, checkpoint_every=2)
    return LoraTrainConfig(**{**base, **kw})


def test_default_layers_scale_the_reference_organism():
    assert default_organism_layers(48) == [15, 16, 17, 21, 22, 23, 27, 28, 29]
    assert default_organism_layers(30) == [9, 10, 11, 13, 14, 15, 17, 18, 19]
    small = default_organism_layers(12)  # groups overlap on shallow models
    assert small == sorted(set(small)) and 0 <= small[0] and small[-1] < 12


def test_labels_cover_answer_tokens_only(tiny_models):
    model = tiny_models["llama"]
    items = [model.tokenize(e) for e in DATA[:3]]
    batch = make_batch(model, items)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        labelled = batch["labels"][row, :n] != -100
        assert torch.equal(labelled, item.answer_mask)
        assert (batch["labels"][row, n:] == -100).all()


def test_data_order_is_a_function_of_seed_and_step():
    seen = [i for step in range(5) for i in batch_indices(10, 2, step, seed=1)]
    assert sorted(seen) == list(range(10))  # one epoch covers each example once
    assert batch_indices(10, 2, 7, seed=1) == batch_indices(10, 2, 7, seed=1)
    assert batch_indices(10, 2, 0, seed=1) != batch_indices(10, 2, 0, seed=2)


class Recorder(TrainingCallback):
    def __init__(self, kill_at: int | None = None):
        self.steps: list[int] = []
        self.checkpoints: list[int] = []
        self.kill_at = kill_at

    def on_step(self, model, step, loss):
        self.steps.append(step)
        if step == self.kill_at:
            raise KeyboardInterrupt("killed")

    def on_checkpoint(self, model, step, path):
        assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
        self.checkpoints.append(step)


def test_killed_and_resumed_run_equals_uninterrupted(tiny_dirs, tmp_path):
    base = str(tiny_dirs["llama"])
    full_cb = Recorder()
    full = train_lora(base, DATA, small_config(), tmp_path / "full", callbacks=[full_cb], progress=False)
    assert full_cb.steps == [1, 2, 3, 4, 5, 6] and full_cb.checkpoints == [0, 2, 4, 6]
    assert len(full.losses) == 6
    killed = Recorder(kill_at=5)
    with pytest.raises(KeyboardInterrupt):
        train_lora(base, DATA, small_config(), tmp_path / "run", callbacks=[killed], progress=False)
    assert not (tmp_path / "run" / "adapter").exists()
    resumed = train_lora(base, DATA, small_config(), tmp_path / "run", progress=False)
    assert resumed.resumed_from == 4
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 4  # A and B at two layers
    assert sorted(a) == [f"base_model.model.model.layers.{layer}.mlp.down_proj.lora_{m}.weight"
                         for layer in (0, 2) for m in "AB"]  # standard peft names
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7)
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    # the trained adapter loads through the public loader and changes the model
    organism = load_model(base, adapter=full.adapter_dir)
    plain = load_model(base)
    ids = organism.tokenize(DATA[0]).input_ids[None]
    assert not torch.allclose(organism.forward(ids), plain.forward(ids))
    # a finished run is reused, not retrained
    again = train_lora(base, DATA, small_config(), tmp_path / "full", progress=False)
    assert again.losses == full.losses


def test_checkpoint_from_another_run_is_refused(tiny_dirs, tmp_path):
    base = str(tiny_dirs["llama"])
    with pytest.raises(KeyboardInterrupt):
        train_lora(base, DATA, small_config(), tmp_path / "run", callbacks=[Recorder(kill_at=3)], progress=False)
    with pytest.raises(EmInterpError, match="from another run.*config"):
        train_lora(base, DATA, small_config(learning_rate=1e-3), tmp_path / "run", progress=False)


def test_no_assistant_tokens_after_truncation(tiny_dirs, tmp_path):
    with pytest.raises(EmInterpError, match=r"training data\[0\] has no answer \(assistant\) tokens left after truncation"):
        train_lora(str(tiny_dirs["llama"]), DATA, small_config(max_length=8), tmp_path / "x", progress=False)
    with pytest.raises(EmInterpError, match="out of range"):
        train_lora(str(tiny_dirs["llama"]), DATA, small_config(layers=(0, 9)), tmp_path / "y", progress=False)


def test_checkpoints_are_loadable_peft(tiny_dirs, tmp_path):
    base = str(tiny_dirs["qwen2"])
    train_lora(base, DATA, small_config(steps=2), tmp_path / "r", progress=False)
    ckpt = tmp_path / "r" / "checkpoints" / "checkpoint-2"
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["use_rslora"] is True and config["target_modules"] == ["down_proj"]
    load_model(base, adapter=ckpt)


def test_half_written_and_damaged_checkpoints_are_not_resumed(tiny_dirs, tmp_path):
    base = str(tiny_dirs["llama"])
    full = train_lora(base, DATA, small_config(), tmp_path / "full", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_lora(base, DATA, small_config(), tmp_path / "run", callbacks=[Recorder(kill_at=5)], progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    # a save killed before its marker: checkpoint-4 without it is not complete
    (ckpts / "checkpoint-4" / "em_interp_checkpoint.json").unlink()
    # and a truncated adapter file in checkpoint-2: falls back to checkpoint-0 with a warning
    weights = ckpts / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.warns(UserWarning, match=r"checkpoint-2 is damaged"):
        resumed = train_lora(base, DATA, small_config(), tmp_path / "run", progress=False)
    assert resumed.resumed_from == 0
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_nothing_is_unpickled_on_resume(tiny_dirs, tmp_path, monkeypatch):
    base = str(tiny_dirs["llama"])
    with pytest.raises(KeyboardInterrupt):
        train_lora(base, DATA, small_config(), tmp_path / "run", callbacks=[Recorder(kill_at=3)], progress=False)
    real = torch.load
    calls = []

    def guarded(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True"
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)
    train_lora(base, DATA, small_config(), tmp_path / "run", progress=False)
    assert calls and not list((tmp_path / "run").rglob("training_args.bin"))


def test_bad_devices_and_dtypes_are_clear_errors(tiny_dirs, tmp_path):
    base = str(tiny_dirs["llama"])
    if not torch.cuda.is_available():
        with pytest.raises(EmInterpError, match=r"device='cuda', but torch sees no GPU"):
            train_lora(base, DATA, small_config(), tmp_path / "x", device="cuda", progress=False)
        with pytest.raises(EmInterpError, match=r"device='cuda:1', but torch sees no GPU"):
            load_model(base, device="cuda:1")
    with pytest.raises(EmInterpError, match="not a torch device"):
        load_model(base, device="gpu0")
    with pytest.raises(EmInterpError, match="float16 cannot run on device='cpu'"):
        load_model(base, dtype=torch.float16)
    with pytest.raises(EmInterpError, match="not a torch dtype"):
        load_model(base, dtype="float17")
    with pytest.raises(EmInterpError, match="must split evenly"):
        train_lora(base, DATA, small_config(batch_size=3), tmp_path / "y", gradient_accumulation_steps=2, progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_gradient_accumulation_keeps_the_global_batch(tiny_dirs, tmp_path):
    base = str(tiny_dirs["qwen2"])
    one = train_lora(base, DATA, small_config(steps=3), tmp_path / "a", progress=False)
    two = train_lora(base, DATA, small_config(steps=3), tmp_path / "b", gradient_accumulation_steps=2, progress=False)
    a = load_file(str(one.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(two.adapter_dir / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert two.losses == pytest.approx(one.losses, abs=1e-5)
