"""Each study stage alone, on a tiny random model, with a hand-built context.

Every test runs one stage's ``run`` on a context holding exactly the artefacts it declares it
needs, checks the artefacts it provides and its result, renders its report section and results.json
entries, and stores and re-reads its record (so the report and the figures can be rebuilt from it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from em_interp import load_model
from em_interp.evaluation.judge_free import score_questions
from em_interp.study import Lazy, StageFileError, StudyConfig, StudyContext
from em_interp.study.common import eval_questions, split_questions
from em_interp.study.records import StageStore
from em_interp.study.stages import default_stages
from tests.conftest import tiny_budget
from tests.test_loading import _make_adapter

STAGES = {s.name: s for s in default_stages()}


@pytest.fixture(scope="module")
def config(tiny_study_dir, tmp_path_factory) -> StudyConfig:
    return StudyConfig(out=tmp_path_factory.mktemp("study"), budget=tiny_budget(), model=str(tiny_study_dir),
                       progress=False)


@pytest.fixture(scope="module")
def models(tiny_study_dir, tmp_path_factory):
    """Base model, and two random rank-1 down_proj adapters standing in for organism and control."""
    folder = tmp_path_factory.mktemp("adapters")
    _make_adapter(tiny_study_dir, folder / "organism", seed=1)
    _make_adapter(tiny_study_dir, folder / "control", seed=2)
    return {"base": load_model(tiny_study_dir), "organism": load_model(tiny_study_dir, adapter=folder / "organism"),
            "control": load_model(tiny_study_dir, adapter=folder / "control"), "organism_adapter": folder / "organism"}


def context(config: StudyConfig, stage: str, **artefacts) -> StudyContext:
    """A context holding exactly the stage's declared needs, restricted like the runner does."""
    spec = STAGES[stage]
    assert set(artefacts) == set(spec.needs), f"test must hand-build exactly {spec.needs}"
    ctx = StudyContext(config)
    for name, value in artefacts.items():
        setattr(ctx, name, value)
    ctx.restrict(stage, frozenset((*spec.needs, *spec.provides)))
    return ctx


def check(stage: str, ctx: StudyContext, config: StudyConfig, tmp_path: Path):
    """Run the stage; check it provides what it declares; render, store and re-read its record."""
    spec = STAGES[stage]
    result = spec.run(ctx)
    assert all(ctx.has(n) for n in spec.provides)
    section = spec.section(result, config)
    assert section.title
    entries = spec.entries(result)
    json.dumps(entries)
    for headline in spec.headlines(result):
        assert headline.text()
    store = StageStore(tmp_path, config.identity())
    store.claim()
    store.save(stage, "k", result, 1.0)
    back = store.load(stage, "k")
    assert back is not None and json.dumps(spec.entries(back.result), sort_keys=True) == json.dumps(entries, sort_keys=True)
    restored = StudyContext(config)  # restoring needs nothing but the config and the record
    restored.restrict(stage, frozenset((*spec.needs, *spec.provides)))
    spec.restore(restored, back.result)
    assert all(restored.has(n) for n in spec.provides)
    return result, entries


def test_model_stage(config, tmp_path):
    result, entries = check("model", context(config, "model"), config, tmp_path)
    assert entries["model"]["n_layers"] == 3 and entries["model"]["d_model"] == 64


def test_cache_stage(config, models, tmp_path):
    result, entries = check("cache", context(config, "cache", model=models["base"]), config, tmp_path)
    assert entries["cache"]["examples"] == 2 and len(entries["cache"]["mean_residual_norm_by_layer"]) == 3


def test_em_base_stage(config, models, tmp_path):
    ctx = context(config, "em_base", model=models["base"])
    result, entries = check("em_base", ctx, config, tmp_path)
    assert entries["em_score"]["base"]["n"] == len(eval_questions(config)) == 6
    assert set(entries["em_score"]["base"]) == {"mean", "ci_low", "ci_high", "n", "frac_positive", "p_value"}
    assert len(entries["base_answers"]) == 8


def test_organisms_stage_and_its_restore(config, tmp_path):
    ctx = context(config, "organisms")
    result, entries = check("organisms", ctx, config, tmp_path)
    assert entries["organisms"]["layers"] == [0, 1, 2] and len(result.runs["organism"].losses) == 2
    # a stage file whose adapters are gone cannot be reused: the runner reruns the stage
    gone = type(result)(result.domain, result.training, result.layers,
                        {**result.runs, "control": type(result.runs["control"])(Path("/nonexistent"), 0.0, [1.0])})
    with pytest.raises(StageFileError, match="control's adapter folder /nonexistent is gone"):
        STAGES["organisms"].restore(StudyContext(config), gone)
    lazy = StudyContext(config)
    STAGES["organisms"].restore(lazy, result)
    assert isinstance(lazy._values["organism"], Lazy)  # nothing loaded until used
    assert lazy.organism.peft_model is not None


def test_em_organisms_stage(config, models, tmp_path):
    base_scores = score_questions(models["base"], eval_questions(config))
    ctx = context(config, "em_organisms", model=models["base"], organism=models["organism"], control=models["control"],
                  base_scores=base_scores)
    result, entries = check("em_organisms", ctx, config, tmp_path)
    shift = entries["em_shift"]["organism_vs_base"]
    expected = float((ctx.organism_scores.per_question - base_scores.per_question).mean())
    assert shift["mean"] == pytest.approx(expected) and shift["ci_low"] <= shift["mean"] <= shift["ci_high"]
    assert set(entries["em_shift_in_domain"]) == {"organism_vs_control", "organism_vs_base", "control_vs_base"}


