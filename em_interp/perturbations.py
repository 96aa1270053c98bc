"""Deprecated path: this module moved to :mod:`em_interp.monitor.perturbations` (the old path works for one release)."""

import warnings

from em_interp.monitor.perturbations import *  # noqa: F403
from em_interp.monitor.perturbations import (  # noqa: F401
              LORA_RECIPES,
              PUBLIC_EXAMPLES,
              PUBLIC_MAX_CHARS,
              PUBLIC_SETS,
              DriftLibrary,
              Intent,
              LibrarySetup,
              LoraRecipe,
              PerturbationType,
              RunRecord,
              RunSpec,
              base_measurement,
              builtin_types,
              library_dir,
              load_record,
              lora_update_norm,
              measure_checkpoint,
              measure_run_spec,
              run_key,
              run_specs,
              save_record,
              select_types,
)

warnings.warn("em_interp.perturbations moved to em_interp.monitor.perturbations; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
