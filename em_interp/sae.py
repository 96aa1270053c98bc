"""Deprecated path: this module moved to :mod:`em_interp.monitor.sae` (the old path works for one release)."""

import warnings

from em_interp.monitor.sae import *  # noqa: F403
from em_interp.monitor.sae import ActivationSAE, train_topk_sae  # noqa: F401

warnings.warn("em_interp.sae moved to em_interp.monitor.sae; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
