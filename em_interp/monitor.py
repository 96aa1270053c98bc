"""The drift monitor (seed 000): a random forest from trait drift to the behavioural EM shift, with an alarm.

Defaults from seed 000's public code: ``RandomForestRegressor(n_estimators=100, max_depth=5,
min_samples_leaf=5)`` from the drift vector to the EM measure; the alarm fires when the prediction
exceeds a threshold chosen on calibration data (:meth:`DriftMonitor.calibrate`). The fitted forest
is stored as plain arrays (every tree's split features, thresholds, children and leaf values) plus
JSON, never pickled, and predictions always go through those arrays, so a loaded monitor predicts
exactly what the fitted one did.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save

from em_interp.chat import ChatExample
from em_interp.drift import DriftTrajectory, Snapshot, TraitBasis, snapshot
from em_interp.errors import EmInterpError
from em_interp.hf_trainer import TrainingCallback
from em_interp.io import atomic_write_bytes, atomic_write_json
from em_interp.model import HookedModel
from em_interp.options import check_option


@dataclass
class DriftMonitor:
    """Fit on drift vectors and EM labels; score, calibrate an alarm threshold, save and load.

    ``model``, ``layer`` and ``names`` say what drift it reads (checked by :meth:`check_input`).
    """

    model: str
    layer: int
    names: tuple[str, ...]
    n_estimators: int = 100
    max_depth: int = 5
    min_samples_leaf: int = 5
    seed: int = 0
    threshold: float | None = None
    trees: list[dict[str, np.ndarray]] = field(default_factory=list, repr=False)

    def check_input(self, drift: np.ndarray | torch.Tensor, argument: str = "drift") -> np.ndarray:
        """``drift`` as a finite (n, len(names)) float array, or an error naming ``argument``."""
        x = np.asarray(drift.numpy() if isinstance(drift, torch.Tensor) else drift, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.names):
            raise EmInterpError(f"{argument} must have shape (n, {len(self.names)}) for traits {list(self.names)}, "
                                f"got {x.shape}")
        if not np.isfinite(x).all():
            raise EmInterpError(f"{argument} has NaN or infinite values")
        return x

    def fit(self, drift: np.ndarray | torch.Tensor, em: Sequence[float] | np.ndarray) -> DriftMonitor:
        """Fit the forest from drift rows to their EM measure (e.g. the EM shift over the base model)."""
        from sklearn.ensemble import RandomForestRegressor

        x = self.check_input(drift)
        y = np.asarray(em, dtype=np.float64)
        if y.shape != (len(x),) or not np.isfinite(y).all():
            raise EmInterpError(f"em must be {len(x)} finite values, one per drift row, got shape {y.shape}")
        if len(x) < 2 * self.min_samples_leaf:
            raise EmInterpError(f"{len(x)} rows cannot fit a forest with min_samples_leaf={self.min_samples_leaf}")
        forest = RandomForestRegressor(n_estimators=self.n_estimators, max_depth=self.max_depth,
                                       min_samples_leaf=self.min_samples_leaf, random_state=self.seed).fit(x, y)
        self.trees = [{"left": t.tree_.children_left.copy(), "right": t.tree_.children_right.copy(),
                       "feature": t.tree_.feature.copy(), "threshold": t.tree_.threshold.copy(),
                       "value": t.tree_.value[:, 0, 0].copy()} for t in forest.estimators_]
        self.threshold = None
        return self

    def score(self, drift: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted EM measure per drift row (mean over trees, walked from the stored arrays)."""
        if not self.trees:
            raise EmInterpError("the monitor is not fitted: call fit() or load() first")
        x = self.check_input(drift).astype(np.float32)  # as scikit-learn's trees compare features
        out = np.zeros(len(x))
        for tree in self.trees:
            node = np.zeros(len(x), dtype=np.int64)
            active = tree["left"][node] != -1
            while active.any():
                i = np.nonzero(active)[0]
                go_left = x[i, tree["feature"][node[i]]] <= tree["threshold"][node[i]]
                node[i] = np.where(go_left, tree["left"][node[i]], tree["right"][node[i]])
                active = tree["left"][node] != -1
            out += tree["value"][node]
        return out / len(self.trees)

    def calibrate(self, drift: np.ndarray | torch.Tensor, dangerous: Sequence[bool] | np.ndarray,
                  max_fnr: float = 0.05) -> float:
        """Set the alarm threshold on calibration rows: the highest that misses at most ``max_fnr`` of the dangerous ones."""
        labels = np.asarray(dangerous, dtype=bool)
        scores = self.score(drift)
        if labels.shape != scores.shape or not labels.any():
            raise EmInterpError("dangerous must mark at least one of the calibration rows (one label per row)")
        positives = np.sort(scores[labels])
        k = int(np.floor(max_fnr * len(positives)))  # at most k dangerous rows may fall below the threshold
        self.threshold = float(np.nextafter(positives[k], -np.inf))
        return self.threshold

    def alarm(self, drift: np.ndarray | torch.Tensor) -> np.ndarray:
        """Whether each drift row raises the alarm (prediction above the calibrated threshold)."""
        if self.threshold is None:
            raise EmInterpError("the monitor has no alarm threshold: call calibrate() first")
        return self.score(drift) > self.threshold

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``<path>.json`` (identity, settings, threshold) and ``<path>.safetensors`` (the trees)."""
        if not self.trees:
            raise EmInterpError("cannot save an unfitted monitor")
        path = Path(path)
        arrays = {f"{i}.{k}": torch.from_numpy(np.ascontiguousarray(v)) for i, t in enumerate(self.trees) for k, v in t.items()}
        atomic_write_bytes(path.with_name(path.name + ".safetensors"), save(arrays))
        atomic_write_json(path.with_name(path.name + ".json"), {
            "format": "em_interp.drift_monitor/1", "model": self.model, "layer": self.layer, "names": list(self.names),
            "n_estimators": self.n_estimators, "max_depth": self.max_depth, "min_samples_leaf": self.min_samples_leaf,
            "seed": self.seed, "threshold": self.threshold, "n_trees": len(self.trees)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: str | None = None, layer: int | None = None) -> DriftMonitor:
        """Read a monitor written by :meth:`save`; with ``model``/``layer``, refuse one made for another."""
        path = Path(path)
        meta_path, arrays_path = path.with_name(path.name + ".json"), path.with_name(path.name + ".safetensors")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != "em_interp.drift_monitor/1":
                raise ValueError("not a drift monitor file")
            arrays = {k: v.clone().numpy() for k, v in load_file(str(arrays_path)).items()}
            trees = [{k: arrays[f"{i}.{k}"] for k in ("left", "right", "feature", "threshold", "value")}
                     for i in range(int(meta["n_trees"]))]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EmInterpError(f"{path}: cannot read a drift monitor ({type(exc).__name__}: {exc})") from None
        if model is not None and meta["model"] != model:
            raise EmInterpError(f"{meta_path}: the monitor was fitted on model {meta['model']!r}, not {model!r}")
        if layer is not None and int(meta["layer"]) != layer:
            raise EmInterpError(f"{meta_path}: the monitor reads layer {meta['layer']}, not {layer}")
        return cls(meta["model"], int(meta["layer"]), tuple(meta["names"]), int(meta["n_estimators"]),
                   int(meta["max_depth"]), int(meta["min_samples_leaf"]), int(meta["seed"]), meta["threshold"], trees)


Alarm = Literal["warn", "stop"]


class MonitorCallback(TrainingCallback):
    """The drift monitor inside a training run: em_interp's trainer or a user's ``Trainer`` / ``SFTTrainer``.

    At the start it measures the model with its adapters disabled (step 0: the base model); then
    at each checkpoint (default) or every ``every`` steps it measures the trait drift, appends
    ``(step, drift)`` to :attr:`history`, and, with a fitted and calibrated ``monitor``, scores it.
    On alarm: ``"warn"`` (a warning naming the step and the score), ``"stop"`` (the trainer stops
    after this step) or a function called as ``on_alarm(step, drift, score)``. Measuring runs in
    eval mode (no LoRA dropout) without gradients, and puts the training mode back.
    """

    def __init__(self, basis: TraitBasis, prompts: Sequence[ChatExample], monitor: DriftMonitor | None = None,
                 every: int | None = None, on_alarm: Alarm | Callable[[int, np.ndarray, float], None] = "warn") -> None:
        if not prompts:
            raise EmInterpError("prompts is empty: the drift monitor needs evaluation prompts")
        if every is not None and every < 1:
            raise EmInterpError(f"every={every} must be >= 1 (or None: at checkpoints)")
        if isinstance(on_alarm, str):
            check_option("on_alarm", on_alarm, ("warn", "stop"))
        if monitor is not None and monitor.names != basis.names:
            raise EmInterpError(f"the monitor reads traits {list(monitor.names)}, the basis has {list(basis.names)}")
        self.basis, self.prompts, self.monitor, self.every, self.on_alarm = basis, list(prompts), monitor, every, on_alarm
        self.history: list[tuple[int, np.ndarray, float | None]] = []
        self.alarms: list[int] = []
        self._start: Snapshot | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, model=model, **kwargs)
        hooked = self._hooked_of(model)
        with hooked.peft_model.disable_adapter():
            self._start = self._measure(hooked, 0)

    def on_step(self, model: HookedModel, step: int, loss: float) -> None:
        if self.every is not None and step % self.every == 0:
            self._record(model, step)

    def on_checkpoint(self, model: HookedModel, step: int, path: Path) -> None:
        if self.every is None and step > 0:
            self._record(model, step)

    def _measure(self, model: HookedModel, step: int) -> Snapshot:
        was_training = model.hf_model.training
        model.hf_model.eval()
        try:
            return snapshot(model, self.basis, self.prompts, step)
        finally:
            if was_training:
                model.hf_model.train()

    def _record(self, model: HookedModel, step: int) -> None:
        if self._start is None:  # em_interp's own loop, no on_train_begin: measure the base now
            with model.peft_model.disable_adapter():
                self._start = self._measure(model, 0)
        now = self._measure(model, step)
        drift = DriftTrajectory.from_snapshots([self._start, now], self.basis.names).drift[-1].numpy().astype(np.float64)
        score = None
        if self.monitor is not None and self.monitor.threshold is not None:
            score = float(self.monitor.score(drift[None])[0])
            if score > self.monitor.threshold:
                self.alarms.append(step)
                if self.on_alarm == "warn":
                    warnings.warn(f"drift monitor alarm at step {step}: predicted EM {score:+.3f} > threshold "
                                  f"{self.monitor.threshold:+.3f}", stacklevel=2)
                elif self.on_alarm == "stop":
                    self.request_stop()
                else:
                    self.on_alarm(step, drift, score)
        self.history.append((step, drift, score))
