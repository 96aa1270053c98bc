"""The EM study on one model, as a pipeline of self-describing stages.

- :mod:`~em_interp.study.config`: :class:`StudyConfig` and its :class:`Budget` (``quick``, ``standard``);
- :mod:`~em_interp.study.context`: the typed artefacts stages share (:class:`StudyContext`);
- :mod:`~em_interp.study.runner`: :class:`Stage`, plan checking and :func:`run_study` (resumable);
- :mod:`~em_interp.study.records`: the stage files in ``OUT/stages/``;
- :mod:`~em_interp.study.stages`: one module per stage group (base, organisms, directions, transfer).

``em-interp study --out OUT [--quick] [--stages a,b] [--force]`` runs it from the command line;
``em-interp figures OUT --to DIR`` rebuilds its figures from the stage files alone.
"""

from em_interp.study.config import Budget, StudyConfig
from em_interp.study.context import Lazy, StudyContext, StudyPlanError, artefact_names
from em_interp.study.records import StageFileError, StageStore
from em_interp.study.runner import Headline, Stage, assemble, plan_stages, run_study

__all__ = [
    "Budget",
    "Headline",
    "Lazy",
    "Stage",
    "StageFileError",
    "StageStore",
    "StudyConfig",
    "StudyContext",
    "StudyPlanError",
    "artefact_names",
    "assemble",
    "plan_stages",
    "run_study",
]
