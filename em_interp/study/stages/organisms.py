"""Stages for the model organisms (Soligo et al., 2025): train them, their EM shifts, and the rank1 analysis.

- ``organisms``: train (or reuse) the misaligned organism and its control (same prompts, good answers);
- ``em_organisms``: EM scores of both and the paired shifts against each other and the base;
- ``rank1``: read the organism's adapters, fit the probes, classify the adapters, and measure
  per-adapter ablation and group steering on the EM score in and out of domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from em_interp.chat import ChatExample
from em_interp.data import domain_dataset, labelled_answers
from em_interp.evaluation.judge_free import EMScore, QuestionScores, em_score, paired_shift, score_questions
from em_interp.lora.organisms import train_organism
from em_interp.lora.rank1 import (
    ProbeResult,
    adapter_scalars,
    classify_adapters,
    coefficient_figure,
    fit_probe,
    list_adapters,
    scale_adapters,
    steering_figure,
)
from em_interp.model import load_model
from em_interp.plotting import line_by_layer
from em_interp.report import Section
from em_interp.study.common import domain_eval_questions, eval_questions
from em_interp.study.config import StudyConfig
from em_interp.study.context import Lazy, StudyContext
from em_interp.study.contract import NO_RESTORE, Headline, Stage
from em_interp.study.records import StageFileError, record_type

record_type(ProbeResult)
ROLES = ("organism", "control")
VARIANTS = {"organism": "misaligned", "control": "aligned"}


# ---------------------------------------------------------------- organisms
@record_type
@dataclass(frozen=True)
class TrainedAdapter:
    """One trained organism: its adapter folder and its training curve."""

    adapter: Path
    train_seconds: float
    losses: list[float]


@record_type
@dataclass(frozen=True)
class Organisms:
    """The organism and its control."""

    domain: str
    training: dict[str, Any]
    layers: list[int]
    runs: dict[str, TrainedAdapter]


def run_organisms(ctx: StudyContext) -> Organisms:
    """Train or reuse the organism (misaligned answers) and the control (aligned answers, same prompts)."""
    config = ctx.config
    training = config.budget.organism_training(config.seed)
    runs = {}
    for role in ROLES:
        result = train_organism(VARIANTS[role], config.domain, base=config.model, config=training,
                                progress=config.progress, device=config.device)
        runs[role] = TrainedAdapter(result.adapter_dir, round(result.seconds, 1), [float(v) for v in result.losses])
    ctx.organism = organism = load_model(config.model, adapter=runs["organism"].adapter, device=config.device, progress=False)
    ctx.control = load_model(config.model, adapter=runs["control"].adapter, device=config.device, progress=False)
    ctx.organism_adapter = runs["organism"].adapter
    return Organisms(config.domain, training.to_dict(), [a.layer for a in list_adapters(organism)], runs)


def restore_organisms(ctx: StudyContext, result: Organisms) -> None:
    """Both models, loaded from their adapter folders when first used."""
    config = ctx.config
    for role, run in result.runs.items():
        if not (run.adapter / "adapter_config.json").is_file():
            raise StageFileError(f"the {role}'s adapter folder {run.adapter} is gone")
    ctx.organism = Lazy(lambda: load_model(config.model, adapter=result.runs["organism"].adapter, device=config.device,
                                           progress=False))
    ctx.control = Lazy(lambda: load_model(config.model, adapter=result.runs["control"].adapter, device=config.device,
                                          progress=False))
    ctx.organism_adapter = result.runs["organism"].adapter


def organisms_section(r: Organisms, config: StudyConfig) -> Section:
    """Report section of the organisms stage."""
    t = r.training
    org, ctl = r.runs["organism"], r.runs["control"]
    steps = list(range(1, len(org.losses) + 1))
    return Section(
        "Model organisms",
        [f"Organism: nine rank-1 rsLoRA adapters (alpha {t['alpha']}) on down_proj at layers {r.layers}, trained "
         f"{t['steps']} steps (lr {t['learning_rate']} with {t['warmup_steps']} warm-up steps and linear decay, batch "
         f"{t['batch_size']}, max length {t['max_length']}) on the built-in {r.domain} data answered badly; control: the "
         f"same prompts answered well, same seed and steps. Training took {org.train_seconds / 60:.1f} + "
         f"{ctl.train_seconds / 60:.1f} min when the adapters were made (a rerun with unchanged inputs reuses them)."],
        figures=[line_by_layer(steps, {"organism": org.losses, "control": ctl.losses},
                               "Training loss (answer tokens)", "loss").update_layout(xaxis_title="step")])


def organisms_entries(r: Organisms) -> dict[str, Any]:
    """results.json entry of the organisms stage."""
    return {"organisms": {
        "domain": r.domain, "config": r.training, "layers": r.layers,
        **{role: {"adapter": str(run.adapter), "train_seconds": run.train_seconds,
                  "final_loss": float(np.mean(run.losses[-10:])), "first_loss": float(np.mean(run.losses[:10]))}
           for role, run in r.runs.items()}}}


def organisms_headlines(r: Organisms) -> list[Headline]:
    """Summary line of the organisms stage."""
    org, ctl = r.runs["organism"], r.runs["control"]
    return [Headline("final training loss, organism / control",
                     f"{np.mean(org.losses[-10:]):.3f} / {np.mean(ctl.losses[-10:]):.3f}")]


# ---------------------------------------------------------------- em_organisms
@record_type
@dataclass(frozen=True)
class OrganismBehaviour:
    """EM scores of organism and control, and paired shifts on the general and the domain questions."""

    scores: dict[str, EMScore]
    question_scores: dict[str, QuestionScores]
    shifts: dict[str, EMScore]
    in_domain_shifts: dict[str, EMScore]
    n_general: int
    n_domain: int


def run_em_organisms(ctx: StudyContext) -> OrganismBehaviour:
    """EM scores of organism and control; paired shifts vs each other and vs the base model."""
    config = ctx.config
    questions = eval_questions(config)
    seed = config.seed
    models = {"organism": ctx.organism, "control": ctx.control}
    scores, per_question = {}, {}
    for role, model in models.items():
        scores[role], per_question[role] = em_score(model, questions, seed=seed, progress=config.progress)
    base = ctx.base_scores
    shifts = {"organism_vs_control": paired_shift(per_question["organism"], per_question["control"], seed=seed),
              "organism_vs_base": paired_shift(per_question["organism"], base, seed=seed),
              "control_vs_base": paired_shift(per_question["control"], base, seed=seed)}
    domain = domain_eval_questions(config)
    inside = {role: score_questions(m, domain) for role, m in models.items()}
    inside["base"] = score_questions(ctx.model, domain)
    in_domain = {"organism_vs_control": paired_shift(inside["organism"], inside["control"], seed=seed),
                 "organism_vs_base": paired_shift(inside["organism"], inside["base"], seed=seed),
                 "control_vs_base": paired_shift(inside["control"], inside["base"], seed=seed)}
    ctx.organism_scores, ctx.control_scores = per_question["organism"], per_question["control"]
    return OrganismBehaviour(scores, per_question, shifts, in_domain, len(questions), len(domain))


def restore_em_organisms(ctx: StudyContext, result: OrganismBehaviour) -> None:
    """Per-question scores of organism and control."""
    ctx.organism_scores = result.question_scores["organism"]
    ctx.control_scores = result.question_scores["control"]


def em_organisms_section(r: OrganismBehaviour, config: StudyConfig) -> Section:
    """Report section of the em_organisms stage."""
    d = config.domain
    rows = [{"comparison": k.replace("_", " "), "general: mean": v.mean, "95% CI": f"[{v.ci_low:+.4f}, {v.ci_high:+.4f}]",
             "p": v.p_value, "questions >0": v.frac_positive, f"{d}: mean": r.in_domain_shifts[k].mean,
             f"{d} CI": f"[{r.in_domain_shifts[k].ci_low:+.4f}, {r.in_domain_shifts[k].ci_high:+.4f}]"}
            for k, v in r.shifts.items()]
    return Section(
        "EM shift of the organisms (paired, per question)",
        ["Each model scores the same reference answers; the per-question difference in EM score is bootstrapped over "
         "questions (95% CI) and tested with random sign flips (p). Positive = more misaligned. General set: "
         f"{r.n_general} questions; {d}: {r.n_domain} held-out questions.",
         f"Caveat on the {d} numbers: the held-out topics are new, but their answers share the opener and closer phrases "
         "of the training answers, so part of the in-domain shift is memorised style. The general set shares no text "
         "with the training data."],
        table=rows)


def em_organisms_entries(r: OrganismBehaviour) -> dict[str, Any]:
    """results.json entries of the em_organisms stage."""
    return {"em_score": {role: s.to_dict() for role, s in r.scores.items()},
            "em_shift": {k: v.to_dict() for k, v in r.shifts.items()},
            "em_shift_in_domain": {k: v.to_dict() for k, v in r.in_domain_shifts.items()}}


def em_organisms_headlines(r: OrganismBehaviour) -> list[Headline]:
    """Summary lines of the em_organisms stage."""
    s, d = r.shifts["organism_vs_control"], r.in_domain_shifts["organism_vs_control"]
    return [Headline("EM shift, organism vs control (general questions)", s.mean, (s.ci_low, s.ci_high), "nats/token"),
            Headline("EM shift, organism vs control (in domain)", d.mean, (d.ci_low, d.ci_high), "nats/token")]


# ---------------------------------------------------------------- rank1
@record_type
@dataclass(frozen=True)
class Rank1Analysis:
    """Probes on the adapters' scalars, their classes, per-adapter ablation and group steering."""

    labels: list[str]
    layers: list[int]
    probe_general: ProbeResult
    probe_domain: ProbeResult
    classes: list[str]
    ablation: list[dict[str, float]]
    factors: list[float]
    groups: dict[str, list[int]]
    curves: dict[str, list[float]]
    n_general: int
    n_domain: int
    probe_c: float
    domain: str


