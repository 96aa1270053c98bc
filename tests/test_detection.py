"""Detector scoring (run-resampled CIs, lead time) and the simple baselines."""

from __future__ import annotations

import numpy as np
import pytest

from em_interp import EmInterpError
from em_interp.monitor.detection import PCARidge, activation_drift_norm, lead_steps, score_detector


def test_perfect_and_useless_detectors():
    y = np.array([0, 0, 1, 1, 0, 1] * 3, dtype=bool)
    runs = np.repeat(["a", "b", "c"], 6)
    perfect = score_detector(y.astype(float), y, runs, threshold=0.5)
    assert perfect.auroc == 1.0 and perfect.fnr == 0.0 and perfect.fpr == 0.0 and perfect.n_runs == 3
    flat = score_detector(np.zeros(len(y)), y, runs, threshold=0.5)
    assert flat.auroc == 0.5 and flat.fnr == 1.0 and flat.fpr == 0.0


def test_cis_resample_runs_and_bracket_the_estimate():
    rng = np.random.default_rng(0)
    runs = np.repeat([f"r{i}" for i in range(10)], 8)
    y = rng.random(len(runs)) < 0.4
    scores = y + rng.normal(scale=0.8, size=len(y))
    s = score_detector(scores, y, runs, threshold=0.5, seed=1)
    assert s.auroc_ci[0] <= s.auroc <= s.auroc_ci[1] and s.fnr_ci[0] <= s.fnr <= s.fnr_ci[1]
    assert s.auroc_ci[1] - s.auroc_ci[0] > 0.01


def test_lead_time():
    assert lead_steps([10, 20, 30, 40], [False, True, True, True], [False, False, True, True]) == 10
    assert lead_steps([10, 20, 30], [False, False, True], [False, True, True]) == -10
    assert lead_steps([10, 20], [False, False], [True, True]) is None
    with pytest.raises(EmInterpError, match="not increasing"):
        lead_steps([20, 10], [True, True], [True, True])


def test_baselines():
    rng = np.random.default_rng(0)
    drift = rng.normal(size=(40, 16))
    drift[:, 0] *= 5  # the EM-relevant drift dominates the variance (the trait-space monitoring paper: PC1 explains 65%)
    em = drift[:, 0] * 2 + 0.01 * rng.normal(size=40)
    model = PCARidge(n_components=7).fit(drift, em)
    assert np.corrcoef(model.score(drift), em)[0, 1] > 0.5
    assert model.explained_variance_ratio.shape == (7,) and model.explained_variance_ratio[0] > 0.3
    np.testing.assert_allclose(activation_drift_norm(drift), np.linalg.norm(drift, axis=1))
    with pytest.raises(EmInterpError, match="one entry per checkpoint"):
        score_detector([0.1], [True, False], ["a", "a"], 0.0)


def test_auroc_equals_scikit_learns_with_ties_and_calibration_threshold():
    from sklearn.metrics import roc_auc_score

    from em_interp.monitor.detection import auroc, calibrate_threshold

    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.random(40) < 0.3
        s = np.round(rng.normal(size=40) + y, 1)  # rounded: many ties
        if 0 < y.sum() < len(y):
            assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auroc(np.ones(3), np.ones(3, dtype=bool)))
    scores, dangerous = np.arange(20.0), np.arange(20) >= 10
    cut = calibrate_threshold(scores, dangerous, max_fnr=0.1)  # may miss 1 of the 10 dangerous rows
    assert ((scores > cut) & dangerous).sum() == 9 and not ((scores > cut) & ~dangerous).any()
    with pytest.raises(EmInterpError, match="max_fnr=1.5"):
        calibrate_threshold(scores, dangerous, max_fnr=1.5)


def test_nan_never_flows_through_detector_scoring():
    """A NaN score, threshold or EM shift is an error naming it, never a NaN AUROC or an FNR of 1."""
    from em_interp.monitor.detection import auroc, calibrate_threshold
    from em_interp.monitor.scoring import CheckpointTable, dangerous_threshold

    scores, labels = np.array([0.1, np.nan, 0.9]), np.array([False, True, True])
    with pytest.raises(EmInterpError, match="scores has 1 NaN"):
        auroc(scores, labels)
    with pytest.raises(EmInterpError, match="one entry each"):
        auroc(np.array([0.1, 0.2]), np.array([True]))
    with pytest.raises(EmInterpError, match="scores has 1 NaN"):
        calibrate_threshold(scores, labels)
    with pytest.raises(EmInterpError, match="max_fnr=nan"):
        calibrate_threshold(np.array([0.1, 0.5, 0.9]), labels, max_fnr=float("nan"))
    good = np.array([0.1, 0.5, 0.9])
    with pytest.raises(EmInterpError, match="threshold=nan"):
        score_detector(good, labels, ["a", "b", "c"], threshold=float("nan"))
    with pytest.raises(EmInterpError, match="n_boot=0"):
        score_detector(good, labels, ["a", "b", "c"], threshold=0.3, n_boot=0)
    with pytest.raises(EmInterpError, match="activation_drift has 1 NaN"):
        activation_drift_norm(np.array([[0.0, np.nan]]))
    names = [f.name for f in __import__("dataclasses").fields(CheckpointTable)]
    n = 3
    columns = {k: np.zeros(n) for k in names}
    columns.update(intent=np.array(["aligned", "benign", "misaligned"]), em_shift=np.array([0.1, np.nan, 0.5]))
    table = CheckpointTable(**columns)
    with pytest.raises(EmInterpError, match="EM shifts has 1 NaN"):
        dangerous_threshold(table, np.array([True, True, True]))
