"""Deprecated path: this module moved to :mod:`em_interp.monitor.drift` (the old path works for one release)."""

import warnings

from em_interp.monitor.drift import *  # noqa: F403
from em_interp.monitor.drift import (  # noqa: F401
              DriftTrajectory,
              Snapshot,
              TraitBasis,
              label_questions,
              measure_run,
              monitor_layer,
              monitor_prompts,
              run_checkpoints,
              snapshot,
              trait_basis,
)

warnings.warn("em_interp.drift moved to em_interp.monitor.drift; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
