"""Study stages for directions and interventions (seeds 001 and 002).

Questions of the general set are split by index: every third question *fits* directions
(``fit``), the others are *held out* for every measurement. Each direction result comes with its
base-model and control-model twin, because a rank-1 LoRA adds a large, near-constant shift and
reference answers differ in topic as well as in alignment.

- :func:`stage_direction`: organism-minus-base directions at the last prompt token (plain and
  with the control's shift projected out), their held-out separation of organism from base and of
  control from base by layer; misaligned-minus-aligned answer directions in organism, control and
  base; a cosine matrix between directions (and the seven trait vectors).
- :func:`stage_ablation`: mean-ablation of the organism-minus-control answer direction, the
  same through the adapters' writers (weight space), norm-matched random controls, the same
  ablation applied to the control, and the benign cost.
- :func:`stage_steering`: the base model steered along that direction, with a norm-matched
  random direction and the benign cost at each strength.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from torch import Tensor

from em_interp.activations import ResidualCache, cache_residuals
from em_interp.chat import ChatExample
from em_interp.data import PairedQuestion, benign_items, labelled_answers
from em_interp.directions import cosine_matrix, project_out, separation
from em_interp.evaluation import QuestionScores, answer_logprobs, bootstrap_ci, score_questions
from em_interp.interventions import ablate, ablate_weights, random_directions, steer
from em_interp.io import sha256_json
from em_interp.loading import cache_dir
from em_interp.model import HookedModel
from em_interp.plotting import line_by_layer
from em_interp.provenance import computation_key
from em_interp.rank1 import list_adapters
from em_interp.report import Section
from em_interp.study import StudyContext, eval_questions
from em_interp.traits import trait_vectors

ROLES = ("organism", "control", "base")


def split_questions(questions: Sequence[PairedQuestion]) -> tuple[list[PairedQuestion], list[PairedQuestion]]:
    """(fit, held-out): every third question fits directions, the rest are held out."""
    return list(questions[0::3]), [q for i, q in enumerate(questions) if i % 3]


def cached_residuals(model: HookedModel, examples: Sequence[ChatExample], reduction: str,
                     progress: bool = False) -> ResidualCache:
    """All-layer residuals, stored under the user cache keyed by the model's weights and the examples."""
    key = sha256_json({"model": model.fingerprint(), "examples": [e.to_dict() for e in examples],
                       "reduction": reduction, "hook": "resid_post",
                       "computed_by": computation_key("em_interp.activations")})
    return cache_residuals(model, examples, reduction=reduction, batch_size=16, progress=progress,
                           out_dir=cache_dir() / "activations" / key[:32])


def _models(ctx: StudyContext) -> dict[str, HookedModel]:
    assert ctx.model is not None
    return {"organism": ctx.extras["organism"], "control": ctx.extras["control"], "base": ctx.model}


def _safe_separation(direction: Tensor, pos: Tensor, neg: Tensor, fit_pos: Tensor, fit_neg: Tensor) -> tuple[float, float, float]:
    """(AUROC, accuracy, threshold) of a direction, or chance values where the direction is zero."""
    if float(direction.norm()) < 1e-6:
        return 0.5, 0.5, 0.0
    sep = separation(direction, pos, neg, fit_pos, fit_neg)
    return sep.auroc, sep.accuracy, sep.threshold


def _accuracy_at(direction: Tensor, threshold: float, pos: Tensor, neg: Tensor) -> float:
    """Accuracy of calling ``pos`` rows positive and ``neg`` rows negative at a fixed threshold."""
    if float(direction.norm()) < 1e-6:
        return 0.5
    unit = direction / direction.norm()
    return float(((pos @ unit > threshold).sum() + (neg @ unit <= threshold).sum()) / (len(pos) + len(neg)))


