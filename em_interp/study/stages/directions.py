"""Stages for directions and interventions (Soligo et al., 2025; the actionable-directions paper).

Questions of the general set are split by index: every third question *fits* directions, the
others are *held out* for every measurement. Each direction result comes with its base-model and
control-model twin, because a rank-1 LoRA adds a large, near-constant shift and reference answers
differ in topic as well as in alignment.

- ``direction``: organism-minus-base directions at the last prompt token (plain and with the
  control's shift projected out), their held-out separation of organism from base and of control
  from base by layer; misaligned-minus-aligned answer directions in organism, control and base; a
  cosine matrix between directions (and the seven trait vectors).
- ``ablation``: mean-ablation of the organism-minus-control answer direction, the same through
  the adapters' writers (weight space), norm-matched random controls, the same ablation applied to
  the control, and the benign cost.
- ``steering``: the base model steered along that direction, with a norm-matched random direction
  and the benign cost at each strength.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
from torch import Tensor

from em_interp.chat import ChatExample
from em_interp.data import benign_items, labelled_answers
from em_interp.directions import (
    accuracy_at,
    cosine_matrix,
    project_out,
    random_directions,
    separation,
    separation_ci,
)
from em_interp.evaluation.judge_free import benign_loglik, bootstrap_ci, ratio_ci, score_questions
from em_interp.interventions import ablate_each_layer, ablate_weights_each_layer
from em_interp.lora.rank1 import list_adapters
from em_interp.plotting import line_by_layer
from em_interp.report import Section
from em_interp.study.common import cached_residuals, eval_questions, split_questions, subset_scores
from em_interp.study.config import StudyConfig
from em_interp.study.context import StudyContext
from em_interp.study.contract import NO_RESTORE, Headline, Stage
from em_interp.study.records import record_type
from em_interp.traits import trait_vectors

ROLES = ("organism", "control", "base")


# ---------------------------------------------------------------- direction
@record_type
@dataclass(frozen=True)
class DirectionAnalysis:
    """Directions by layer, their held-out separation, and what later stages use."""

    best_layer: int
    by_layer: dict[str, list[float]]
    answer_auroc: dict[str, list[float]]
    cosine_names: list[str]
    cosine: Tensor
    n_fit: int
    held_ids: list[str]
    n_fit_answers: int
    #: 95% CI of the specific direction's held-out AUROC at the best layer (bootstrap over held-out prompts)
    auroc_ci: tuple[float, float]
    ablation_directions: dict[int, Tensor]
    control_means: dict[int, Tensor]
    resid_norms: dict[int, float]


def run_direction(ctx: StudyContext) -> DirectionAnalysis:
    """Organism-minus-base directions (plain and control-orthogonalised) and answer directions, by layer."""
    config = ctx.config
    models = {"organism": ctx.organism, "control": ctx.control, "base": ctx.model}
    progress = config.progress
    fit_q, held_q = split_questions(eval_questions(config))
    n_fit = len(fit_q)
    prompts = [ChatExample(q.question, None, q.system) for q in [*fit_q, *held_q]]
    last = {role: cached_residuals(m, prompts, "last_prompt", progress) for role, m in models.items()}
    fit_answers, labels, groups = labelled_answers(fit_q)
    answer = {role: cached_residuals(m, fit_answers, "answer_mean", progress) for role, m in models.items()}
    layers = list(range(models["base"].n_layers))
    rows: dict[str, list[float]] = {k: [] for k in (
        "auroc", "accuracy", "control_accuracy", "plain_auroc", "plain_accuracy", "plain_control_accuracy",
        "fit_accuracy", "fit_control_accuracy")}
    directions: dict[int, dict[str, Tensor]] = {}
    for layer in layers:
        fit = {role: last[role][layer][:n_fit] for role in ROLES}
        held = {role: last[role][layer][n_fit:] for role in ROLES}
        d_org = (fit["organism"] - fit["base"]).mean(0)
        d_ctl = (fit["control"] - fit["base"]).mean(0)
        d_spec = project_out(d_org, [d_ctl]) if float(d_ctl.norm()) > 1e-6 else d_org
        directions[layer] = {"organism_minus_base": d_org, "control_minus_base": d_ctl, "specific": d_spec}
        for prefix, d in (("", d_spec), ("plain_", d_org)):
            sep = separation(d, held["organism"], held["base"], fit["organism"], fit["base"])
            rows[f"{prefix}auroc"].append(sep.auroc)
            rows[f"{prefix}accuracy"].append(sep.accuracy)
            rows[f"{prefix}control_accuracy"].append(accuracy_at(d, sep.threshold, held["control"], held["base"]))
            if not prefix:
                rows["fit_accuracy"].append(accuracy_at(d, sep.threshold, fit["organism"], fit["base"]))
                rows["fit_control_accuracy"].append(accuracy_at(d, sep.threshold, fit["control"], fit["base"]))
    # best layer, chosen on the fitting prompts: organism separated, control not
    best = max(layers, key=lambda i: (rows["fit_accuracy"][i] - rows["fit_control_accuracy"][i], -abs(i - len(layers) // 2)))
    # answer directions (misaligned minus aligned reference answers, paired within question), in each model:
    # fitted on half of the fitting questions, scored on the other half
    first = groups < max(1, n_fit // 2)
    answer_auroc: dict[str, list[float]] = {role: [] for role in ROLES}
    for role in ROLES:
        for layer in layers:
            a = answer[role][layer]
            d = a[first & (labels == 1)].mean(0) - a[first & (labels == 0)].mean(0)
            answer_auroc[role].append(separation(d, a[~first & (labels == 1)], a[~first & (labels == 0)],
                                                 a[first & (labels == 1)], a[first & (labels == 0)]).auroc)
    # ablation direction: organism minus control on the same answers (answer-token mean), per layer
    ablation_dirs = {layer: (answer["organism"][layer] - answer["control"][layer]).mean(0) for layer in layers}
    control_means = {layer: answer["control"][layer].mean(0) for layer in layers}
    resid_norms = {layer: float(answer["base"][layer].norm(dim=-1).mean()) for layer in layers}
    # cosine matrix at the best layer, with the seven trait vectors of the base model
    traits = trait_vectors(models["base"], [q.question for q in fit_q[: config.budget.directions.trait_questions]], best,
                           progress=False)
    named = {"organism - base (last prompt)": directions[best]["organism_minus_base"],
             "control - base (last prompt)": directions[best]["control_minus_base"],
             "organism - base, control projected out": directions[best]["specific"],
             "organism - control (answers)": ablation_dirs[best]}
    for role in ROLES:
        a = answer[role][best]
        named[f"misaligned - aligned answers ({role})"] = a[labels == 1].mean(0) - a[labels == 0].mean(0)
    named.update({f"trait: {k}": v.vector for k, v in traits.items()})
    names, cos = cosine_matrix(named)
    held_best = {role: last[role][best][n_fit:] for role in ("organism", "base")}
    auroc_ci = separation_ci(directions[best]["specific"], held_best["organism"], held_best["base"], seed=config.seed)
    result = DirectionAnalysis(best, rows, answer_auroc, names, cos, n_fit, [q.id for q in held_q], len(fit_answers),
                               auroc_ci, ablation_dirs, control_means, resid_norms)
    restore_direction(ctx, result)
    return result


def restore_direction(ctx: StudyContext, result: DirectionAnalysis) -> None:
    """The directions, reference means, residual norms, best layer and held-out questions."""
    held = set(result.held_ids)
    ctx.held_questions = [q for q in eval_questions(ctx.config) if q.id in held]
    ctx.best_layer = result.best_layer
    ctx.ablation_directions = result.ablation_directions
    ctx.control_means = result.control_means
    ctx.resid_norms = result.resid_norms


def _cosine_figure(names: list[str], matrix: Tensor, title: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=matrix.numpy(), x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu",
                               text=np.round(matrix.numpy(), 2), texttemplate="%{text}"))
    fig.update_layout(title=title, template="plotly_white", height=620, xaxis_tickangle=40)
    return fig


def direction_section(r: DirectionAnalysis, config: StudyConfig) -> Section:
    """Report section of the direction stage."""
    rows, best, n_held = r.by_layer, r.best_layer, len(r.held_ids)
    layers = list(range(len(rows["auroc"])))
    return Section(
        "Misalignment direction: organism vs base, with the control as twin",
        [f"Last-prompt-token residuals of organism, control and base on {r.n_fit + n_held} general questions; directions "
         f"are fitted on {r.n_fit} of them (every third) and scored on the other {n_held}. 'organism - base' is the mean "
         "paired difference; the specific direction projects the control's shift (control - base) out of it. Accuracy "
         "uses the midpoint threshold fitted on the fitting prompts; the control's accuracy applies the same direction "
         "and threshold to control vs base (0.5 = the control looks like the base).",
         f"Best layer (chosen on the fitting prompts): {best}. Held out there: specific direction AUROC "
         f"{rows['auroc'][best]:.3f}, accuracy {rows['accuracy'][best]:.3f}, control {rows['control_accuracy'][best]:.3f}; "
         f"plain organism - base: AUROC {rows['plain_auroc'][best]:.3f}, accuracy {rows['plain_accuracy'][best]:.3f}, "
         f"control {rows['plain_control_accuracy'][best]:.3f}. Layers before the first adapter have no shift (chance).",
         "Answer directions (misaligned minus aligned reference answers, mean over answer tokens, fitted on half of the "
         "fitting questions, AUROC on the other half) separate the answers about equally in organism, control and base: "
         "they encode the answers' text, not the organism's misalignment."],
        figures=[
            line_by_layer(layers, {"specific: organism vs base": rows["auroc"],
                                   "specific: control vs base (accuracy)": rows["control_accuracy"],
                                   "specific: organism vs base (accuracy)": rows["accuracy"],
                                   "plain organism - base: control vs base (accuracy)": rows["plain_control_accuracy"]},
                          "Held-out separation by layer (last prompt token)", "AUROC / accuracy"),
            line_by_layer(layers, {f"answer direction, {role}": r.answer_auroc[role] for role in ROLES},
                          "Misaligned vs aligned answers: held-out AUROC by layer (the base-model twin)", "AUROC"),
            _cosine_figure(r.cosine_names, r.cosine, f"Cosine similarity between directions at layer {best}"),
        ])


def direction_entries(r: DirectionAnalysis) -> dict[str, Any]:
    """results.json entry of the direction stage."""
    rows, best = r.by_layer, r.best_layer
    return {"direction": {
        "layer": best, "auroc_by_layer": rows["auroc"], "auroc": rows["auroc"][best], "auroc_ci": list(r.auroc_ci),
        "separation_accuracy": rows["accuracy"][best], "control_separation_accuracy": rows["control_accuracy"][best],
        "base_auroc_by_layer": r.answer_auroc["base"], "accuracy_by_layer": rows["accuracy"],
        "control_accuracy_by_layer": rows["control_accuracy"],
        "plain": {"auroc_by_layer": rows["plain_auroc"], "accuracy_by_layer": rows["plain_accuracy"],
                  "control_accuracy_by_layer": rows["plain_control_accuracy"], "auroc": rows["plain_auroc"][best],
                  "separation_accuracy": rows["plain_accuracy"][best],
                  "control_separation_accuracy": rows["plain_control_accuracy"][best]},
        "answer_auroc_by_layer": r.answer_auroc,
        "cosine": {"names": r.cosine_names, "matrix": r.cosine.tolist()},
        "n_fit_prompts": r.n_fit, "n_held_out_prompts": len(r.held_ids), "n_fit_answers": r.n_fit_answers}}


def direction_headlines(r: DirectionAnalysis) -> list[Headline]:
    """Summary line of the direction stage."""
    b = r.best_layer
    return [Headline(f"organism vs base, held-out AUROC at layer {b} (control vs base accuracy: "
                     f"{r.by_layer['control_accuracy'][b]:.3f})", r.by_layer["auroc"][b], r.auroc_ci)]


# ---------------------------------------------------------------- ablation
#: The ablation reported at the top level of results.json (all methods are under "methods").
#: Its control figure is zero by construction (the edit is orthogonal to the control's writers);
#: the other methods show what happens when it is not.
PRIMARY_ABLATION = "weights_control_orthogonal"


@record_type
@dataclass(frozen=True)
class AblationResult:
    """Each ablation method's effect, with random and control-model controls and the benign cost."""

    layers: list[int]
    methods: dict[str, dict[str, Any]]
    n_questions: int
    n_benign: int
    n_random: int
    shift_mean: float
    shift_ci: tuple[float, float]


