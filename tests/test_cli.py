"""The study command on the embedded model: results.json and report.html with the promised fields."""

from __future__ import annotations

import json
import random
import shutil
import time

import pytest

from em_interp.cli import main
from em_interp.defenses import DEFENSES
from em_interp.defenses.runs import SWITCHABLE
from em_interp.reference import compare, load_reference, readable, study_numbers
from em_interp.study import Budget
from tests.conftest import EXTERNAL
from tests.test_reference_numbers import REFERENCE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quick_study(smollm, tmp_path_factory):
    """One uninterrupted quick study on the embedded model (the CLI, as a user runs it)."""
    out = tmp_path_factory.mktemp("quick") / "study"
    assert main(["study", "--out", str(out), "--quick", "--no-progress"]) == 0
    return out


def test_study_quick_writes_results_and_report(quick_study):
    out = quick_study
    text = (out / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: an undefined value is null
    results = json.loads(text)
    assert results["model"]["name"] == "smollm2-135m-instruct"
    assert (results["model"]["n_layers"], results["model"]["d_model"]) == (30, 576)
    assert results["model"]["load_seconds"] > 0
    assert results["cache"]["examples"] >= 4 and results["cache"]["tokens_per_second"] > 0
    base, n_questions = results["em_score"]["base"], 120 // Budget.quick().base.eval_stride
    assert base["n"] == n_questions and base["ci_low"] <= base["mean"] <= base["ci_high"]
    assert len(results["base_answers"]) == 8 and all(a["answer"] for a in results["base_answers"])
    for role in ("organism", "control"):
        assert results["em_score"][role]["n"] == n_questions
    for key in ("organism_vs_control", "organism_vs_base", "control_vs_base"):
        shift = results["em_shift"][key]
        assert shift["ci_low"] <= shift["mean"] <= shift["ci_high"]
    rank1 = results["rank1"]
    assert [a["layer"] for a in rank1["adapters"]] == [9, 10, 11, 13, 14, 15, 17, 18, 19]
    assert {a["class"] for a in rank1["adapters"]} <= {"general", "domain-specific", "inactive"}
    assert 0 <= rank1["probe_accuracy"]["misaligned_vs_aligned"] <= 1
    direction = results["direction"]
    assert len(direction["auroc_by_layer"]) == 30 and len(direction["base_auroc_by_layer"]) == 30
    assert 0 <= direction["layer"] < 30 and 0 <= direction["separation_accuracy"] <= 1
    assert 0 <= direction["control_separation_accuracy"] <= 1
    assert direction["auroc_by_layer"][0] == 0.5  # no adapter before layer 9: no shift, chance
    names = direction["cosine"]["names"]
    assert len(direction["cosine"]["matrix"]) == len(names) and any(n.startswith("trait: ") for n in names)
    ablation = results["ablation"]
    for key in ("em_shift_removed", "random_em_shift_removed", "control_em_change", "benign_loglik_change"):
        assert isinstance(ablation[key], float)
    assert set(ablation["methods"]) == {"activation", "weights", "weights_control_orthogonal"}
    # the control-orthogonal weight edit cannot touch the control's adapters
    assert abs(ablation["methods"]["weights_control_orthogonal"]["control_em_change"]) < 1e-3
    steering = results["steering"]
    assert steering["alphas"][0] == 0 and len(steering["em_scores"]) == len(steering["random_em_scores"]) == len(steering["alphas"])
    assert steering["em_scores"][0] == steering["random_em_scores"][0] and steering["benign_loglik_changes"][0] == 0
    assert results["transfer"]["status"] == "not run"
    monitor = results["monitor"]  # the drift monitor on the real model, at the quick budget
    assert monitor["library_layer"] == 15 and set(monitor["layer_selection"]) == {"15", "10", "20"}  # 15 +/- 5
    assert str(monitor["layer"]) in monitor["layer_selection"] and len(monitor["runs"]) == 4
    assert monitor["kind"] in ("forest", "logistic") and results["monitor_stress"]["layer"] == monitor["layer"]
    assert monitor["threshold"] >= 0 and 0 < monitor["pc1_variance"] <= 1 and monitor["cost_ratio"] > 0
    assert (out / monitor["monitor_path"]).with_suffix(".json").is_file()
    assert monitor["sae"]["over_seeds"]["n_seeds"] == 2 and monitor["label"]["questions"] == 16
    defenses, study = results["defenses"], results["defenses_study"]  # the six defenses on the real model
    assert set(defenses) == set(DEFENSES)
    assert all(len(d["em_shift"]) == len(d["strengths"]) == len(d["benign_task_loss"]) for d in defenses.values())
    assert study["none"]["medical"]["em_shift_ci"][0] > 0  # the undefended organism is misaligned over its control
    assert set(study["timing"]["ratios"]) == set(SWITCHABLE)
    assert all(len(d["criteria"]) == len(d["strengths"]) for d in defenses.values())
    judging = results["judging"]  # the public judged answers beside the project: the judge-free measures checked
    if (EXTERNAL / "response_data").is_dir():
        assert judging["status"] == "run" and len(judging["em_rate"]["models"]) == 5
        assert all(0 <= m["auroc"] <= 1 for m in judging["measures"].values())
    else:
        assert judging["status"] == "not run"
    assert results["triggered"]["status"] == "run" and results["triggered"]["defense"] in study["timing"]["ratios"]
    report = (out / "report.html").read_text()
    assert "Defenses during fine-tuning" in report
    assert "Misalignment direction" in report and "Ablating the misalignment direction" in report
    assert "Steering the base model" in report and "Drift monitor: detecting EM during fine-tuning" in report
    assert "Residual cache" in report and "plotly" in report and "Behavioural EM measure" in report
    assert "rank1: what the organism" in report and "EM shift of the organisms" in report
    assert report.index("<h2>Summary</h2>") < report.index("<h2>Model</h2>")
    assert "EM shift, organism vs control (general questions)" in report
    assert not [p for p in out.rglob(".*")]  # no temporary files left
    assert {p.stem for p in (out / "stages").glob("*.json")} == {*results["study"]["stages"], "study"}
    # the science has not moved: the key numbers equal the known-good run's within float noise
    assert all(readable(a["answer"]) for a in results["base_answers"])
    assert compare(load_reference(REFERENCE)["study"], study_numbers(results)) == []


def test_study_bad_model_is_a_clear_error(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path / "x"), "--model", "nope-model"]) == 2
    assert "unknown model 'nope-model'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "results.json").exists()


