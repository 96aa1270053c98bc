"""The contract between the study's runner and its stages: what a stage declares and returns.

A :class:`Stage` declares the artefacts it ``needs`` and ``provides`` (names of
:class:`~em_interp.study.context.StudyContext` attributes), computes a typed result with ``run``,
restores its artefacts from a stored result with ``restore``, and turns a result into its report
section (``section``), its results.json entries (``entries``) and its summary lines (``headlines``,
:class:`Headline`) with pure functions. The stages (:mod:`em_interp.study.stages`) and the runner
(:mod:`em_interp.study.runner`) both import this module; neither imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from em_interp.report import Section
from em_interp.study.config import StudyConfig
from em_interp.study.context import StudyContext

R = TypeVar("R")


@dataclass(frozen=True)
class Headline:
    """One line of the report's summary: a number with its 95% CI where it has one."""

    label: str
    value: float | str
    ci: tuple[float, float] | None = None
    unit: str = ""

    def text(self) -> str:
        """The value (and CI) as the summary prints it."""
        if isinstance(self.value, str):
            return self.value
        ci = f" [{self.ci[0]:+.3f}, {self.ci[1]:+.3f}]" if self.ci is not None else ""
        return f"{self.value:+.3f}{ci}{(' ' + self.unit) if self.unit else ''}"


@dataclass(frozen=True)
class Stage(Generic[R]):
    """One step of the study (see the module docstring for the contract of each function)."""

    name: str
    group: str
    needs: tuple[str, ...]
    provides: tuple[str, ...]
    run: Callable[[StudyContext], R]
    restore: Callable[[StudyContext, R], None]
    section: Callable[[R, StudyConfig], Section]
    entries: Callable[[R], dict[str, Any]]
    headlines: Callable[[R], list[Headline]] = field(default=lambda result: [])


def _no_restore(ctx: StudyContext, result: Any) -> None:
    """For stages that provide nothing."""


NO_RESTORE = _no_restore


