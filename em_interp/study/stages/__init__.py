"""The study's stages, one module per group (``base_model``: the model, cache and base EM score; ``organisms``;
``directions``, ``steering``; ``transfer``; ``perturbations``, ``monitor`` and ``monitor_stress``; ``defenses``; ``judging``); :func:`default_stages` lists them in pipeline order."""

from __future__ import annotations

from typing import Any

from em_interp.study.contract import Stage


def default_stages() -> tuple[Stage[Any], ...]:
    """Every stage of the study, in order."""
    from em_interp.study.stages import (
        base_model,
        defenses,
        directions,
        judging,
        monitor,
        monitor_stress,
        organisms,
        perturbations,
        steering,
        transfer,
    )

    return (*base_model.STAGES, *organisms.STAGES, *directions.STAGES, *steering.STAGES, *transfer.STAGES, *perturbations.STAGES, *monitor.STAGES, *monitor_stress.STAGES, *defenses.STAGES, *judging.STAGES)
