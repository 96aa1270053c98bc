"""Run a plan of stages: check it whole, reuse finished stages, write each result as it ends.

The runner knows stages only through their contract (:mod:`em_interp.study.contract`) and imports
none of them: the stages to run are an argument (:func:`em_interp.study.run_study` passes the default
pipeline). A :class:`~em_interp.study.contract.Stage` declares the artefacts it ``needs`` and ``provides`` (names of
:class:`~em_interp.study.context.StudyContext` attributes), computes a typed result with ``run``,
restores its artefacts from a stored result with ``restore``, and turns a result into its report
section (``section``), its results.json entries (``entries``) and its summary lines
(``headlines``) with pure functions: the report and the figures are rebuilt from stage files alone.

:func:`run_stages` checks the whole plan before running anything, then, stage by stage, reuses the
stored result when its inputs are unchanged (its key: the study identity, the code, and the
digests of the stages it depends on) or runs it and writes its file at once. A study killed in
stage k resumes at k. ``results.json`` and ``report.html`` are assembled from the stage files.
"""

from __future__ import annotations

import platform
import random
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from em_interp.io import atomic_write_json, sha256_json
from em_interp.provenance import library_versions, package_code_hash
from em_interp.report import Section, write_report
from em_interp.study.config import StudyConfig
from em_interp.study.context import StudyContext, StudyPlanError, artefact_names
from em_interp.study.contract import Headline, Stage
from em_interp.study.lock import study_lock
from em_interp.study.records import StageFileError, StageRecord, StageStore
from em_interp.version import __version__


def plan_stages(stages: Sequence[Stage[Any]], selected: Sequence[str] | None = None) -> list[Stage[Any]]:
    """The stages to run, in pipeline order: all, or ``selected`` plus the stages they need.

    Checks the whole plan: stage names unique and known, every need and provide a known artefact,
    every need provided by an earlier stage. Errors name the stage and the artefact.
    """
    known = artefact_names()
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise StudyPlanError(f"stage names are not unique: {names}")
    provider: dict[str, Stage[Any]] = {}
    for stage in stages:
        for name in (*stage.needs, *stage.provides):
            if name not in known:
                raise StudyPlanError(f"stage {stage.name!r} declares unknown artefact {name!r}; known: {sorted(known)}")
        for name in stage.needs:
            if name not in provider:
                raise StudyPlanError(f"stage {stage.name!r} needs {name!r}, which no earlier stage provides")
        for name in stage.provides:
            provider.setdefault(name, stage)
    if selected is None:
        return list(stages)
    unknown = [s for s in selected if s not in names]
    if unknown:
        raise StudyPlanError(f"--stages: unknown stage(s) {unknown}; stages are {names}")
    wanted: set[str] = set()
    todo = list(selected)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        stage = stages[names.index(name)]
        todo.extend(provider[need].name for need in stage.needs)
    return [s for s in stages if s.name in wanted]


def dependencies(stages: Sequence[Stage[Any]]) -> dict[str, list[str]]:
    """For each stage, the earlier stages that provide what it needs."""
    provider: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for stage in stages:
        deps[stage.name] = sorted({provider[n] for n in stage.needs if n in provider})
        for name in stage.provides:
            provider.setdefault(name, stage.name)
    return deps


def stage_key(store: StageStore, stage: str, upstream: dict[str, str]) -> str:
    """The key of a stage's inputs: study identity, code and libraries, and its upstream digests."""
    return sha256_json({"study": store.study_key, "stage": stage, "code": package_code_hash(),
                        "libraries": library_versions(), "upstream": upstream})


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _log(config: StudyConfig, message: str) -> None:
    if config.progress:
        print(message, file=sys.stderr, flush=True)


def run_stages(config: StudyConfig, stages: Sequence[Stage[Any]], only: Sequence[str] | None = None,
               force: bool = False) -> dict[str, Any]:
    """Run (or resume) the study; write the stage files, ``results.json`` and ``report.html``.

    ``stages`` is the pipeline (:func:`em_interp.study.stages.default_stages` for the EM study); ``only`` runs
    those stages and what they need; ``force`` discards the stage files of another study in ``config.out``.
    Returns the results.json content.
    """
    plan = plan_stages(stages, only)
    with study_lock(config.out):  # one study at a time per folder: a second one is refused, naming the holder
        return _run_locked(config, stages, plan, force)


