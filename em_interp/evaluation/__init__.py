"""The EM measures: the judge-free log-prob score (:mod:`~em_interp.evaluation.judge_free`), sampling
(:mod:`~em_interp.evaluation.generation`) and LLM judges (:mod:`~em_interp.evaluation.judges`).

The judge-free score's public names are importable from here as before (``from em_interp.evaluation
import em_score``).
"""

from em_interp.evaluation.judge_free import (
    EMScore,
    QuestionScores,
    answer_logprobs,
    benign_loglik,
    bootstrap_ci,
    em_score,
    paired_shift,
    ratio_ci,
    score_questions,
    sign_flip_p_value,
    summarize,
)

__all__ = [
    "EMScore",
    "QuestionScores",
    "answer_logprobs",
    "benign_loglik",
    "bootstrap_ci",
    "em_score",
    "paired_shift",
    "ratio_ci",
    "score_questions",
    "sign_flip_p_value",
    "summarize",
]
