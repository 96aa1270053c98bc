"""The ``perturbations`` stage (Nghiem et al., 2026): the drift monitor's library of fine-tuning runs.

It trains and measures the library (:mod:`em_interp.monitor.perturbations`) through the sweep engine
(:mod:`em_interp.monitor.sweep`: this process, or Ray with ``--ray``); each run is cached, so a killed
build resumes at the run it was in. The ``monitor`` stage (:mod:`em_interp.study.stages.monitor`)
evaluates the monitor on it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from em_interp.monitor.perturbations import (
    DriftLibrary,
    RunRecord,
)
from em_interp.report import Section
from em_interp.study.config import StudyConfig
from em_interp.study.context import StudyContext
from em_interp.study.contract import Stage
from em_interp.study.library import library_setup, library_specs, library_types, measure_specs
from em_interp.study.records import record_type

record_type(RunRecord)
record_type(DriftLibrary)


def run_perturbations(ctx: StudyContext) -> DriftLibrary:
    """Train and measure every run of the library (cached per run; Ray with ``config.ray``)."""
    config = ctx.config
    setup = library_setup(config, ctx.model.n_layers)
    layer = setup.layer
    types = library_types(config)
    start = time.perf_counter()
    records = measure_specs(config, library_specs(config), setup)
    library = DriftLibrary(layer, [{"name": t.name, "intent": t.intent, "lora": t.lora, "source": t.source}
                                   for t in types], [q.id for q in setup.questions],
                           [p.question for p in setup.prompts], records, round(time.perf_counter() - start, 2))
    ctx.drift_library = library
    return library


def restore_perturbations(ctx: StudyContext, result: DriftLibrary) -> None:
    """The measured library."""
    ctx.drift_library = result


def perturbations_section(r: DriftLibrary, config: StudyConfig) -> Section:
    """Report section of the library: one row per type with its runs' final EM shift."""
    rows = []
    for t in r.types:
        runs = [x for x in r.records if x.type == t["name"]]
        rows.append({"type": t["name"], "intent": t["intent"], "LoRA": t["lora"], "runs": len(runs),
                     "final EM shift (mean over seeds)": round(float(np.mean([x.em_shift[-1] for x in runs])), 4),
                     "train s/run": round(float(np.mean([x.seconds_train for x in runs])), 1)})
    steps = r.records[0].steps
    return Section(
        "Drift monitor: perturbation library",
        [f"{len(r.records)} fine-tuning runs of {len(r.types)} types, checkpoints at steps {list(steps[1:])}, built in "
         f"{r.seconds:.0f} s. Each checkpoint is labelled by its judge-free EM shift over the base model on "
         f"{len(r.question_ids)} held-out general questions (paired per question), and measured at layer {r.layer} "
         f"on {len(r.prompts)} monitor prompts."], table=rows)


def perturbations_entries(r: DriftLibrary) -> dict[str, Any]:
    """results.json entry of the library (the monitor stage's entry carries the evaluation)."""
    return {"monitor_library": {"types": [t["name"] for t in r.types], "runs": [x.run for x in r.records],
                                "layer": r.layer, "label_questions": len(r.question_ids), "prompts": len(r.prompts),
                                "seconds": r.seconds}}


STAGES: tuple[Stage[Any], ...] = (
    Stage("perturbations", "drift monitor", needs=("model",), provides=("drift_library",), run=run_perturbations,
          restore=restore_perturbations, section=perturbations_section, entries=perturbations_entries),
)
