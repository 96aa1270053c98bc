"""The study's stages, one module per group; :func:`default_stages` lists them in pipeline order."""

from __future__ import annotations

from typing import Any

from em_interp.study.runner import Stage


def default_stages() -> tuple[Stage[Any], ...]:
    """Every stage of the study, in order."""
    from em_interp.study.stages import base, defenses, directions, monitor, organisms, transfer

    return (*base.STAGES, *organisms.STAGES, *directions.STAGES, *transfer.STAGES, *monitor.STAGES, *defenses.STAGES)
