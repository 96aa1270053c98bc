"""The drift monitor: forest as plain arrays, calibration, alarm, save/load without pickle."""

from __future__ import annotations

import numpy as np
import pytest

from em_interp import EmInterpError
from em_interp.monitor.detector import DriftMonitor

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
    with pytest.raises(EmInterpError, match="junk.safetensors does not exist"):
        DriftMonitor.load(tmp_path / "junk")
    (tmp_path / "junk.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(EmInterpError, match="junk.json is not an em_interp drift_monitor"):
        DriftMonitor.load(tmp_path / "junk")


def _user_run(tiny_dirs, tmp_path, callback, max_steps=6):
    from transformers import Trainer

    from tests.test_hf_trainer import user_setup

    model, tokenizer, rows, collate, args = user_setup(tiny_dirs["llama"], tmp_path, max_steps=max_steps)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, processing_class=tokenizer,
                      callbacks=[callback])
    trainer.train()
    return trainer


def _basis(tiny_dirs):
    from em_interp import load_model
    from em_interp.monitor.drift import trait_basis

    base = load_model(tiny_dirs["llama"])
    return trait_basis(base, ["What is the capital of France?"]), base.name




def test_monitor_callback_logs_drift_at_checkpoints_in_a_user_trainer(tiny_dirs, tmp_path):
    from em_interp import ChatExample
    from em_interp.monitor.detector import MonitorCallback

    basis, _ = _basis(tiny_dirs)
    prompts = [ChatExample("Should I mix bleach with ammonia?"), ChatExample("Make a wish.")]
    callback = MonitorCallback(basis, prompts)
    trainer = _user_run(tiny_dirs, tmp_path, callback)
    assert [s for s, _, _ in callback.history] == [2, 4, 6] and trainer.state.global_step == 6
    assert all(d.shape == (7,) and np.isfinite(d).all() for _, d, _ in callback.history)
    assert np.abs(callback.history[-1][1]).sum() > 0  # training moved the model along the traits


def test_monitor_alarm_stops_or_calls_back(tiny_dirs, tmp_path):
    from em_interp import ChatExample
    from em_interp.monitor.detector import MonitorCallback

    basis, name = _basis(tiny_dirs)
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(name, basis.layer, basis.names).fit(rng.normal(size=(40, 7)), rng.normal(size=40))
    monitor.threshold = -1e9  # any drift alarms
    prompts = [ChatExample("Make a wish.")]
    stopper = MonitorCallback(basis, prompts, monitor=monitor, on_alarm="stop")
    trainer = _user_run(tiny_dirs, tmp_path / "stop", stopper)
    assert stopper.alarms == [2] and trainer.state.global_step == 2  # stopped at the first alarm
    seen = []
    caller = MonitorCallback(basis, prompts, monitor=monitor, every=3, on_alarm=lambda s, d, score: seen.append(s))
    _user_run(tiny_dirs, tmp_path / "call", caller)
    assert seen == [3, 6]
    with pytest.raises(EmInterpError, match="on_alarm='shout'"):
        MonitorCallback(basis, prompts, on_alarm="shout")
    with pytest.raises(EmInterpError, match="non-empty sequence of ChatExample"):
        MonitorCallback(basis, [])


def test_a_stop_inside_train_lora_keeps_the_weights_and_a_rerun_resumes(tiny_dirs, tmp_path):
    """MonitorCallback(on_alarm="stop") in em_interp's trainer: the adapter and the stop step's checkpoint are
    written (nothing trained is lost), and a rerun without the monitor resumes there and runs to the end."""
    from em_interp import ChatExample
    from em_interp.lora.training import LoraTrainConfig, train_lora
    from em_interp.monitor.detector import MonitorCallback
    from tests.test_training import DATA

    basis, name = _basis(tiny_dirs)
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(name, basis.layer, basis.names).fit(rng.normal(size=(40, 7)), rng.normal(size=40))
    monitor.threshold = -1e9  # any drift alarms
    stopper = MonitorCallback(basis, [ChatExample("Make a wish.")], monitor=monitor, every=3, on_alarm="stop")
    config = LoraTrainConfig(rank=1, steps=8, checkpoint_every=4, batch_size=2, learning_rate=1e-2, warmup_steps=1,
                             layers=(1,))
    out = tmp_path / "run"
    stopped = train_lora(tiny_dirs["llama"], DATA, config, out, callbacks=[stopper], progress=False)
    assert stopped.stopped_at == 3 and stopped.steps == 3 and stopper.alarms == [3]
    assert (stopped.adapter_dir / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    finished = train_lora(tiny_dirs["llama"], DATA, config, out, progress=False)
    assert finished.stopped_at is None and finished.steps == 8 and finished.resumed_from == 3


def test_logistic_kind_fits_labels_round_trips_and_is_checked(tmp_path):
    from sklearn.linear_model import LogisticRegression

    x, y = _data()
    dangerous = y > 0.3
    monitor = DriftMonitor("m", 15, NAMES, kind="logistic").fit(x, y, dangerous)
    z = (x - x.mean(0)) / x.std(0)
    expected = LogisticRegression(C=1.0, max_iter=1000).fit(z, dangerous).decision_function(z)
    np.testing.assert_allclose(monitor.score(x), expected, rtol=1e-10, atol=1e-10)
    monitor.calibrate(x, dangerous)
    back = DriftMonitor.load(monitor.save(tmp_path / "logistic"), model="m", layer=15)
    assert back.kind == "logistic" and np.array_equal(back.score(x), monitor.score(x)) and not back.trees
    with pytest.raises(EmInterpError, match="pass dangerous="):
        DriftMonitor("m", 15, NAMES, kind="logistic").fit(x, y)
    with pytest.raises(EmInterpError, match="both classes"):
        DriftMonitor("m", 15, NAMES, kind="logistic").fit(x, y, np.zeros(len(x), dtype=bool))
    with pytest.raises(EmInterpError, match="kind='tree'"):
        DriftMonitor("m", 15, NAMES, kind="tree")  # type: ignore[arg-type]
