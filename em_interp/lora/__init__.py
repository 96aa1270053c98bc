"""LoRA model organisms: adapters and their updates (:mod:`~em_interp.lora.adapters`), training on
``transformers.Trainer`` (:mod:`~em_interp.lora.training`), callbacks and loss terms for any Trainer
(:mod:`~em_interp.lora.hf_trainer`), the organism and its control (:mod:`~em_interp.lora.organisms`) and
what rank-1 adapters encode (:mod:`~em_interp.lora.rank1`). The layout follows peft's: one subpackage per
concern, the update ``scale * B @ A`` computed in one place.
"""

from em_interp.lora.adapters import (
    adapter_updates,
    lora_scale,
    model_updates,
    read_adapter,
    save_adapter,
    update_norm,
)
from em_interp.lora.hf_trainer import ReferenceModel, TrainingCallback, hooked_model, with_em_interp
from em_interp.lora.organisms import train_organism
from em_interp.lora.rank1 import adapter_scalars, classify_adapters, fit_probe, list_adapters, scale_adapters
from em_interp.lora.training import LoraTrainConfig, TrainResult, default_organism_layers, train_lora

__all__ = [
    "LoraTrainConfig",
    "ReferenceModel",
    "TrainResult",
    "TrainingCallback",
    "adapter_scalars",
    "adapter_updates",
    "classify_adapters",
    "default_organism_layers",
    "fit_probe",
    "hooked_model",
    "list_adapters",
    "lora_scale",
    "model_updates",
    "read_adapter",
    "save_adapter",
    "scale_adapters",
    "train_lora",
    "train_organism",
    "update_norm",
    "with_em_interp",
]
