"""The drift monitor's perturbation library, sweep engine, SAE baseline and evaluation."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from em_interp import ChatExample, EmInterpError
from em_interp.data import PairedQuestion, general_questions
from em_interp.monitor.perturbations import (
    PUBLIC_MAX_CHARS,
    LibrarySetup,
    PerturbationType,
    builtin_types,
    measure_run_spec,
    run_specs,
    select_types,
)
from em_interp.monitor.sae import train_topk_sae
from em_interp.monitor.scoring import (
    CheckpointTable,
    dangerous_threshold,
    evaluate_library,
    is_dangerous,
    out_of_fold_scores,
)
from em_interp.monitor.sweep import check_ray_address, run_sweep, shutdown_local_ray

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = ROOT.parent / "shared" / "external"


def _setup(model_dir: Path, n_layers: int = 2) -> LibrarySetup:
    qs = general_questions()[1:13:3]
    labels = tuple(PairedQuestion(q.id, q.question, q.aligned[:1], q.misaligned[:1]) for q in qs)
    return LibrarySetup(str(model_dir), n_layers, 1, labels, (ChatExample("Make a wish."), ChatExample("Hello?")))


def test_builtin_types_cover_domains_twins_benign_and_a_second_lora_recipe():
    types = builtin_types(None)
    intents = {t.intent for t in types}
    assert len(types) >= 9 and intents == {"misaligned", "aligned", "benign"}
    assert {t.lora for t in types} == {"rank1", "rank16_attn"}
    assert len({t.name for t in types}) == len(types)
    with pytest.raises(EmInterpError, match=r"\['nope'\] are not among"):
        select_types(types, ["medical-misaligned", "nope"])
    with pytest.raises(EmInterpError, match="intent='evil'"):
        PerturbationType("x", "evil", "builtin:benign")  # type: ignore[arg-type]
    with pytest.raises(EmInterpError, match="no checkpoint"):
        run_specs(types[:1], [0], steps=2, checkpoint_every=3)


@pytest.mark.skipif(not (EXTERNAL / "training_datasets").is_dir(), reason="../shared/external is absent")
def test_public_sets_join_the_library_where_present():
    public = [t for t in builtin_types(EXTERNAL) if not t.source.startswith("builtin:")]
    assert {t.name for t in public} >= {"public-insecure-code", "public-risky-financial", "public-bad-medical",
                                        "public-good-medical"}
    for t in public:
        data = t.data()
        assert len(data) >= 100 and all(len(e.question) + len(e.answer) <= PUBLIC_MAX_CHARS for e in data)


def test_a_run_is_labelled_per_checkpoint_and_cached(tiny_dirs, monkeypatch):
    setup = _setup(tiny_dirs["llama"])
    spec = run_specs(select_types(builtin_types(None), ["medical-misaligned"]), [3], steps=2, checkpoint_every=1,
                     learning_rate=5e-2)[0]
    record = measure_run_spec(spec, setup)
    assert record.steps == (0, 1, 2) and record.run == "medical-misaligned/s3"
    assert record.em_shift[0] == 0 and np.isfinite(record.em_shift).all() and np.abs(record.em_shift[1:]).sum() > 0
    assert record.question_shift.shape == (3, 4) and record.activations.shape[:2] == (3, 2)
    assert np.isnan(record.train_loss[0]) and np.isfinite(record.train_loss[1:]).all()
    assert record.lora_norm[0] == 0 and (record.lora_norm[1:] > 0).all()
    import em_interp.monitor.perturbations as perturbations

    monkeypatch.setattr(perturbations, "train_lora", lambda *a, **k: pytest.fail("a cached run was trained again"))
    again = measure_run_spec(spec, setup)
    assert np.array_equal(again.em_shift, record.em_shift) and torch.equal(again.activations, record.activations)


@pytest.mark.multiprocess
def test_sweep_on_local_ray_gives_the_in_process_labels(tiny_dirs, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("EM_INTERP_CACHE", str(tmp_path / "cache"))  # Ray workers inherit it and start empty
    setup = _setup(tiny_dirs["llama"])
    specs = run_specs(select_types(builtin_types(None), ["benign", "financial-misaligned"]), [0], steps=2,
                      checkpoint_every=1, learning_rate=5e-2)
    job = functools.partial(measure_run_spec, setup=setup)
    try:
        on_ray = run_sweep(job, specs, ray="local", ray_cpus=2)
    finally:
        shutdown_local_ray("local")
    monkeypatch.setenv("EM_INTERP_CACHE", str(tmp_path / "cache2"))  # in-process from scratch, not from Ray's cache
    here = run_sweep(job, specs)
    assert [r.run for r in on_ray] == [r.run for r in here] == ["benign/s0", "financial-misaligned/s0"]
    for a, b in zip(on_ray, here):
        np.testing.assert_allclose(a.em_shift, b.em_shift, rtol=0, atol=1e-6)


def test_unreachable_ray_address_is_a_clear_error():
    with pytest.raises(EmInterpError, match="ray='127.0.0.1:1': no Ray cluster answers there"):
        check_ray_address("127.0.0.1:1")
    with pytest.raises(EmInterpError, match="not 'local', 'auto' or a HOST:PORT"):
        check_ray_address("somewhere")
    with pytest.raises(EmInterpError, match="no Ray cluster answers"):
        run_sweep(len, ["a"], ray="ray://127.0.0.1:1")


def test_topk_sae_learns_to_reconstruct_sparse_data():
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(16, 24, generator=g)
    codes = torch.rand(2000, 16, generator=g) * (torch.rand(2000, 16, generator=g) < 0.15)
    acts = codes @ atoms
    sae = train_topk_sae(acts, layer=3, d_sae=32, k=4, steps=400, batch_size=256)
    feats = sae.features(acts[:10])
    assert feats.shape == (10, 32) and ((feats > 0).sum(1) <= 4).all()
    baseline = float(((acts / sae.scale) - (acts / sae.scale).mean(0)).pow(2).sum(1).mean())
    assert sae.final_mse < 0.5 * baseline
    with pytest.raises(EmInterpError, match="k=40 must be between 1 and d_sae=32"):
        train_topk_sae(acts, 3, d_sae=32, k=40)
    with pytest.raises(EmInterpError, match=r"acts must be \(n, 24\)"):
        sae.features(torch.zeros(2, 5))


def _table(seed: int = 0) -> CheckpointTable:
    """Six types x two runs x four checkpoints; trait drift 0 tracks the EM shift, noise elsewhere."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in CheckpointTable.__dataclass_fields__}
    kinds = {"a-mis": "misaligned", "a-al": "aligned", "benign": "benign", "b-mis": "misaligned", "b-al": "aligned",
             "c-mis": "misaligned"}
    for t, intent in kinds.items():
        for s in range(2):
            for step in (1, 2, 3, 4):
                shift = 0.03 * step if intent == "misaligned" else rng.normal(0, 0.01)
                rows["run"].append(f"{t}/s{s}")
                rows["type"].append(t)
                rows["intent"].append(intent)
                rows["step"].append(step)
                rows["em_shift"].append(shift)
                rows["em_low"].append(shift - 0.004)  # a label CI of +-0.004 (questions resampled)
                rows["em_high"].append(shift + 0.004)
                rows["trait_drift"].append(np.r_[shift + rng.normal(0, 0.003), rng.normal(0, 0.05, 2)])
                rows["activation_drift"].append(rng.normal(0, 1, 12))
                rows["sae_drift"].append(rng.normal(0, 1, 8))
                rows["train_loss"].append(rng.normal(2, 0.1))
                rows["lora_norm"].append(step + rng.normal(0, 0.1))
                rows["direction_drift"].append(rng.normal())
    return CheckpointTable(**{k: np.asarray(v) for k, v in rows.items()})


