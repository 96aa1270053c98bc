"""The drift monitor: forest as plain arrays, calibration, alarm, save/load without pickle."""

from __future__ import annotations

import numpy as np
import pytest

from em_interp import EmInterpError
from em_interp.monitor import DriftMonitor

NAMES = ("honesty", "sycophancy", "harmlessness")


def _data(n=80, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = 0.5 * np.maximum(x[:, 0], 0) + 0.05 * rng.normal(size=n)
    return x, y


def test_predictions_equal_sklearns_forest():
    from sklearn.ensemble import RandomForestRegressor

    x, y = _data()
    monitor = DriftMonitor("m", 15, NAMES).fit(x, y)
    forest = RandomForestRegressor(n_estimators=100, max_depth=5, min_samples_leaf=5, random_state=0).fit(x, y)
    test, _ = _data(seed=1)
    np.testing.assert_allclose(monitor.score(test), forest.predict(test), rtol=1e-12, atol=1e-12)


def test_calibrated_alarm_misses_at_most_the_allowed_share(tmp_path):
    x, y = _data()
    monitor = DriftMonitor("m", 15, NAMES).fit(x, y)
    dangerous = y > 0.3
    monitor.calibrate(x, dangerous, max_fnr=0.05)
    fired = monitor.alarm(x)
    assert (~fired[dangerous]).mean() <= 0.05 and fired[~dangerous].mean() < 0.5
    back = DriftMonitor.load(monitor.save(tmp_path / "monitor"), model="m", layer=15)
    assert back.threshold == monitor.threshold and np.array_equal(back.score(x), monitor.score(x))
    with pytest.raises(EmInterpError, match="fitted on model 'm', not 'other'"):
        DriftMonitor.load(tmp_path / "monitor", model="other")
    with pytest.raises(EmInterpError, match="reads layer 15, not 3"):
        DriftMonitor.load(tmp_path / "monitor", layer=3)


def test_bad_input_names_the_argument(tmp_path):
    monitor = DriftMonitor("m", 15, NAMES)
    with pytest.raises(EmInterpError, match="not fitted"):
        monitor.score(np.zeros((2, 3)))
    with pytest.raises(EmInterpError, match=r"drift must have shape \(n, 3\)"):
        monitor.fit(np.zeros((20, 2)), np.zeros(20))
    with pytest.raises(EmInterpError, match="NaN"):
        monitor.fit(np.full((20, 3), np.nan), np.zeros(20))
    x, y = _data()
    monitor.fit(x, y)
    with pytest.raises(EmInterpError, match="no alarm threshold"):
        monitor.alarm(x)
    with pytest.raises(EmInterpError, match="at least one"):
        monitor.calibrate(x, np.zeros(len(x), dtype=bool))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(EmInterpError, match="cannot read a drift monitor"):
        DriftMonitor.load(tmp_path / "junk")
