"""The drift monitor (Nghiem et al., 2026): a model from trait drift to the behavioural EM label, with an alarm.

Two kinds (``DriftMonitor.kind``):

- ``"forest"`` (the default, the trait-space monitoring paper's public code): ``RandomForestRegressor(n_estimators=100,
  max_depth=5, min_samples_leaf=5)`` from the drift vector to the EM measure;
- ``"logistic"``: standardised drift -> ``LogisticRegression(C=1)`` on the dangerous/safe labels;
  its score is the log-odds. A linear model extrapolates to drift larger than the calibration
  runs reached, which a forest cannot (:func:`em_interp.monitor.scoring.select_monitor_kind`
  picks the kind by leave-one-type-out on the calibration types only).

The alarm fires when the score exceeds a threshold chosen on calibration data
(:meth:`DriftMonitor.calibrate`). The fitted model is stored as plain arrays (every tree's split
features, thresholds, children and leaf values; or the scaler and coefficients) plus JSON, never
pickled, and predictions always go through those arrays, so a loaded monitor predicts exactly what
the fitted one did.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from em_interp.artifacts import artifact_paths, load_artifact, save_artifact, sidecar_field
from em_interp.chat import ChatExample
from em_interp.errors import EmInterpError
from em_interp.lora.hf_trainer import TrainingCallback
from em_interp.model import HookedModel
from em_interp.monitor.detection import calibrate_threshold
from em_interp.monitor.drift import DriftTrajectory, Snapshot, TraitBasis, snapshot
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
    #: the EM shift (nats/token) above which the library it was calibrated on counted a checkpoint dangerous
    #: (:func:`em_interp.monitor.scoring.dangerous_threshold`); None where it was fitted outside a library
    danger_line: float | None = None

    def __post_init__(self) -> None:
        check_option("kind", self.kind, MONITOR_KINDS)

    @property
    def score_name(self) -> str:
        """What :meth:`score` returns, in words: the forest's predicted EM measure, the logistic kind's log-odds."""
        return "predicted EM" if self.kind == "forest" else "log-odds of dangerous"

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
        """Set the alarm threshold on calibration rows: the highest that misses at most ``max_fnr`` of the dangerous ones.

        Rows the monitor was fitted on give an optimistic threshold (a forest reproduces them): prefer rows it was
        not fitted on, or the threshold :func:`em_interp.monitor.scoring.evaluate_library` sets on out-of-fold
        scores (``evaluation.detectors["monitor"].threshold``)."""
        self.threshold = calibrate_threshold(self.score(drift), dangerous, max_fnr)
        return self.threshold

    def alarm(self, drift: np.ndarray | torch.Tensor) -> np.ndarray:
        """Whether each drift row raises the alarm (prediction above the calibrated threshold)."""
        if self.threshold is None:
            raise EmInterpError("the monitor has no alarm threshold: call calibrate() first")
        return self.score(drift) > self.threshold

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``<path>.json`` (identity, settings, threshold) and ``<path>.safetensors`` (the trees or the
        logistic arrays), atomically (see :mod:`em_interp.artifacts`)."""
        if not self.fitted:
            raise EmInterpError("cannot save an unfitted monitor")
        arrays = {f"{i}.{k}": torch.from_numpy(np.ascontiguousarray(v)) for i, t in enumerate(self.trees) for k, v in t.items()}
        arrays.update({f"linear.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.linear.items()})
        return save_artifact(path, "drift_monitor", arrays, {
            "model": self.model, "layer": self.layer, "names": list(self.names), "n_estimators": self.n_estimators,
            "max_depth": self.max_depth, "min_samples_leaf": self.min_samples_leaf, "seed": self.seed,
            "threshold": self.threshold, "n_trees": len(self.trees), "kind": self.kind, "danger_line": self.danger_line})

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: str | None = None, layer: int | None = None) -> DriftMonitor:
        """Read a monitor written by :meth:`save`; with ``model``/``layer``, refuse one made for another.

        The sidecar is checked against the arrays it describes (tree count, trait count, kind, a finite
        threshold), so an edited or damaged file is an error naming it, never a monitor that scores
        with part of its trees or can never alarm.
        """
        fields = ("model", "layer", "names", "n_estimators", "max_depth", "min_samples_leaf", "seed", "threshold",
                  "n_trees", "kind")
        tensors, meta = load_artifact(path, "drift_monitor", required=fields)
        source = artifact_paths(path)[1]
        arrays = {k: v.clone().numpy() for k, v in tensors.items()}
        names = meta["names"]
        if not isinstance(names, list) or len(names) < 1 or len(set(names)) != len(names) \
                or not all(isinstance(n, str) for n in names):
            raise EmInterpError(f"{source}: field 'names' must be a list of distinct trait names")
        kind = meta["kind"]
        if kind not in MONITOR_KINDS:
            raise EmInterpError(f"{source}: field 'kind' = {kind!r} is not one of {list(MONITOR_KINDS)}")
        threshold = None if meta["threshold"] is None else sidecar_field(meta, "threshold", float, source)
        # optional: monitors saved before it was recorded have none
        line = None if meta.get("danger_line") is None else sidecar_field(meta, "danger_line", float, source)
        n_estimators, n_trees = (sidecar_field(meta, k, int, source) for k in ("n_estimators", "n_trees"))
        trees = _read_trees(arrays, n_trees, len(names), source) if kind == "forest" else []
        linear = {k.removeprefix("linear."): v for k, v in arrays.items() if k.startswith("linear.")}
        if kind == "forest" and (n_trees != n_estimators or linear):
            raise EmInterpError(f"{source}: a forest of n_estimators={n_estimators} holds {n_trees} trees"
                                + (" and logistic arrays" if linear else ""))
        if kind == "logistic":
            _check_linear(linear, len(names), n_trees, source)
        monitor_model = sidecar_field(meta, "model", str, source)
        monitor_layer = sidecar_field(meta, "layer", int, source)
        if model is not None and monitor_model != model:
            raise EmInterpError(f"{source}: the monitor was fitted on model {monitor_model!r}, not {model!r}")
        if layer is not None and monitor_layer != layer:
            raise EmInterpError(f"{source}: the monitor reads layer {monitor_layer}, not {layer}")
        return cls(monitor_model, monitor_layer, tuple(names), n_estimators, sidecar_field(meta, "max_depth", int, source),
                   sidecar_field(meta, "min_samples_leaf", int, source), sidecar_field(meta, "seed", int, source),
                   threshold, trees, kind, linear, line)


_TREE_ARRAYS = ("left", "right", "feature", "threshold", "value")


def _read_trees(arrays: dict[str, np.ndarray], n_trees: int, n_features: int, source: Path) -> list[dict[str, np.ndarray]]:
    """The forest's trees from the stored arrays, each checked to be a well-formed tree over ``n_features``."""
    expected = {f"{i}.{k}" for i in range(n_trees) for k in _TREE_ARRAYS}
    if n_trees < 1 or set(arrays) != expected:
        raise EmInterpError(f"{source}: n_trees={n_trees} does not match the stored tree arrays "
                            f"({len({k.split('.')[0] for k in arrays})} trees)")
    trees = []
    for i in range(n_trees):
        tree = {k: arrays[f"{i}.{k}"] for k in _TREE_ARRAYS}
        n = len(tree["left"])
        ok = all(v.ndim == 1 and len(v) == n for v in tree.values()) and n >= 1
        if ok:
            internal, index = tree["left"] != -1, np.arange(n)
            # children come after their parent (as scikit-learn stores them): no walk can loop or leave the tree
            ok = bool(((tree["left"] > index) & (tree["right"] > index) | ~internal).all()
                      and (tree["left"] < n).all() and (tree["right"] < n).all() and (tree["right"][~internal] == -1).all()
                      and ((tree["feature"] >= 0) & (tree["feature"] < n_features) | ~internal).all())
        if not ok:
            raise EmInterpError(f"{source}: tree {i} is not a well-formed tree over {n_features} traits")
        trees.append(tree)
    return trees


def _check_linear(linear: dict[str, np.ndarray], n_features: int, n_trees: int, source: Path) -> None:
    shapes = {"mean": (n_features,), "scale": (n_features,), "coef": (n_features,), "intercept": (1,)}
    if n_trees != 0 or {k: v.shape for k, v in linear.items()} != shapes or not (linear["scale"] > 0).all():
        raise EmInterpError(f"{source}: the logistic monitor's arrays do not match its {n_features} traits")


#: the field's behavioural evaluation (Betley et al., 2025, and every paper since): answers sampled at
#: temperature 1 to each of the 8 first-plot questions, up to 600 new tokens each, two judge calls per answer
FIELD_EVAL_QUESTIONS = 8
FIELD_EVAL_SAMPLES = 50
FIELD_EVAL_MAX_TOKENS = 600
FIELD_EVAL_JUDGE_CALLS = 2


def monitor_cost(model: HookedModel, basis: TraitBasis, monitor: DriftMonitor, prompts: Sequence[ChatExample],
                 questions: Sequence[Any], answer_tokens: int = 96, seed: int = 0) -> dict[str, float]:
    """What the monitor costs per checkpoint, timed here, against the behavioural evaluation it replaces.

    Monitor: a snapshot of ``prompts`` plus the detector's score. Against it:

    - the field's evaluation, from this model's measured generation cost per token ``t`` (one
      answer per question of ``questions`` sampled at temperature 1, ``answer_tokens`` new tokens at
      most, batched by 8; ``t`` = seconds / generated tokens):
      ``field_eval_generation_seconds = 8 questions x 50 answers x 600 tokens x t``, plus
      ``8 x 50 x 2 = 800`` judge calls, not timed (they depend on the judge). Answers shorter than
      600 tokens and the judge's time make the real evaluation cheaper and dearer respectively; per-token
      cost grows with length, so ``t`` measured on short answers makes the ratio an upper bound on
      generation alone;
    - one small evaluation of the same model: those sampled answers plus the judge-free EM score of
      ``questions`` (:class:`~em_interp.data.PairedQuestion`), timed whole.

    Memory: what the monitor keeps between checkpoints (basis, step-0 snapshot, detector arrays) and
    the activations a snapshot holds.
    """
    import time

    from em_interp.evaluation.generation import sample_answers
    from em_interp.evaluation.judge_free import score_questions

    start = time.perf_counter()
    snap = snapshot(model, basis, prompts, 1)
    monitor.score((snap.projections.mean(0) / float(snap.norms.mean())).numpy()[None].astype(np.float64))
    monitor_s = time.perf_counter() - start
    start = time.perf_counter()
    answers = sample_answers(model, [ChatExample(q.question, None, q.system) for q in questions], n=1, temperature=1.0,
                             max_new_tokens=answer_tokens, seed=seed)
    generation_s = time.perf_counter() - start
    score_questions(model, list(questions), use_cache=False)
    behaviour_s = time.perf_counter() - start
    generated = sum(max(1, len(model.tokenizer(a, add_special_tokens=False)["input_ids"])) for row in answers for a in row)
    per_token = generation_s / generated
    field_s = FIELD_EVAL_QUESTIONS * FIELD_EVAL_SAMPLES * FIELD_EVAL_MAX_TOKENS * per_token
    kept = sum(t.numel() * t.element_size() for t in (basis.directions, snap.projections, snap.norms, snap.mean_activation))
    kept += sum(v.nbytes for tree in monitor.trees for v in tree.values()) + sum(v.nbytes for v in monitor.linear.values())
    return {"monitor_seconds": monitor_s, "behavioural_eval_seconds": behaviour_s, "cost_ratio": monitor_s / behaviour_s,
            "generation_seconds_per_token": per_token, "generated_tokens": float(generated),
            "field_eval_generation_seconds": field_s,
            "field_eval_judge_calls": float(FIELD_EVAL_QUESTIONS * FIELD_EVAL_SAMPLES * FIELD_EVAL_JUDGE_CALLS),
            "cost_ratio_vs_field_eval": monitor_s / field_s,
            "monitor_state_bytes": float(kept), "snapshot_activation_bytes": float(len(prompts) * model.d_model * 4),
            "questions": float(len(questions)), "prompts": float(len(prompts))}


Alarm = Literal["warn", "stop"]
_log = logging.getLogger("em_interp.monitor.detector")


class MonitorCallback(TrainingCallback):
    """The drift monitor inside a training run: em_interp's trainer or a user's ``Trainer`` / ``SFTTrainer``.

    At the start it measures the model with its adapters disabled (step 0: the base model); then
    at each checkpoint (default) or every ``every`` steps it measures the trait drift, appends
    ``(step, drift, score)`` to :attr:`history` (and logs it to the ``em_interp.monitor.detector`` logger), and,
    with a fitted and calibrated ``monitor``, scores it.
    On alarm: ``"warn"`` (a warning naming the step and the score), ``"stop"`` (the trainer stops
    after this step) or a function called as ``on_alarm(step, drift, score)``. Measuring runs in
    eval mode (no LoRA dropout) without gradients, and puts the training mode back.
    """

    def __init__(self, basis: TraitBasis, prompts: Sequence[ChatExample], monitor: DriftMonitor | None = None,
                 every: int | None = None, on_alarm: Alarm | Callable[[int, np.ndarray, float], None] = "warn") -> None:
        if not isinstance(basis, TraitBasis):
            raise EmInterpError(f"basis must be a TraitBasis, got {type(basis).__name__}")
        if isinstance(prompts, (str, ChatExample)) or not prompts:
            raise EmInterpError("prompts must be a non-empty sequence of ChatExample: the drift monitor's evaluation prompts")
        wrong = [type(p).__name__ for p in prompts if not isinstance(p, ChatExample)]
        if wrong:
            raise EmInterpError(f"prompts must be ChatExample objects (e.g. ChatExample(question)), got {sorted(set(wrong))}")
        if monitor is not None and not isinstance(monitor, DriftMonitor):
            raise EmInterpError(f"monitor must be a DriftMonitor or None, got {type(monitor).__name__}")
        if not isinstance(on_alarm, str) and not callable(on_alarm):  # a string is checked just below
            raise EmInterpError(f"on_alarm must be 'warn', 'stop' or a function, got {type(on_alarm).__name__}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)):
            raise EmInterpError(f"every={every!r} must be an integer >= 1 (or None: at checkpoints)")
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

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                       **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, model=model, processing_class=processing_class, **kwargs)
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
                    warnings.warn(f"drift monitor alarm at step {step}: {self.monitor.score_name} {score:+.3f} > threshold "
                                  f"{self.monitor.threshold:+.3f}", stacklevel=2)
                elif self.on_alarm == "stop":
                    self.request_stop()
                else:
                    self.on_alarm(step, drift, score)
        self.history.append((step, drift, score))
        _log.info("drift monitor step %d: drift %s%s", step, np.round(drift, 4).tolist(),
                  "" if score is None or self.monitor is None else f", {self.monitor.score_name} {score:+.4f}")