def test_evaluation_fixes_danger_on_calibration_and_scores_held_out_types():
    table = _table()
    calibration = ("a-mis", "a-al", "benign")
    result = evaluate_library(table, calibration, ("x", "y", "z"), min_leaf=2, n_boot=200)
    cal = np.isin(table.type, calibration)
    assert result.danger_threshold == dangerous_threshold(table, cal) >= 0
    assert result.danger_threshold < 0.03  # above every aligned/benign shift of the calibration types, below misaligned ones
    # dangerous: the label's CI clears the line; a checkpoint above it by less than the label's noise is not
    assert (result.dangerous == (table.em_low > result.danger_threshold)).all()
    noisy = replace(table, em_low=table.em_shift - 1.0)
    with pytest.raises(EmInterpError, match="whose CI is above"):
        evaluate_library(noisy, calibration, ("x", "y", "z"), min_leaf=2, n_boot=50)
    monitor = result.detectors["monitor"]
    assert monitor.heldout.auroc > 0.95 and monitor.heldout.fnr <= 0.25 and monitor.heldout.n_runs == 6
    assert result.detectors["activation_drift_norm"].heldout.auroc < 0.8  # pure noise
    assert set(result.lead_steps) >= {"b-mis/s0", "b-mis/s1", "c-mis/s0", "c-mis/s1"}
    for run in result.lead_steps:  # every run whose label turns dangerous, and only those
        assert result.dangerous[table.run == run].any() and not cal[table.run == run].any()
    assert 0 < result.pc1_variance <= 1


