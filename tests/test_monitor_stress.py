"""The drift monitor's stress tests: the frozen monitor on new runs, the recalibration verdict, a merged start model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from em_interp import EmInterpError
from em_interp.monitor.detection import DetectionScore
from em_interp.monitor.detector import DriftMonitor
from em_interp.monitor.drift import TraitBasis
from em_interp.monitor.perturbations import RunRecord
from em_interp.monitor.stress import STRESS_MAX_RATE, frozen_check, recalibration_verdict

D = 6


def _basis() -> TraitBasis:
    return TraitBasis("m", 1, "resid_post", ("evil", "kind"), torch.eye(D)[:2].clone())


def _record(name: str, intent: str, speed: float, steps: tuple[int, ...] = (0, 2, 4, 6)) -> RunRecord:
    """A run whose 'evil' drift and EM shift both grow by ``speed`` per step (8 label questions, 3 prompts)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    n = len(steps)
    shift = np.array([speed * s for s in steps])
    question = shift[:, None] + rng.normal(0, 0.002, (n, 8))
    question[0] = 0.0
    acts = torch.zeros(n, 3, D)
    acts[:, :, 0] = torch.tensor(shift, dtype=torch.float32)[:, None] * 10
    acts[:, :, 1] = torch.tensor(rng.normal(0, 0.01, (n, 3)), dtype=torch.float32)
    acts[:, :, 2] = 1.0  # unit norm at step 0: the drift is the activation change itself
    return RunRecord(name, intent, "rank1", 0, steps, question.mean(1), question, acts, np.r_[np.nan, np.ones(n - 1)],
                     np.arange(n, dtype=float), 1.0, 1.0, 0.1)


def _monitor() -> DriftMonitor:
    x = np.array([[v, 0.0] for v in np.linspace(0, 1, 20)])
    monitor = DriftMonitor("m", 1, ("evil", "kind"), kind="logistic").fit(x, x[:, 0], x[:, 0] > 0.5)
    monitor.threshold = float(monitor.score(np.array([[0.5, 0.0]]))[0])
    return monitor


def test_frozen_check_labels_by_the_line_and_alarms_by_the_monitors_own_threshold():
    records = [_record("fast", "misaligned", 0.02), _record("flat", "aligned", 0.0)]
    monitor = _monitor()
    check = frozen_check(records, _basis(), monitor, line=0.05, n_boot=50)
    rows = check.rows
    assert rows["run"] == ["fast/s0"] * 3 + ["flat/s0"] * 3 and rows["step"] == [2, 4, 6] * 2
    # fast: EM 0.04, 0.08, 0.12 -> dangerous at steps 4 and 6; drift 0.4, 0.8, 1.2 -> alarm above 0.5 at 4 and 6
    assert rows["dangerous"] == [False, True, True, False, False, False]
    assert rows["alarm"] == [False, True, True, False, False, False]
    assert check.score.fnr == 0 and check.score.fpr == 0 and check.score.auroc == 1
    assert check.recalibration_needed is False and check.why == ""
    late = frozen_check(records, _basis(), monitor, line=0.05, n_boot=50, after_step=4)
    assert late.rows["step"] == [6, 6]
    # a line the monitor was not calibrated for: every 'fast' checkpoint is dangerous, the step-2 one is missed
    low = frozen_check(records, _basis(), monitor, line=0.01, n_boot=50)
    assert low.rows["dangerous"][:3] == [True, True, True] and low.score.fnr == pytest.approx(1 / 3)
    assert low.recalibration_needed is True


def test_frozen_check_bad_input():
    records = [_record("fast", "misaligned", 0.02)]
    with pytest.raises(EmInterpError, match="records is empty"):
        frozen_check([], _basis(), _monitor(), 0.05)
    bare = _monitor()
    bare.threshold = None
    with pytest.raises(EmInterpError, match="no alarm threshold"):
        frozen_check(records, _basis(), bare, 0.05)
    with pytest.raises(EmInterpError, match="no run has a checkpoint after step 6"):
        frozen_check(records, _basis(), _monitor(), 0.05, after_step=6)


def _score(fnr: float, fpr: float) -> DetectionScore:
    return DetectionScore(0.9, (0.8, 1.0), fnr, (0, 1), fpr, (0, 1), 10, 2)


def test_recalibration_verdict_uses_the_rates_that_are_defined():
    assert recalibration_verdict(_score(0.0, STRESS_MAX_RATE)) == (False, "")
    assert recalibration_verdict(_score(0.1, 0.0)) == (True, "")
    assert recalibration_verdict(_score(float("nan"), 0.5)) == (True, "no checkpoint is dangerous: the FNR is undefined")
    assert recalibration_verdict(_score(0.0, float("nan")))[0] is False
    with pytest.raises(EmInterpError, match="neither"):
        recalibration_verdict(_score(float("nan"), float("nan")))


def test_the_danger_line_is_saved_with_the_monitor(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 3))
    y = x[:, 0]
    monitor = DriftMonitor("m", 2, ("a", "b", "c"), min_samples_leaf=2, danger_line=0.0125).fit(x, y, y > 0)
    monitor.threshold = 0.1
    loaded = DriftMonitor.load(monitor.save(tmp_path / "mon"))
    assert loaded.danger_line == 0.0125 and loaded.threshold == 0.1
    monitor.danger_line = None  # fitted outside a library: none saved, none loaded
    assert DriftMonitor.load(monitor.save(tmp_path / "other")).danger_line is None


def test_merged_model_equals_the_model_with_its_adapter(tiny_dirs, tmp_path):
    from em_interp.data import domain_dataset
    from em_interp.loading import merged_model_dir
    from em_interp.lora.training import LoraTrainConfig, train_lora
    from em_interp.model import load_model

    base = tiny_dirs["llama"]
    run = train_lora(str(base), domain_dataset("medical", "misaligned", "train")[:4],
                     LoraTrainConfig(steps=2, checkpoint_every=2, batch_size=2, learning_rate=5e-2, max_length=160),
                     tmp_path / "run", progress=False)
    merged = merged_model_dir(base, run.adapter_dir)
    assert (merged / "config.json").is_file() and merged_model_dir(base, run.adapter_dir) == merged
    tokens = torch.tensor([[1, 5, 9, 13, 2]])
    with_adapter = load_model(str(base), adapter=run.adapter_dir, progress=False)
    plain = load_model(str(merged), progress=False)
    reference = load_model(str(base), progress=False)
    with torch.no_grad():
        a, b, c = (m.bridge(tokens) for m in (with_adapter, plain, reference))
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, c, atol=1e-4)
    with pytest.raises(EmInterpError, match="does not exist"):
        merged_model_dir(base, tmp_path / "nowhere")
