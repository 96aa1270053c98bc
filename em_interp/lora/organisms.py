"""Model organisms: a misaligned organism and its control, trained once and cached.

The organism is fine-tuned on a domain's misaligned answers; the control on the aligned answers to
the same prompts, with the same seed, steps and everything else. Trained adapters live in
``<cache>/organisms/<name>-<hash>/`` where the hash covers the base model, the config, the data, the
training code and the library versions (:mod:`em_interp.provenance`), so a rerun with unchanged
inputs reuses them and anything else retrains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from em_interp.data import domain_dataset
from em_interp.io import sha256_json
from em_interp.loading import DEFAULT_MODEL, cache_dir
from em_interp.lora.training import (
    TRAINING_MODULES,
    LoraTrainConfig,
    TrainingCallback,
    TrainResult,
    precision,
    train_lora,
)
from em_interp.provenance import computation_key


def organism_dir(name: str, base: str, config: LoraTrainConfig, data_key: str, run_precision: str = "cpu:float32") -> Path:
    """Cache folder of an organism run (keyed by base, config, data, device kind and dtype, training code and
    library versions)."""
    digest = sha256_json({"base": base, "config": config.to_dict(), "data": data_key, "precision": run_precision,
                          "computed_by": computation_key(*TRAINING_MODULES)})[:12]
    return cache_dir() / "organisms" / f"{name}-{digest}"


def train_organism(
    variant: str = "misaligned",
    domain: str = "medical",
    base: str = DEFAULT_MODEL,
    config: LoraTrainConfig | None = None,
    callbacks: tuple[TrainingCallback, ...] = (),
    progress: bool = True,
    out_dir: str | Path | None = None,
    device: str = "cpu",
    **train_kwargs: Any,
) -> TrainResult:
    """Train (or reuse) an organism on the built-in ``domain`` training split, answered ``variant``-ly.

    ``variant="misaligned"`` gives the EM organism, ``"aligned"`` its control. ``device`` and
    ``train_kwargs`` (``dtype``, ``gradient_accumulation_steps``, ``report_to``) go to
    :func:`~em_interp.lora.training.train_lora`.
    """
    config = config or LoraTrainConfig()
    data = domain_dataset(domain, variant, "train")
    name = f"{domain}-{variant}"
    data_key = f"builtin:{name}:train:{sha256_json([e.to_dict() for e in data])[:16]}"
    out = Path(out_dir) if out_dir is not None else organism_dir(name, base, config, data_key,
                                                                          precision(device, train_kwargs.get("dtype")))
    return train_lora(base, data, config, out, callbacks=callbacks, progress=progress, device=device, **train_kwargs)
