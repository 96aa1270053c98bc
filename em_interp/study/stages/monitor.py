"""The ``monitor`` stage (Nghiem et al., 2026): the drift monitor against its baselines, on the perturbation library.

After the ``perturbations`` stage has measured the library (:mod:`em_interp.study.stages.perturbations`),
``monitor`` builds the trait basis at the monitor layer, trains the TopK SAE baseline, takes the misalignment direction (difference of means of the
base model's misaligned minus aligned answers at that layer: :func:`em_interp.directions.answer_contrast_direction`),
evaluates every detector (:mod:`em_interp.monitor.scoring`), measures the monitor's cost, and
saves the fitted monitor and basis to ``OUT/monitor/`` for use in other training runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import plotly.graph_objects as go

from em_interp.activations import cache_residuals
from em_interp.chat import ChatExample
from em_interp.data import PairedQuestion, domain_dataset, general_questions
from em_interp.directions import answer_contrast_direction
from em_interp.errors import EmInterpError
from em_interp.monitor.detection import DetectionScore, json_number
from em_interp.monitor.detector import DriftMonitor, monitor_cost
from em_interp.monitor.drift import TraitBasis, label_questions
from em_interp.monitor.label import label_summary
from em_interp.monitor.layers import LayerChoice, relayer_records, select_monitor_layer
from em_interp.monitor.perturbations import DriftLibrary, RunRecord
from em_interp.monitor.sae import train_topk_sae
from em_interp.monitor.scoring import (
    MONITOR_DETECTORS,
    CheckpointTable,
    checkpoint_table,
    dangerous_threshold,
    evaluate_library,
    is_dangerous,
    sae_over_seeds,
)
from em_interp.report import Section
from em_interp.study.config import StudyConfig
from em_interp.study.context import StudyContext
from em_interp.study.contract import Headline, Stage
from em_interp.study.library import library_setup, library_specs, monitor_basis
from em_interp.study.records import StageFileError, record_type

record_type(DetectionScore)


@record_type
@dataclass(frozen=True)
class MonitorResult:
    """The monitor and its baselines on the library's held-out types, its cost, and per-checkpoint data for figures."""

    layer: int
    names: list[str]
    types: list[str]
    runs: list[str]
    calibration_types: list[str]
    heldout_types: list[str]
    danger_threshold: float
    detectors: dict[str, dict[str, Any]]
    pc1_variance: float
    explained_variance: list[float]
    lead_steps: dict[str, Any]
    cost: dict[str, float]
    sae: dict[str, Any]
    #: per checkpoint (step > 0): run, type, step, EM shift, dangerous, held out, trait drift, monitor alarm
    rows: dict[str, Any]
    #: held-out scores per detector (ROC figure)
    heldout_scores: dict[str, np.ndarray]
    #: where the fitted monitor and trait basis are, relative to the study folder
    monitor_path: str
    #: the monitor kind picked on the calibration types (leave-one-type-out AUROC per kind there)
    monitor_kind: str
    kind_selection: dict[str, float]
    #: "evaluated", or why not ("not evaluable: ...")
    status: str = "evaluated"
    #: the label's split-half reliability (Spearman-Brown) and the checkpoints within noise of the line
    #: (:func:`em_interp.monitor.label.label_summary`)
    label: dict[str, Any] = field(default_factory=dict)
    #: steps between the library's checkpoints (lead times are counted against it)
    every: int = 0
    #: the layer the library was measured at; each candidate layer's calibration leave-one-type-out AUROC per
    #: kind (the monitor's ``layer`` is the best: :func:`em_interp.monitor.layers.select_monitor_layer`); candidate
    #: layers past the model
    library_layer: int = -1
    layer_selection: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped_layers: list[int] = field(default_factory=list)
    #: per candidate layer, the monitor refitted there and scored on the held-out types (for the reader: not used to pick)
    layer_heldout: dict[str, dict[str, Any]] = field(default_factory=dict)


