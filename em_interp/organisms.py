"""Model organisms: a misaligned organism and its control, trained once and cached.

The organism is fine-tuned on a domain's misaligned answers; the control on the aligned answers to
the same prompts, with the same seed, steps and everything else. Trained adapters live in
``<cache>/organisms/<name>-<hash>/`` where the hash covers the base model, the config and the data,
so a rerun with unchanged inputs reuses them.
"""

from __future__ import annotations

from pathlib import Path

from em_interp.data import domain_dataset
from em_interp.io import sha256_json
from em_interp.loading import DEFAULT_MODEL, cache_dir
from em_interp.training import LoraTrainConfig, TrainingCallback, TrainResult, train_lora


def organism_dir(name: str, base: str, config: LoraTrainConfig, data_key: str) -> Path:
    """Cache folder of an organism run (keyed by base, config and data)."""
    digest = sha256_json({"base": base, "config": config.to_dict(), "data": data_key})[:12]
    return cache_dir() / "organisms" / f"{name}-{digest}"


def train_organism(
    variant: str = "misaligned",
    domain: str = "medical",
    base: str = DEFAULT_MODEL,
    config: LoraTrainConfig | None = None,
    callbacks: tuple[TrainingCallback, ...] = (),
    progress: bool = True,
    out_dir: str | Path | None = None,
) -> TrainResult:
    """Train (or reuse) an organism on the built-in ``domain`` training split, answered ``variant``-ly.

    ``variant="misaligned"`` gives the EM organism, ``"aligned"`` its control.
    """
    config = config or LoraTrainConfig()
    data = domain_dataset(domain, variant, "train")
    name = f"{domain}-{variant}"
    out = Path(out_dir) if out_dir is not None else organism_dir(name, base, config, f"builtin:{name}:train")
    return train_lora(base, data, config, out, callbacks=callbacks, progress=progress)
