"""Bad input is a clear error, never a silent wrong result or lost files (part of the reliability issue)."""

from __future__ import annotations

import math

import pytest
import torch

from em_interp import ChatExample, Direction, EmInterpError, cache_residuals
from em_interp.cli import main
from em_interp.interventions import ablate, steer
from em_interp.validate import finite_number, finite_tensor

EXAMPLES = [ChatExample("Hi", "Hello there."), ChatExample("What is the capital of France?", "Paris.")]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1", None, True])
def test_numeric_guard_rejects_non_finite_and_non_numbers(value):
    with pytest.raises(EmInterpError, match="alpha"):
        finite_number("alpha", value)


def test_numeric_guard_bounds_and_tensors():
    assert finite_number("t", 0.0, minimum=0.0) == 0.0
    with pytest.raises(EmInterpError, match=r"t=-1.0 must be >= 0"):
        finite_number("t", -1, minimum=0.0)
    with pytest.raises(EmInterpError, match="v has 1 NaN"):
        finite_tensor("v", [1.0, math.nan])


def test_steering_with_non_finite_inputs_is_refused(tiny_models):
    model = tiny_models["llama"]
    vector = torch.ones(model.d_model)
    for alpha in (math.nan, math.inf):
        with pytest.raises(EmInterpError, match="alpha"), steer(model, vector, alpha=alpha, layer=1):
            pass
    bad = vector.clone()
    bad[0] = math.nan
    with pytest.raises(EmInterpError, match="direction has 1 NaN"), steer(model, bad, alpha=1.0, layer=1):
        pass
    with pytest.raises(EmInterpError, match="temperature"):
        model.generate([ChatExample("Hi")], temperature=math.nan)
    assert model.active_hook_count() == 0


def test_misspelt_hook_names_are_errors(tiny_models):
    model = tiny_models["qwen2"]
    with pytest.raises(EmInterpError, match=r"'blocks.1.hook_resid_pst' is not a hook point.*did you mean 'blocks.1.hook_resid_post'"):
        with model.hooks([("blocks.1.hook_resid_pst", lambda t, *, hook: t)]):
            pass
    with pytest.raises(EmInterpError, match="not callable"), model.hooks([(model.hook_name(1), "nope")]):
        pass
    assert model.active_hook_count() == 0


def test_direction_acts_at_the_site_it_was_made_at(tiny_models):
    model = tiny_models["llama"]
    d = Direction(torch.randn(model.d_model), layer=1, hook="mlp_out", model=model.name)
    seen = []
    with steer(model, d, alpha=1.0), ablate(model, d, layers=[1]):
        seen = [name for name in model.bridge.hook_dict if model.bridge.hook_dict[name].fwd_hooks]
    assert "blocks.1.hook_mlp_out" in seen and not any("resid" in name for name in seen)
    with pytest.raises(EmInterpError, match="made at hook site 'mlp_out', not 'resid_post'"), steer(model, d, 1.0, hook="resid_post"):
        pass


def test_direction_names_keep_dots(tmp_path, tiny_models):
    model = tiny_models["llama"]
    a = Direction(torch.ones(model.d_model), layer=0, model=model.name)
    b = Direction(-torch.ones(model.d_model), layer=2, model=model.name)
    a.save(tmp_path / "em.l10")
    b.save(tmp_path / "em.l20")
    assert Direction.load(tmp_path / "em.l10").layer == 0 and Direction.load(tmp_path / "em.l20").layer == 2
    assert Direction.load(tmp_path / "em.l20.safetensors").layer == 2
    (tmp_path / "em.l20.json").write_text("{broken")
    with pytest.raises(EmInterpError, match=r"em.l20.json is not a direction sidecar"):
        Direction.load(tmp_path / "em.l20")


def test_saving_a_cache_never_deletes_other_files(tmp_path, tiny_models):
    model = tiny_models["llama"]
    cache = cache_residuals(model, EXAMPLES, layers=[0], progress=False)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(EmInterpError, match="holds other files.*notes.txt"):
        cache.save(folder)
    assert (folder / "notes.txt").read_text() == "keep me"
    cache.save(tmp_path / "acts")
    cache.save(tmp_path / "acts")  # its own earlier files are replaced
    (tmp_path / "file").write_text("x")
    with pytest.raises(EmInterpError, match="it is a file"):
        cache.save(tmp_path / "file")


def test_lengths(tiny_models):
    model = tiny_models["gemma2"]
    for bad in (0, -5, 2.5):
        with pytest.raises(EmInterpError, match="max_length"):
            model.tokenize(EXAMPLES[0], max_length=bad)
    long = ChatExample("word " * (model.context_length + 10), "Fine.")
    with pytest.raises(EmInterpError, match=r"examples\[0\] is \d+ tokens long, more than .* context of 256"):
        model.tokenize_many([long])
    assert len(model.tokenize_many([long], max_length=64, require_answer=False)[0].input_ids) == 64


def test_cli_checks_outputs_before_any_work_and_prints_one_line(tmp_path, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert main(["study", "--out", str(a_file), "--model", "nope-model"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "unknown model" not in err and err.count("\n") == 1
    existing = tmp_path / "d"
    existing.mkdir()
    assert main(["score-responses", "--data", str(tmp_path), "--out", str(existing)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert main(["score-responses", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "no" / "x.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