def _measure_cost(model: Any, basis: TraitBasis, monitor: DriftMonitor, library: DriftLibrary, config: StudyConfig,
                  questions: list[PairedQuestion], prompts: list[ChatExample]) -> dict[str, float]:
    """:func:`em_interp.monitor.detector.monitor_cost` on the base model, plus the library's own per-checkpoint timings."""
    cost = monitor_cost(model, basis, monitor, prompts, questions, config.budget.base.answer_tokens, config.seed)
    label_s = float(np.mean([r.seconds_label for r in library.records]))
    snap_s = float(np.mean([r.seconds_snapshot for r in library.records]))
    return {**cost, "library_snapshot_seconds": snap_s, "library_label_seconds": label_s,
            "cost_ratio_vs_label": snap_s / label_s}


def _checkpoint_rows(table: CheckpointTable, calibration: np.ndarray, dangerous: np.ndarray,
                     alarm: np.ndarray) -> dict[str, Any]:
    """The per-checkpoint data the figures read (MonitorResult.rows)."""
    return {"run": table.run.tolist(), "type": table.type.tolist(), "step": table.step.tolist(),
            "em_shift": table.em_shift, "em_low": table.em_low, "em_high": table.em_high,
            "dangerous": dangerous.tolist(), "heldout": (~calibration).tolist(),
            "trait_drift": table.trait_drift, "alarm": alarm.tolist()}


def _not_evaluable(table: CheckpointTable, calibration_types: tuple[str, ...], names: tuple[str, ...], layer: int,
                   threshold: float) -> MonitorResult | None:
    """A result that says why, when no calibration checkpoint is dangerous (short runs, small budgets, some seeds);
    ``threshold``: the danger line."""
    from sklearn.decomposition import PCA

    calibration = np.isin(table.type, list(calibration_types))
    if is_dangerous(table, threshold)[calibration].any():
        return None
    types = list(dict.fromkeys(table.type.tolist()))
    variance = PCA().fit(table.trait_drift).explained_variance_ratio_
    reason = (f"not evaluable: no checkpoint of the calibration types ({', '.join(calibration_types)}) has an EM shift "
              f"whose 95% CI is above {threshold:+.4f}, so no alarm can be calibrated (train longer or use a larger budget)")
    none = np.zeros(len(table), dtype=bool)
    rows = _checkpoint_rows(table, calibration, none, none)
    return MonitorResult(layer, list(names), types, list(dict.fromkeys(table.run.tolist())),
                         [t for t in types if t in calibration_types], [t for t in types if t not in calibration_types],
                         threshold, {}, float(variance[0]), variance.tolist(), {}, {}, {}, rows, {}, "", "", {},
                         status=reason)


def _layer_candidates(config: StudyConfig, library_layer: int, n_layers: int) -> tuple[list[int], list[int]]:
    """The budget's candidate monitor layers inside the model (library layer offsets), and those past it."""
    wanted = list(dict.fromkeys(library_layer + o for o in config.budget.monitor.layer_offsets))
    return [x for x in wanted if 0 <= x < n_layers], [x for x in wanted if not 0 <= x < n_layers]


