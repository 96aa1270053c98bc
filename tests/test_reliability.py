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
    with pytest.raises(EmInterpError, match=r"em.l20.json is not a readable direction sidecar"):
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


def test_resumed_cache_with_other_shard_size_and_edited_meta(tmp_path, tiny_models):
    import json

    model = tiny_models["llama"]
    examples = [ChatExample(f"Question {i}?", f"Answer {i}.") for i in range(12)]
    out = tmp_path / "acts"
    cache_residuals(model, examples, layers=[0, 1], out_dir=out, shard_size=4, progress=False)
    again = cache_residuals(model, examples, layers=[0, 1], out_dir=out, shard_size=3, progress=False)
    assert again[1].shape[0] == 12 and len(again.meta.shards) == 4
    from em_interp import ResidualCache

    meta_path = out / "meta.json"
    good = json.loads(meta_path.read_text())
    for edit, message in ((dict(n_examples=13), "cover 12 examples, but n_examples is 13"),
                          (dict(d_model=7), r"promises \(3, 7\)"),
                          (dict(shards=good["shards"][1:]), "do not cover examples")):
        meta_path.write_text(json.dumps({**good, **edit}))
        with pytest.raises(EmInterpError, match=message):
            ResidualCache.load(out)
    meta_path.write_text(json.dumps(good))
    shard = out / good["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:30])
    with pytest.raises(EmInterpError, match="is not readable"):
        ResidualCache.load(out)
    repaired = cache_residuals(model, examples, layers=[0, 1], out_dir=out, shard_size=3, progress=False)
    assert repaired[0].shape[0] == 12  # the damaged shard was computed again


def test_data_shapes_are_checked():
    from em_interp.data import PairedQuestion

    with pytest.raises(EmInterpError, match=r"aligned must be a tuple of answer strings, not a str"):
        PairedQuestion("q", "Why?", "abc", ("x",))
    with pytest.raises(EmInterpError, match="non-text or empty answers"):
        PairedQuestion("q", "Why?", ("ok", None), ("x",))
    assert PairedQuestion("q", "Why?", ["a"], ["b"]).aligned == ("a",)


def test_loader_inputs(tmp_path):
    import gzip

    from em_interp.data import load_chat_jsonl, load_question_yaml

    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    path = tmp_path / "d.jsonl"
    path.write_text(good * 3)
    for bad in (0, -1, True):
        with pytest.raises(EmInterpError, match="limit"):
            load_chat_jsonl(path, limit=bad)
    fake = tmp_path / "d.jsonl.gz"
    fake.write_text(good)
    with pytest.raises(EmInterpError, match=r"d.jsonl.gz: not readable as gzip"):
        load_chat_jsonl(fake)
    fake.write_bytes(gzip.compress(good.encode())[:-12])
    with pytest.raises(EmInterpError, match="d.jsonl.gz"):
        load_chat_jsonl(fake)
    yml = tmp_path / "q.yaml"
    yml.write_text("- id: a\n  paraphrases: [x]\n  samples_per_paraphrase: true\n")
    with pytest.raises(EmInterpError, match="samples_per_paraphrase"):
        load_question_yaml(yml)
    yml.write_text("- id: a\n  paraphrases: [x]\n- id: a\n  paraphrases: [y]\n")
    with pytest.raises(EmInterpError, match=r"duplicate id 'a' \(also question 1\)"):
        load_question_yaml(yml)


def test_parquet_missing_answers_and_columns(tmp_path):
    import pandas as pd

    from em_interp.data import load_response_data

    pd.DataFrame({"question": ["q1", "q1", "q2"], "answer": ["fine", None, float("nan")]}).to_parquet(
        tmp_path / "g_aligned.parquet")
    pd.DataFrame({"question": ["q1", "q2"], "answer": ["bad", "worse"]}).to_parquet(tmp_path / "g_misaligned.parquet")
    (q,) = load_response_data(tmp_path, "g")  # q2 has no real aligned answer: dropped
    assert q.aligned == ("fine",) and "None" not in q.aligned
    pd.DataFrame({"question": ["q1"], "text": ["x"]}).to_parquet(tmp_path / "h_aligned.parquet")
    pd.DataFrame({"question": ["q1"], "answer": ["x"]}).to_parquet(tmp_path / "h_misaligned.parquet")
    with pytest.raises(EmInterpError, match=r"h_aligned.parquet: has no \['answer'\] column"):
        load_response_data(tmp_path, "h")
    (tmp_path / "i_aligned.parquet").write_bytes(b"not parquet")
    (tmp_path / "i_misaligned.parquet").write_bytes(b"not parquet")
    with pytest.raises(EmInterpError, match="i_aligned.parquet: not a readable parquet file"):
        load_response_data(tmp_path, "i")


def test_bad_adapters_are_refused(tiny_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from em_interp import load_model
    from em_interp.lora.training import LoraTrainConfig, train_lora

    base = str(tiny_dirs["llama"])
    run = train_lora(base, EXAMPLES * 2, LoraTrainConfig(rank=1, alpha=8.0, layers=(0,), steps=1, batch_size=2,
                                                         checkpoint_every=1), tmp_path / "r", progress=False)
    weights = run.adapter_dir / "adapter_model.safetensors"
    for name, content in (("nan", lambda t: {k: v * float("nan") for k, v in t.items()}),
                          ("empty", lambda t: {"other.weight": next(iter(t.values()))})):
        bad = tmp_path / name
        shutil.copytree(run.adapter_dir, bad)
        save_file(content(load_file(str(weights))), str(bad / "adapter_model.safetensors"))
        with pytest.raises(EmInterpError, match="NaN or infinite" if name == "nan" else "holds no LoRA tensors"):
            load_model(base, adapter=bad)
    truncated = tmp_path / "truncated"
    shutil.copytree(run.adapter_dir, truncated)
    (truncated / "adapter_model.safetensors").write_bytes(weights.read_bytes()[:50])
    with pytest.raises(EmInterpError, match=r"truncated/adapter_model.safetensors is not a readable safetensors"):
        load_model(base, adapter=truncated)


def test_judge_nan_logprobs_and_corrupt_cache(tmp_path):
    from em_interp.evaluation.judges import JudgeCache, score_from_top_logprobs

    assert score_from_top_logprobs({"50": math.nan, "10": math.log(0.9)}) == pytest.approx(10.0)
    assert score_from_top_logprobs({"50": math.nan}) is None
    bad = tmp_path / "judge.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(EmInterpError, match=r"judge.sqlite is not an em_interp sqlite cache"):
        JudgeCache(bad)
