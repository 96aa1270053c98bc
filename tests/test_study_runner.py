"""The study runner on fake stages (no model): plan checks, typed artefacts, stage files, resume."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from em_interp.report import Section
from em_interp.study import (
    Budget,
    Stage,
    StageFileError,
    StudyConfig,
    StudyContext,
    StudyPlanError,
    plan_stages,
    run_study,
)
from em_interp.study.contract import NO_RESTORE, Headline
from em_interp.study.records import decode, encode, record_type


@record_type
@dataclass(frozen=True)
class FakeResult:
    value: float
    vector: torch.Tensor
    by_layer: dict[int, torch.Tensor]
    array: np.ndarray
    pair: tuple[float, float]
    where: Path


def _config(out: Path, seed: int = 0) -> StudyConfig:
    return StudyConfig(out=out, budget=Budget.quick(), seed=seed, progress=False)


class Pipeline:
    """Three fake stages: a -> (best_layer) -> b -> (resid_norms) -> c; counts runs, can fail on demand."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.fail_at: str | None = None
        self.value = 1.0

    def _run(self, name: str):
        if self.fail_at == name:
            raise KeyboardInterrupt(f"killed in {name}")
        self.runs.append(name)

    def stages(self) -> tuple[Stage, ...]:
        def run_a(ctx):
            self._run("a")
            ctx.best_layer = 2
            return {"layer": 2, "value": self.value}

        def restore_a(ctx, r):
            ctx.best_layer = r["layer"]

        def run_b(ctx):
            self._run("b")
            ctx.resid_norms = {ctx.best_layer: 3.5}
            return FakeResult(ctx.best_layer * 1.5, torch.arange(4.0), {ctx.best_layer: torch.ones(3)},
                              np.arange(3), (0.1, 0.2), Path("x/y"))

        def restore_b(ctx, r):
            ctx.resid_norms = {next(iter(r.by_layer)): 3.5}

        def run_c(ctx):
            self._run("c")
            return {"norm": ctx.resid_norms[2]}

        def section(r, config):
            return Section("fake", [json.dumps(str(r))[:40]])

        return (
            Stage("a", "g", needs=(), provides=("best_layer",), run=run_a, restore=restore_a, section=section,
                  entries=lambda r: {"a": r}, headlines=lambda r: [Headline("a value", r["value"], (0.0, 2.0))]),
            Stage("b", "g", needs=("best_layer",), provides=("resid_norms",), run=run_b, restore=restore_b,
                  section=section, entries=lambda r: {"b": {"value": r.value}}),
            Stage("c", "g", needs=("resid_norms",), provides=(), run=run_c, restore=NO_RESTORE, section=section,
                  entries=lambda r: {"c": r}),
        )


def _stable(results: dict) -> dict:
    results = json.loads(json.dumps(results))
    results.pop("study")
    return results


def test_plan_checks_names_before_anything_runs():
    p = Pipeline()
    a, b, c = p.stages()
    with pytest.raises(StudyPlanError, match="'best_layr'"):
        plan_stages([a, Stage("b", "g", ("best_layr",), (), b.run, NO_RESTORE, b.section, b.entries)])
    with pytest.raises(StudyPlanError, match="needs 'resid_norms', which no earlier stage provides"):
        plan_stages([a, c, b])
    with pytest.raises(StudyPlanError, match=r"unknown stage\(s\) \['d'\]"):
        plan_stages([a, b, c], ["d"])
    assert [s.name for s in plan_stages([a, b, c], ["c"])] == ["a", "b", "c"]
    assert [s.name for s in plan_stages([a, b, c], ["a"])] == ["a"]
    assert p.runs == []


def test_stages_may_read_only_what_they_declare(tmp_path):
    p = Pipeline()
    a, b, c = p.stages()
    sneaky = Stage("c", "g", needs=(), provides=(), run=lambda ctx: ctx.best_layer, restore=NO_RESTORE,
                   section=c.section, entries=c.entries)
    with pytest.raises(StudyPlanError, match="reads artefact 'best_layer' without declaring it"):
        run_study(_config(tmp_path), stages=(a, sneaky))
    lazy = Stage("b", "g", needs=("best_layer",), provides=("resid_norms",), run=lambda ctx: {}, restore=NO_RESTORE,
                 section=c.section, entries=c.entries)
    with pytest.raises(StudyPlanError, match=r"did not provide \['resid_norms'\]"):
        run_study(_config(tmp_path), stages=(a, lazy))


def test_context_rejects_unprovided_artefacts():
    ctx = StudyContext(_config(Path("/nonexistent")))
    with pytest.raises(StudyPlanError, match="'held_questions' has not been provided"):
        ctx.held_questions  # noqa: B018