def stage_direction(ctx: StudyContext) -> None:
    """Organism-minus-base directions (plain and control-orthogonalised) and answer directions, by layer."""
    models = _models(ctx)
    progress = ctx.config.progress
    fit_q, held_q = split_questions(eval_questions(ctx.config.quick))
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
        acts = {role: last[role][layer] for role in ROLES}
        fit = {role: a[:n_fit] for role, a in acts.items()}
        held = {role: a[n_fit:] for role, a in acts.items()}
        d_org = (fit["organism"] - fit["base"]).mean(0)
        d_ctl = (fit["control"] - fit["base"]).mean(0)
        d_spec = project_out(d_org, [d_ctl]) if float(d_ctl.norm()) > 1e-6 else d_org
        directions[layer] = {"organism_minus_base": d_org, "control_minus_base": d_ctl, "specific": d_spec}
        for prefix, d in (("", d_spec), ("plain_", d_org)):
            auroc, acc, thr = _safe_separation(d, held["organism"], held["base"], fit["organism"], fit["base"])
            rows[f"{prefix}auroc"].append(auroc)
            rows[f"{prefix}accuracy"].append(acc)
            rows[f"{prefix}control_accuracy"].append(_accuracy_at(d, thr, held["control"], held["base"]))
            if not prefix:
                rows["fit_accuracy"].append(_accuracy_at(d, thr, fit["organism"], fit["base"]))
                rows["fit_control_accuracy"].append(_accuracy_at(d, thr, fit["control"], fit["base"]))
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
            auroc, _, _ = _safe_separation(d, a[~first & (labels == 1)], a[~first & (labels == 0)],
                                           a[first & (labels == 1)], a[first & (labels == 0)])
            answer_auroc[role].append(auroc)
    # ablation direction: organism minus control on the same answers (answer-token mean), per layer
    ablation_dirs = {layer: (answer["organism"][layer] - answer["control"][layer]).mean(0) for layer in layers}
    control_means = {layer: answer["control"][layer].mean(0) for layer in layers}
    resid_norms = {layer: float(answer["base"][layer].norm(dim=-1).mean()) for layer in layers}
    ctx.extras.update(ablation_dirs=ablation_dirs, control_means=control_means, resid_norms=resid_norms,
                      held_questions=held_q, best_layer=best)
    # cosine matrix at the best layer, with the seven trait vectors of the base model
    traits = trait_vectors(models["base"], [q.question for q in fit_q[:8]], best, progress=False)
    named = {"organism - base (last prompt)": directions[best]["organism_minus_base"],
             "control - base (last prompt)": directions[best]["control_minus_base"],
             "organism - base, control projected out": directions[best]["specific"],
             "organism - control (answers)": ablation_dirs[best]}
    for role in ROLES:
        a = answer[role][best]
        named[f"misaligned - aligned answers ({role})"] = a[labels == 1].mean(0) - a[labels == 0].mean(0)
    named.update({f"trait: {k}": v.vector for k, v in traits.items()})
    names, cos = cosine_matrix(named)
    ctx.results["direction"] = {
        "layer": best,
        "auroc_by_layer": rows["auroc"],
        "auroc": rows["auroc"][best],
        "separation_accuracy": rows["accuracy"][best],
        "control_separation_accuracy": rows["control_accuracy"][best],
        "base_auroc_by_layer": answer_auroc["base"],
        "accuracy_by_layer": rows["accuracy"],
        "control_accuracy_by_layer": rows["control_accuracy"],
        "plain": {"auroc_by_layer": rows["plain_auroc"], "accuracy_by_layer": rows["plain_accuracy"],
                  "control_accuracy_by_layer": rows["plain_control_accuracy"], "auroc": rows["plain_auroc"][best],
                  "separation_accuracy": rows["plain_accuracy"][best],
                  "control_separation_accuracy": rows["plain_control_accuracy"][best]},
        "answer_auroc_by_layer": {role: answer_auroc[role] for role in ROLES},
        "cosine": {"names": names, "matrix": cos.tolist()},
        "n_fit_prompts": n_fit, "n_held_out_prompts": len(held_q), "n_fit_answers": len(fit_answers),
    }
    r = ctx.results["direction"]
    ctx.sections.append(Section(
        "Misalignment direction: organism vs base, with the control as twin",
        [f"Last-prompt-token residuals of organism, control and base on {len(prompts)} general questions; directions "
         f"are fitted on {n_fit} of them (every third) and scored on the other {len(held_q)}. 'organism - base' is the "
         "mean paired difference; the specific direction projects the control's shift (control - base) out of it. "
         "Accuracy uses the midpoint threshold fitted on the fitting prompts; the control's accuracy applies the same "
         "direction and threshold to control vs base (0.5 = the control looks like the base).",
         f"Best layer (chosen on the fitting prompts): {best}. Held out there: specific direction AUROC {r['auroc']:.3f}, "
         f"accuracy {r['separation_accuracy']:.3f}, control {r['control_separation_accuracy']:.3f}; plain organism - base: "
         f"AUROC {r['plain']['auroc']:.3f}, accuracy {r['plain']['separation_accuracy']:.3f}, control "
         f"{r['plain']['control_separation_accuracy']:.3f}. Layers before the first adapter have no shift (chance).",
         "Answer directions (misaligned minus aligned reference answers, mean over answer tokens, fitted on half of the "
         "fitting questions, AUROC on the other half) separate the answers about equally in organism, control and "
         "base: they encode the answers' text, not the organism's misalignment."],
        figures=[
            line_by_layer(layers, {"specific: organism vs base": rows["auroc"], "specific: control vs base (accuracy)": rows["control_accuracy"],
                                   "specific: organism vs base (accuracy)": rows["accuracy"],
                                   "plain organism - base: control vs base (accuracy)": rows["plain_control_accuracy"]},
                          "Held-out separation by layer (last prompt token)", "AUROC / accuracy"),
            line_by_layer(layers, {f"answer direction, {role}": answer_auroc[role] for role in ROLES},
                          "Misaligned vs aligned answers: held-out AUROC by layer (the base-model twin)", "AUROC"),
            _cosine_figure(names, cos, f"Cosine similarity between directions at layer {best}"),
        ],
    ))


