"""Deprecated path: this module moved to :mod:`em_interp.lora.organisms` (the old path works for one release)."""

import warnings

from em_interp.lora.organisms import *  # noqa: F403
from em_interp.lora.organisms import organism_dir, train_organism  # noqa: F401

warnings.warn("em_interp.organisms moved to em_interp.lora.organisms; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
