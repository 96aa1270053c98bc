"""The whole study on a tiny model: a real kill mid-stage and a resume, --stages, the CLI's bad inputs,
figures rebuilt from stage files, and the report opened in headless Chromium."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from em_interp import EmInterpError
from em_interp.cli import main
from em_interp.study import StudyConfig, run_study
from em_interp.study.stages import default_stages
from tests.conftest import ROOT, tiny_budget

STAGE_NAMES = [s.name for s in default_stages()]
#: results.json fields that time things (they differ between any two runs)
TIMINGS = {("model", "load_seconds"), ("cache", "seconds"), ("cache", "tokens_per_second"), ("monitor", "cost_ratio"),
           ("monitor", "cost"), ("monitor_library", "seconds"), ("judging", "seconds"),
           ("monitor_stress", "seconds")}


def stable(results: dict) -> dict:
    """results.json without the fields that measure time."""
    out = json.loads(json.dumps(results))
    out.pop("study")
    for section, key in TIMINGS:
        out.get(section, {}).pop(key, None)
    for role in ("organism", "control"):
        out.get("organisms", {}).get(role, {}).pop("train_seconds", None)
    for entry in out.get("defenses", {}).values():
        entry.pop("step_time_ratio", None)
    study = out.get("defenses_study", {})
    for key in ("timing", "seconds"):
        study.pop(key, None)
    for entry in study.get("none", {}).values():
        entry.pop("train_seconds", None)
    return out


def tiny_config(out: Path, model: Path, **kw) -> StudyConfig:
    return StudyConfig(out=out, budget=tiny_budget(), model=str(model), progress=False, **kw)


@pytest.fixture(scope="module")
def tiny_study(tiny_study_dir, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted tiny study: its folder and results."""
    out = tmp_path_factory.mktemp("tiny_study_run") / "out"
    return out, run_study(tiny_config(out, tiny_study_dir))


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.conftest import tiny_budget
from em_interp.study import StudyConfig, run_study
from em_interp.study.stages import default_stages
stages = list(default_stages())
victim = {victim!r}
for i, s in enumerate(stages):
    if s.name == victim:
        def run(ctx, _run=s.run):
            _run(ctx)  # the stage does its work, then the process dies before its file is written
            os.kill(os.getpid(), signal.SIGKILL)
        stages[i] = type(s)(**{{**s.__dict__, "run": run}})
