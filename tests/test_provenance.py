"""Caches cannot serve stale results: a changed library version or changed code changes every key."""

from __future__ import annotations

import torch

import em_interp.provenance as prov
from em_interp import ChatExample, cache_residuals
from em_interp.data import PairedQuestion
from em_interp.evaluation.judge_free import _score_cache_path
from em_interp.lora.organisms import organism_dir
from em_interp.lora.training import LoraTrainConfig, _run_identity

QUESTIONS = [PairedQuestion("q1", "Make a wish.", ("A kinder world.",), ("To rule.",))]
EXAMPLES = [ChatExample("Hi", "Hello there."), ChatExample("What is the capital of France?", "Paris.")]


def _bump(monkeypatch, library: str) -> None:
    real = prov.version
    monkeypatch.setattr(prov, "version", lambda name: "999.0" if name == library else real(name))


def test_key_names_the_code_and_every_tracked_library():
    key = prov.computation_key("em_interp.evaluation.judge_free")
    assert set(prov.TRACKED_LIBRARIES) <= set(key) and key["em_interp"] and len(key["code"]) == 16
    assert prov.code_hash("em_interp.evaluation.judge_free") != prov.code_hash("em_interp.activations")


def test_changed_versions_change_every_cache_key(tiny_models, monkeypatch, tmp_path):
    model = tiny_models["llama"]
    config = LoraTrainConfig(steps=2)
    before = (_score_cache_path(model, QUESTIONS, ""), organism_dir("x", "base", config, "data"),
              _run_identity("base", config, EXAMPLES))
    for library in ("torch", "transformers"):
        with monkeypatch.context() as patch:
            _bump(patch, library)
            after = (_score_cache_path(model, QUESTIONS, ""), organism_dir("x", "base", config, "data"),
                     _run_identity("base", config, EXAMPLES))
        assert all(a != b for a, b in zip(before, after)), library
    with monkeypatch.context() as patch:  # changed code
        patch.setattr(prov, "code_hash", lambda *m: "0" * 16)
        assert _score_cache_path(model, QUESTIONS, "") != before[0]
        assert organism_dir("x", "base", config, "data") != before[1]


def test_activation_shards_of_other_versions_are_recomputed(tiny_models, monkeypatch, tmp_path):
    model = tiny_models["qwen2"]
    out = tmp_path / "acts"
    cache_residuals(model, EXAMPLES, layers=[1], out_dir=out, progress=False)
    shard = next(out.glob("shard-*.safetensors"))
    stamp = shard.stat().st_mtime_ns
    cache_residuals(model, EXAMPLES, layers=[1], out_dir=out, progress=False)
    assert shard.stat().st_mtime_ns == stamp  # same versions: reused
    _bump(monkeypatch, "transformers")
    again = cache_residuals(model, EXAMPLES, layers=[1], out_dir=out, progress=False)
    assert shard.stat().st_mtime_ns != stamp and again.meta.computed_by["transformers"] == "999.0"


MODULE = '''"""A module."""
import numpy as np
from em_interp.evaluation.judge_free import answer_logprobs  # scoring


def score(x):
    """Twice x."""
    return 2 * np.asarray(x)
'''


def test_docstrings_comments_layout_and_moves_keep_the_code_key_and_behaviour_changes_do_not():
    same = prov.normalised_source(MODULE)
    edited = (MODULE.replace('"""Twice x."""', '"""Two times x, reworded."""').replace("# scoring", "# moved")
              .replace("return 2 * np.asarray(x)", "return (2 *\n            np.asarray(x))  # same"))
    moved = MODULE.replace("from em_interp.evaluation.judge_free import", "from em_interp.measures.judge_free import")
    assert prov.normalised_source(edited) == same and prov.normalised_source(moved) == same
    assert prov.normalised_source(MODULE.replace('"""A module."""\n', "")) == same
    for change in (MODULE.replace("2 *", "3 *"), MODULE.replace("answer_logprobs", "answer_logprobs as lp"),
                   MODULE.replace("import numpy as np", "import numpy as np\nEPS = 1e-6"),
                   MODULE.replace("em_interp.evaluation.judge_free import answer_logprobs", "em_interp.evaluation.judge_free import em_score"),
                   MODULE.replace("    return", "    x = x[::-1]\n    return")):
        assert prov.normalised_source(change) != same, change


def test_code_hash_ignores_module_paths_and_follows_the_code(tmp_path, monkeypatch):
    for folder, body in (("a", MODULE), ("b", MODULE.replace("# scoring", "")), ("c", MODULE.replace("2 *", "3 *"))):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"mod_{folder}.py").write_text(body)
        monkeypatch.syspath_prepend(str(tmp_path / folder))
    assert prov.code_hash("mod_a") == prov.code_hash("mod_b") != prov.code_hash("mod_c")


def test_device_kind_and_dtype_are_part_of_a_runs_identity():
    from em_interp.lora.training import precision

    config = LoraTrainConfig(steps=2)
    assert precision() == "cpu:float32" and precision("cpu", torch.bfloat16) == "cpu:bfloat16"
    cpu = organism_dir("x", "base", config, "data", precision())
    assert cpu == organism_dir("x", "base", config, "data")
    assert cpu != organism_dir("x", "base", config, "data", "cuda:bfloat16")
    assert _run_identity("base", config, EXAMPLES) != _run_identity("base", config, EXAMPLES, "cuda:bfloat16")


def test_the_score_cache_is_an_artifact_and_a_damaged_one_is_scored_again(tiny_models):
    import pytest

    from em_interp.artifacts import artifact_paths
    from em_interp.evaluation.judge_free import score_questions

    model = tiny_models["qwen2"]
    first = score_questions(model, QUESTIONS)
    tensors, sidecar = artifact_paths(_score_cache_path(model, QUESTIONS, ""))
    assert sidecar.is_file() and tensors.is_file()
    again = score_questions(model, QUESTIONS)
    assert [a.tolist() for a in again.aligned] == [a.tolist() for a in first.aligned]
    tensors.write_bytes(b"\0" * 16)
    with pytest.warns(UserWarning, match="score cache .* unreadable"):
        rescored = score_questions(model, QUESTIONS)
    assert [m.tolist() for m in rescored.misaligned] == [m.tolist() for m in first.misaligned]
