"""Deprecated path: this module moved to :mod:`em_interp.lora.hf_trainer` (the old path works for one release)."""

import warnings

from em_interp.lora.hf_trainer import *  # noqa: F403
from em_interp.lora.hf_trainer import (  # noqa: F401
              CHECKPOINT_MARKER,
              EmInterpTrainerMixin,
              ReferenceModel,
              TrainingCallback,
              attach_hooked,
              hooked_model,
              latest_checkpoint,
              with_em_interp,
)

warnings.warn("em_interp.hf_trainer moved to em_interp.lora.hf_trainer; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
