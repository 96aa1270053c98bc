"""Switching a defense on when the drift monitor's alarm fires, and rolling back to the last check before it.

Part of :mod:`em_interp.defenses` (see its docstring).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from em_interp.defenses.base import Defense
from em_interp.errors import EmInterpError
from em_interp.lora.hf_trainer import TrainingCallback
from em_interp.model import HookedModel


def triggered(defense: Defense, monitor_callback: Any) -> list[TrainingCallback]:
    """``defense`` off until ``monitor_callback`` (a :class:`~em_interp.monitor.detector.MonitorCallback`) raises its alarm.

    Returns the two callbacks to pass to the trainer. The monitor's ``on_alarm`` is replaced by one
    that switches the defense on (and remembers the step in ``defense.switched_at``).
    """
    from em_interp.monitor.detector import MonitorCallback

    if not isinstance(defense, Defense):
        raise EmInterpError(f"defense must be an em_interp Defense, got {type(defense).__name__}")
    if not isinstance(monitor_callback, MonitorCallback):
        raise EmInterpError(f"monitor_callback must be a MonitorCallback, got {type(monitor_callback).__name__}")
    if monitor_callback.monitor is None or monitor_callback.monitor.threshold is None:
        raise EmInterpError("monitor_callback has no calibrated DriftMonitor (a threshold): its alarm could never "
                            "switch the defense on")
    defense.disable()
    defense.switched_at = None  # type: ignore[attr-defined]

    def switch_on(step: int, drift: Any, score: float) -> None:
        if not defense.active:
            defense.switched_at = step  # type: ignore[attr-defined]
            defense.enable()

    monitor_callback.on_alarm = switch_on
    return [monitor_callback, defense]


class Rollback(TrainingCallback):
    """On the drift monitor's alarm, put back the weights of the last check before it, then go on with ``defense``
    on (``stop=False``) or stop there (``stop=True``: early stopping at the alarm, keeping the pre-alarm weights).

    Pass the callbacks :func:`rollback` returns (the monitor first, so this one sees each check's verdict on the
    same step). At every monitor check that raises no alarm, and at the start of training (step 0, the monitor's
    base measurement), it keeps an in-memory copy of the trainable weights (a LoRA adapter's are small); on the
    alarm at step ``s`` it copies back the last one before ``s`` (:attr:`rolled_back_to`). Training then goes on
    from step ``s + 1`` with the next batches (the data of the rolled-back steps is not replayed, and the
    optimiser's moments are kept), so a rolled-back run takes as many steps as an undefended one. Only the first
    alarm acts.
    """

    def __init__(self, monitor_callback: Any, defense: Defense | None = None, stop: bool = False) -> None:
        from em_interp.monitor.detector import MonitorCallback

        if not isinstance(monitor_callback, MonitorCallback):
            raise EmInterpError(f"monitor_callback must be a MonitorCallback, got {type(monitor_callback).__name__}")
        if monitor_callback.monitor is None or monitor_callback.monitor.threshold is None:
            raise EmInterpError("monitor_callback has no calibrated DriftMonitor (a threshold): its alarm could never "
                                "trigger the rollback")
        if defense is not None and not isinstance(defense, Defense):
            raise EmInterpError(f"defense must be an em_interp Defense or None, got {type(defense).__name__}")
        if defense is None and not stop:
            raise EmInterpError("rollback without a defense would retrain the same way: give defense= or stop=True")
        self.monitor, self.defense, self.stop = monitor_callback, defense, bool(stop)
        self.alarm_at: int | None = None
        self.rolled_back_to: int | None = None
        self._kept: tuple[int, dict[str, torch.Tensor]] | None = None
        self._seen = 0
        if defense is not None:
            defense.disable()
            defense.switched_at = None  # type: ignore[attr-defined]

        def on_alarm(step: int, drift: Any, score: float) -> None:
            if self.alarm_at is None:
                self.alarm_at = step

        monitor_callback.on_alarm = on_alarm

    @staticmethod
    def _trainable(model: HookedModel) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.hf_model.named_parameters() if p.requires_grad}

    def _keep(self, model: HookedModel, step: int) -> None:
        self._kept = (step, {n: p.detach().clone() for n, p in self._trainable(model).items()})

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                       **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, model=model, processing_class=processing_class, **kwargs)
        self._keep(self._hooked_of(model), 0)
        self._seen = len(self.monitor.history)

    def on_step(self, model: HookedModel, step: int, loss: float) -> None:
        self._after_check(model, step)

    def on_checkpoint(self, model: HookedModel, step: int, path: Path) -> None:
        self._after_check(model, step)

    def _after_check(self, model: HookedModel, step: int) -> None:
        if len(self.monitor.history) == self._seen or self.monitor.history[-1][0] != step:
            return  # the monitor did not check at this step
        self._seen = len(self.monitor.history)
        if self.alarm_at != step or self.rolled_back_to is not None:
            if self.alarm_at is None:
                self._keep(model, step)
            return
        if self._kept is None:
            raise EmInterpError(f"rollback: no checkpoint before the alarm at step {step} (was the Rollback callback "
                                "passed to the trainer from the start?)")
        kept_step, weights = self._kept
        params = self._trainable(model)
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        self.rolled_back_to = kept_step
        if self.defense is not None:
            self.defense.switched_at = step  # type: ignore[attr-defined]
            self.defense.enable()
        if self.stop:
            self.request_stop()


def rollback(monitor_callback: Any, defense: Defense | None = None, stop: bool = False) -> list[TrainingCallback]:
    """The callbacks of a monitor-triggered rollback (see :class:`Rollback`): pass them to the trainer in this order.

    ``defense`` (off until the alarm) and ``stop=False``: roll back and go on defended; ``stop=True``: roll back and
    stop (early stopping at the alarm; ``defense`` may be None).
    """
    back = Rollback(monitor_callback, defense, stop)
    return [monitor_callback, back] + ([defense] if defense is not None else [])


def checkpoint_before(run_dir: str | Path, step: int) -> tuple[int, Path]:
    """``(step, folder)`` of the last checkpoint of ``run_dir`` strictly before ``step`` (e.g. a monitor's alarm),
    to restart from after the fact; none before it is an error naming both."""
    from em_interp.monitor.drift import run_checkpoints

    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise EmInterpError(f"checkpoint_before(step={step!r}) must be an integer >= 1 (the alarm's step)")
    earlier = [(s, p) for s, p in run_checkpoints(Path(run_dir)) if s < step]
    if not earlier:
        raise EmInterpError(f"checkpoint_before: {str(run_dir)!r} has no checkpoint before step {step}: nothing to "
                            "roll back to (checkpoint more often than the monitor checks)")
    return earlier[-1]