def _cosine_figure(names: list[str], matrix: Tensor, title: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=matrix.numpy(), x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu",
                               text=np.round(matrix.numpy(), 2), texttemplate="%{text}"))
    fig.update_layout(title=title, template="plotly_white", height=620, xaxis_tickangle=40)
    return fig


@contextlib.contextmanager
def _mean_ablation(model: HookedModel, directions: dict[int, Tensor], references: dict[int, Tensor]) -> Iterator[None]:
    """Mean-ablate each layer's own direction at that layer (component set to the reference's)."""
    with contextlib.ExitStack() as stack:
        for layer, d in directions.items():
            stack.enter_context(ablate(model, d, layers=[layer], reference=references[layer]))
        yield


@contextlib.contextmanager
def _weight_ablation(model: HookedModel, directions: dict[int, Tensor]) -> Iterator[None]:
    """Remove each adapter layer's own direction from the adapters' writers at that layer."""
    with contextlib.ExitStack() as stack:
        for layer, d in directions.items():
            stack.enter_context(ablate_weights(model, d, layers=[layer]))
        yield


def _ratio_ci(numerator: np.ndarray, denominator: np.ndarray, seed: int) -> tuple[float, float]:
    """Bootstrap CI (over questions) of mean(numerator) / mean(denominator)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(numerator), size=(5000, len(numerator)))
    ratios = numerator[idx].mean(1) / denominator[idx].mean(1)
    return float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


def ablation_layers(model: HookedModel) -> list[int]:
    """Layers of the organism's adapters (the writers of its shift)."""
    return sorted({a.layer for a in list_adapters(model)})


def _subset(scores: QuestionScores, questions: Sequence[PairedQuestion]) -> np.ndarray:
    """Per-question EM scores of ``questions``, taken from scores of a larger set (no rescoring)."""
    index = {qid: i for i, qid in enumerate(scores.ids)}
    return scores.per_question[[index[q.id] for q in questions]]


#: The ablation reported at the top level of results.json (all methods are under "methods").
#: Its control figure is zero by construction (the edit is orthogonal to the control's writers);
#: the other methods show what happens when it is not.
PRIMARY_ABLATION = "weights_control_orthogonal"