run_study(StudyConfig(out=Path(sys.argv[1]), budget=tiny_budget(), model=sys.argv[2], progress=False), stages=stages)
"""


def test_killed_study_resumes_at_the_killed_stage(tiny_study, tiny_study_dir, tmp_path):
    _, expected = tiny_study
    victim = random.choice(STAGE_NAMES[1:-1])
    print(f"killing the study in stage {victim!r}")
    out = tmp_path / "out"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), victim=victim))
    proc = subprocess.run([sys.executable, str(script), str(out), str(tiny_study_dir)], capture_output=True, text=True,
                          env={**os.environ}, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    done = {p.stem for p in (out / "stages").glob("*.json")} - {"study"}
    assert done == set(STAGE_NAMES[: STAGE_NAMES.index(victim)])
    assert not (out / "results.json").exists()
    resumed = run_study(tiny_config(out, tiny_study_dir))
    assert resumed["study"]["ran_this_time"] == STAGE_NAMES[STAGE_NAMES.index(victim):]
    assert stable(resumed) == stable(expected)
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary files left


def test_rerun_reuses_every_stage_and_loads_no_model(tiny_study, tiny_study_dir, monkeypatch):
    out, expected = tiny_study
    import em_interp.model

    def no_loading(*args, **kwargs):
        raise AssertionError("a rerun with unchanged inputs loaded a model")

    monkeypatch.setattr(em_interp.model, "load_model", no_loading)
    for module in ("base_model", "organisms", "transfer"):
        monkeypatch.setattr(f"em_interp.study.stages.{module}.load_model", no_loading)
    again = run_study(tiny_config(out, tiny_study_dir))
    assert again["study"]["ran_this_time"] == [] and stable(again) == stable(expected)


def test_stages_subset_runs_what_it_needs(tiny_study, tiny_study_dir, tmp_path):
    out = tmp_path / "subset"
    shutil.copytree(tiny_study[0] / "stages", out / "stages")
    for name in ("steering", "em_base"):
        (out / "stages" / f"{name}.json").unlink()
    results = run_study(tiny_config(out, tiny_study_dir), only=["steering"])
    assert results["study"]["ran_this_time"] == ["em_base", "steering"]
    assert results["study"]["stages"] == STAGE_NAMES  # the other stages' files are still current: reported too
    assert stable(results) == stable(tiny_study[1])
    fresh = tmp_path / "fresh"
    only = run_study(tiny_config(fresh, tiny_study_dir), only=["em_base"])
    assert only["study"]["stages"] == ["model", "em_base"] and "rank1" not in only
    assert stable(results)["steering"] == stable(tiny_study[1])["steering"]


def test_defenses_stage_reports_every_defense_with_the_documented_keys(tiny_study):
    out, results = tiny_study
    defenses = results["defenses"]
    from em_interp.defenses import DEFENSES

    assert set(defenses) == set(DEFENSES)
    for d in defenses.values():
        assert {"strengths", "em_shift", "em_shift_ci", "task_loss", "benign_task_loss", "step_time_ratio",
                "coherence_cost", "readable", "criteria"} <= set(d)
        assert all(set(c) == {"em_prevented", "task_learned", "benign_learned", "coherent"} for c in d["criteria"])
        assert all(0 <= r <= 8 for r in d["readable"])
        n = len(d["strengths"])
        assert len(d["em_shift"]) == len(d["task_loss"]) == len(d["benign_task_loss"]) == len(d["em_shift_ci"]) == n
        assert all(lo <= m <= hi for m, (lo, hi) in zip(d["em_shift"], d["em_shift_ci"]))
        assert all(loss > 0 for loss in d["task_loss"] + d["benign_task_loss"]) and d["step_time_ratio"] > 0
    timed = results["defenses_study"]["timing"]["ratios"]
    assert set(timed) == {"kl", "ldifs", "ablate_direction", "ablate_layers", "ablate_subspace", "ablate_gradient",
                          "preventative_steering"}
    assert defenses["interleave"]["step_time_ratio"] == defenses["safelora"]["step_time_ratio"] == 1.0
    triggered = results["triggered"]
    assert triggered["status"] == "run" and triggered["defense"] in timed
    assert {"em_shift", "em_shift_ci", "task_loss", "always_on", "none", "switched_at", "rollback", "early_stop"} <= set(triggered)
    for variant in ("rollback", "early_stop"):  # a tiny model's monitor may or may not alarm; the keys are there
        assert {"em_reduction", "task_cost", "alarm_at", "rolled_back_to"} <= set(triggered[variant])
    composition = results["defense_composition"]
    assert composition["status"] == "run" or composition["status"].startswith("not run")
    selection = results["defenses_study"]["selection"]
    assert selection["candidates"] > 0 and selection["gap_top"] >= selection["gap_median"] >= selection["gap_bottom"]
    # the defended runs are distinct trainings: a defense changes the task loss of the organism
    assert len({d["task_loss"][0] for name, d in defenses.items()}) == len(defenses)
    report = (out / "report.html").read_text()
    assert "Defenses during fine-tuning" in report and "Every defense at its best setting" in report
    assert "Four criteria per defense setting" in report


def test_monitor_stage_reports_the_documented_keys_and_saves_a_loadable_monitor(tiny_study):
    from em_interp.monitor.detector import DriftMonitor

    out, results = tiny_study
    m = results["monitor"]
    keys = {"types", "runs", "calibration_types", "heldout_types", "threshold", "pc1_variance", "auroc", "fnr", "fpr",
            "lead_steps", "baselines", "cost_ratio"}
    assert keys <= set(m)
    assert set(m["baselines"]) == {"pca_activation_drift", "sae_feature_drift", "activation_drift_norm",
                                   "training_loss", "lora_weight_norm", "misalignment_direction"}
    assert all(set(b) >= {"auroc", "fnr", "fpr"} for b in m["baselines"].values())
    assert m["calibration_types"] == ["medical-misaligned", "benign"]
    assert sorted(m["calibration_types"] + m["heldout_types"]) == sorted(m["types"])
    assert m["runs"] == [f"{t}/s0" for t in m["types"]] and 0 < m["pc1_variance"] <= 1
    assert m["cost_ratio"] > 0 and m["cost"]["monitor_state_bytes"] > 0
    seeds = m["sae"]["over_seeds"]  # the SAE baseline over its training seeds, the first one the table's row
    assert seeds["n_seeds"] == 2 and len(seeds["auroc"]) == 2 and seeds["auroc"][0] == m["baselines"]["sae_feature_drift"]["auroc"]
    label = m["label"]  # the label's reliability: measured, or why not (a tiny model's library is small)
    assert (label["reliability"] is None and label["why"]) or (
        label["checkpoints"] == 8 and 0 <= label["within_noise_of_line"] <= 8 and label["reliability"] <= 1)
    sel = m["layer_selection"]  # tiny_budget's offsets (0, 1) from the library's layer 1: the best one picked
    assert m["library_layer"] == 1 and set(sel) == set(m["layer_heldout"]) == {"1", "2"} and m["skipped_layers"] == []
    best = {x: max(v for v in kinds.values() if v is not None) for x, kinds in sel.items()}
    assert best[str(m["layer"])] == max(best.values())
    picked = m["layer_heldout"][str(m["layer"])]  # the same monitor as the table's row, refitted in the same way
    assert (picked["auroc"], picked["fnr"], picked["fpr"]) == (m["auroc"], m["fnr"], m["fpr"])
    monitor = DriftMonitor.load(out / m["monitor_path"], model=results["model"]["name"], layer=m["layer"])
    assert monitor.threshold == m["alarm_threshold"] and monitor.names == tuple(m["traits"])
    with pytest.raises(EmInterpError, match="reads layer"):
        DriftMonitor.load(out / m["monitor_path"], layer=m["layer"] + 1)


def test_monitor_stress_stage_runs_each_test_on_the_saved_monitor(tiny_study):
    out, results = tiny_study
    assert results["monitor"]["status"] == "evaluated"
    s = results["monitor_stress"]
    assert s["status"] == "evaluated" and s["layer"] == results["monitor"]["layer"]
    assert s["types"] == ["financial-misaligned", "medical-aligned"]  # the first held-out misaligned and other type
    tests = s["tests"]
    longer = tests["longer_run"]
    assert longer["steps"] == 4 and longer["runs"] == ["financial-misaligned/s1", "medical-aligned/s1"]
    assert longer["score"]["n_checkpoints"] == 8 and longer["past_library"]["score"]["n_checkpoints"] == 4
    assert longer["recalibrated"] is False and isinstance(longer["recalibration_needed"], bool)
    organism = tests["from_organism"]
    assert organism["score"]["n_checkpoints"] == 4 and organism["start_em_shift"] != 0
    layer = tests["other_layer"]
    assert abs(layer["layer"] - s["layer"]) == 1 and layer["recalibrated"] is True and layer["score"]["n_checkpoints"] == 4
    assert layer["frozen_refusal"] == f"monitor/drift_monitor.json: the monitor reads layer {s['layer']}, not {layer['layer']}"
    assert tests["other_architecture"]["status"].startswith("not run")
    assert "Drift monitor: stress tests" in (out / "report.html").read_text()


def test_cli_bad_inputs_name_the_argument(tiny_study, tiny_study_dir, tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path / "x"), "--stages", "steering,steerin"]) == 2
    assert "--stages: unknown stage(s) ['steerin']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing was created before the plan was checked
    other = tmp_path / "other"
    shutil.copytree(tiny_study[0], other)
    assert main(["study", "--out", str(other), "--model", str(tiny_study_dir), "--quick", "--stages", "model"]) == 2
    err = capsys.readouterr().err
    assert "holds the stage files of another study" in err and "budget.base.eval_stride: 20 there, 6 here" in err
    assert main(["figures", str(tmp_path / "empty"), "--to", str(tmp_path / "f")]) == 2
    assert "has no stage files" in capsys.readouterr().err
    assert main(["study", "--out", str(tmp_path / "y"), "--stages", " , "]) == 2
    assert "names no stage" in capsys.readouterr().err
    assert main(["study", "--out", str(tmp_path / "z"), "--ray", "127.0.0.1:1"]) == 2
    assert "ray='127.0.0.1:1': no Ray cluster answers there" in capsys.readouterr().err
    assert main(["study", "--out", str(tmp_path / "z"), "--external", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--external" in err and "no such folder" in err
    assert main(["study", "--out", str(tmp_path / "z"), "--quick", "--budget", "full"]) == 2
    assert "--quick and --budget full disagree" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_figures_are_rebuilt_from_stage_files_alone(tiny_study, tmp_path, monkeypatch):
    from em_interp.figures import HEADLINE_FIGURES, export_figures, study_figures

    out, _ = tiny_study
    import em_interp.model

    monkeypatch.setattr(em_interp.model, "load_model", lambda *a, **k: pytest.fail("figures loaded a model"))
    figures = study_figures(out)
    report = (out / "report.html").read_text()
    assert len(figures) == report.count("class=\"plotly-graph-div\"")
    written = export_figures(out, tmp_path / "figs", static=False)
    names = {p.name for p in written}
    for name, _fig in figures:
        assert {f"{name}.html", f"{name}.csv"} <= names
    rows = (tmp_path / "figs" / "steering-1-steering-the-base-model-at-layer-{}.csv".format(
        json.loads((out / "results.json").read_text())["steering"]["layer"])).read_text().splitlines()
    assert rows[0] == "trace,x,y" and len(rows) == 1 + 3 * 2  # three traces, two strengths
    headline = export_figures(out, tmp_path / "head", static=False, headline=True, plotlyjs="cdn")
    assert len({p.stem for p in headline}) == len(HEADLINE_FIGURES)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_static_figures_through_kaleido(tiny_study, tmp_path):
    if _chromium() is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    from em_interp.figures import export_figures

    written = export_figures(tiny_study[0], tmp_path / "static", headline=True, plotlyjs="cdn")
    svgs = [p for p in written if p.suffix == ".svg"]
    pngs = [p for p in written if p.suffix == ".png"]
    assert len(svgs) == len(pngs) == 5
    assert all(p.read_bytes().lstrip().startswith(b"<svg") for p in svgs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def browser_console(page: Path) -> tuple[str, str]:
    """(DOM after scripts ran, console log) of ``page`` in headless Chromium."""
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=20000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    return proc.stdout, proc.stderr


def console_errors(log: str) -> list[str]:
    """Console errors and uncaught exceptions in a Chromium log."""
    return [line for line in log.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "ERROR" in line.split("CONSOLE")[0]
                                                                       or "Error" in line)]


def test_report_renders_in_a_browser(tiny_study, tmp_path):
    if _chromium() is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    out, _ = tiny_study
    html = (out / "report.html").read_text()
    n_figures = html.count("class=\"plotly-graph-div\"")
    dom, log = browser_console(out / "report.html")
    assert console_errors(log) == [], log[-3000:]
    assert dom.count("class=\"main-svg\"") >= n_figures > 0  # plotly drew every figure
    assert dom.index("<h2>Summary</h2>") < dom.index("<h2>Model</h2>")
    # the check can fail: a page with a broken script is caught
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    assert console_errors(browser_console(broken)[1])


def test_figures_skip_a_stage_file_of_another_version_and_say_so(tiny_study, tmp_path):
    from em_interp.figures import study_figures
    from em_interp.io import sha256_json

    out = tmp_path / "old"
    shutil.copytree(tiny_study[0], out)
    path = out / "stages" / "steering.json"
    data = json.loads(path.read_text())
    data["result"]["fields"].pop("top_change")  # a result type that had other fields in an earlier version
    data["digest"] = sha256_json({"result": data["result"], "arrays": data["arrays"]})
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"steering\.json is corrupt or from another em_interp version.*"
                                         r"no figures for stage 'steering'"):
        names = [name for name, _ in study_figures(out)]
    assert names and not any(n.startswith("steering-") for n in names)
    assert any(n.startswith("direction-") for n in names)