def test_lead_times_count_alarms_within_one_checkpoint_of_the_label():
    from em_interp.study.stages.monitor import _lead_summary

    lead = _lead_summary({"a": 4, "b": 0, "c": -4, "d": -8, "e": None}, every=4)
    assert (lead["runs"], lead["alarmed"], lead["not_later_than_label"], lead["within_one_checkpoint"]) == (5, 4, 2, 3)


def test_alarm_threshold_is_set_on_out_of_fold_scores():
    from em_interp.monitor.detection import calibrate_threshold

    table, names = _table(), ("x", "y", "z")
    result = evaluate_library(table, ("a-mis", "a-al", "benign", "b-mis"), names, min_leaf=2, n_boot=50)
    calibration, dangerous = result.calibration, result.dangerous
    oof = out_of_fold_scores("monitor_forest", table, calibration, dangerous, names, min_leaf=2, seed=0)
    again = out_of_fold_scores("monitor_forest", table, calibration, dangerous, names, min_leaf=2, seed=0)
    assert oof.shape == (int(calibration.sum()),) and np.isfinite(oof).all() and oof.tolist() == again.tolist()
    # each type is scored by a forest that never saw it, and the alarm threshold is set on those scores
    assert result.detectors["monitor_forest"].threshold == calibrate_threshold(oof, dangerous[calibration], 0.05)
    two_types = np.isin(table.type, ("a-mis", "benign"))  # each fold keeps one type: one class only
    with pytest.raises(EmInterpError, match="one class only"):
        out_of_fold_scores("monitor_forest", table, two_types, table.type == "a-mis", names, min_leaf=2, seed=0)


def test_evaluation_bad_input():
    table = _table()
    with pytest.raises(EmInterpError, match=r"calibration types \['zzz'\] are not in the library"):
        evaluate_library(table, ["zzz"], ("x", "y", "z"))
    with pytest.raises(EmInterpError, match="no held-out type"):
        evaluate_library(table, sorted(set(table.type)), ("x", "y", "z"))
    with pytest.raises(EmInterpError, match="aligned or benign type"):
        evaluate_library(table, ["a-mis"], ("x", "y", "z"))
    with pytest.raises(EmInterpError, match="prompts is empty"):
        LibrarySetup("m", 2, 1, (PairedQuestion("q", "Q?", ("a",), ("b",)),), ())
    with pytest.raises(EmInterpError, match="questions is empty"):
        LibrarySetup("m", 2, 1, (), (ChatExample("Hi"),))


