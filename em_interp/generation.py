"""Deprecated path: this module moved to :mod:`em_interp.evaluation.generation` (the old path works for one release)."""

import warnings

from em_interp.evaluation.generation import *  # noqa: F403
from em_interp.evaluation.generation import sample_answers  # noqa: F401

warnings.warn("em_interp.generation moved to em_interp.evaluation.generation; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
