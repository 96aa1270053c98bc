"""The study command on the embedded model: results.json and report.html with the promised fields."""

from __future__ import annotations

import json

import pytest

from em_interp.cli import main

pytestmark = pytest.mark.integration


def test_study_quick_writes_results_and_report(smollm, tmp_path):
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), "--quick", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["name"] == "smollm2-135m-instruct"
    assert (results["model"]["n_layers"], results["model"]["d_model"]) == (30, 576)
    assert results["model"]["load_seconds"] > 0
    assert results["cache"]["examples"] >= 4 and results["cache"]["tokens_per_second"] > 0
    base = results["em_score"]["base"]
    assert base["n"] == 30 and base["ci_low"] <= base["mean"] <= base["ci_high"]
    assert len(results["base_answers"]) == 8 and all(a["answer"] for a in results["base_answers"])
    for role in ("organism", "control"):
        assert results["em_score"][role]["n"] == 30
    for key in ("organism_vs_control", "organism_vs_base", "control_vs_base"):
        shift = results["em_shift"][key]
        assert shift["ci_low"] <= shift["mean"] <= shift["ci_high"]
    rank1 = results["rank1"]
    assert [a["layer"] for a in rank1["adapters"]] == [9, 10, 11, 13, 14, 15, 17, 18, 19]
    assert {a["class"] for a in rank1["adapters"]} <= {"general", "domain-specific", "inactive"}
    assert 0 <= rank1["probe_accuracy"]["misaligned_vs_aligned"] <= 1
    report = (out / "report.html").read_text()
    assert "Residual cache" in report and "plotly" in report and "Behavioural EM measure" in report
    assert "rank1: what the organism" in report and "EM shift of the organisms" in report
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_study_bad_model_is_a_clear_error(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path / "x"), "--model", "nope-model"]) == 2
    assert "unknown model 'nope-model'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "results.json").exists()