def test_rank1_stage(config, models, tmp_path):
    result, entries = check("rank1", context(config, "rank1", organism=models["organism"]), config, tmp_path)
    rank1 = entries["rank1"]
    assert [a["layer"] for a in rank1["adapters"]] == [0, 1, 2]
    assert {a["class"] for a in rank1["adapters"]} <= {"general", "domain-specific", "inactive"}
    curves = rank1["steering"]["em_scores"]
    assert all(len(v) == 3 for v in curves.values())


def test_direction_stage(config, models, tmp_path):
    ctx = context(config, "direction", model=models["base"], organism=models["organism"], control=models["control"])
    result, entries = check("direction", ctx, config, tmp_path)
    d = entries["direction"]
    assert len(d["auroc_by_layer"]) == 3 and 0 <= d["layer"] < 3
    fit, held = split_questions(eval_questions(config))
    assert [q.id for q in ctx.held_questions] == [q.id for q in held]
    assert set(ctx.ablation_directions) == {0, 1, 2} and ctx.best_layer == d["layer"]
    assert d["auroc_ci"][0] <= d["auroc"] <= d["auroc_ci"][1]


def _direction_artefacts(config, models):
    _, held = split_questions(eval_questions(config))
    gen = torch.Generator().manual_seed(0)
    return {"ablation_directions": {layer: torch.randn(64, generator=gen) for layer in range(3)},
            "held_questions": held}


def test_ablation_stage(config, models, tmp_path):
    questions = eval_questions(config)
    arts = _direction_artefacts(config, models)
    ctx = context(config, "ablation", organism=models["organism"], control=models["control"],
                  organism_scores=score_questions(models["organism"], questions),
                  control_scores=score_questions(models["control"], questions),
                  control_means={layer: torch.zeros(64) for layer in range(3)}, **arts)
    result, entries = check("ablation", ctx, config, tmp_path)
    ablation = entries["ablation"]
    assert set(ablation["methods"]) == {"activation", "weights", "weights_control_orthogonal"}
    # the control-orthogonal weight edit cannot touch the control's adapters
    assert abs(ablation["methods"]["weights_control_orthogonal"]["control_em_change"]) < 1e-4
    lo, hi = ablation["em_shift_removed_ci"]
    assert lo <= hi


def test_steering_stage(config, models, tmp_path):
    arts = _direction_artefacts(config, models)
    ctx = context(config, "steering", model=models["base"], base_scores=score_questions(models["base"], eval_questions(config)),
                  best_layer=1, resid_norms={layer: 2.0 for layer in range(3)}, **arts)
    result, entries = check("steering", ctx, config, tmp_path)
    s = entries["steering"]
    assert s["alpha_fraction_of_residual_norm"] == [0.0, 0.2] and s["alphas"] == [0.0, pytest.approx(0.4)]
    assert s["em_scores"][0] == s["random_em_scores"][0] and s["em_scores"][1] != s["em_scores"][0]
    assert s["top_em_change"] == pytest.approx(s["em_scores"][-1] - s["em_scores"][0])
    assert s["top_em_change_ci"][0] <= s["top_em_change"] <= s["top_em_change_ci"][1]


def test_transfer_stage_reports_why_it_did_not_run(config, models, tmp_path):
    ctx = context(config, "transfer", model=models["base"], organism=models["organism"], best_layer=1)
    _, entries = check("transfer", ctx, config, tmp_path)
    assert entries["transfer"]["status"] == "not run"


def test_the_defenses_headline_is_the_best_within_the_task_budget():
    """SafeLoRA removing 177% at +45% task cost must not headline over steering's 51% at +5%."""
    from types import SimpleNamespace

    from em_interp.study.stages.defenses import defenses_headlines

    def entry(strengths, reductions, costs):
        return {"strengths": strengths, "em_reduction": reductions, "task_cost": costs,
                "em_reduction_ci": [(x - 0.1, x + 0.1) for x in reductions]}

    table = {"safelora": entry([0.25, 0.5], [1.77, 0.2], [0.45, 0.02]),
             "preventative_steering": entry([0.1, 0.3], [0.2, 0.51], [0.01, 0.051])}
    result = SimpleNamespace(domains=["medical"], by_domain={"medical": {"defenses": table}}, composition={"status": "not run"})
    [line] = defenses_headlines(result)
    assert line.value == 0.51 and "preventative_steering=0.3" in line.label and "within a 10% task-loss rise" in line.label
    assert line.ci == pytest.approx((0.41, 0.61))
    composed = {"status": "run", "em_reduction": 0.7, "em_reduction_ci": [0.5, 0.9], "task_cost": 0.08,
                "defenses": [{"name": "preventative_steering", "strength": 0.3}, {"name": "kl", "strength": 1.0}]}
    [line] = defenses_headlines(SimpleNamespace(domains=["medical"], by_domain={"medical": {"defenses": table}},
                                                composition=composed))
    assert line.value == 0.7 and "preventative_steering=0.3 + kl=1" in line.label and line.ci == (0.5, 0.9)
    over = {**composed, "em_reduction": 0.95, "task_cost": 0.2}
    [line] = defenses_headlines(SimpleNamespace(domains=["medical"], by_domain={"medical": {"defenses": table}},
                                                composition=over))
    assert line.value == 0.51
    table = {"safelora": entry([0.25], [1.77], [0.45])}
    [line] = defenses_headlines(SimpleNamespace(domains=["medical"], by_domain={"medical": {"defenses": table}},
                                                composition={"status": "not run"}))
    assert line.value == 1.77 and "OUTSIDE" in line.label
