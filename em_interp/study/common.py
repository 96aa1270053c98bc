"""Helpers several stage groups use (stage modules never import each other)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from em_interp.activations import ResidualCache, cache_residuals
from em_interp.chat import ChatExample
from em_interp.data import PairedQuestion, domain_questions, general_questions
from em_interp.evaluation.judge_free import QuestionScores
from em_interp.io import sha256_json
from em_interp.loading import cache_dir
from em_interp.model import HookedModel
from em_interp.options import Reduction
from em_interp.provenance import computation_key
from em_interp.study.config import StudyConfig


def eval_questions(config: StudyConfig) -> list[PairedQuestion]:
    """The general evaluation set at the config's budget (every ``eval_stride``-th question)."""
    return general_questions()[:: config.budget.base.eval_stride]


def domain_eval_questions(config: StudyConfig) -> list[PairedQuestion]:
    """The held-out questions of the config's domain at its budget (every ``domain_stride``-th)."""
    return domain_questions(config.domain)[:: config.budget.base.domain_stride]


def split_questions(questions: Sequence[PairedQuestion]) -> tuple[list[PairedQuestion], list[PairedQuestion]]:
    """(fit, held-out): every third question fits directions, the rest are held out."""
    return list(questions[0::3]), [q for i, q in enumerate(questions) if i % 3]


def cached_residuals(model: HookedModel, examples: Sequence[ChatExample], reduction: Reduction,
                     progress: bool = False) -> ResidualCache:
    """All-layer residuals, stored under the user cache keyed by the model's weights and the examples."""
    key = sha256_json({"model": model.fingerprint(), "examples": [e.to_dict() for e in examples],
                       "reduction": reduction, "hook": "resid_post",
                       "computed_by": computation_key("em_interp.activations")})
    return cache_residuals(model, examples, reduction=reduction, batch_size=16, progress=progress,
                           out_dir=cache_dir() / "activations" / key[:32])


def subset_scores(scores: QuestionScores, questions: Sequence[PairedQuestion]) -> np.ndarray:
    """Per-question EM scores of ``questions``, taken from scores of a larger set (no rescoring)."""
    index = {qid: i for i, qid in enumerate(scores.ids)}
    return scores.per_question[[index[q.id] for q in questions]]


def steering_layer(directions: dict[int, torch.Tensor], preferred: int) -> tuple[int, torch.Tensor]:
    """The layer the steering and defenses stages act at, and its unit direction: ``preferred`` (the best
    layer) unless its organism-minus-control direction is (near) zero, then the layer of the longest one."""
    layer = preferred
    if float(directions[layer].norm()) < 1e-6:
        layer = max(directions, key=lambda i: float(directions[i].norm()))
    return layer, directions[layer] / directions[layer].norm()