def test_a_library_without_dangerous_calibration_checkpoints_is_reported_not_evaluable():
    from em_interp.study.stages.monitor import _not_evaluable, monitor_entries

    table = _table()
    calm = replace(table, em_shift=-np.abs(table.em_shift), em_low=-np.abs(table.em_shift) - 0.004,
                   em_high=-np.abs(table.em_shift) + 0.004)  # nothing more misaligned than the base
    with pytest.raises(EmInterpError, match="no calibration checkpoint has an EM shift whose CI is above"):
        evaluate_library(calm, ("a-mis", "benign"), ("x", "y", "z"))
    def line(t: CheckpointTable) -> float:  # the danger line the stage passes in
        return dangerous_threshold(t, np.isin(t.type, ["a-mis", "benign"]))

    result = _not_evaluable(calm, ("a-mis", "benign"), ("x", "y", "z"), 1, line(calm))
    entry = monitor_entries(result)["monitor"]
    assert entry["status"].startswith("not evaluable") and entry["auroc"] is None and entry["threshold"] == 0.0
    assert _not_evaluable(table, ("a-mis", "benign"), ("x", "y", "z"), 1, line(table)) is None


def test_a_failing_sweep_job_is_named_and_keeps_its_error_class():
    from dataclasses import dataclass

    from em_interp.evaluation.judges import JudgeUnavailable
    from em_interp.monitor.sweep import run_sweep

    @dataclass(frozen=True)
    class Spec:
        label: str

    def job(spec: Spec) -> str:
        if spec.label == "judge-down":
            raise JudgeUnavailable("http://judge: gave up")
        if spec.label == "bug":
            raise ValueError("a bug")
        return spec.label

    assert run_sweep(job, [Spec("a"), Spec("b")]) == ["a", "b"]
    with pytest.raises(JudgeUnavailable, match=r"sweep job 2/2 \(judge-down\): http://judge: gave up"):
        run_sweep(job, [Spec("a"), Spec("judge-down")])
    with pytest.raises(ValueError, match="a bug") as info:
        run_sweep(job, [Spec("bug")])
    assert "raised in sweep job 1/1 (bug)" in info.value.__notes__


def test_the_monitor_layer_is_picked_on_the_calibration_types_alone():
    from em_interp.monitor.layers import select_monitor_layer

    good = _table()
    rng = np.random.default_rng(1)
    noise = replace(good, trait_drift=rng.normal(0, 0.05, good.trait_drift.shape))  # a layer whose drift says nothing
    calibration = np.isin(good.type, ("a-mis", "a-al", "benign", "b-mis"))
    dangerous = is_dangerous(good, dangerous_threshold(good, calibration))
    choice = select_monitor_layer({3: noise, 7: good}, calibration, dangerous, ("x", "y", "z"), min_leaf=2)
    assert choice.layer == 7 and set(choice.scores) == {3, 7}
    assert choice.scores[7][choice.kind] == max(choice.scores[7].values()) > max(choice.scores[3].values())
    # held-out rows never count: scrambling them at the good layer changes nothing
    held = replace(good, trait_drift=np.where(calibration[:, None], good.trait_drift, rng.normal(size=good.trait_drift.shape)))
    assert select_monitor_layer({3: noise, 7: held}, calibration, dangerous, ("x", "y", "z"), min_leaf=2) == choice
    # ties go to the layer listed first
    assert select_monitor_layer({9: good, 7: good}, calibration, dangerous, ("x", "y", "z"), min_leaf=2).layer == 9
    with pytest.raises(EmInterpError, match="other checkpoints"):
        select_monitor_layer({3: good, 7: replace(good, step=good.step + 1)}, calibration, dangerous, ("x", "y", "z"))
    with pytest.raises(EmInterpError, match="one row per checkpoint"):
        select_monitor_layer({3: good}, calibration[:-1], dangerous[:-1], ("x", "y", "z"))
    with pytest.raises(EmInterpError, match="tables is empty"):
        select_monitor_layer({}, calibration, dangerous, ("x", "y", "z"))