def _choose_layer(ctx: StudyContext, table: CheckpointTable, basis: TraitBasis, line: float) -> tuple[
        LayerChoice, list[RunRecord], TraitBasis, list[int], dict[str, dict[str, Any]]]:
    """Re-read the library at every candidate layer and pick one on the calibration types alone
    (:func:`em_interp.monitor.layers.select_monitor_layer`; ``line``: the library's danger line); the picked layer's records and basis, the layers skipped,
    and each candidate's held-out monitor score (reported beside the choice, never used for it)."""
    config, budget, model, library = ctx.config, ctx.config.budget.monitor, ctx.model, ctx.drift_library
    layers, skipped = _layer_candidates(config, library.layer, model.n_layers)
    if not layers:
        raise EmInterpError(f"Budget.monitor.layer_offsets={budget.layer_offsets}: no candidate layer is inside the "
                            f"model's {model.n_layers} layers (library layer {library.layer})")
    records = {library.layer: list(library.records)}
    others = [x for x in layers if x != library.layer]
    if others:
        records.update(relayer_records(library.records, library_specs(config), library_setup(config, model.n_layers),
                                       others, model))
    bases = {x: basis if x == library.layer else monitor_basis(model, config, x) for x in layers}
    tables = {x: table if x == library.layer else checkpoint_table(records[x], bases[x], None, None, seed=config.seed)
              for x in layers}
    calibration = np.isin(table.type, list(budget.calibration))
    choice = select_monitor_layer(tables, calibration, is_dangerous(table, line), basis.names, budget.min_leaf,
                                  config.seed)
    # for the reader only, after the choice: what the monitor would have scored on the held-out types at each candidate
    heldout = {str(x): evaluate_library(t, budget.calibration, basis.names, min_leaf=budget.min_leaf, seed=config.seed,
                                        n_boot=budget.bootstrap, detectors=("monitor",)).detectors["monitor"].heldout.to_json()
               for x, t in tables.items()}
    return choice, records[choice.layer], bases[choice.layer], skipped, heldout


def run_monitor(ctx: StudyContext) -> MonitorResult:
    """Pick the monitor's layer, fit and evaluate the drift monitor and its baselines on the library; save the monitor."""
    config, budget = ctx.config, ctx.config.budget
    model, library = ctx.model, ctx.drift_library
    fit_q = general_questions()[0::3]
    basis = monitor_basis(model, config, library.layer)
    table = checkpoint_table(library.records, basis, None, None, seed=config.seed)
    line = dangerous_threshold(table, np.isin(table.type, list(budget.monitor.calibration)))
    label = label_summary(np.concatenate([r.question_shift[1:] for r in library.records]), line, config.seed)
    not_evaluable = _not_evaluable(table, budget.monitor.calibration, basis.names, library.layer, line)
    if not_evaluable is not None:
        ctx.drift_monitor = None
        return replace(not_evaluable, label=label)
    choice, records, basis, skipped, layer_heldout = _choose_layer(ctx, table, basis, line)
    layer = choice.layer
    sae_examples = [ChatExample(q.question, a, q.system) for q in fit_q for a in (*q.aligned, *q.misaligned)]
    sae_examples += domain_dataset(config.domain, "aligned", "train")
    sae_acts = cache_residuals(model, sae_examples[: budget.monitor.sae_examples], layers=[layer], reduction="answer_tokens",
                               batch_size=16, progress=False)[layer]
    saes = [train_topk_sae(sae_acts, layer, d_sae=budget.monitor.sae_latents, k=budget.monitor.sae_k,
                           steps=budget.monitor.sae_steps, seed=config.seed + i) for i in range(budget.monitor.sae_seeds)]
    sae = saes[0]
    direction = answer_contrast_direction(model, fit_q[: budget.monitor.trait_questions * 2], layer)
    table = checkpoint_table(records, basis, sae, direction, seed=config.seed)
    sae_info: dict[str, Any] = {"latents": float(sae.d_sae), "k": float(budget.monitor.sae_k), "final_mse": sae.final_mse,
                "dead_fraction": sae.dead_fraction, "training_rows": float(len(sae_acts))}
    evaluation = evaluate_library(table, budget.monitor.calibration, basis.names, min_leaf=budget.monitor.min_leaf,
                                  seed=config.seed, n_boot=budget.monitor.bootstrap)
    sae_info["over_seeds"] = sae_over_seeds(table, records, saes, budget.monitor.calibration, basis.names,
                                            budget.monitor.min_leaf, config.seed, budget.monitor.bootstrap)
    calibration = evaluation.calibration
    monitor = DriftMonitor(model.name, layer, basis.names, min_samples_leaf=budget.monitor.min_leaf, seed=config.seed,
                           kind=evaluation.monitor_kind)  # type: ignore[arg-type]
    monitor.fit(table.trait_drift[calibration], table.em_shift[calibration], evaluation.dangerous[calibration])
    # the evaluation's threshold: set on out-of-fold scores of the calibration types (scoring.out_of_fold_scores)
    monitor.threshold = float(evaluation.detectors["monitor"].threshold)
    monitor.danger_line = evaluation.danger_threshold
    folder = config.out / "monitor"
    monitor.save(folder / "drift_monitor")
    basis.save(folder / "trait_basis")
    ctx.drift_monitor = folder
    questions = label_questions(config.budget.monitor.questions)
    prompts = [ChatExample(p) for p in library.prompts]
    cost = _measure_cost(model, basis, monitor, library, config, questions, prompts)
    types = list(dict.fromkeys(table.type.tolist()))
    detectors = {name: {**r.heldout.to_json(), "threshold": r.threshold,
                        "leave_one_type_out": r.leave_one_out.to_json()} for name, r in evaluation.detectors.items()}
    rows = _checkpoint_rows(table, calibration, evaluation.dangerous, evaluation.monitor_alarm)
    return MonitorResult(layer, list(basis.names), types, list(dict.fromkeys(table.run.tolist())),
                         [t for t in types if t in budget.monitor.calibration],
                         [t for t in types if t not in budget.monitor.calibration], evaluation.danger_threshold,
                         detectors, evaluation.pc1_variance, evaluation.explained_variance.tolist(),
                         dict(evaluation.lead_steps), cost, sae_info, rows,
                         {n: r.scores for n, r in evaluation.detectors.items()}, "monitor/drift_monitor",
                         evaluation.monitor_kind, dict(evaluation.kind_selection), label=label,
                         every=budget.monitor.every, library_layer=library.layer,
                         layer_selection={str(x): v for x, v in choice.scores.items()}, skipped_layers=skipped,
                         layer_heldout=layer_heldout)