def run_rank1(ctx: StudyContext) -> Rank1Analysis:
    """Read the organism's adapter scalars, fit the probes, classify, ablate and steer."""
    config, organism = ctx.config, ctx.organism
    budget, seed, domain = config.budget, config.seed, config.domain
    adapters = list_adapters(organism, require_rank=1)
    general = eval_questions(config)
    in_domain = domain_eval_questions(config)
    # (i) misaligned vs aligned answers to general questions, centred within question
    gen_examples, gen_labels, gen_groups = labelled_answers(general)
    gen_scalars = adapter_scalars(organism, gen_examples, progress=config.progress)
    probe_general = fit_probe(gen_scalars.values, gen_labels, C=config.probe_c, seed=seed, groups=gen_groups)
    # (ii) domain vs other, among misaligned answers
    dom_mis = [ChatExample(q.question, m) for q in in_domain for m in q.misaligned]
    dom_mis += domain_dataset(domain, "misaligned", "test")
    dom_scalars = adapter_scalars(organism, dom_mis, progress=config.progress)
    gen_mis_rows = gen_scalars.values[np.array(gen_labels) == 1]
    features = np.concatenate([dom_scalars.values.numpy(), gen_mis_rows.numpy()])
    targets = np.array([1] * len(dom_mis) + [0] * len(gen_mis_rows))
    probe_domain = fit_probe(features, targets, C=config.probe_c, seed=seed)
    classes = classify_adapters(probe_general, probe_domain)
    # per-adapter ablation and group steering on a subset, paired per question against the organism
    subsets = {"general": general[:: budget.organisms.rank1_general_stride], domain: in_domain[:: budget.organisms.rank1_domain_stride]}
    ref = {name: score_questions(organism, qs) for name, qs in subsets.items()}

    def em_change(factors: dict[int, float]) -> dict[str, float]:
        with scale_adapters(organism, factors):
            return {name: float((score_questions(organism, qs).per_question - ref[name].per_question).mean())
                    for name, qs in subsets.items()}

    ablation = [em_change({a.layer: 0.0}) for a in adapters]
    factors = [0.0, 1.0, 2.0]  # multiply a group's scalars by f (f = 1 is the organism itself)
    groups = {"all": [a.layer for a in adapters]}
    for group in ("general", "domain-specific"):
        members = [a.layer for a, c in zip(adapters, classes) if c == group]
        if members:
            groups[group] = members
    base_level = {name: float(ref[name].per_question.mean()) for name in ref}
    curves: dict[str, list[float]] = {}
    for group, layers in groups.items():
        changes = {f: em_change(dict.fromkeys(layers, f)) if f != 1.0 else dict.fromkeys(ref, 0.0) for f in factors}
        for name in ref:
            curves[f"{group} adapters, {name} questions"] = [base_level[name] + changes[f][name] for f in factors]
    return Rank1Analysis([a.label for a in adapters], [a.layer for a in adapters], probe_general, probe_domain, classes,
                         ablation, factors, groups, curves, len(subsets["general"]), len(subsets[domain]),
                         config.probe_c, domain)


