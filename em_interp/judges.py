"""Deprecated path: this module moved to :mod:`em_interp.evaluation.judges` (the old path works for one release)."""

import warnings

from em_interp.evaluation.judges import *  # noqa: F403
from em_interp.evaluation.judges import (  # noqa: F401
              EM_ALIGNED_BELOW,
              EM_COHERENT_ABOVE,
              JUDGE_PROMPTS,
              MIN_NUMBER_MASS,
              HTTPJudge,
              Judge,
              JudgeCache,
              JudgeResult,
              JudgeRow,
              JudgeUnavailable,
              LocalJudge,
              MalformedReply,
              fill_prompt,
              is_em,
              judge_answers,
              score_from_top_logprobs,
)

warnings.warn("em_interp.judges moved to em_interp.evaluation.judges; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