def _stable(results: dict) -> dict:
    from tests.test_study_pipeline import stable

    return stable(results)


def test_quick_study_resumes_from_a_random_late_stage_and_reruns_in_seconds(quick_study, tmp_path, capsys):
    """A study stopped before stage k (its files from k on missing) resumes at k and ends with the same results.

    k is drawn from the last two stage groups (their trained runs come from the cache, so the rerun
    stays short on the real model); the tiny study's kill test (tests/test_study_pipeline.py) covers
    a resume at every stage.
    """
    expected = json.loads((quick_study / "results.json").read_text())
    names = expected["study"]["stages"]
    k = random.randrange(names.index("perturbations"), len(names))
    print(f"resuming the quick study at stage {names[k]!r}")
    out = tmp_path / "resumed"
    # a killed study keeps everything its finished stages wrote (the saved drift monitor, the judged answers),
    # not only the stage files; it has no results or report yet
    shutil.copytree(quick_study, out)
    for name in ("results.json", "report.html"):
        (out / name).unlink()
    for name in names[k:]:
        for suffix in (".json", ".safetensors"):
            (out / "stages" / f"{name}{suffix}").unlink(missing_ok=True)
    (out / "stages" / f".{names[k]}.json.x1.tmp").write_text("{half a file")  # what a kill leaves behind
    assert main(["study", "--out", str(out), "--quick", "--no-progress"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["study"]["ran_this_time"] == names[k:]
    assert _stable(resumed) == _stable(expected)
    assert not [p for p in out.rglob(".*")]  # the killed write's leftover was removed
    start = time.perf_counter()
    assert main(["study", "--out", str(out), "--quick", "--no-progress"]) == 0
    assert "ran nothing: every stage reused" in capsys.readouterr().out
    assert time.perf_counter() - start < 60