def test_records_round_trip_without_pickle():
    arrays: dict = {}
    value = FakeResult(1.5, torch.randn(5), {3: torch.randn(2), -1: torch.zeros(1)}, np.arange(4.0), (1.0, 2.0), Path("a"))
    encoded = encode({"r": value, "ids": ["q1"], 7: "seven"}, arrays)
    json.dumps(encoded)  # plain JSON
    back = decode(json.loads(json.dumps(encoded)), arrays)
    r = back["r"]
    assert isinstance(r, FakeResult) and r.value == 1.5 and r.pair == (1.0, 2.0) and r.where == Path("a")
    assert torch.equal(r.vector, value.vector) and set(r.by_layer) == {3, -1} and np.array_equal(r.array, value.array)
    assert back[7] == "seven"

    @dataclass
    class Unregistered:
        x: int

    with pytest.raises(StageFileError.__mro__[1], match="not registered"):
        encode(Unregistered(1), {})


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    full = Pipeline()
    expected = run_study(_config(tmp_path / "full"), stages=full.stages())
    assert full.runs == ["a", "b", "c"]
    for k in ("a", "b", "c"):
        p = Pipeline()
        p.fail_at = k
        out = tmp_path / f"killed-{k}"
        with pytest.raises(KeyboardInterrupt):
            run_study(_config(out), stages=p.stages())
        p.fail_at = None
        resumed = run_study(_config(out), stages=p.stages())
        assert p.runs == ["a", "b", "c"], k  # each stage ran exactly once over both runs
        assert resumed["study"]["ran_this_time"] == ["a", "b", "c"][["a", "b", "c"].index(k):]
        assert _stable(resumed) == _stable(expected)
        assert (out / "report.html").is_file()
    again = Pipeline()
    assert run_study(_config(tmp_path / "full"), stages=again.stages())["study"]["ran_this_time"] == []
    assert again.runs == []


def test_a_changed_stage_reruns_what_depends_on_it(tmp_path):
    p = Pipeline()
    run_study(_config(tmp_path), stages=p.stages())
    (tmp_path / "stages" / "a.json").unlink()
    p.runs.clear()
    p.value = 2.0  # a's result changes: b depends on it and reruns; b's result is unchanged, so c is reused
    results = run_study(_config(tmp_path), stages=p.stages())
    assert p.runs == ["a", "b"] and results["a"]["value"] == 2.0
    p.runs.clear()
    run_study(_config(tmp_path), stages=p.stages(), only=["b"])
    assert p.runs == []


def test_corrupt_stage_files_rerun_that_stage_and_say_so(tmp_path):
    p = Pipeline()
    run_study(_config(tmp_path), stages=p.stages())
    (tmp_path / "stages" / "b.json").write_text('{"format": "em_interp.stage/1", "stage": "b", "res')
    p.runs.clear()
    with pytest.warns(UserWarning, match=r"b\.json is corrupt.*rerunning stage 'b'"):
        run_study(_config(tmp_path), stages=p.stages())
    assert p.runs == ["b"]  # same result, so c is reused
    arrays = tmp_path / "stages" / "b.safetensors"
    arrays.write_bytes(arrays.read_bytes()[:-8] + b"\x00" * 8)
    p.runs.clear()
    with pytest.warns(UserWarning, match="does not match"):
        run_study(_config(tmp_path), stages=p.stages())
    assert p.runs == ["b"]


def test_another_studys_folder_is_refused_unless_forced(tmp_path):
    p = Pipeline()
    run_study(_config(tmp_path), stages=p.stages())
    with pytest.raises(StageFileError, match=r"another study \(seed: 0 there, 1 here\).*--force"):
        run_study(_config(tmp_path, seed=1), stages=p.stages())
    p.runs.clear()
    run_study(_config(tmp_path, seed=1), stages=p.stages(), force=True)
    assert p.runs == ["a", "b", "c"]
    (tmp_path / "stages" / "study.json").unlink()
    with pytest.raises(StageFileError, match="without study.json"):
        run_study(_config(tmp_path, seed=1), stages=p.stages())


def test_summary_is_the_first_section(tmp_path):
    p = Pipeline()
    run_study(_config(tmp_path), stages=p.stages())
    html = (tmp_path / "report.html").read_text()
    assert html.index("<h2>Summary</h2>") < html.index("<h2>fake</h2>")
    assert "a value" in html and "+1.000 [+0.000, +2.000]" in html