def _run_locked(config: StudyConfig, stages: Sequence[Stage[Any]], plan: Sequence[Stage[Any]],
                force: bool) -> dict[str, Any]:
    """:func:`run_stages` once the folder's lock is held."""
    deps = dependencies(stages)
    store = StageStore(config.out, config.identity(), force=force)
    store.claim()
    ctx = StudyContext(config)
    records: dict[str, StageRecord] = {}
    ran: list[str] = []
    total = time.perf_counter()
    for stage in plan:
        key = stage_key(store, stage.name, {d: records[d].digest for d in deps[stage.name]})
        record = store.load(stage.name, key)
        _seed_everything(config.seed)
        ctx.restrict(stage.name, frozenset((*stage.needs, *stage.provides)))
        try:
            if record is not None:
                try:
                    stage.restore(ctx, record.result)
                    _log(config, f"em-interp: stage {stage.name}: reusing {store.json_path(stage.name)}")
                except StageFileError as exc:
                    warnings.warn(f"stage file {store.json_path(stage.name)} cannot be reused ({exc}); rerunning stage "
                                  f"{stage.name!r}", stacklevel=2)
                    record = None
            if record is None:
                _log(config, f"em-interp: stage {stage.name} ...")
                start = time.perf_counter()
                result = stage.run(ctx)
                record = store.save(stage.name, key, result, time.perf_counter() - start)
                ran.append(stage.name)
            missing = [n for n in stage.provides if not ctx.has(n)]
            if missing:
                raise StudyPlanError(f"stage {stage.name!r} did not provide {missing}")
        finally:
            ctx.restrict("", None)
        records[stage.name] = record
    for stage in stages:  # stages outside the plan whose stored results are still current join the report
        if stage.name not in records and all(d in records for d in deps[stage.name]):
            stored = store.load(stage.name, stage_key(store, stage.name, {d: records[d].digest for d in deps[stage.name]}))
            if stored is not None:
                records[stage.name] = stored
    return assemble(config, stages, records, ran=ran, seconds=time.perf_counter() - total)


def assemble(config: StudyConfig, stages: Sequence[Stage[Any]], records: dict[str, StageRecord],
             ran: Sequence[str] = (), seconds: float | None = None) -> dict[str, Any]:
    """Write ``results.json`` and ``report.html`` from stage records (pipeline order); return the results."""
    results: dict[str, Any] = {}
    sections: list[Section] = []
    headlines: list[tuple[str, Headline]] = []
    for stage in stages:
        record = records.get(stage.name)
        if record is None:
            continue
        for key, value in stage.entries(record.result).items():
            if isinstance(value, dict) and isinstance(results.get(key), dict):
                results[key] = {**results[key], **value}
            else:
                results[key] = value
        sections.append(stage.section(record.result, config))
        headlines += [(stage.group, h) for h in stage.headlines(record.result)]
    timings = {name: r.seconds for name, r in records.items()}
    results["study"] = {
        "config": config.to_dict(), "package_version": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "stages": [s.name for s in stages if s.name in records],
        "ran_this_time": list(ran), "seconds": {**timings, **({"this_run": round(seconds, 3)} if seconds is not None else {})},
    }
    out = Path(config.out)
    atomic_write_json(out / "results.json", results)
    summary = Section("Summary", [f"em_interp {__version__}; budget {config.budget.name}; seed {config.seed}; "
                                  f"domain {config.domain}. Each line is one section's headline number (95% CI over "
                                  "questions where shown; nats/token for EM scores)."],
                      table=[{"section": group, "measure": h.label, "value": h.text()} for group, h in headlines])
    run = Section("Run", ["Seconds per stage when it was computed (reused stages keep their first time)."],
                  rows={"seconds per stage": results["study"]["seconds"]})
    model_name = results.get("model", {}).get("name", config.model)
    write_report(out / "report.html", f"em_interp study: emergent misalignment on {model_name}", [summary, *sections, run])
    return results