def stage_ablation(ctx: StudyContext) -> None:
    """Ablate the organism-minus-control direction (activations and weights); controls and benign cost."""
    models = _models(ctx)
    seed = ctx.config.seed
    held = ctx.extras["held_questions"]
    questions = held[::2][: 10 if ctx.config.quick else 30]
    benign = benign_items()[:: 4 if ctx.config.quick else 2]
    layers = ablation_layers(models["organism"])
    dirs = {layer: ctx.extras["ablation_dirs"][layer] for layer in layers}
    refs = {layer: ctx.extras["control_means"][layer] for layer in layers}
    n_random = 1
    randoms = [{layer: random_directions(models["base"].d_model, 1, seed=seed + 1000 * k + layer)[0] for layer in dirs}
               for k in range(n_random)]
    plain = {role: _subset(ctx.scores[role], questions) for role in ("organism", "control")}
    shift = plain["organism"] - plain["control"]
    benign_plain = float(answer_logprobs(models["organism"], benign).mean())
    # the same directions with each layer's control writer projected out: the control's adapters cannot see them
    control_writers = {a.layer: [a.B[:, j] for j in range(a.rank)] for a in list_adapters(models["control"])}
    orth = {layer: project_out(d, control_writers.get(layer, [])) for layer, d in dirs.items()}
    # (how to ablate, per-layer directions); random controls go through the same edit, norm-matched per layer
    methods = {
        "activation": (lambda m, d: _mean_ablation(m, d, refs), dirs),
        "weights": (_weight_ablation, dirs),
        "weights_control_orthogonal": (_weight_ablation, orth),
    }
    out: dict[str, Any] = {}
    for name, (apply, method_dirs) in methods.items():
        with apply(models["organism"], method_dirs):
            org = score_questions(models["organism"], questions).per_question
            benign_after = float(answer_logprobs(models["organism"], benign).mean())
        with apply(models["control"], method_dirs):
            ctl = score_questions(models["control"], questions).per_question
        random_removed = []
        for rnd in randoms:
            matched = {layer: v / v.norm() * float(method_dirs[layer].norm()) for layer, v in rnd.items()}
            with apply(models["organism"], matched):
                random_removed.append(float(1 - (score_questions(models["organism"], questions).per_question - plain["control"]).mean()
                                            / shift.mean()))
        removed = 1 - (org - plain["control"]).mean() / shift.mean()
        lo, hi = _ratio_ci(shift - (org - plain["control"]), shift, seed)
        out[name] = {
            "em_shift_removed": float(removed), "em_shift_removed_ci": [lo, hi],
            "random_em_shift_removed": float(np.mean(random_removed)), "random_em_shift_removed_each": random_removed,
            "control_em_change": float((ctl - plain["control"]).mean() / shift.mean()),
            "control_em_change_ci": list(_ratio_ci(ctl - plain["control"], shift, seed)),
            "benign_loglik_change": (benign_after - benign_plain) / abs(benign_plain),
            "paired_shift_after": float((org - ctl).mean() / shift.mean()),
        }
    primary = out[PRIMARY_ABLATION]
    ctx.results["ablation"] = {
        **{k: primary[k] for k in ("em_shift_removed", "random_em_shift_removed", "control_em_change", "benign_loglik_change")},
        "em_shift_removed_ci": primary["em_shift_removed_ci"],
        "method": PRIMARY_ABLATION,
        "method_description": "per adapter layer, the organism-minus-control answer direction with the control's writer at "
                              "that layer projected out, removed from the adapters' writers B at that layer",
        "layers": layers, "methods": out, "n_questions": len(questions), "n_benign": len(benign),
        "shift_before": {"mean": float(shift.mean()), "ci": list(bootstrap_ci(shift, seed=seed))},
    }
    table = [{"method": name, "EM shift removed": v["em_shift_removed"],
              "95% CI": "[{:+.2f}, {:+.2f}]".format(*v["em_shift_removed_ci"]),
              "random removed": v["random_em_shift_removed"], "control moved": v["control_em_change"],
              "benign log-lik change": v["benign_loglik_change"]} for name, v in out.items()]
    fig = go.Figure()
    for key, label in (("em_shift_removed", "direction"), ("random_em_shift_removed", "norm-matched random"),
                       ("control_em_change", "same ablation on the control"), ("benign_loglik_change", "benign log-lik change")):
        fig.add_trace(go.Bar(name=label, x=list(out), y=[v[key] for v in out.values()]))
    fig.update_layout(title="Ablation vs controls (fractions of the organism - control EM shift)", barmode="group",
                      template="plotly_white", height=380)
    ctx.sections.append(Section(
        "Ablating the misalignment direction",
        [f"Direction per adapter layer ({layers}): organism minus control residuals on the same reference answers (mean "
         f"over answer tokens) of the fitting questions. Activation ablation sets the residual's component along it to the "
         f"control's mean component at that layer (mean ablation); weight ablation removes it from the adapters' writers B "
         "at that layer; the control-orthogonal variant first projects the control's own writer at that layer out of the "
         "direction, so the same edit leaves the control unchanged by construction. Measured on "
         f"{len(questions)} held-out questions, paired per question: the organism - control shift "
         f"there is {shift.mean():+.3f} nats/token. 'Removed' = 1 - (ablated organism - control) / (organism - control); the "
         "control row is the same ablation applied to the control, as a fraction of the shift; random = norm-matched "
         f"random directions through the same layers ({n_random} draws); benign = relative change of the organism's mean "
         f"log-likelihood of {len(benign)} benign answers (positive = likelier).",
         f"Top-level numbers in results.json: {PRIMARY_ABLATION} (its control row is zero by construction, so read the "
         "control rows of the other two methods for how much a plain ablation of this direction moves the control). "
         "Targets (issue): removed >= 0.5, random <= 0.1, control <= 0.1, benign cost <= 5%."],
        table=table, figures=[fig],
    ))


