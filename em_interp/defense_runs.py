"""Deprecated path: this module moved to :mod:`em_interp.defenses.runs` (the old path works for one release)."""

import warnings

from em_interp.defenses.runs import *  # noqa: F403
from em_interp.defenses.runs import (  # noqa: F401
              STRENGTH_MEANING,
              SWITCHABLE,
              DefenseRunRecord,
              DefenseRunSpec,
              DefenseSetting,
              DefenseSettings,
              DefenseSetup,
              Variant,
              alignment_from_adapter,
              build_defense,
              defense_dir,
              evaluate_adapter,
              measure_defense_run,
              measure_safelora,
              task_examples,
)
from em_interp.defenses.timing import step_time_ratios  # noqa: F401

warnings.warn("em_interp.defense_runs moved to em_interp.defenses.runs; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
