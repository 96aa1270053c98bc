"""One artefact form for every saved object: suffixes appended, every read problem a clear error naming the file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from em_interp import EmInterpError
from em_interp.artifacts import artifact_paths, load_artifact, save_artifact
from em_interp.directions import Direction
from em_interp.lora.training import LoraTrainConfig
from em_interp.monitor.detector import DriftMonitor
from em_interp.monitor.drift import TraitBasis
from em_interp.transfer import RidgeMap


def ridge(seed: int) -> RidgeMap:
    g = torch.Generator().manual_seed(seed)
    return RidgeMap(torch.randn(4, 3, generator=g), torch.randn(4, generator=g), torch.randn(3, generator=g), 1.0, 0.5,
                    10, "a", "b", 2, 5)


def fitted_monitor(kind: str = "forest") -> DriftMonitor:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    em = x[:, 0] + 0.1 * rng.normal(size=40)
    monitor = DriftMonitor("m", 2, ("a", "b", "c"), n_estimators=5, min_samples_leaf=2, kind=kind)
    monitor.fit(x, em, em > 0.5)
    monitor.calibrate(x, em > 0.5)
    return monitor


@pytest.mark.parametrize("make", [lambda i: Direction(torch.ones(4) * (i + 1), layer=i, model="m"), ridge])
def test_names_with_dots_are_distinct_artifacts_and_round_trip(tmp_path, make):
    cls = type(make(0))
    for i, name in enumerate(("em.l10", "em.l20")):
        make(i).save(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["em.l10.json", "em.l10.safetensors", "em.l20.json",
                                                          "em.l20.safetensors"]
    first, second = cls.load(tmp_path / "em.l10"), cls.load(tmp_path / "em.l20.json")
    if cls is Direction:
        assert first.layer == 0 and second.layer == 1 and torch.equal(second.vector, make(1).vector)
    else:
        assert torch.equal(first.weight, ridge(0).weight) and torch.equal(second.weight, ridge(1).weight)


def test_every_read_problem_names_the_file(tmp_path):
    path = save_artifact(tmp_path / "x", "thing", {"t": torch.ones(3)}, {"size": 3})
    tensors, sidecar = artifact_paths(path)
    assert load_artifact(path, "thing", required=("size",), tensors=("t",))[1] == {"size": 3}
    with pytest.raises(EmInterpError, match="x.json lacks the thing field"):
        load_artifact(path, "thing", required=("size", "width"))
    with pytest.raises(EmInterpError, match="is not an em_interp other"):
        load_artifact(path, "other")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(EmInterpError, match="newer em_interp"):
        load_artifact(path, "thing")
    sidecar.write_text("{half")
    with pytest.raises(EmInterpError, match="x.json is not a readable thing sidecar"):
        load_artifact(path, "thing")
    sidecar.write_text(json.dumps({**meta, "size": 4}))  # an edited field: the digest no longer matches
    with pytest.raises(EmInterpError, match="x.json does not match its tensors x.safetensors"):
        load_artifact(path, "thing")
    other = save_artifact(tmp_path / "y", "thing", {"t": torch.zeros(3)}, {"size": 3})
    good = tensors.read_bytes()
    tensors.write_bytes(artifact_paths(other)[0].read_bytes())  # the same field, other tensors
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(EmInterpError, match="digest differs"):
        load_artifact(path, "thing")
    tensors.write_bytes(good)
    assert load_artifact(path, "thing")[1] == {"size": 3}
    tensors.write_bytes(tensors.read_bytes()[:-5])
    with pytest.raises(EmInterpError, match="cannot read thing tensors .*x.safetensors"):
        load_artifact(path, "thing")
    tensors.unlink()
    with pytest.raises(EmInterpError, match="x.safetensors does not exist"):
        load_artifact(path, "thing")


@pytest.mark.parametrize("kind", ["forest", "logistic"])
def test_an_edited_monitor_sidecar_is_refused_not_half_used(tmp_path, kind):
    monitor = fitted_monitor(kind)
    monitor.save(tmp_path / "mon")
    loaded = DriftMonitor.load(tmp_path / "mon", model="m", layer=2)
    x = np.random.default_rng(1).normal(size=(7, 3))
    assert np.array_equal(loaded.score(x), monitor.score(x)) and loaded.threshold == monitor.threshold
    sidecar = tmp_path / "mon.json"
    good = json.loads(sidecar.read_text())
    edits = [{"threshold": math.nan}, {"threshold": "high"}, {"names": ["a", "b"]}, {"names": ["a", "a", "c"]},
             {"kind": "svm"}, {"layer": "two"}]
    if kind == "forest":
        edits += [{"n_trees": 1}, {"n_estimators": 1}, {"kind": "logistic"}]
    for edit in edits:
        sidecar.write_text(json.dumps({**good, **edit}))
        with pytest.raises(EmInterpError, match="mon.json"):
            DriftMonitor.load(tmp_path / "mon")
    sidecar.write_text(json.dumps({key: value for key, value in good.items() if key != "seed"}))
    with pytest.raises(EmInterpError, match=r"mon.json lacks the drift_monitor field\(s\) \['seed'\]"):
        DriftMonitor.load(tmp_path / "mon")


def test_a_forest_with_a_looping_tree_is_refused(tmp_path):
    monitor = fitted_monitor()
    assert monitor.trees[0]["left"][0] != -1  # the root splits
    monitor.trees[0]["left"][0] = 0  # the root's left child is the root itself: score() would never end
    monitor.save(tmp_path / "mon")
    with pytest.raises(EmInterpError, match="tree 0 is not a well-formed tree"):
        DriftMonitor.load(tmp_path / "mon")


def test_trait_basis_refuses_repeated_names_and_non_finite_directions(tmp_path):
    with pytest.raises(EmInterpError, match="repeat"):
        TraitBasis("m", 1, "resid_post", ("a", "a"), torch.ones(2, 4))
    with pytest.raises(EmInterpError, match="NaN"):
        TraitBasis("m", 1, "resid_post", ("a", "b"), torch.tensor([[1.0, math.nan], [0.0, 1.0]]))
    basis = TraitBasis("m", 1, "resid_post", ("a", "b"), torch.eye(2))
    basis.save(tmp_path / "basis.l1")
    loaded = TraitBasis.load(tmp_path / "basis.l1")
    assert loaded.names == basis.names and torch.equal(loaded.directions, basis.directions)
    sidecar = tmp_path / "basis.l1.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "names": ["a", "b", "c"]}))
    with pytest.raises(EmInterpError, match="basis.l1.json"):
        TraitBasis.load(tmp_path / "basis.l1")


@pytest.mark.parametrize("bad", [{"learning_rate": math.nan}, {"learning_rate": math.inf}, {"learning_rate": 0.0},
                                 {"alpha": math.nan}, {"alpha": 0.0}, {"weight_decay": -1.0}, {"warmup_steps": -1}])
def test_train_config_refuses_non_finite_and_out_of_range_numbers(bad):
    with pytest.raises(EmInterpError, match=next(iter(bad))):
        LoraTrainConfig(**bad)


def test_library_and_defense_records_are_artifacts_and_a_damaged_one_is_measured_again():
    """The perturbation library's run records, its base measurement and the defense run records are
    artefacts; an unreadable one warns with its file and reads as absent (the run is measured again)."""
    from em_interp.defenses.runs import DefenseRunRecord, _load, _record_path, _save
    from em_interp.monitor.perturbations import RunRecord, load_record, save_record

    run = RunRecord("medical-misaligned", "misaligned", "rank1", 0, (0, 3), np.array([0.0, 0.2]),
                    np.zeros((2, 4)), torch.randn(2, 3, 8), np.array([float("nan"), 1.5]), np.array([0.0, 0.1]),
                    1.0, 0.5, 0.25)
    path = save_record(run, "k-run")
    back = load_record("k-run")
    assert back is not None and back.steps == (0, 3) and math.isnan(back.train_loss[0])
    torch.testing.assert_close(back.activations, run.activations)
    tensors, sidecar = artifact_paths(path)
    assert json.loads(sidecar.read_text())["format"] == "em_interp.perturbation_run"
    tensors.write_bytes(tensors.read_bytes()[:40])  # truncated by a crash or a full disk
    with pytest.warns(UserWarning, match=f"{tensors.name}.*measuring the run again"):
        assert load_record("k-run") is None
    assert load_record("never-saved") is None

    record = DefenseRunRecord("medical-misaligned/kl=1", "medical", "misaligned", [{"name": "kl", "strength": 1.0}],
                              False, np.array([0.1, -0.2]), 2.5, [3.0, 2.0], None, 1.0, 0.5, str(sidecar.parent))
    _save(record, "k-def")
    again = _load("k-def")
    assert again is not None and again.per_question.dtype == np.float64
    np.testing.assert_array_equal(again.per_question, record.per_question)
    assert again.defenses == record.defenses and again.task_loss == 2.5
    artifact_paths(_record_path("k-def"))[1].write_text("{half")
    with pytest.warns(UserWarning, match="defense run record .* unreadable"):
        assert _load("k-def") is None
