"""The drift monitor (seed 000): a model from trait drift to the behavioural EM label, with an alarm.

Two kinds (``DriftMonitor.kind``):

- ``"forest"`` (the default, seed 000's public code): ``RandomForestRegressor(n_estimators=100,
  max_depth=5, min_samples_leaf=5)`` from the drift vector to the EM measure;
- ``"logistic"``: standardised drift -> ``LogisticRegression(C=1)`` on the dangerous/safe labels;
  its score is the log-odds. A linear model extrapolates to drift larger than the calibration
  runs reached, which a forest cannot (:func:`em_interp.monitor_evaluation.select_monitor_kind`
  picks the kind by leave-one-type-out on the calibration types only).

The alarm fires when the score exceeds a threshold chosen on calibration data
(:meth:`DriftMonitor.calibrate`). The fitted model is stored as plain arrays (every tree's split
features, thresholds, children and leaf values; or the scaler and coefficients) plus JSON, never
pickled, and predictions always go through those arrays, so a loaded monitor predicts exactly what
the fitted one did.
"""

from __future__ import annotations

import json
import logging
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
from em_interp.detection import calibrate_threshold
from em_interp.drift import DriftTrajectory, Snapshot, TraitBasis, snapshot
from em_interp.errors import EmInterpError
from em_interp.hf_trainer import TrainingCallback
from em_interp.io import atomic_write_bytes, atomic_write_json
from em_interp.model import HookedModel
from em_interp.options import check_option