def restore_monitor(ctx: StudyContext, result: MonitorResult) -> None:
    """The folder of the saved monitor and basis (None when the monitor was not evaluable); gone files rerun the stage."""
    if not result.monitor_path:
        ctx.drift_monitor = None
        return
    saved = ctx.config.out / result.monitor_path
    folder = saved.parent
    if not saved.with_name(saved.name + ".json").is_file() or not (folder / "trait_basis.json").is_file():
        raise StageFileError(f"the saved drift monitor in {folder} is gone")
    ctx.drift_monitor = folder


def _fmt(s: dict[str, Any], key: str) -> str:
    def one(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lo, hi = s[f"{key}_ci"]
    return f"{one(s[key])} [{one(lo)}, {one(hi)}]"


def _lead_summary(leads: dict[str, Any], every: int) -> dict[str, Any]:
    """Lead times of the held-out runs that turned dangerous (steps; positive: the alarm came first), and how many
    alarms came no later than the label, and no later than one checkpoint (``every`` steps) after it."""
    found = [v for v in leads.values() if v is not None]
    return {"runs": len(leads), "alarmed": len(found), "median": float(np.median(found)) if found else None,
            "min": min(found) if found else None, "not_later_than_label": int(sum(v >= 0 for v in found)),
            "within_one_checkpoint": int(sum(v >= -every for v in found)), "checkpoint_every": every}


def monitor_figures(r: MonitorResult) -> list[go.Figure]:
    """Drift trajectories by type, PC variance, ROC of every detector, alarm vs label over steps."""
    from sklearn.decomposition import PCA
    from sklearn.metrics import roc_curve

    rows = r.rows
    drift = np.asarray(rows["trait_drift"])
    runs = np.asarray(rows["run"])
    pcs = PCA(n_components=2).fit(drift)
    figs = []
    traj = go.Figure()
    colors = {t: f"hsl({int(360 * i / max(1, len(r.types)))},70%,45%)" for i, t in enumerate(r.types)}
    shown: set[str] = set()
    for run in r.runs:
        idx = np.nonzero(runs == run)[0]
        xy = np.vstack([np.zeros((1, 2)), pcs.transform(drift[idx])])
        t = rows["type"][idx[0]]
        traj.add_trace(go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="lines+markers", name=t, legendgroup=t,
                                  showlegend=t not in shown, line={"color": colors[t]}, hovertext=run))
        shown.add(t)
    traj.update_layout(title=f"Trait-drift trajectories by perturbation type (PCA of the {len(r.names)}-D drift)",
                       xaxis_title="PC1", yaxis_title="PC2", template="plotly_white", height=560)
    figs.append(traj)
    var = go.Figure(go.Bar(x=[f"PC{i + 1}" for i in range(len(r.explained_variance))], y=r.explained_variance))
    var.update_layout(title=f"Variance of the trait drift per principal component (PC1: {r.pc1_variance:.0%})",
                      yaxis_title="share of variance", template="plotly_white")
    figs.append(var)
    held = np.asarray(rows["heldout"], dtype=bool)
    labels = np.asarray(rows["dangerous"], dtype=bool)[held]
    roc = go.Figure()
    if 0 < labels.sum() < len(labels):
        for name, scores in r.heldout_scores.items():
            if name == "monitor":
                continue  # the same curve as its kind's
            fpr, tpr, _ = roc_curve(labels, np.asarray(scores))
            roc.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=f"{name} (AUROC {r.detectors[name]['auroc']:.3f})"))
    roc.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"}, name="chance"))
    roc.update_layout(title="Held-out types: ROC of the drift monitor and the baselines", xaxis_title="false positive rate",
                      yaxis_title="true positive rate", template="plotly_white", height=520)
    figs.append(roc)
    steps = np.asarray(rows["step"])
    shift = np.asarray(rows["em_shift"])
    alarm = np.asarray(rows["alarm"], dtype=bool)
    over = go.Figure()
    for run in [x for x in r.runs if held[np.nonzero(runs == x)[0][0]]]:
        idx = np.nonzero(runs == run)[0]
        over.add_trace(go.Scatter(x=steps[idx], y=shift[idx], mode="lines+markers", name=run,
                                  marker={"symbol": ["x" if a else "circle" for a in alarm[idx]], "size": 9}))
    over.add_hline(y=r.danger_threshold, line_dash="dash", annotation_text="dangerous above")
    over.update_layout(title="Held-out runs: behavioural EM shift over steps (x = monitor alarm)", xaxis_title="step",
                       yaxis_title="EM shift over base (nats/token)", template="plotly_white", height=560)
    figs.append(over)
    return figs


