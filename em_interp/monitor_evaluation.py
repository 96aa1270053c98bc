"""Deprecated path: this module moved to :mod:`em_interp.monitor.scoring` (the old path works for one release)."""

import warnings

from em_interp.monitor.scoring import *  # noqa: F403
from em_interp.monitor.scoring import (  # noqa: F401
              DANGER_PERCENTILE,
              DETECTORS,
              MAX_FNR,
              MONITOR_DETECTORS,
              CheckpointTable,
              DetectorResult,
              LibraryEvaluation,
              checkpoint_table,
              dangerous_threshold,
              evaluate_library,
              run_trajectory,
              select_monitor_kind,
              summary,
)

warnings.warn("em_interp.monitor_evaluation moved to em_interp.monitor.scoring; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
