"""The steering stage: the base model steered along the organism-minus-control direction, against a
norm-matched random direction, with the benign cost (Soligo et al., 2025)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from em_interp.data import benign_items
from em_interp.directions import (
    random_directions,
)
from em_interp.evaluation.judge_free import benign_loglik, bootstrap_ci, score_questions
from em_interp.interventions import steer
from em_interp.plotting import line_by_layer
from em_interp.report import Section
from em_interp.study.common import steering_layer, subset_scores
from em_interp.study.config import StudyConfig
from em_interp.study.context import StudyContext
from em_interp.study.contract import NO_RESTORE, Headline, Stage
from em_interp.study.records import record_type


@record_type
@dataclass(frozen=True)
class SteeringResult:
    """EM score of the steered base model, a random direction's, and the benign cost, per strength."""

    layer: int
    residual_norm: float
    fractions: list[float]
    em_scores: list[float]
    random_em_scores: list[float]
    benign_changes: list[float]
    n_questions: int
    n_benign: int
    #: EM change at the strongest strength vs the plain model, paired per question, with its 95% CI
    top_change: float
    top_change_ci: tuple[float, float]


def run_steering(ctx: StudyContext) -> SteeringResult:
    """Steer the base model along the organism-minus-control direction; random direction and benign cost per strength."""
    config = ctx.config
    base, seed, budget = ctx.model, config.seed, config.budget
    layer, unit = steering_layer(ctx.ablation_directions, ctx.best_layer)
    norm = ctx.resid_norms[layer]
    random_unit = random_directions(base.d_model, 1, 1.0, seed=seed + 7)[0]
    questions = ctx.held_questions[1::2][: budget.directions.intervention_questions]
    benign = benign_items()[:: budget.directions.benign_stride]
    em, em_random, benign_change = [], [], []
    benign_plain = benign_loglik(base, benign)
    plain = steered = subset_scores(ctx.base_scores, questions)
    for f in budget.directions.steering_fractions:
        if f == 0:  # no steering: the plain model, for both
            em.append(float(plain.mean()))
            em_random.append(em[-1])
            benign_change.append(0.0)
            continue
        with steer(base, unit, f * norm, layer=layer):
            steered = score_questions(base, questions).per_question
            em.append(float(steered.mean()))
            benign_change.append((benign_loglik(base, benign) - benign_plain) / abs(benign_plain))
        with steer(base, random_unit, f * norm, layer=layer):
            em_random.append(float(score_questions(base, questions).per_question.mean()))
    return SteeringResult(layer, norm, list(budget.directions.steering_fractions), em, em_random, benign_change, len(questions),
                          len(benign), float((steered - plain).mean()), bootstrap_ci(steered - plain, seed=seed))


def steering_section(r: SteeringResult, config: StudyConfig) -> Section:
    """Report section of the steering stage."""
    fig = line_by_layer(r.fractions, {"direction: EM score": r.em_scores, "norm-matched random: EM score": r.random_em_scores,
                                      "direction: benign log-lik change (fraction)": r.benign_changes},
                        f"Steering the base model at layer {r.layer}", "EM score (nats/token) / fraction")
    fig.update_layout(xaxis_title="alpha / mean residual norm")
    return Section(
        "Steering the base model",
        [f"Add alpha x the unit organism - control direction at layer {r.layer} at every position (alpha as a fraction of "
         f"the mean residual norm there, {r.residual_norm:.1f}); EM score on {r.n_questions} held-out questions, benign "
         f"change on {r.n_benign} benign answers, and the same strengths along a random unit direction."],
        table=[{"alpha / norm": f, "EM score": e, "random EM score": x, "benign change": b}
               for f, e, x, b in zip(r.fractions, r.em_scores, r.random_em_scores, r.benign_changes)],
        figures=[fig])


def steering_entries(r: SteeringResult) -> dict[str, Any]:
    """results.json entry of the steering stage."""
    return {"steering": {
        "alphas": [f * r.residual_norm for f in r.fractions], "alpha_fraction_of_residual_norm": r.fractions,
        "layer": r.layer, "em_scores": r.em_scores, "benign_loglik_changes": r.benign_changes,
        "random_em_scores": r.random_em_scores, "n_questions": r.n_questions, "n_benign": r.n_benign, "model": "base",
        "top_em_change": r.top_change, "top_em_change_ci": list(r.top_change_ci)}}


def steering_headlines(r: SteeringResult) -> list[Headline]:
    """Summary line of the steering stage."""
    return [Headline(f"steering the base model at {r.fractions[-1]:g} x residual norm: EM change (random direction: "
                     f"{r.random_em_scores[-1] - r.random_em_scores[0]:+.3f})", r.top_change, r.top_change_ci,
                     unit="nats/token")]


STAGES: tuple[Stage[Any], ...] = (
    Stage("steering", "directions", needs=("model", "base_scores", "best_layer", "ablation_directions", "resid_norms",
                                           "held_questions"),
          provides=(), run=run_steering, restore=NO_RESTORE, section=steering_section, entries=steering_entries,
          headlines=steering_headlines),
)
