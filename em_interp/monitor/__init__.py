"""Monitoring fine-tuning from the inside: trait drift (:mod:`~em_interp.monitor.drift`), the drift
monitor and its training callback (:mod:`~em_interp.monitor.detector`), the perturbation library
(:mod:`~em_interp.monitor.perturbations`), the sweep engine (:mod:`~em_interp.monitor.sweep`), detector
scoring (:mod:`~em_interp.monitor.detection`, :mod:`~em_interp.monitor.scoring`) and the SAE baseline
(:mod:`~em_interp.monitor.sae`).

The detector's public names are importable from here as before (``from em_interp.monitor import
DriftMonitor, MonitorCallback``).
"""

from em_interp.monitor.detector import (
    MONITOR_KINDS,
    Alarm,
    DriftMonitor,
    MonitorCallback,
    MonitorKind,
    monitor_cost,
)

__all__ = [
    "Alarm",
    "DriftMonitor",
    "MONITOR_KINDS",
    "MonitorCallback",
    "MonitorKind",
    "monitor_cost",
]