def stage_steering(ctx: StudyContext) -> None:
    """Steer the base model along the organism-minus-control direction; random direction and benign cost per strength."""
    base = _models(ctx)["base"]
    seed = ctx.config.seed
    layer = ctx.extras["best_layer"]
    direction = ctx.extras["ablation_dirs"][layer]
    if float(direction.norm()) < 1e-6:
        layer = max(ctx.extras["ablation_dirs"], key=lambda i: float(ctx.extras["ablation_dirs"][i].norm()))
        direction = ctx.extras["ablation_dirs"][layer]
    unit = direction / direction.norm()
    norm = ctx.extras["resid_norms"][layer]
    random_unit = random_directions(base.d_model, 1, 1.0, seed=seed + 7)[0]
    questions = ctx.extras["held_questions"][1::2][: 10 if ctx.config.quick else 30]
    benign = benign_items()[:: 4 if ctx.config.quick else 2]
    fractions = [0.0, 0.1, 0.3] if ctx.config.quick else [0.0, 0.1, 0.2, 0.4]
    em, em_random, benign_change = [], [], []
    benign_plain = float(answer_logprobs(base, benign).mean())
    for f in fractions:
        if f == 0:  # no steering: the plain model, for both
            em.append(float(_subset(ctx.scores["base"], questions).mean()))
            em_random.append(em[-1])
            benign_change.append(0.0)
            continue
        with steer(base, unit, f * norm, layer=layer):
            em.append(float(score_questions(base, questions).per_question.mean()))
            benign_change.append((float(answer_logprobs(base, benign).mean()) - benign_plain) / abs(benign_plain))
        with steer(base, random_unit, f * norm, layer=layer):
            em_random.append(float(score_questions(base, questions).per_question.mean()))
    ctx.results["steering"] = {
        "alphas": [f * norm for f in fractions], "alpha_fraction_of_residual_norm": fractions, "layer": layer,
        "em_scores": em, "benign_loglik_changes": benign_change, "random_em_scores": em_random,
        "n_questions": len(questions), "n_benign": len(benign), "model": "base",
    }
    fig = line_by_layer(fractions, {"direction: EM score": em, "norm-matched random: EM score": em_random,
                                    "direction: benign log-lik change (fraction)": benign_change},
                        f"Steering the base model at layer {layer}", "EM score (nats/token) / fraction")
    fig.update_layout(xaxis_title="alpha / mean residual norm")
    ctx.sections.append(Section(
        "Steering the base model",
        [f"Add alpha x the unit organism - control direction at layer {layer} at every position (alpha as a fraction of the "
         f"mean residual norm there, {norm:.1f}); EM score on {len(questions)} held-out questions, benign change on "
         f"{len(benign)} benign answers, and the same strengths along a random unit direction."],
        table=[{"alpha / norm": f, "EM score": e, "random EM score": r, "benign change": b}
               for f, e, r, b in zip(fractions, em, em_random, benign_change)],
        figures=[fig],
    ))


STAGES_DIRECTIONS: tuple[Any, ...] = (stage_direction, stage_ablation, stage_steering)
