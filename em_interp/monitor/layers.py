"""The monitor's layer: the library re-read at other layers, and the layer picked on the calibration types alone.

The trait-space monitoring paper reads its traits at one mid-depth layer; which layer carries the drift
best differs between models. Re-running the library's LoRA training per layer would multiply its cost;
the library's runs keep their checkpoints, so :func:`relayer_records` re-reads every checkpoint at any
set of layers in one forward pass per checkpoint, and :func:`select_monitor_layer` picks the layer (and
the monitor's kind) by leave-one-type-out within the calibration types, as the kind is picked
(:func:`em_interp.monitor.scoring.select_monitor_kind`): held-out types are never looked at.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from em_interp.chat import ChatExample
from em_interp.errors import EmInterpError
from em_interp.model import HookedModel
from em_interp.monitor.perturbations import LibrarySetup, RunRecord, RunSpec, train_run
from em_interp.monitor.scoring import CheckpointTable, select_monitor_kind


@dataclass(frozen=True)
class LayerChoice:
    """The picked monitor layer and kind, and every candidate's calibration leave-one-type-out AUROC per kind."""

    layer: int
    kind: str
    #: layer -> kind -> pooled leave-one-type-out AUROC over the calibration rows
    scores: dict[int, dict[str, float]]


def select_monitor_layer(tables: Mapping[int, CheckpointTable], calibration: np.ndarray, dangerous: np.ndarray,
                         names: tuple[str, ...], min_leaf: int = 5, seed: int = 0) -> LayerChoice:
    """The layer (key of ``tables``: that layer's checkpoint table, same rows in the same order) and kind with
    the best leave-one-type-out AUROC within the calibration rows; ties go to the layer listed first.

    ``calibration`` and ``dangerous`` mark rows (the label does not depend on the layer)."""
    if not tables:
        raise EmInterpError("tables is empty: give at least one layer's checkpoint table")
    sizes = {layer: len(t) for layer, t in tables.items()}
    if len(set(sizes.values())) != 1 or next(iter(sizes.values())) != len(calibration):
        raise EmInterpError(f"every layer's table needs one row per checkpoint ({len(calibration)}), got {sizes}")
    first = next(iter(tables.values()))
    for layer, t in tables.items():
        if not (np.array_equal(t.run, first.run) and np.array_equal(t.step, first.step)):
            raise EmInterpError(f"layer {layer}'s table lists other checkpoints than layer {next(iter(tables))}'s")
    picks = {layer: select_monitor_kind(table, calibration, dangerous, names, min_leaf, seed)
             for layer, table in tables.items()}
    order = list(picks)
    # the best AUROC (NaN: worst); among equals, the layer listed first
    layer = max(order, key=lambda x: (float(np.nan_to_num(picks[x][1][picks[x][0]], nan=-1.0)), -order.index(x)))
    return LayerChoice(layer, picks[layer][0], {x: per_kind for x, (_, per_kind) in picks.items()})


def monitor_activations(model: HookedModel, setup: LibrarySetup, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The monitor prompts' last-prompt-token ``resid_post`` activations of ``model`` at each of ``layers`` (one
    forward pass), as :func:`em_interp.monitor.perturbations.measure_checkpoint` reads them at the library's layer.

    That function keeps its own copy: it is part of every cached library run's key, so moving it would rebuild them."""
    from em_interp.activations import cache_residuals

    read = {layer: model.check_layer(layer, "layers") for layer in layers}
    prompts = [ChatExample(p.question, None, p.system) for p in setup.prompts]
    cached = cache_residuals(model, prompts, layers=sorted(set(read.values())), hook="resid_post", reduction="last_prompt",
                             batch_size=32, progress=False)
    return {layer: cached[read[layer]].float().cpu() for layer in layers}


def relayer_records(records: Sequence[RunRecord], specs: Sequence[RunSpec], setup: LibrarySetup,
                    layers: Sequence[int], base_model: HookedModel) -> dict[int, list[RunRecord]]:
    """The library's ``records`` with their monitor activations re-read at each of ``layers`` (labels unchanged).

    ``specs`` are the runs the records came from (same order); each run's saved checkpoints are read once,
    every layer from the same forward pass (a run whose folder is gone is retrained to the same weights);
    step 0 of every run is ``base_model`` (the library's base model, loaded)."""
    from em_interp.lora.adapters import load_adapter_weights
    from em_interp.model import load_model

    if len(records) != len(specs):
        raise EmInterpError(f"{len(records)} records for {len(specs)} run specs")
    if not layers:
        raise EmInterpError("layers is empty: name at least one layer to re-read")
    base = monitor_activations(base_model, setup, layers)
    out: dict[int, list[RunRecord]] = {layer: [] for layer in layers}
    for record, spec in zip(records, specs):
        if record.run != spec.name:
            raise EmInterpError(f"record {record.run} does not belong to run spec {spec.name}")
        result, checkpoints = train_run(spec, setup)
        by_step = dict(checkpoints)
        missing = [s for s in record.steps[1:] if s not in by_step]
        if missing:
            raise EmInterpError(f"run {spec.name}: no saved checkpoint for steps {missing}")
        model = load_model(setup.model, adapter=result.adapter_dir, device=setup.device, progress=False)
        acts: dict[int, list[torch.Tensor]] = {layer: [base[layer]] for layer in layers}
        for step in record.steps[1:]:
            load_adapter_weights(model, by_step[step])
            for layer, a in monitor_activations(model, setup, layers).items():
                acts[layer].append(a)
        for layer in layers:
            out[layer].append(replace(record, activations=torch.stack(acts[layer])))
    return out