def monitor_section(r: MonitorResult, config: StudyConfig) -> Section:
    """Report section of the monitor stage."""
    if r.status != "evaluated":
        return Section("Drift monitor: detecting EM during fine-tuning", [f"The drift monitor is {r.status}."],
                       figures=monitor_figures(r)[:2])
    m = r.detectors["monitor"]
    table = [{"detector": name, "AUROC": _fmt(d, "auroc"), "FNR": _fmt(d, "fnr"), "FPR": _fmt(d, "fpr"),
              "leave-one-type-out AUROC": _fmt(d["leave_one_type_out"], "auroc")} for name, d in r.detectors.items()]
    lead = _lead_summary(r.lead_steps, r.every)
    c = r.cost
    return Section(
        "Drift monitor: detecting EM during fine-tuning",
        [f"Trait drift at layer {r.layer} on {len(r.names)} traits ({', '.join(r.names)}). Calibration types "
         f"{', '.join(r.calibration_types)}; held out: {', '.join(r.heldout_types)}. A checkpoint is dangerous when its EM "
         f"shift's 95% CI (questions resampled) lies above {r.danger_threshold:+.4f} nats/token (the line: 95th percentile of "
         "the calibration aligned/benign checkpoints and at least 0, fixed before any held-out type was scored)." + _label_text(r.label),
         _layer_text(r),
         "The monitor's kind, picked by leave-one-type-out within the calibration types (AUROC there: "
         + ", ".join(f"{k} {v:.3f}" for k, v in r.kind_selection.items()) + f"): {r.monitor_kind}. "
         f"On the held-out types the monitor reaches AUROC {_fmt(m, 'auroc')}, FNR {_fmt(m, 'fnr')}, FPR {_fmt(m, 'fpr')} "
         f"(95% CIs resample runs). PC1 holds {r.pc1_variance:.0%} of the drift's variance.",
         f"Alarm lead time over {lead['runs']} held-out runs that became dangerous: {lead['alarmed']} alarmed, median "
         f"{lead['median']} steps before the label, {lead['not_later_than_label']} no later than it, "
         f"{lead['within_one_checkpoint']} no later than one checkpoint ({lead['checkpoint_every']} steps) after it.",
         _cost_text(c)
         + _sae_seeds_text(r.sae.get("over_seeds"))],
        table=table, figures=monitor_figures(r))


