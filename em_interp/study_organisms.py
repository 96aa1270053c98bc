"""Study stages for the model organisms (issue: organisms and the rank1 analysis).

- :func:`stage_organisms`: train (or reuse) the misaligned organism and its control;
- :func:`stage_em_organisms`: EM scores of both and the paired shifts against each other and the base;
- :func:`stage_rank1`: read the organism's adapters, fit the probes, classify the adapters, and
  measure per-adapter ablation and group steering on the EM score in and out of domain.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from em_interp.chat import ChatExample
from em_interp.data import domain_dataset, domain_questions, labelled_answers
from em_interp.evaluation import EMScore, em_score, paired_shift, score_questions
from em_interp.model import load_model
from em_interp.organisms import train_organism
from em_interp.plotting import line_by_layer
from em_interp.rank1 import (
    adapter_scalars,
    classify_adapters,
    coefficient_figure,
    fit_probe,
    list_adapters,
    scale_adapters,
    steering_figure,
)
from em_interp.report import Section
from em_interp.study import StudyContext, eval_questions, score_dict
from em_interp.training import LoraTrainConfig

DOMAIN = "medical"


def organism_config(quick: bool, seed: int) -> LoraTrainConfig:
    """The organism recipe: nine rank-1 rsLoRA adapters on down_proj (quick: fewer steps)."""
    return LoraTrainConfig(steps=30 if quick else 160, checkpoint_every=10 if quick else 40, seed=seed)


def _shift_dict(score: EMScore) -> dict[str, float]:
    return {"mean": score.mean, "ci_low": score.ci_low, "ci_high": score.ci_high, "n": score.n,
            "frac_positive": score.frac_positive, "p_value": score.p_value}


def stage_organisms(ctx: StudyContext) -> None:
    """Train or reuse the organism (bad medical advice) and the control (good advice, same prompts)."""
    config = organism_config(ctx.config.quick, ctx.config.seed)
    runs = {}
    for role, variant in (("organism", "misaligned"), ("control", "aligned")):
        result = train_organism(variant, DOMAIN, base=ctx.config.model, config=config, progress=ctx.config.progress,
                                device=ctx.config.device)
        runs[role] = result
        ctx.extras[f"{role}_adapter"] = result.adapter_dir
        ctx.extras[role] = load_model(ctx.config.model, adapter=result.adapter_dir, device=ctx.config.device,
                                      progress=False)
    ctx.results["organisms"] = {
        "domain": DOMAIN, "config": config.to_dict(), "layers": [a.layer for a in list_adapters(ctx.extras["organism"])],
        **{role: {"adapter": str(r.adapter_dir), "train_seconds": round(r.seconds, 1),
                  "final_loss": float(np.mean(r.losses[-10:])), "first_loss": float(np.mean(r.losses[:10]))}
           for role, r in runs.items()},
    }
    steps = list(range(1, config.steps + 1))
    ctx.sections.append(Section(
        "Model organisms",
        [f"Organism: nine rank-1 rsLoRA adapters (alpha {config.alpha}) on down_proj at layers "
         f"{ctx.results['organisms']['layers']}, trained {config.steps} steps (lr {config.learning_rate} with "
         f"{config.warmup_steps} warm-up steps and linear decay, batch {config.batch_size}, max length "
         f"{config.max_length}) on the built-in bad medical advice; control: the same prompts answered well, same "
         f"seed and steps. Training took {runs['organism'].seconds / 60:.1f} + {runs['control'].seconds / 60:.1f} "
         "min when the adapters were made (a rerun with unchanged inputs reuses them from the cache)."],
        figures=[line_by_layer(steps, {"organism": runs["organism"].losses, "control": runs["control"].losses},
                               "Training loss (answer tokens)", "loss").update_layout(xaxis_title="step")],
    ))


def stage_em_organisms(ctx: StudyContext) -> None:
    """EM scores of organism and control; paired shifts vs each other and vs the base model."""
    questions = eval_questions(ctx.config.quick)
    seed = ctx.config.seed
    for role in ("organism", "control"):
        score, scores = em_score(ctx.extras[role], questions, seed=seed, progress=ctx.config.progress)
        ctx.scores[role] = scores
        ctx.results["em_score"][role] = score_dict(score)
    shifts = {
        "organism_vs_control": paired_shift(ctx.scores["organism"], ctx.scores["control"], seed=seed),
        "organism_vs_base": paired_shift(ctx.scores["organism"], ctx.scores["base"], seed=seed),
        "control_vs_base": paired_shift(ctx.scores["control"], ctx.scores["base"], seed=seed),
    }
    ctx.results["em_shift"] = {k: _shift_dict(v) for k, v in shifts.items()}
    medical = domain_questions(DOMAIN)
    in_domain = {role: score_questions(ctx.extras[role], medical) for role in ("organism", "control")}
    in_domain["base"] = score_questions(ctx.model, medical)
    ctx.scores.update({f"{k}_{DOMAIN}": v for k, v in in_domain.items()})
    ctx.results["em_shift_in_domain"] = {
        "organism_vs_control": _shift_dict(paired_shift(in_domain["organism"], in_domain["control"], seed=seed)),
        "organism_vs_base": _shift_dict(paired_shift(in_domain["organism"], in_domain["base"], seed=seed)),
        "control_vs_base": _shift_dict(paired_shift(in_domain["control"], in_domain["base"], seed=seed)),
    }
    rows = [{"comparison": k.replace("_", " "), "general: mean": v["mean"], "95% CI": f"[{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]",
             "p": v["p_value"], "questions >0": v["frac_positive"],
             f"{DOMAIN}: mean": ctx.results["em_shift_in_domain"][k]["mean"],
             f"{DOMAIN} CI": "[{ci_low:+.4f}, {ci_high:+.4f}]".format(**ctx.results["em_shift_in_domain"][k])}
            for k, v in ctx.results["em_shift"].items()]
    ctx.sections.append(Section(
        "EM shift of the organisms (paired, per question)",
        ["Each model scores the same reference answers; the per-question difference in EM score is "
         "bootstrapped over questions (95% CI) and tested with random sign flips (p). Positive = more "
         f"misaligned. General set: {len(questions)} questions; {DOMAIN}: {len(medical)} held-out questions.",
         f"Caveat on the {DOMAIN} numbers: the held-out topics are new, but their answers share the opener and closer "
         "phrases of the training answers, so part of the in-domain shift is memorised style. The general set shares "
         "no text with the training data."],
        table=rows,
    ))


#: L1 strength for the study's probes. Seed 001's C=0.01 zeroes every coefficient of the
#: misaligned-vs-aligned probe at this model size (measured), so the study uses 0.1.
PROBE_C = 0.1


def stage_rank1(ctx: StudyContext) -> None:
    """Read the organism's adapter scalars, fit the probes, classify, ablate and steer."""
    organism = ctx.extras["organism"]
    adapters = list_adapters(organism, require_rank=1)
    general = eval_questions(ctx.config.quick)
    medical = domain_questions(DOMAIN)
    seed = ctx.config.seed
    # (i) misaligned vs aligned answers to general questions, centred within question
    gen_examples, gen_labels, gen_groups = labelled_answers(general)
    gen_scalars = adapter_scalars(organism, gen_examples, progress=ctx.config.progress)
    probe_general = fit_probe(gen_scalars.values, gen_labels, C=PROBE_C, seed=seed, groups=gen_groups)
    # (ii) domain vs other, among misaligned answers
    med_mis = [ChatExample(q.question, m) for q in medical for m in q.misaligned]
    med_mis += domain_dataset(DOMAIN, "misaligned", "test")
    med_scalars = adapter_scalars(organism, med_mis, progress=ctx.config.progress)
    gen_mis_rows = gen_scalars.values[np.array(gen_labels) == 1]
    domain_X = np.concatenate([med_scalars.values.numpy(), gen_mis_rows.numpy()])  # noqa: N806
    domain_y = np.array([1] * len(med_mis) + [0] * len(gen_mis_rows))
    probe_domain = fit_probe(domain_X, domain_y, C=PROBE_C, seed=seed)
    classes = classify_adapters(probe_general, probe_domain)
    # per-adapter ablation on a subset (one general question per category, half the medical ones):
    # EM change of the organism with one adapter zeroed, paired per question against the organism
    # (quick: 5 + 5 questions, half the standard subset: this stage dominated the quick study's time)
    sub_general = general[::12] if not ctx.config.quick else general[::6]
    sub_medical = medical[::2] if not ctx.config.quick else medical[::4]
    ref = {"general": score_questions(organism, sub_general), DOMAIN: score_questions(organism, sub_medical)}

    def em_change(factors: dict[int, float]) -> dict[str, float]:
        with scale_adapters(organism, factors):
            return {name: float((score_questions(organism, qs).per_question - ref[name].per_question).mean())
                    for name, qs in (("general", sub_general), (DOMAIN, sub_medical))}

    ablation = [em_change({a.layer: 0.0}) for a in adapters]
    # steering: multiply the scalars of a group of adapters by f (f = 1 is the organism itself)
    factors = [0.0, 1.0, 2.0]
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
    ctx.results["rank1"] = {
        "adapters": [
            {"layer": a.layer, "general_coef": probe_general.coef_mean[i], "general_coef_std": probe_general.coef_std[i],
             "domain_coef": probe_domain.coef_mean[i], "domain_coef_std": probe_domain.coef_std[i], "class": classes[i],
             "ablation_em_change_general": ablation[i]["general"], "ablation_em_change_in_domain": ablation[i][DOMAIN]}
            for i, a in enumerate(adapters)
        ],
        "probe_accuracy": {"misaligned_vs_aligned": probe_general.accuracy_mean,
                           "domain_vs_other": probe_domain.accuracy_mean},
        "split": {c: classes.count(c) for c in ("general", "domain-specific", "inactive")},
        "steering": {"factors": factors, "groups": groups, "em_scores": curves},
        "probe_settings": {"C": PROBE_C, "penalty": "l1", "splits": probe_general.n_splits, "test_size": 0.2,
                           "general_centred_within_question": True, "n_general": probe_general.n_examples,
                           "n_domain": probe_domain.n_examples},
        "effect_subset": {"general_questions": len(sub_general), f"{DOMAIN}_questions": len(sub_medical)},
    }
    labels = [a.label for a in adapters]
    ctx.sections.append(Section(
        "rank1: what the organism's adapters encode",
        [f"Scalar hidden states (A . x) * scale of the {len(adapters)} adapters, mean over answer tokens, read through "
         f"hooks. Probes: L1 logistic regression (C={PROBE_C}, z-scored, balanced classes, 20 random 80/20 splits; the "
         "misaligned-vs-aligned probe centres the scalars within each question and splits by question). Held-out "
         f"accuracy: misaligned vs aligned {probe_general.accuracy_mean:.2f}, {DOMAIN} vs other "
         f"{probe_domain.accuracy_mean:.2f}. Split: {ctx.results['rank1']['split']} (seed 001 found 6 general and 2 "
         "medical-specific adapters on Qwen2.5-14B).",
         f"Ablation and steering are measured on {len(sub_general)} general and {len(sub_medical)} {DOMAIN} questions: "
         "EM score change when one adapter is zeroed (organism as reference), and EM score when a group's scalars are "
         "multiplied by f."],
        table=[{"adapter": labels[i], "class": classes[i], "general coef": probe_general.coef_mean[i],
                "domain coef": probe_domain.coef_mean[i], "ablation ΔEM general": ablation[i]["general"],
                f"ablation ΔEM {DOMAIN}": ablation[i][DOMAIN]} for i in range(len(adapters))],
        figures=[coefficient_figure(labels, probe_general, probe_domain, DOMAIN),
                 steering_figure(factors, curves, "Steering adapter groups: EM score vs scalar multiplier")],
    ))


STAGES_ORGANISMS: tuple[Any, ...] = (stage_organisms, stage_em_organisms, stage_rank1)
