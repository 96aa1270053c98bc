"""Deprecated path: this module moved to :mod:`em_interp.lora.adapters` (the old path works for one release)."""

import warnings

from em_interp.lora.adapters import *  # noqa: F403
from em_interp.lora.adapters import (  # noqa: F401
              WEIGHTS,
              ModuleName,
              adapter_tensors,
              adapter_updates,
              load_adapter_weights,
              lora_parameters,
              lora_scale,
              model_updates,
              module_of,
              parse_module_name,
              read_adapter,
              save_adapter,
              update_norm,
)

warnings.warn("em_interp.adapters moved to em_interp.lora.adapters; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
