"""The study's shared state: typed artefacts that stages provide and need.

Each artefact is a declared attribute of :class:`StudyContext` (an :class:`Artefact` descriptor
with its type and meaning). A stage names the artefacts it needs and provides; the runner checks
those names against this class before anything runs, and while a stage runs it may read only what
it declared (reading anything else, or something not yet provided, raises
:class:`StudyPlanError` naming it). Expensive artefacts restored from stage files (models) are
:class:`Lazy`: built on first use, so a rerun that reuses every stage loads no model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

from torch import Tensor

from em_interp.data import PairedQuestion
from em_interp.errors import EmInterpError
from em_interp.evaluation.judge_free import QuestionScores
from em_interp.model import HookedModel
from em_interp.monitor.perturbations import DriftLibrary
from em_interp.study.config import StudyConfig

T = TypeVar("T")


class StudyPlanError(EmInterpError):
    """A stage plan that cannot run: an unknown, misspelt or missing artefact or stage."""


class Lazy(Generic[T]):
    """A value built on first use (e.g. a model reloaded from its adapter folder)."""

    def __init__(self, build: Callable[[], T]) -> None:
        self.build = build


class Artefact(Generic[T]):
    """A typed slot of :class:`StudyContext`; reading it before a stage provides it is an error."""

    def __init__(self, doc: str) -> None:
        self.doc = doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, ctx: None, owner: type) -> Artefact[T]: ...
    @overload
    def __get__(self, ctx: StudyContext, owner: type) -> T: ...
    def __get__(self, ctx: StudyContext | None, owner: type) -> Artefact[T] | T:
        if ctx is None:
            return self
        return ctx._read(self.name)

    def __set__(self, ctx: StudyContext, value: T | Lazy[T]) -> None:
        ctx._write(self.name, value)


class StudyContext:
    """Artefacts shared by the stages, plus the config. See :func:`artefact_names`."""

    model: Artefact[HookedModel] = Artefact("the base model behind hooks")
    organism: Artefact[HookedModel] = Artefact("the base model with the misaligned organism's adapters")
    control: Artefact[HookedModel] = Artefact("the base model with the aligned control's adapters")
    organism_adapter: Artefact[Path] = Artefact("folder of the organism's peft adapter")
    base_scores: Artefact[QuestionScores] = Artefact("per-answer log-probs of the base model on the evaluation questions")
    organism_scores: Artefact[QuestionScores] = Artefact("the same for the organism")
    control_scores: Artefact[QuestionScores] = Artefact("the same for the control")
    best_layer: Artefact[int] = Artefact("layer where the organism-minus-base direction separates best (fit prompts)")
    ablation_directions: Artefact[dict[int, Tensor]] = Artefact("organism-minus-control answer direction per layer")
    control_means: Artefact[dict[int, Tensor]] = Artefact("the control's mean answer residual per layer")
    resid_norms: Artefact[dict[int, float]] = Artefact("the base model's mean answer residual norm per layer")
    held_questions: Artefact[list[PairedQuestion]] = Artefact("evaluation questions not used to fit directions")
    drift_library: Artefact[DriftLibrary] = Artefact("the drift monitor's perturbation library: measured runs")
    drift_monitor: Artefact[Path | None] = Artefact("folder of the fitted drift monitor and trait basis (None: not evaluable)")

    def __init__(self, config: StudyConfig) -> None:
        self.config = config
        self._values: dict[str, Any] = {}
        self._allowed: frozenset[str] | None = None
        self._stage = ""

    def _read(self, name: str) -> Any:
        if self._allowed is not None and name not in self._allowed:
            raise StudyPlanError(f"stage {self._stage!r} reads artefact {name!r} without declaring it in needs")
        if name not in self._values:
            raise StudyPlanError(f"artefact {name!r} has not been provided (stage {self._stage or '-'!r})")
        value = self._values[name]
        if isinstance(value, Lazy):
            value = self._values[name] = value.build()
        return value

    def _write(self, name: str, value: Any) -> None:
        if self._allowed is not None and name not in self._allowed:
            raise StudyPlanError(f"stage {self._stage!r} writes artefact {name!r} without declaring it in provides")
        self._values[name] = value

    def has(self, name: str) -> bool:
        """Whether artefact ``name`` has been provided."""
        return name in self._values

    def restrict(self, stage: str, names: frozenset[str] | None) -> None:
        """Let only ``names`` be read or written (the running stage's declarations); None lifts it."""
        self._stage, self._allowed = stage, names


def artefact_names() -> dict[str, str]:
    """Every artefact a stage may need or provide, with its meaning."""
    return {name: value.doc for name, value in vars(StudyContext).items() if isinstance(value, Artefact)}
