"""Switching a defense on when the drift monitor's alarm fires.

Part of :mod:`em_interp.defenses` (see its docstring).
"""

from __future__ import annotations

from typing import Any

from em_interp.defenses.base import Defense
from em_interp.errors import EmInterpError
from em_interp.lora.hf_trainer import TrainingCallback


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
