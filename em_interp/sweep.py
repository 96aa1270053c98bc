"""Deprecated path: this module moved to :mod:`em_interp.monitor.sweep` (the old path works for one release)."""

import warnings

from em_interp.monitor.sweep import *  # noqa: F403
from em_interp.monitor.sweep import CONNECT_TIMEOUT, R, T, check_ray_address, run_sweep, shutdown_local_ray  # noqa: F401

warnings.warn("em_interp.sweep moved to em_interp.monitor.sweep; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
