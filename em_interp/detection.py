"""Deprecated path: this module moved to :mod:`em_interp.monitor.detection` (the old path works for one release)."""

import warnings

from em_interp.monitor.detection import *  # noqa: F403
from em_interp.monitor.detection import (  # noqa: F401
              DetectionScore,
              PCARidge,
              activation_drift_norm,
              auroc,
              calibrate_threshold,
              lead_steps,
              score_detector,
)

warnings.warn("em_interp.detection moved to em_interp.monitor.detection; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
