"""Deprecated path: this module moved to :mod:`em_interp.lora.rank1` (the old path works for one release)."""

import warnings

from em_interp.lora.rank1 import *  # noqa: F403
from em_interp.lora.rank1 import (  # noqa: F401
              AdapterInfo,
              AdapterScalars,
              ProbeResult,
              Scalars,
              adapter_scalars,
              classify_adapters,
              coefficient_figure,
              fit_probe,
              list_adapters,
              scale_adapters,
              steering_figure,
)

warnings.warn("em_interp.rank1 moved to em_interp.lora.rank1; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