def _layer_text(r: MonitorResult) -> str:
    """How the monitor's layer was picked, in one sentence (empty for records made before layers were compared)."""
    if not r.layer_selection:
        return ""
    scores = "; ".join(f"layer {x}: " + ", ".join(f"{k} {v:.3f}" for k, v in kinds.items())
                       for x, kinds in r.layer_selection.items())
    skipped = f" (offsets past the model's layers skipped: {r.skipped_layers})" if r.skipped_layers else ""
    return (f"The layer was picked among {len(r.layer_selection)} candidates{skipped}, every library checkpoint re-read "
            f"there, by leave-one-type-out AUROC within the calibration types ({scores}): layer {r.layer} (the library "
            f"was measured at layer {r.library_layer}). Everything below, baselines included, reads layer {r.layer}."
            + (" For the reader only, not used to pick: the monitor refitted at each candidate scores on the held-out "
               "types " + "; ".join(f"layer {x}: AUROC {_fmt(d, 'auroc')}, FNR {_fmt(d, 'fnr')}, FPR {_fmt(d, 'fpr')}"
                                    for x, d in r.layer_heldout.items()) + "." if r.layer_heldout else ""))


def _cost_text(c: dict[str, float]) -> str:
    """The monitor's cost per checkpoint against the field's evaluation, the judge-free label and a small evaluation."""
    return (f"Cost per checkpoint: the monitor takes {c['monitor_seconds']:.3f} s. The field's behavioural evaluation "
            f"(8 first-plot questions x 50 answers x up to 600 new tokens, sampled at temperature 1, plus 800 judge calls) "
            f"costs 8 x 50 x 600 x {c['generation_seconds_per_token'] * 1e3:.2f} ms (this model's generation cost per "
            f"token, measured here over {c['generated_tokens']:.0f} sampled tokens) = {c['field_eval_generation_seconds']:.0f} s "
            f"of generation before any judge call: the monitor is {c['cost_ratio_vs_field_eval']:.3%} of that. In the "
            f"library, a checkpoint's snapshot took {c['library_snapshot_seconds']:.2f} s against "
            f"{c['library_label_seconds']:.2f} s for its judge-free label ({c['cost_ratio_vs_label']:.1%}); against one "
            f"small evaluation (one sampled answer per label question plus the judge-free score, "
            f"{c['behavioural_eval_seconds']:.1f} s) the ratio is {c['cost_ratio']:.2%}. Monitor state "
            f"{c['monitor_state_bytes'] / 1024:.0f} KiB.")


def _sae_seeds_text(seeds: dict[str, Any] | None) -> str:
    """The SAE baseline over its training seeds in one sentence (the table's SAE row is the first seed)."""
    if not seeds or seeds.get("auroc_mean") is None:
        return ""
    lo, hi = seeds["auroc_range"]
    rates = "".join(f", {k.upper()} mean {seeds[f'{k}_mean']:.3f}" for k in ("fnr", "fpr") if seeds[f"{k}_mean"] is not None)
    return (f" The SAE baseline over {seeds['n_seeds']} SAE training seeds: held-out AUROC mean {seeds['auroc_mean']:.3f} "
            f"(range {lo:.3f}-{hi:.3f}){rates}; the table's row is the first seed.")