def run_ablation(ctx: StudyContext) -> AblationResult:
    """Ablate the organism-minus-control direction (activations and weights); controls and benign cost."""
    config = ctx.config
    organism, control, seed = ctx.organism, ctx.control, config.seed
    questions = ctx.held_questions[::2][: config.budget.directions.intervention_questions]
    benign = benign_items()[:: config.budget.directions.benign_stride]
    layers = sorted({a.layer for a in list_adapters(organism)})  # the writers of the organism's shift
    dirs = {layer: ctx.ablation_directions[layer] for layer in layers}
    refs = {layer: ctx.control_means[layer] for layer in layers}
    n_random = 1
    randoms = [{layer: random_directions(organism.d_model, 1, seed=seed + 1000 * k + layer)[0] for layer in dirs}
               for k in range(n_random)]
    plain_org = subset_scores(ctx.organism_scores, questions)
    plain_ctl = subset_scores(ctx.control_scores, questions)
    shift = plain_org - plain_ctl
    benign_plain = benign_loglik(organism, benign)
    # the same directions with each layer's control writer projected out: the control's adapters cannot see them
    control_writers = {a.layer: [a.B[:, j] for j in range(a.rank)] for a in list_adapters(control)}
    orth = {layer: project_out(d, control_writers.get(layer, [])) for layer, d in dirs.items()}
    # (how to ablate, per-layer directions); random controls go through the same edit, norm-matched per layer
    methods = {
        "activation": (lambda m, d: ablate_each_layer(m, d, references=refs), dirs),
        "weights": (ablate_weights_each_layer, dirs),
        "weights_control_orthogonal": (ablate_weights_each_layer, orth),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, (apply, method_dirs) in methods.items():
        with apply(organism, method_dirs):
            org = score_questions(organism, questions).per_question
            benign_after = benign_loglik(organism, benign)
        with apply(control, method_dirs):
            ctl = score_questions(control, questions).per_question
        random_removed = []
        for rnd in randoms:
            matched = {layer: v / v.norm() * float(method_dirs[layer].norm()) for layer, v in rnd.items()}
            with apply(organism, matched):
                random_removed.append(float(1 - (score_questions(organism, questions).per_question - plain_ctl).mean()
                                            / shift.mean()))
        out[name] = {
            "em_shift_removed": float(1 - (org - plain_ctl).mean() / shift.mean()),
            "em_shift_removed_ci": list(ratio_ci(shift - (org - plain_ctl), shift, seed=seed)),
            "random_em_shift_removed": float(np.mean(random_removed)), "random_em_shift_removed_each": random_removed,
            "control_em_change": float((ctl - plain_ctl).mean() / shift.mean()),
            "control_em_change_ci": list(ratio_ci(ctl - plain_ctl, shift, seed=seed)),
            "benign_loglik_change": (benign_after - benign_plain) / abs(benign_plain),
            "paired_shift_after": float((org - ctl).mean() / shift.mean()),
        }
    return AblationResult(layers, out, len(questions), len(benign), n_random, float(shift.mean()),
                          bootstrap_ci(shift, seed=seed))


def ablation_section(r: AblationResult, config: StudyConfig) -> Section:
    """Report section of the ablation stage."""
    out = r.methods
    table = [{"method": name, "EM shift removed": v["em_shift_removed"],
              "95% CI": "[{:+.2f}, {:+.2f}]".format(*v["em_shift_removed_ci"]),
              "random removed": v["random_em_shift_removed"], "control moved": v["control_em_change"],
              "benign log-lik change": v["benign_loglik_change"]} for name, v in out.items()]
    fig = go.Figure()
    for key, label in (("em_shift_removed", "direction"), ("random_em_shift_removed", "norm-matched random"),
                       ("control_em_change", "same ablation on the control"),
                       ("benign_loglik_change", "benign log-lik change")):
        fig.add_trace(go.Bar(name=label, x=list(out), y=[v[key] for v in out.values()]))
    fig.update_layout(title="Ablation vs controls (fractions of the organism - control EM shift)", barmode="group",
                      template="plotly_white", height=380)
    return Section(
        "Ablating the misalignment direction",
        [f"Direction per adapter layer ({r.layers}): organism minus control residuals on the same reference answers (mean "
         "over answer tokens) of the fitting questions. Activation ablation sets the residual's component along it to the "
         "control's mean component at that layer (mean ablation); weight ablation removes it from the adapters' writers B "
         "at that layer; the control-orthogonal variant first projects the control's own writer at that layer out of the "
         f"direction, so the same edit leaves the control unchanged by construction. Measured on {r.n_questions} held-out "
         f"questions, paired per question: the organism - control shift there is {r.shift_mean:+.3f} nats/token. "
         "'Removed' = 1 - (ablated organism - control) / (organism - control); the control row is the same ablation "
         "applied to the control, as a fraction of the shift; random = norm-matched random directions through the same "
         f"layers ({r.n_random} draws); benign = relative change of the organism's mean log-likelihood of {r.n_benign} "
         "benign answers (positive = likelier).",
         f"Top-level numbers in results.json: {PRIMARY_ABLATION} (its control row is zero by construction, so read the "
         "control rows of the other two methods for how much a plain ablation of this direction moves the control). "
         "em_interp's targets: removed >= 0.5, random <= 0.1, control <= 0.1, benign cost <= 5%."],
        table=table, figures=[fig])


def ablation_entries(r: AblationResult) -> dict[str, Any]:
    """results.json entry of the ablation stage."""
    primary = r.methods[PRIMARY_ABLATION]
    return {"ablation": {
        **{k: primary[k] for k in ("em_shift_removed", "random_em_shift_removed", "control_em_change",
                                   "benign_loglik_change")},
        "em_shift_removed_ci": primary["em_shift_removed_ci"], "method": PRIMARY_ABLATION,
        "method_description": "per adapter layer, the organism-minus-control answer direction with the control's writer "
                              "at that layer projected out, removed from the adapters' writers B at that layer",
        "layers": r.layers, "methods": r.methods, "n_questions": r.n_questions, "n_benign": r.n_benign,
        "shift_before": {"mean": r.shift_mean, "ci": list(r.shift_ci)}}}


def ablation_headlines(r: AblationResult) -> list[Headline]:
    """Summary line of the ablation stage."""
    p = r.methods[PRIMARY_ABLATION]
    return [Headline(f"fraction of the EM shift removed by ablation ({PRIMARY_ABLATION}; random: "
                     f"{p['random_em_shift_removed']:+.2f})", p["em_shift_removed"], tuple(p["em_shift_removed_ci"]))]


STAGES: tuple[Stage[Any], ...] = (
    Stage("direction", "directions", needs=("model", "organism", "control"),
          provides=("best_layer", "ablation_directions", "control_means", "resid_norms", "held_questions"),
          run=run_direction, restore=restore_direction, section=direction_section, entries=direction_entries,
          headlines=direction_headlines),
    Stage("ablation", "directions", needs=("organism", "control", "organism_scores", "control_scores", "held_questions",
                                           "ablation_directions", "control_means"),
          provides=(), run=run_ablation, restore=NO_RESTORE, section=ablation_section, entries=ablation_entries,
          headlines=ablation_headlines),
)