MonitorKind = Literal["forest", "logistic"]
MONITOR_KINDS: tuple[str, ...] = ("forest", "logistic")


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
    kind: MonitorKind = "forest"
    #: the logistic kind's arrays: drift mean and scale, coefficients, intercept
    linear: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_option("kind", self.kind, MONITOR_KINDS)

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`load`) gave the monitor a model."""
        return bool(self.trees) if self.kind == "forest" else bool(self.linear)

    def check_input(self, drift: np.ndarray | torch.Tensor, argument: str = "drift") -> np.ndarray:
        """``drift`` as a finite (n, len(names)) float array, or an error naming ``argument``."""
        x = np.asarray(drift.numpy() if isinstance(drift, torch.Tensor) else drift, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.names):
            raise EmInterpError(f"{argument} must have shape (n, {len(self.names)}) for traits {list(self.names)}, "
                                f"got {x.shape}")
        if not np.isfinite(x).all():
            raise EmInterpError(f"{argument} has NaN or infinite values")
        return x

    def fit(self, drift: np.ndarray | torch.Tensor, em: Sequence[float] | np.ndarray,
            dangerous: Sequence[bool] | np.ndarray | None = None) -> DriftMonitor:
        """Fit from drift rows: the forest to their EM measure (e.g. the EM shift over the base model),
        the logistic kind to their ``dangerous`` labels (required for it)."""
        x = self.check_input(drift)
        y = np.asarray(em, dtype=np.float64)
        if y.shape != (len(x),) or not np.isfinite(y).all():
            raise EmInterpError(f"em must be {len(x)} finite values, one per drift row, got shape {y.shape}")
        self.threshold = None
        if self.kind == "logistic":
            return self._fit_logistic(x, dangerous)
        from sklearn.ensemble import RandomForestRegressor

        if len(x) < 2 * self.min_samples_leaf:
            raise EmInterpError(f"{len(x)} rows cannot fit a forest with min_samples_leaf={self.min_samples_leaf}")
        forest = RandomForestRegressor(n_estimators=self.n_estimators, max_depth=self.max_depth,
                                       min_samples_leaf=self.min_samples_leaf, random_state=self.seed).fit(x, y)
        self.trees = [{"left": t.tree_.children_left.copy(), "right": t.tree_.children_right.copy(),
                       "feature": t.tree_.feature.copy(), "threshold": t.tree_.threshold.copy(),
                       "value": t.tree_.value[:, 0, 0].copy()} for t in forest.estimators_]
        return self

    def _fit_logistic(self, x: np.ndarray, dangerous: Sequence[bool] | np.ndarray | None) -> DriftMonitor:
        from sklearn.linear_model import LogisticRegression

        if dangerous is None:
            raise EmInterpError("the logistic monitor is fitted on dangerous labels: pass dangerous=")
        labels = np.asarray(dangerous, dtype=bool)
        if labels.shape != (len(x),) or labels.all() or not labels.any():
            raise EmInterpError(f"dangerous must be {len(x)} labels, one per drift row, with both classes")
        mean, scale = x.mean(0), x.std(0)
        scale[scale == 0] = 1.0
        model = LogisticRegression(C=1.0, max_iter=1000).fit((x - mean) / scale, labels)
        self.linear = {"mean": mean, "scale": scale, "coef": model.coef_[0].copy(),
                       "intercept": np.asarray(model.intercept_, dtype=np.float64).copy()}
        return self

    def score(self, drift: np.ndarray | torch.Tensor) -> np.ndarray:
        """Score per drift row: the forest's predicted EM measure (mean over trees, walked from the stored
        arrays), or the logistic kind's log-odds of dangerous."""
        if not self.fitted:
            raise EmInterpError("the monitor is not fitted: call fit() or load() first")
        if self.kind == "logistic":
            z = (self.check_input(drift) - self.linear["mean"]) / self.linear["scale"]
            return z @ self.linear["coef"] + float(self.linear["intercept"][0])
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
        self.threshold = calibrate_threshold(self.score(drift), dangerous, max_fnr)
        return self.threshold

    def alarm(self, drift: np.ndarray | torch.Tensor) -> np.ndarray:
        """Whether each drift row raises the alarm (prediction above the calibrated threshold)."""
        if self.threshold is None:
            raise EmInterpError("the monitor has no alarm threshold: call calibrate() first")
        return self.score(drift) > self.threshold

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``<path>.json`` (identity, settings, threshold) and ``<path>.safetensors`` (the trees)."""
        if not self.fitted:
            raise EmInterpError("cannot save an unfitted monitor")
        path = Path(path)
        arrays = {f"{i}.{k}": torch.from_numpy(np.ascontiguousarray(v)) for i, t in enumerate(self.trees) for k, v in t.items()}
        arrays.update({f"linear.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.linear.items()})
        atomic_write_bytes(path.with_name(path.name + ".safetensors"), save(arrays))
        atomic_write_json(path.with_name(path.name + ".json"), {
            "format": "em_interp.drift_monitor/1", "model": self.model, "layer": self.layer, "names": list(self.names),
            "n_estimators": self.n_estimators, "max_depth": self.max_depth, "min_samples_leaf": self.min_samples_leaf,
            "seed": self.seed, "threshold": self.threshold, "n_trees": len(self.trees), "kind": self.kind})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: str | None = None, layer: int | None = None) -> DriftMonitor:
        """Read a monitor written by :meth:`save`; with ``model``/``layer``, refuse one made for another."""
        path = Path(path)
        meta_path, arrays_path = path.with_name(path.name + ".json"), path.with_name(path.name + ".safetensors")
        try:
            meta = json.loads(meta_path.read_text())
            fmt = meta.get("format") if isinstance(meta, dict) else None
            arrays = {k: v.clone().numpy() for k, v in load_file(str(arrays_path)).items()} if fmt else {}
            trees = [{k: arrays[f"{i}.{k}"] for k in ("left", "right", "feature", "threshold", "value")}
                     for i in range(int(meta["n_trees"]))] if fmt else []
            linear = {k.removeprefix("linear."): v for k, v in arrays.items() if k.startswith("linear.")}
            kind = meta.get("kind", "forest") if fmt else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EmInterpError(f"{path}: cannot read a drift monitor ({type(exc).__name__}: {exc})") from None
        if fmt != "em_interp.drift_monitor/1":
            raise EmInterpError(f"{path}: cannot read a drift monitor ({meta_path} is not a drift monitor file)")
        if kind not in MONITOR_KINDS or (kind == "logistic") != bool(linear):
            raise EmInterpError(f"{path}: cannot read a drift monitor (kind {kind!r} does not match the stored arrays)")
        if model is not None and meta["model"] != model:
            raise EmInterpError(f"{meta_path}: the monitor was fitted on model {meta['model']!r}, not {model!r}")
        if layer is not None and int(meta["layer"]) != layer:
            raise EmInterpError(f"{meta_path}: the monitor reads layer {meta['layer']}, not {layer}")
        return cls(meta["model"], int(meta["layer"]), tuple(meta["names"]), int(meta["n_estimators"]),
                   int(meta["max_depth"]), int(meta["min_samples_leaf"]), int(meta["seed"]), meta["threshold"], trees,
                   kind, linear)


def monitor_cost(model: HookedModel, basis: TraitBasis, monitor: DriftMonitor, prompts: Sequence[ChatExample],
                 questions: Sequence[Any], answer_tokens: int = 96, seed: int = 0) -> dict[str, float]:
    """What the monitor costs per checkpoint against one behavioural evaluation of the same model, timed here.

    Monitor: a snapshot of ``prompts`` plus the forest's score. Behavioural evaluation: one sampled
    answer (``answer_tokens`` new tokens) per question of ``questions`` (:class:`~em_interp.data.PairedQuestion`)
    and their judge-free EM score. Memory: what the monitor keeps between checkpoints (basis,
    step-0 snapshot, forest arrays) and the activations a snapshot holds.
    """
    import time

    from em_interp.evaluation import score_questions
    from em_interp.generation import sample_answers

    start = time.perf_counter()
    snap = snapshot(model, basis, prompts, 1)
    monitor.score((snap.projections.mean(0) / float(snap.norms.mean())).numpy()[None].astype(np.float64))
    monitor_s = time.perf_counter() - start
    start = time.perf_counter()
    sample_answers(model, [ChatExample(q.question, None, q.system) for q in questions], n=1, temperature=1.0,
                   max_new_tokens=answer_tokens, seed=seed)
    score_questions(model, list(questions), use_cache=False)
    behaviour_s = time.perf_counter() - start
    kept = sum(t.numel() * t.element_size() for t in (basis.directions, snap.projections, snap.norms, snap.mean_activation))
    kept += sum(v.nbytes for tree in monitor.trees for v in tree.values())
    return {"monitor_seconds": monitor_s, "behavioural_eval_seconds": behaviour_s, "cost_ratio": monitor_s / behaviour_s,
            "monitor_state_bytes": float(kept), "snapshot_activation_bytes": float(len(prompts) * model.d_model * 4),
            "questions": float(len(questions)), "prompts": float(len(prompts))}


Alarm = Literal["warn", "stop"]
_log = logging.getLogger("em_interp.monitor")


class MonitorCallback(TrainingCallback):
    """The drift monitor inside a training run: em_interp's trainer or a user's ``Trainer`` / ``SFTTrainer``.

    At the start it measures the model with its adapters disabled (step 0: the base model); then
    at each checkpoint (default) or every ``every`` steps it measures the trait drift, appends
    ``(step, drift, score)`` to :attr:`history` (and logs it to the ``em_interp.monitor`` logger), and,
    with a fitted and calibrated ``monitor``, scores it.
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
        _log.info("drift monitor step %d: drift %s%s", step, np.round(drift, 4).tolist(),
                  "" if score is None else f", predicted EM {score:+.4f}")