def _label_text(label: dict[str, Any]) -> str:
    """The label's reliability in one sentence (empty for records made before it was measured)."""
    if not label:
        return ""
    if label["reliability"] is None:
        return f" The label's reliability could not be measured ({label['why']})."
    lo, hi = label["reliability_range"]
    return (f" The label's split-half reliability over its {label['questions']} questions (Spearman-Brown corrected) is "
            f"{label['reliability']:.2f} (random splits {lo:.2f}-{hi:.2f}); {label['within_noise_of_line']} of "
            f"{label['checkpoints']} checkpoints have a 95% CI (questions resampled) that contains the danger line"
            + (f", {label['above_line']} have a mean above it and {label['dangerous']} a CI wholly above it (median CI "
               f"half width {label['ci_half_width_median']:.4f} nats/token)" if "dangerous" in label else "") + ".")


def _short(d: dict[str, Any]) -> dict[str, Any]:
    return {"auroc": d["auroc"], "fnr": d["fnr"], "fpr": d["fpr"], "auroc_ci": d["auroc_ci"], "fnr_ci": d["fnr_ci"],
            "fpr_ci": d["fpr_ci"], "leave_one_type_out_auroc": d["leave_one_type_out"]["auroc"]}


def monitor_entries(r: MonitorResult) -> dict[str, Any]:
    """results.json entry of the monitor stage."""
    if r.status != "evaluated":
        return {"monitor": {"status": r.status, "types": r.types, "runs": r.runs, "calibration_types": r.calibration_types,
                            "heldout_types": r.heldout_types, "threshold": r.danger_threshold, "layer": r.layer,
                            "traits": r.names, "pc1_variance": r.pc1_variance, "auroc": None, "fnr": None, "fpr": None,
                            "lead_steps": None, "baselines": {}, "cost_ratio": None, "sae": r.sae, "label": r.label}}
    m = r.detectors["monitor"]
    lead = _lead_summary(r.lead_steps, r.every)
    return {"monitor": {
        "status": r.status, "types": r.types, "runs": r.runs, "calibration_types": r.calibration_types, "heldout_types": r.heldout_types,
        "threshold": r.danger_threshold, "alarm_threshold": m["threshold"], "layer": r.layer, "traits": r.names,
        "pc1_variance": r.pc1_variance, "auroc": m["auroc"], "auroc_ci": m["auroc_ci"], "fnr": m["fnr"],
        "fnr_ci": m["fnr_ci"], "fpr": m["fpr"], "fpr_ci": m["fpr_ci"], "lead_steps": lead["median"],
        "lead_steps_per_run": r.lead_steps, "lead": lead, "leave_one_type_out": m["leave_one_type_out"],
        "kind": r.monitor_kind, "kind_selection": {k: json_number(v) for k, v in r.kind_selection.items()},
        "variants": {name: _short(d) for name, d in r.detectors.items() if name in MONITOR_DETECTORS and name != "monitor"},
        "baselines": {name: _short(d) for name, d in r.detectors.items() if name not in MONITOR_DETECTORS},
        "cost_ratio": r.cost["cost_ratio"], "cost": r.cost, "sae": r.sae, "monitor_path": r.monitor_path, "label": r.label,
        "library_layer": r.library_layer, "skipped_layers": r.skipped_layers, "layer_heldout": r.layer_heldout,
        "layer_selection": {x: {k: json_number(v) for k, v in kinds.items()} for x, kinds in r.layer_selection.items()}}}


def monitor_headlines(r: MonitorResult) -> list[Headline]:
    """Summary line: the monitor's held-out AUROC."""
    if r.status != "evaluated" or r.detectors["monitor"]["auroc"] is None:
        return []
    m = r.detectors["monitor"]
    return [Headline("drift monitor AUROC (held-out types)", m["auroc"], tuple(m["auroc_ci"]), "")]


STAGES: tuple[Stage[Any], ...] = (
    Stage("monitor", "drift monitor", needs=("model", "drift_library"), provides=("drift_monitor",), run=run_monitor,
          restore=restore_monitor, section=monitor_section, entries=monitor_entries, headlines=monitor_headlines),
)