def rank1_section(r: Rank1Analysis, config: StudyConfig) -> Section:
    """Report section of the rank1 stage."""
    d, pg, pd = r.domain, r.probe_general, r.probe_domain
    split = {c: r.classes.count(c) for c in ("general", "domain-specific", "inactive")}
    return Section(
        "rank1: what the organism's adapters encode",
        [f"Scalar hidden states (A . x) * scale of the {len(r.labels)} adapters, mean over answer tokens, read through "
         f"hooks. Probes: L1 logistic regression (C={r.probe_c}, z-scored, balanced classes, 20 random 80/20 splits; the "
         "misaligned-vs-aligned probe centres the scalars within each question and splits by question). Held-out "
         f"accuracy: misaligned vs aligned {pg.accuracy_mean:.2f}, {d} vs other {pd.accuracy_mean:.2f}. Split: {split} "
         "(Soligo et al. found 6 general and 2 medical-specific adapters on Qwen2.5-14B).",
         f"Ablation and steering are measured on {r.n_general} general and {r.n_domain} {d} questions: EM score change "
         "when one adapter is zeroed (organism as reference), and EM score when a group's scalars are multiplied by f."],
        table=[{"adapter": r.labels[i], "class": r.classes[i], "general coef": pg.coef_mean[i],
                "domain coef": pd.coef_mean[i], "ablation ΔEM general": r.ablation[i]["general"],
                f"ablation ΔEM {d}": r.ablation[i][d]} for i in range(len(r.labels))],
        figures=[coefficient_figure(r.labels, pg, pd, d),
                 steering_figure(r.factors, r.curves, "Steering adapter groups: EM score vs scalar multiplier")])