def test_budget_and_config_errors_name_the_field(tmp_path):
    from dataclasses import replace

    from em_interp.errors import EmInterpError

    quick = Budget.quick()
    with pytest.raises(EmInterpError, match=r"Budget\.base\.eval_stride=0 must be >= 1"):
        replace(quick.base, eval_stride=0)
    for group, change, message in [("monitor", {"every": 13, "steps": 12}, r"Budget\.monitor\.every=13 > steps=12"),
                                   ("monitor", {"learning_rate": float("nan")}, r"Budget\.monitor\.learning_rate=nan"),
                                   ("monitor", {"calibration": ("financial-aligned",)}, "not among types"),
                                   ("monitor", {"questions": 41}, r"Budget\.monitor\.questions=41 > the 40 held-out"),
                                   ("monitor", {"layer_offsets": ()}, r"Budget\.monitor\.layer_offsets=\(\) must be"),
                                   ("monitor", {"layer_offsets": (0, 0)}, "distinct integers"),
                                   ("monitor", {"layer_offsets": (0, 1.5)}, "distinct integers"),
                                   ("organisms", {"checkpoint_every": 30}, r"Budget\.organisms\.checkpoint_every=30"),
                                   ("directions", {"steering_fractions": (0.1,)}, "must start with 0.0"),
                                   ("transfer", {"strengths": ()}, r"Budget\.transfer\.strengths is empty"),
                                   ("defenses", {"check_every": 5}, r"Budget\.defenses\.check_every=5 > steps=4")]:
        with pytest.raises(EmInterpError, match=message):
            replace(getattr(quick, group), **change)
    with pytest.raises(EmInterpError, match="Budget.monitor must be a MonitorBudget"):
        replace(quick, monitor=quick.defenses)
    with pytest.raises(EmInterpError, match="no group"):
        quick.with_group(sae=quick.monitor)
    assert Budget.from_dict(quick.to_dict()) == quick and Budget.from_dict(Budget.full().to_dict()) == Budget.full()
    with pytest.raises(EmInterpError, match="lacks the groups"):
        Budget.from_dict({"name": "quick"})
    with pytest.raises(EmInterpError, match="domain='cooking'"):
        StudyConfig(out=tmp_path, domain="cooking")
    with pytest.raises(EmInterpError, match="budget='huge'"):
        Budget.named("huge")


def test_stage_modules_do_not_import_each_other():
    import ast

    import em_interp.study.stages as stages_pkg

    folder = Path(stages_pkg.__file__).parent
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    assert modules >= {"base_model", "organisms", "directions", "transfer"}
    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not any(node.module == f"em_interp.study.stages.{m}" for m in modules), (path.name, node.module)
                assert node.module != "em_interp.study.stages", path.name


def test_a_killed_writes_leftover_is_removed_and_never_read(tmp_path):
    p = Pipeline()
    run_study(_config(tmp_path), stages=p.stages())
    (tmp_path / "stages" / "c.json").unlink()
    leftover = tmp_path / "stages" / ".c.json.k1l2.tmp"
    leftover.write_text('{"half')
    p.runs.clear()
    run_study(_config(tmp_path), stages=p.stages())
    assert p.runs == ["c"] and not leftover.exists()


def test_a_second_study_into_a_running_studys_folder_is_refused_naming_the_holder(tmp_path, capsys):
    import os

    from em_interp.cli import main
    from em_interp.errors import EmInterpError
    from em_interp.study.lock import LOCK_FILE, StudyFolderInUse, study_lock

    out = tmp_path / "study"
    with study_lock(out):
        assert f"pid {os.getpid()}" in (out / LOCK_FILE).read_text()
        with pytest.raises(StudyFolderInUse, match=f"in use by another study \\(pid {os.getpid()} on "):
            with study_lock(out):
                pass
        assert main(["study", "--out", str(out), "--quick", "--no-progress", "--stages", "model"]) == 2
        assert "in use by another study" in capsys.readouterr().err
        assert not (out / "stages").exists()  # refused before any work or cleanup
    assert (out / LOCK_FILE).read_text() == ""  # released: free for the next study
    with study_lock(out):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(EmInterpError, match="is a file, not a folder"):
        with study_lock(tmp_path / "file"):
            pass


def test_a_setting_new_in_this_version_is_named_even_when_it_is_none():
    """A folder written before a budget setting existed differs from this version's identity even where the
    new setting is None: the refusal names it (it once said "unreadable study.json")."""
    from em_interp.study.records import _differences

    theirs = {"budget": {"judging": {"samples": 10}}}
    ours = {"budget": {"judging": {"samples": 10, "answers_per_label": None}}}
    assert _differences(theirs, ours) == "budget.judging.answers_per_label: absent there, None here"
    assert _differences(ours, theirs) == "budget.judging.answers_per_label: None there, absent here"
    assert _differences(ours, ours) == ""
