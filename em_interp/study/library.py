"""The study's drift-monitor library: its types, shared setup, runs and trait basis (stage modules never import
each other; the ``perturbations``, ``monitor`` and ``monitor_stress`` stages share these)."""

from __future__ import annotations

import functools
from typing import Any

from em_interp.data import general_questions
from em_interp.monitor.drift import TraitBasis, label_questions, monitor_layer, monitor_prompts, trait_basis
from em_interp.monitor.perturbations import (
    LibrarySetup,
    PerturbationType,
    RunRecord,
    RunSpec,
    builtin_types,
    measure_run_spec,
    run_specs,
    select_types,
)
from em_interp.monitor.sweep import run_sweep, shutdown_local_ray
from em_interp.study.config import StudyConfig


def library_types(config: StudyConfig) -> list[PerturbationType]:
    """The budget's perturbation types (all built-in ones and the public sets found, unless it names some)."""
    types = builtin_types(config.external)
    return select_types(types, config.budget.monitor.types) if config.budget.monitor.types else types


def library_setup(config: StudyConfig, n_layers: int) -> LibrarySetup:
    """What every run of the study's library shares (model, monitor layer, label questions, prompts)."""
    monitor = config.budget.monitor
    return LibrarySetup(config.model, n_layers, monitor_layer(n_layers), tuple(label_questions(monitor.questions)),
                        tuple(monitor_prompts(monitor.prompts, config.external)), config.device)


def library_specs(config: StudyConfig) -> list[RunSpec]:
    """The library's runs: every type of :func:`library_types` at the budget's seeds, type-major."""
    monitor = config.budget.monitor
    return run_specs(library_types(config), range(config.seed, config.seed + monitor.seeds), monitor.steps,
                     monitor.every, monitor.learning_rate)


def measure_specs(config: StudyConfig, specs: list[RunSpec], setup: LibrarySetup) -> list[RunRecord]:
    """Train and measure ``specs`` through the sweep engine (cached per run; Ray with ``config.ray``)."""
    try:
        return run_sweep(functools.partial(measure_run_spec, setup=setup), specs, ray=config.ray,
                         progress=config.progress)
    finally:
        shutdown_local_ray(config.ray)


def monitor_basis(model: Any, config: StudyConfig, layer: int) -> TraitBasis:
    """The monitor's trait basis at ``layer``: trait vectors from the budget's first fitting questions."""
    fit_q = general_questions()[0::3]
    return trait_basis(model, [q.question for q in fit_q[: config.budget.monitor.trait_questions]], layer=layer)