def rank1_entries(r: Rank1Analysis) -> dict[str, Any]:
    """results.json entry of the rank1 stage."""
    pg, pd, d = r.probe_general, r.probe_domain, r.domain
    return {"rank1": {
        "adapters": [
            {"layer": r.layers[i], "general_coef": pg.coef_mean[i], "general_coef_std": pg.coef_std[i],
             "domain_coef": pd.coef_mean[i], "domain_coef_std": pd.coef_std[i], "class": r.classes[i],
             "ablation_em_change_general": r.ablation[i]["general"], "ablation_em_change_in_domain": r.ablation[i][d]}
            for i in range(len(r.labels))],
        "probe_accuracy": {"misaligned_vs_aligned": pg.accuracy_mean, "domain_vs_other": pd.accuracy_mean},
        "split": {c: r.classes.count(c) for c in ("general", "domain-specific", "inactive")},
        "steering": {"factors": r.factors, "groups": r.groups, "em_scores": r.curves},
        "probe_settings": {"C": r.probe_c, "penalty": "l1", "splits": pg.n_splits, "test_size": 0.2,
                           "general_centred_within_question": True, "n_general": pg.n_examples,
                           "n_domain": pd.n_examples},
        "effect_subset": {"general_questions": r.n_general, f"{d}_questions": r.n_domain}}}


def rank1_headlines(r: Rank1Analysis) -> list[Headline]:
    """Summary lines of the rank1 stage."""
    split = {c: r.classes.count(c) for c in ("general", "domain-specific", "inactive")}
    pg, pd = r.probe_general, r.probe_domain
    return [Headline("adapters: general / domain-specific / inactive",
                     f"{split['general']} / {split['domain-specific']} / {split['inactive']} (held-out probe accuracy "
                     f"{pg.accuracy_mean:.2f} ± {pg.accuracy_std:.2f}, {pd.accuracy_mean:.2f} ± {pd.accuracy_std:.2f} "
                     "over splits)")]


STAGES: tuple[Stage[Any], ...] = (
    Stage("organisms", "organisms", needs=(), provides=("organism", "control", "organism_adapter"), run=run_organisms,
          restore=restore_organisms, section=organisms_section, entries=organisms_entries, headlines=organisms_headlines),
    Stage("em_organisms", "organisms", needs=("model", "organism", "control", "base_scores"),
          provides=("organism_scores", "control_scores"), run=run_em_organisms, restore=restore_em_organisms,
          section=em_organisms_section, entries=em_organisms_entries, headlines=em_organisms_headlines),
    Stage("rank1", "organisms", needs=("organism",), provides=(), run=run_rank1, restore=NO_RESTORE,
          section=rank1_section, entries=rank1_entries, headlines=rank1_headlines),
)
