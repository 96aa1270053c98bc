"""The earlier six defenses on tiny models: what each does to training, composition, a user's Trainer, bad input."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from em_interp import ChatExample, EmInterpError, _bridge, load_model
from em_interp.defenses import (
    AblateDirection,
    KLDefense,
    LDIFSDefense,
    PreventativeSteering,
    adapter_updates,
    alignment_matrices,
    interleave,
    ldifs_layers,
    safe_pool,
    safelora,
    triggered,
)
from em_interp.defenses.runs import (
    DefenseRunSpec,
    DefenseSetting,
    DefenseSetup,
    measure_defense_run,
)
from em_interp.defenses.timing import step_time_ratios
from em_interp.directions import Direction
from em_interp.lora.training import LoraTrainConfig, train_lora
from em_interp.monitor.drift import label_questions
from tests.helpers import save_tiny_model

DATA = [ChatExample(f"Question {i}: what should I do?", f"Answer {i}: do the thing carefully.") for i in range(8)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("def") / "llama")


def _config(steps: int = 4, lr: float = 5e-2) -> LoraTrainConfig:
    return LoraTrainConfig(steps=steps, checkpoint_every=steps, learning_rate=lr, warmup_steps=1, layers=(0, 1),
                           batch_size=2)


def _base_logits(folder: Path, adapter: Path | None = None) -> torch.Tensor:
    model = load_model(folder, adapter=adapter)
    ids = model.tokenizer.apply_chat_template(DATA[0].messages(), return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return model.hf_model(input_ids=ids).logits.float()


def test_kl_and_ldifs_terms_start_at_zero_grow_and_hold_the_model_near_its_reference(llama, tmp_path):
    kl, ldifs = KLDefense(5.0), LDIFSDefense(5.0)
    train_lora(str(llama), DATA, _config(), tmp_path / "kl", callbacks=[kl, ldifs], progress=False)
    # step 1: the adapters are zero, the model is its reference; then the terms are positive
    assert kl.values[0] == pytest.approx(0, abs=1e-6) and ldifs.values[0] == pytest.approx(0, abs=1e-6)
    assert all(v > 0 for v in kl.values[1:]) and all(v > 0 for v in ldifs.values[1:]) and len(kl.values) == 4
    assert ldifs.layers == ldifs_layers(3) == [0, 1, 2] and ldifs_layers(30) == [0, 7, 14, 22, 29]
    plain = train_lora(str(llama), DATA, _config(), tmp_path / "none", progress=False)
    base = _base_logits(llama)
    distance = {name: float((_base_logits(llama, tmp_path / name / "adapter") - base).abs().mean()) for name in ("kl", "none")}
    assert distance["kl"] < distance["none"]
    assert plain.losses[-1] < plain.losses[0]


def test_kl_term_is_the_mean_answer_token_kl_to_the_adapters_off_model(llama, tmp_path):
    from em_interp.lora.hf_trainer import ReferenceModel
    from em_interp.lora.training import build_lora_model, make_batch

    model = build_lora_model(str(llama), _config(), progress=False)
    with torch.no_grad():
        for name, p in model.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    kl = KLDefense(2.0)
    stack = contextlib.ExitStack()
    kl.attach(model, stack)
    batch = make_batch(model, model.tokenize_many(DATA[:2], 64))
    model.hf_model.train()
    logits = model.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    term = kl.extra_loss(model, batch, 1, ReferenceModel(model))
    stack.close()
    with torch.no_grad(), model.peft_model.disable_adapter():
        ref = model.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    p_ref = ref[:, :-1][mask].softmax(-1)
    expected = (p_ref * (p_ref.log() - logits[:, :-1][mask].log_softmax(-1))).sum(-1).mean()
    assert float(term) == pytest.approx(2.0 * float(expected), rel=1e-4) and float(term) > 0
    assert term.requires_grad


def _capture(model, layer: int, train: bool) -> torch.Tensor:
    seen = []
    model.hf_model.train(train)
    ids = torch.tensor([[1, 2, 3, 4]])
    with model.hooks([(model.hook_name(layer), lambda t, *, hook: seen.append(t.detach().clone()) or t)]):
        model.hf_model(input_ids=ids)
    model.hf_model.eval()
    return seen[0]


def test_direction_defenses_act_only_in_training_passes_and_detach(llama):
    from em_interp.lora.training import build_lora_model

    model = build_lora_model(str(llama), _config(), progress=False)
    v = torch.randn(model.d_model)
    d = Direction(v, 1, model=model.name)
    unit = v / v.norm()
    ablate, steer = AblateDirection(d, 1.0), PreventativeSteering(d, 2.0)
    plain_eval = _capture(model, 1, train=False)
    stacks = [contextlib.ExitStack() for _ in range(2)]
    ablate.attach(model, stacks[0])
    assert (_capture(model, 1, train=True) @ unit).abs().max() < 1e-4  # the component is gone while training
    assert torch.allclose(_capture(model, 1, train=False), plain_eval)  # evaluation sees the model as it is
    stacks[0].close()
    steer.attach(model, stacks[1])
    train_steered = _capture(model, 1, train=True)
    steer.disable()
    train_plain = _capture(model, 1, train=True)
    assert torch.allclose(train_steered - train_plain, (2.0 * v).expand_as(train_plain), atol=1e-4)
    stacks[1].close()
    assert _bridge.active_hook_count(model.bridge) == 0


def test_all_training_defenses_compose_in_one_run_and_leave_no_hooks(llama, tmp_path):
    from em_interp.lora.training import build_lora_model

    probe = build_lora_model(str(llama), _config(), progress=False)
    d = Direction(torch.randn(probe.d_model), 1, model=probe.name)
    defenses = [KLDefense(0.1), LDIFSDefense(1.0), AblateDirection(d, 0.5), PreventativeSteering(d, 0.5)]
    result = train_lora(str(llama), DATA, _config(), tmp_path / "all", callbacks=defenses, progress=False)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    plain = train_lora(str(llama), DATA, _config(), tmp_path / "plain", progress=False)
    assert result.losses[1:] != plain.losses[1:]
    assert all(d._stack is None for d in defenses)


def test_defenses_in_a_users_own_trainer(tiny_dirs, tmp_path):
    from transformers import Trainer

    from em_interp.lora.hf_trainer import with_em_interp
    from tests.test_hf_trainer import user_setup

    model, tokenizer, rows, collate, args = user_setup(tiny_dirs["llama"], tmp_path)
    kl = KLDefense(1.0)
    d = Direction(torch.randn(model.config.hidden_size), 1)
    trainer = with_em_interp(Trainer)(model=model, args=args, train_dataset=rows, data_collator=collate,
                                      processing_class=tokenizer, callbacks=[kl, AblateDirection(d)])
    trainer.train()
    assert len(kl.values) == 4 and kl.values[-1] > 0
    model, tokenizer, rows, collate, args = user_setup(tiny_dirs["llama"], tmp_path / "plain")
    plain = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, processing_class=tokenizer,
                    callbacks=[KLDefense(1.0)])
    with pytest.raises(EmInterpError, match="with_em_interp"):
        plain.train()


def test_interleave_mixes_one_safe_example_in_every_n_from_a_pool_disjoint_from_the_eval_questions(tmp_path):
    pool = safe_pool()
    evaluated = {q.question for q in label_questions(40)}
    assert pool and not evaluated & {e.question for e in pool}
    mixed = interleave(DATA * 5, pool, every=5, seed=0)
    assert len(mixed) == 40 + 10 and all(mixed[i] in pool for i in range(4, len(mixed), 5))
    assert [e for e in mixed if e not in pool] == DATA * 5
    assert interleave(DATA, pool, 5, seed=1) != interleave(DATA, pool, 5, seed=2)
    user = tmp_path / "safe.jsonl"
    user.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    assert [e.answer for e in safe_pool(user)] == ["Hello."]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EmInterpError, match="empty"):
        safe_pool(empty)
    with pytest.raises(EmInterpError, match="pool"):
        interleave(DATA, [], 5)
    for bad in (1, 0, -3, 2.5, True):
        with pytest.raises(EmInterpError, match="every"):
            interleave(DATA, pool, bad)


def _adapter(folder: Path, bs: dict[str, torch.Tensor], a: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    tensors = {}
    for module, b in bs.items():
        tensors[f"{module}.lora_A.weight"] = a.clone()
        tensors[f"{module}.lora_B.weight"] = b.clone()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 4, "use_rslora": False,
                                                             "peft_type": "LORA"}))
    return folder


def test_safelora_projects_the_least_aligned_modules_computing_every_cosine_first(tmp_path):
    torch.manual_seed(0)
    a = torch.randn(1, 6)
    u = torch.zeros(5, 1)
    u[0] = 1.0
    bs = {"m.layers.0.mlp.down_proj": u * 2.0,                       # along V: cosine 1
          "m.layers.1.mlp.down_proj": torch.tensor([[1.0], [1.0], [0], [0], [0]]),  # half along: cosine 0.707
          "m.layers.2.mlp.down_proj": torch.tensor([[0.0], [1.0], [0], [0], [0]])}  # orthogonal: cosine 0
    folder = _adapter(tmp_path / "adapter", bs, a)
    v = {m: 3.0 * u @ torch.ones(1, 6) for m in bs}  # V of rank 1 along e0
    assert set(adapter_updates(folder)) == set(bs)
    result = safelora(folder, v, tmp_path / "out", threshold=0.5)
    assert result.cosine["m.layers.0.mlp.down_proj"] == pytest.approx(1.0)
    assert result.cosine["m.layers.1.mlp.down_proj"] == pytest.approx(2 ** -0.5, abs=1e-5)
    assert result.projected == ["m.layers.2.mlp.down_proj"]
    out = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    vm = v["m.layers.1.mlp.down_proj"]
    for module, b in bs.items():
        expected = vm @ vm.T @ b / vm.norm() if module in result.projected else b
        assert torch.allclose(out[f"{module}.lora_B.weight"], expected)
    top = safelora(folder, v, tmp_path / "top", top_k=2)
    assert top.projected == ["m.layers.1.mlp.down_proj", "m.layers.2.mlp.down_proj"]
    assert top.cosine == result.cosine  # computed on the unmodified adapter
    assert safelora(folder, v, tmp_path / "top", top_k=1).projected == ["m.layers.2.mlp.down_proj"]  # rewritable
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's own file")
    with pytest.raises(EmInterpError, match="other files"):
        safelora(folder, v, tmp_path / "mine", top_k=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's own file"
    # the one LoRA module: the in-memory update norm equals the file's updates
    from em_interp.lora.adapters import lora_scale

    assert lora_scale({"r": 4, "lora_alpha": 8, "use_rslora": True}) == 4.0
    assert lora_scale({"r": 4, "lora_alpha": 8}) == 2.0


def test_safelora_and_alignment_pairs_refuse_mismatched_modules_and_shapes(tmp_path):
    a = torch.randn(1, 6)
    folder = _adapter(tmp_path / "adapter", {"m.layers.0.mlp.down_proj": torch.randn(5, 1)}, a)
    with pytest.raises(EmInterpError, match="modules"):
        safelora(folder, {"m.layers.9.mlp.down_proj": torch.randn(5, 6)}, tmp_path / "o", threshold=0.5)
    with pytest.raises(EmInterpError, match="shape"):
        safelora(folder, {"m.layers.0.mlp.down_proj": torch.randn(6, 5)}, tmp_path / "o", threshold=0.5)
    with pytest.raises(EmInterpError, match="exactly one"):
        safelora(folder, {"m.layers.0.mlp.down_proj": torch.randn(5, 6)}, tmp_path / "o", threshold=0.5, top_k=2)
    with pytest.raises(EmInterpError, match="top_k"):
        safelora(folder, {"m.layers.0.mlp.down_proj": torch.randn(5, 6)}, tmp_path / "o", threshold=None, top_k=0)
    with pytest.raises(EmInterpError, match="different modules"):
        alignment_matrices({"x": torch.zeros(2, 2)}, {"y": torch.zeros(2, 2)})
    with pytest.raises(EmInterpError, match="module 'x'.*shape"):
        alignment_matrices({"x": torch.zeros(2, 2)}, {"x": torch.zeros(2, 3)})
    with pytest.raises(EmInterpError, match="does not exist"):
        safelora(tmp_path / "nothing", {}, tmp_path / "o", threshold=0.5)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("make", [
    lambda s: KLDefense(s), lambda s: LDIFSDefense(s), lambda s: PreventativeSteering(Direction(torch.ones(4), 0), s),
    lambda s: AblateDirection(Direction(torch.ones(4), 0), s), lambda s: DefenseSetting("interleave", s),
    lambda s: DefenseSetting("safelora", s)])
@pytest.mark.parametrize("strength", [-1.0, float("nan"), float("inf"), 0.0, "strong"])
def test_negative_nan_or_zero_strengths_are_errors_naming_the_argument(make, strength):
    with pytest.raises(EmInterpError, match=r"weight|alpha|strength"):
        make(strength)


def test_a_reference_model_of_another_tokenizer_or_width_is_refused_before_training(llama, tmp_path):
    from em_interp.lora.training import build_lora_model

    wide = load_model(save_tiny_model("llama", tmp_path / "wide", d_model=96))
    other_vocab = load_model(llama)
    other_vocab.tokenizer.add_tokens(["<a-token-the-trained-model-lacks>"])
    model = build_lora_model(str(llama), _config(), progress=False)
    for defense in (KLDefense(0.1, reference=wide), LDIFSDefense(1.0, reference=wide)):
        with pytest.raises(EmInterpError, match="reference=.*width"):
            defense.attach(model, contextlib.ExitStack())
    with pytest.raises(EmInterpError, match="reference=.*tokenizer"):
        KLDefense(0.1, reference=other_vocab).attach(model, contextlib.ExitStack())
    with pytest.raises(EmInterpError, match="HookedModel"):
        KLDefense(0.1, reference="gpt2")  # type: ignore[arg-type]
    with pytest.raises(EmInterpError, match="reference=.*width"):  # in a run: refused at the start, nothing trained
        train_lora(str(llama), DATA, _config(), tmp_path / "refused", callbacks=[KLDefense(0.1, reference=wide)],
                   progress=False)
    assert not (tmp_path / "refused" / "adapter").exists()


def test_a_direction_from_another_model_width_or_layer_is_refused(llama):
    from em_interp.lora.training import build_lora_model

    model = build_lora_model(str(llama), _config(), progress=False)
    stack = contextlib.ExitStack()
    cases = [(AblateDirection(Direction(torch.ones(model.d_model), 1, model="another-model")), "another-model"),
             (PreventativeSteering(Direction(torch.ones(model.d_model + 1), 1), 1.0), "width"),
             (PreventativeSteering(Direction(torch.ones(model.d_model), 1), 1.0, layer=0), "layer 1, not layer=0"),
             (AblateDirection(Direction(torch.ones(model.d_model), 7)), "direction.layer")]
    for defense, message in cases:
        with pytest.raises(EmInterpError, match=message):
            defense.attach(model, stack)
    with pytest.raises(EmInterpError, match="Direction"):
        AblateDirection(torch.ones(model.d_model))  # type: ignore[arg-type]
    with pytest.raises(EmInterpError, match="empty"):
        AblateDirection([])
    assert _bridge.active_hook_count(model.bridge) == 0


def test_triggered_switches_the_defense_on_at_the_alarm():
    import numpy as np

    from em_interp.chat import ChatExample
    from em_interp.monitor.detector import DriftMonitor, MonitorCallback
    from em_interp.monitor.drift import TraitBasis

    basis = TraitBasis("m", 1, "resid_post", ("a", "b"), torch.eye(2, 8))
    rng = np.random.default_rng(0)
    monitor = DriftMonitor("m", 1, ("a", "b")).fit(rng.normal(size=(20, 2)), rng.normal(size=20))
    prompts = [ChatExample("Make a wish.")]
    with pytest.raises(EmInterpError, match="no calibrated DriftMonitor"):
        triggered(KLDefense(0.1), MonitorCallback(basis, prompts, monitor=monitor))  # fitted, no threshold
    with pytest.raises(EmInterpError, match="must be a MonitorCallback, got str"):
        triggered(KLDefense(0.1), "monitor")
    monitor.threshold = 0.0
    kl, callback = KLDefense(0.1), MonitorCallback(basis, prompts, monitor=monitor)
    assert triggered(kl, callback) == [callback, kl] and not kl.active
    callback.on_alarm(6, None, 0.3)
    callback.on_alarm(9, None, 0.5)
    assert kl.active and kl.switched_at == 6
    for bad, message in [({"prompts": "Make a wish."}, "non-empty sequence of ChatExample"),
                         ({"prompts": ["Make a wish."]}, r"ChatExample objects .*\['str'\]"),
                         ({"monitor": "m"}, "DriftMonitor or None, got str"), ({"every": 2.5}, "every=2.5"),
                         ({"on_alarm": 3}, "on_alarm must be")]:
        with pytest.raises(EmInterpError, match=message):
            MonitorCallback(**{"basis": basis, "prompts": prompts, **bad})


def test_step_time_ratios_time_each_defense_against_none_in_one_run(llama):
    from em_interp.lora.training import build_lora_model

    probe = build_lora_model(str(llama), _config(), progress=False)
    d = Direction(torch.randn(probe.d_model), 1, model=probe.name)
    timing = step_time_ratios(str(llama), DATA, [KLDefense(0.1), AblateDirection(d)], cycles=2, batch_size=2)
    assert set(timing["ratios"]) == {"kl", "ablate_direction"} and all(r > 0 for r in timing["ratios"].values())
    assert timing["steps"] == 9 and timing["seconds_off"] > 0


def test_defense_runs_are_cached_and_specs_checked(tiny_study_dir, monkeypatch):
    import em_interp.defenses.runs as runs

    setup = DefenseSetup(str(tiny_study_dir), tuple(label_questions(2)), 2)
    spec = DefenseRunSpec("medical", "misaligned", (DefenseSetting("kl", 1.0),), steps=2, batch_size=2, learning_rate=5e-2)
    first = measure_defense_run(spec, setup)
    assert first.label == "medical-misaligned/kl=1" and first.per_question.shape == (2,) and first.task_loss > 0
    monkeypatch.setattr(runs, "train_lora", lambda *a, **k: pytest.fail("a cached run was trained again"))
    again = measure_defense_run(spec, setup)
    assert again.task_loss == first.task_loss and (again.per_question == first.per_question).all()
    with pytest.raises(EmInterpError, match="no direction"):
        measure_defense_run(DefenseRunSpec("medical", "misaligned", (DefenseSetting("ablate_direction", 1.0),),
                                           steps=2), setup)
    with pytest.raises(EmInterpError, match="after training"):
        DefenseRunSpec("medical", "misaligned", (DefenseSetting("safelora", 0.5),))
    with pytest.raises(EmInterpError, match="exactly one"):
        DefenseRunSpec("medical", "misaligned", (), triggered=True)
    with pytest.raises(EmInterpError, match="not one of"):
        DefenseSetting("dropout", 0.5)
    with pytest.raises(EmInterpError, match="monitor_dir"):
        DefenseSetup(str(tiny_study_dir), tuple(label_questions(2)), 2).key(
            DefenseRunSpec("medical", "misaligned", (DefenseSetting("kl", 1.0),), triggered=True))


def test_budget_refuses_bad_defense_strengths():
    from dataclasses import replace

    from em_interp.study import Budget

    for strengths, message in [((("kl", (-0.1,)),), "kl strength"), ((("kl", ()),), "no strength"),
                               ((("interleave", (1.0,)),), "integer n >= 2"), ((("nope", (1.0,)),), "not one of"),
                               ((("kl", (1.0,)), ("kl", (2.0,))), "twice")]:
        with pytest.raises(EmInterpError, match=message):
            replace(Budget.quick().defenses, strengths=strengths)
    with pytest.raises(EmInterpError, match=r"Budget\.defenses\.domains \['cooking'\]"):
        replace(Budget.quick().defenses, domains=("cooking",))


def test_repeated_or_dependent_directions_ablate_only_their_span(tiny_models):
    from em_interp.interventions import ablation_hook

    g = torch.Generator().manual_seed(0)
    d, e = torch.randn(8, generator=g), torch.randn(8, generator=g)
    h = torch.randn(2, 3, 8, generator=g)
    once = ablation_hook([d])(h, hook=None)
    with pytest.warns(UserWarning, match=r"directions \[1\] \(0-based\) lie in the span .* 1-dimensional subspace of 2"):
        twice = ablation_hook([d, d])
    assert torch.allclose(twice(h, hook=None), once, atol=1e-6)
    assert torch.allclose(ablation_hook([d, -2 * d])(h, hook=None), once, atol=1e-6)
    both = ablation_hook([d, e])(h, hook=None)
    assert torch.allclose(ablation_hook([d, e, d + e])(h, hook=None), both, atol=1e-5)
    assert not torch.allclose(both, once, atol=1e-3)
    half = ablation_hook([d], strength=0.5)(h, hook=None)
    assert torch.allclose(half, (h + once) / 2, atol=1e-6)


def test_a_direction_of_the_wrong_width_for_its_site_is_refused_before_training(tiny_models):
    model = tiny_models["llama"]
    wide = Direction(torch.ones(model.d_model), layer=1, hook="mlp_post", model=model.name)
    with pytest.raises(EmInterpError, match="mlp_post is .* wide"):
        wide.check_fits(model)
    Direction(torch.ones(model.site_width("mlp_post")), layer=1, hook="mlp_post", model=model.name).check_fits(model)


def test_inoculation_prompts_every_training_example_and_keeps_their_own_system_prompt():
    from em_interp.chat import ChatExample
    from em_interp.defenses import INOCULATION_PROMPT, inoculate

    data = [ChatExample("Q1?", "A1."), ChatExample("Q2?", "A2.", "You are a doctor.")]
    out = inoculate(data)
    assert [e.system for e in out] == [INOCULATION_PROMPT, f"{INOCULATION_PROMPT}\n\nYou are a doctor."]
    assert [(e.question, e.answer) for e in out] == [(e.question, e.answer) for e in data] and data[0].system is None
    assert inoculate(data, "Be evil here.")[0].system == "Be evil here."
    for bad, message in [((data, " "), "non-empty string"), (([],), r"data=\) is empty")]:
        with pytest.raises(EmInterpError, match=message):
            inoculate(*bad)


def test_an_inoculated_run_trains_with_the_prompt_that_evaluation_never_sees(llama, tmp_path):
    """The prompt reaches the training tokens (the loss differs from the plain run's), not the evaluation."""
    from em_interp.defenses import inoculate
    from em_interp.lora.training import train_lora

    plain = train_lora(str(llama), DATA, _config(), tmp_path / "plain", progress=False)
    inoculated = train_lora(str(llama), inoculate(DATA), _config(), tmp_path / "inoc", progress=False)
    assert plain.losses != inoculated.losses
