"""Deprecated path: this module moved to :mod:`em_interp.lora.training` (the old path works for one release)."""

import warnings

from em_interp.lora.training import *  # noqa: F403
from em_interp.lora.training import (  # noqa: F401
              ORGANISM_GROUP_STARTS,
              ORGANISM_REFERENCE_LAYERS,
              TRAINING_MODULES,
              LoraTrainConfig,
              StepOrderSampler,
              TrainResult,
              batch_indices,
              build_lora_model,
              default_organism_layers,
              make_batch,
              train_lora,
)

warnings.warn("em_interp.training moved to em_interp.lora.training; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
