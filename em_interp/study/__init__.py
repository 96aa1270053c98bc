"""The EM study on one model, as a pipeline of self-describing stages.

- :mod:`~em_interp.study.config`: :class:`StudyConfig` and its :class:`Budget` (``quick``, ``standard``);
- :mod:`~em_interp.study.context`: the typed artefacts stages share (:class:`StudyContext`);
- :mod:`~em_interp.study.contract`: :class:`Stage` and :class:`Headline`, what the runner and the stages share;
- :mod:`~em_interp.study.runner`: plan checking and :func:`run_stages` (resumable); it imports no stage;
- :mod:`~em_interp.study.records`: the stage files in ``OUT/stages/``;
- :mod:`~em_interp.study.stages`: one module per stage group (base_model, organisms, directions, transfer, monitor,
  defenses).

``em-interp study --out OUT [--quick] [--stages a,b] [--force]`` runs it from the command line;
``em-interp figures OUT --to DIR`` rebuilds its figures from the stage files alone.
"""

from collections.abc import Sequence
from typing import Any

from em_interp.study.config import Budget, StudyConfig
from em_interp.study.context import Lazy, StudyContext, StudyPlanError, artefact_names
from em_interp.study.contract import Headline, Stage
from em_interp.study.records import StageFileError, StageStore
from em_interp.study.runner import assemble, plan_stages, run_stages

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
    "run_stages",
    "run_study",
]


def run_study(config: StudyConfig, stages: Sequence[Stage[Any]] | None = None, only: Sequence[str] | None = None,
              force: bool = False) -> dict[str, Any]:
    """Run (or resume) the EM study: :func:`~em_interp.study.runner.run_stages` on ``stages`` (default: every
    stage of :func:`em_interp.study.stages.default_stages`); ``only`` runs those stages and what they need;
    ``force`` discards the stage files of another study in ``config.out``. Returns the results.json content."""
    if stages is None:
        from em_interp.study.stages import default_stages

        stages = default_stages()
    return run_stages(config, stages, only=only, force=force)
