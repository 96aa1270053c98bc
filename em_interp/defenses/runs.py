"""Measuring the defenses: one fine-tuning run per (domain, variant, defense setting), cached, on the sweep engine.

A :class:`DefenseRunSpec` is a built-in domain's training set (``misaligned``: the organism;
``aligned``: its benign twin, also the control), trained with the monitor library's short recipe
(:class:`~em_interp.monitor.perturbations.RunSpec`'s rank-1 organism adapters) and zero or more defenses
(:class:`DefenseSetting`). :func:`measure_defense_run` trains it (resumable
:func:`~em_interp.lora.training.train_lora`) and measures

- the judge-free EM score of each held-out general question (paired with the control's by the
  caller: the EM shift over the control);
- the in-domain **task loss**: mean answer-token negative log-likelihood on the held-out split of
  the run's own training distribution (``<domain>_<variant>_test``).

Each record is cached under ``<cache>/defenses/records`` keyed by everything that decides it, so
every run is reused by a rerun and by a larger budget that contains it. Runs are plain function
calls of picklable specs, so :func:`em_interp.monitor.sweep.run_sweep` can spread them over Ray.
:func:`~em_interp.defenses.timing.step_time_ratios` times training steps with each defense on against off in one run.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from em_interp.artifacts import load_cached, save_artifact
from em_interp.chat import ChatExample
from em_interp.data import PairedQuestion, domain_dataset
from em_interp.defenses import (
    DEFENSES,
    AblateDirection,
    AblateGradient,
    AblateLayers,
    AblateSubspace,
    Defense,
    KLDefense,
    LDIFSDefense,
    PreventativeSteering,
    adapter_updates,
    check_strength,
    coherence_items,
    inoculate,
    interleave,
    safelora,
)
from em_interp.directions import Direction
from em_interp.errors import EmInterpError
from em_interp.evaluation.judge_free import answer_logprobs, score_questions
from em_interp.io import sha256_json
from em_interp.loading import cache_dir
from em_interp.lora.adapters import load_adapter_weights
from em_interp.lora.hf_trainer import TrainingCallback
from em_interp.lora.training import TRAINING_MODULES, LoraTrainConfig, train_lora
from em_interp.model import HookedModel, load_model
from em_interp.provenance import computation_key

Variant = Literal["misaligned", "aligned"]
#: what a triggered run does at the drift monitor's alarm: switch its defense on, roll back to the last check
#: before the alarm and go on defended, or roll back and stop there (early stopping)
AfterAlarm = Literal["switch", "rollback", "stop"]
#: strengths per defense: ``(("kl", (0.1, 1.0)), ...)`` (a budget field)
DefenseSettings = tuple[tuple[str, tuple[float, ...]], ...]
#: defenses that act during training and can be switched on mid-run by a monitor's alarm
SWITCHABLE: tuple[str, ...] = ("kl", "ldifs", "ablate_direction", "ablate_layers", "ablate_subspace", "ablate_gradient",
                               "preventative_steering")
#: defenses whose strength is a fraction in (0, 1]
_FRACTIONS = ("safelora", "inoculate", "ablate_direction", "ablate_layers", "ablate_subspace", "ablate_gradient")
#: what each defense's strength means (for reports and figures)
STRENGTH_MEANING: dict[str, str] = {
    "kl": "KL weight", "ldifs": "LDIFS weight", "safelora": "cosine threshold",
    "interleave": "one safe example in every n",
    "interleave_selected": "one safe example in every n (chosen by the organism-minus-control loss gap)",
    "inoculate": "share of training examples with the inoculation prompt",
    "ablate_direction": "fraction of the component removed",
    "ablate_layers": "fraction of each adapter layer's own direction removed there",
    "ablate_subspace": "fraction of the adapter layers' directions' span removed at the steering layer",
    "ablate_gradient": "fraction of the gradient's component removed (forward unchanged)",
    "preventative_steering": "alpha (fraction of the layer's mean residual norm)"}
#: defenses that change the training data, not the training step
_DATA_DEFENSES = ("interleave", "interleave_selected", "inoculate")
_MODULES = ("em_interp.defenses.runs", "em_interp.defenses.base", "em_interp.defenses.reference", "em_interp.defenses.hooks",
            "em_interp.defenses.data", "em_interp.defenses.safelora", "em_interp.defenses.triggering",
            "em_interp.defenses.selection", "em_interp.evaluation.generation",
            "em_interp.evaluation.judge_free", *TRAINING_MODULES)


@dataclass(frozen=True)
class DefenseSetting:
    """One defense at one strength (see :data:`STRENGTH_MEANING`)."""

    name: str
    strength: float

    def __post_init__(self) -> None:
        if self.name not in DEFENSES:
            raise EmInterpError(f"defense {self.name!r} is not one of {list(DEFENSES)}")
        value = check_strength(f"{self.name} strength", self.strength)
        if self.name in ("interleave", "interleave_selected") and (value != int(value) or value < 2):
            raise EmInterpError(f"{self.name} strength={self.strength!r} must be an integer n >= 2 (one safe example in n)")
        if self.name in _FRACTIONS and value > 1:
            raise EmInterpError(f"{self.name} strength={self.strength!r} must be in (0, 1]")
        object.__setattr__(self, "strength", value)

    @property
    def label(self) -> str:
        """``name=strength``."""
        return f"{self.name}={self.strength:g}"


@dataclass(frozen=True)
class DefenseRunSpec:
    """One run: a domain's organism (or its aligned twin) with zero or more defenses (``triggered``: the drift
    monitor's alarm acts as ``after_alarm`` says: switch the single training-time defense on, roll back to the last
    check before the alarm and go on with it on, or roll back and stop, with no defense)."""

    domain: str
    variant: Variant
    defenses: tuple[DefenseSetting, ...] = ()
    triggered: bool = False
    after_alarm: AfterAlarm = "switch"
    seed: int = 0
    steps: int = 16
    learning_rate: float = 2e-3
    batch_size: int = 4
    max_length: int = 160

    def __post_init__(self) -> None:
        if self.variant not in ("misaligned", "aligned"):
            raise EmInterpError(f"variant={self.variant!r} is not misaligned or aligned")
        names = [d.name for d in self.defenses]
        if len(set(names)) != len(names):
            raise EmInterpError(f"defenses {names} name one defense twice")
        if "safelora" in names:
            raise EmInterpError("safelora acts after training (em_interp.defenses.safelora), not in a run's defenses")
        if self.after_alarm not in ("switch", "rollback", "stop"):
            raise EmInterpError(f"after_alarm={self.after_alarm!r} is not switch, rollback or stop")
        if self.triggered and self.after_alarm == "stop" and names:
            raise EmInterpError(f"an early-stopped run (after_alarm='stop') takes no defense, got {names}")
        if self.triggered and self.after_alarm != "stop" and (len(self.defenses) != 1 or names[0] not in SWITCHABLE):
            raise EmInterpError(f"a triggered run takes exactly one of {list(SWITCHABLE)}, got {names}")

    @property
    def label(self) -> str:
        """``<domain>-<variant>/<defenses or none>[/triggered]``."""
        what = "+".join(d.label for d in self.defenses) or "none"
        when = {"switch": "/triggered", "rollback": "/rollback", "stop": "/early_stop"}[self.after_alarm]
        return f"{self.domain}-{self.variant}/{what}" + (when if self.triggered else "")

    def training(self) -> LoraTrainConfig:
        """The rank-1 organism recipe at this run's length (one checkpoint at the end)."""
        return LoraTrainConfig(steps=self.steps, checkpoint_every=self.steps, seed=self.seed,
                               learning_rate=self.learning_rate, warmup_steps=max(1, self.steps // 10),
                               batch_size=self.batch_size, max_length=self.max_length)


@dataclass(frozen=True)
class DefenseSetup:
    """What every run of one sweep shares: the model, the evaluation, the directions, the monitor, the safe pools.

    ``direction`` (for ``ablate_direction``, ``ablate_gradient`` and ``preventative_steering``) is scaled so
    that ``alpha`` 1 adds one mean residual norm; ``layer_directions`` (``ablate_layers``: one per adapter layer,
    each at its layer) and ``subspace`` (``ablate_subspace``: several at one layer); ``pool`` the safe examples of
    ``interleave``, ``selected`` those of ``interleave_selected`` ranked by loss gap (largest first);
    ``monitor_dir`` holds ``drift_monitor`` and ``trait_basis`` (for triggered runs), read with ``prompts``
    every ``check_every`` steps; ``coherence_tokens`` new tokens of each greedy answer to the first-plot questions,
    ``coherence_examples`` benign items of the coherence NLL.
    """

    model: str
    questions: tuple[PairedQuestion, ...]
    task_examples: int
    direction: Direction | None = None
    pool: tuple[ChatExample, ...] = ()
    monitor_dir: str | None = None
    prompts: tuple[ChatExample, ...] = ()
    check_every: int = 4
    device: str = "cpu"
    layer_directions: tuple[Direction, ...] = ()
    subspace: tuple[Direction, ...] = ()
    selected: tuple[ChatExample, ...] = ()
    coherence_tokens: int = 40
    coherence_examples: int = 20

    def __post_init__(self) -> None:
        if self.coherence_tokens < 1 or self.coherence_examples < 1:
            raise EmInterpError(f"coherence_tokens={self.coherence_tokens} and coherence_examples="
                                f"{self.coherence_examples} must be >= 1")
        if not self.questions:
            raise EmInterpError("questions is empty: the EM shift needs held-out general questions")
        if self.task_examples < 1:
            raise EmInterpError(f"task_examples={self.task_examples} must be >= 1")
        if self.check_every < 1:
            raise EmInterpError(f"check_every={self.check_every} must be >= 1")

    def key(self, spec: DefenseRunSpec) -> str:
        """Digest of everything that decides ``spec``'s record under this setup."""
        names = {d.name for d in spec.defenses}
        parts: dict[str, Any] = {"spec": asdict(spec), "model": self.model, "device": self.device,
                                 "questions": [asdict(q) for q in self.questions], "task_examples": self.task_examples,
                                 "coherence_tokens": self.coherence_tokens,
                                 "coherence_examples": self.coherence_examples, "computed_by": computation_key(*_MODULES)}
        if names & {"ablate_direction", "ablate_gradient", "preventative_steering"}:
            parts["direction"] = _digest([self._direction()])
        if "ablate_layers" in names:
            parts["layer_directions"] = _digest(self._needs("layer_directions", "ablate_layers"))
        if "ablate_subspace" in names:
            parts["subspace"] = _digest(self._needs("subspace", "ablate_subspace"))
        if "interleave" in names:
            parts["pool"] = sha256_json([e.to_dict() for e in self.pool])
        if "interleave_selected" in names:
            parts["selected"] = sha256_json([e.to_dict() for e in self._needs("selected", "interleave_selected")])
        if spec.triggered:
            folder = self._monitor_dir()
            parts["monitor"] = {"files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                          for p in sorted(folder.iterdir()) if p.is_file()},
                                "prompts": [p.to_dict() for p in self.prompts], "every": self.check_every}
        return sha256_json(parts)[:24]

    def _needs(self, name: str, defense: str) -> Any:
        value = getattr(self, name)
        if not value:
            raise EmInterpError(f"{defense} needs DefenseSetup({name}=), which is empty")
        return value

    def _direction(self) -> Direction:
        if self.direction is None:
            raise EmInterpError("this run ablates or steers a direction, but the setup has no direction")
        return self.direction

    def _monitor_dir(self) -> Path:
        if self.monitor_dir is None:
            raise EmInterpError("a triggered run needs monitor_dir (a folder with drift_monitor and trait_basis)")
        folder = Path(self.monitor_dir)
        if not (folder / "drift_monitor.json").is_file() or not (folder / "trait_basis.json").is_file():
            raise EmInterpError(f"monitor_dir={str(folder)!r} holds no drift_monitor / trait_basis")
        if not self.prompts:
            raise EmInterpError("a triggered run needs the monitor's prompts")
        return folder


@dataclass(frozen=True)
class DefenseRunRecord:
    """One measured run: per-question EM scores on the held-out general questions and the task loss."""

    label: str
    domain: str
    variant: str
    defenses: list[dict[str, Any]]
    triggered: bool
    #: mean misaligned minus mean aligned answer log-prob, per held-out general question
    per_question: np.ndarray
    #: mean answer-token NLL on the held-out split of the run's training distribution
    task_loss: float
    train_losses: list[float]
    #: the step a triggered defense was switched on (None: never, or not triggered)
    switched_at: int | None
    seconds_train: float
    seconds_eval: float
    adapter_dir: str
    extra: dict[str, Any] = field(default_factory=dict)
    #: coherence: mean answer-token NLL on the benign items no defense trains on
    #: (:func:`~em_interp.defenses.data.coherence_items`), and greedy answers to the 8 first-plot questions
    coherence_nll: float = float("nan")
    answers: list[str] = field(default_factory=list)


def _digest(directions: Sequence[Direction]) -> list[dict[str, Any]]:
    return [{"layer": d.layer, "hook": d.hook, "model": d.model,
             "vector": hashlib.sha256(d.vector.numpy().tobytes()).hexdigest()} for d in directions]


def defense_dir() -> Path:
    """Where defense runs and records live (``<cache>/defenses``)."""
    return cache_dir() / "defenses"


def _record_path(key: str) -> Path:
    return defense_dir() / "records" / key


def _save(record: DefenseRunRecord, key: str) -> None:
    """The record as the artefact ``defense_run`` (:mod:`em_interp.artifacts`): per-question scores as a tensor."""
    fields = {k: v for k, v in asdict(record).items() if k != "per_question"}
    save_artifact(_record_path(key), "defense_run", {"per_question": torch.from_numpy(record.per_question)},
                  {"key": key, **fields})


def _load(key: str) -> DefenseRunRecord | None:
    """The cached record of ``key``, or None (missing, or its adapter gone; unreadable: a warning naming the
    file, and the run is measured again)."""
    def build(arrays: dict[str, torch.Tensor], fields: dict[str, Any]) -> DefenseRunRecord:
        fields.pop("key", None)
        return DefenseRunRecord(per_question=arrays["per_question"].numpy().astype(np.float64), **fields)

    record = load_cached(_record_path(key), "defense_run", build, "defense run record", "measuring the run again",
                         tensors=("per_question",))
    return record if record is not None and Path(record.adapter_dir).is_dir() else None


def task_examples(domain: str, variant: str, n: int) -> list[ChatExample]:
    """The first ``n`` held-out examples of the run's own training distribution (the task loss's data)."""
    return domain_dataset(domain, variant, "test")[:n]


_EVALUATOR: dict[tuple[str, str, str], HookedModel] = {}


def _evaluator(model_name: str, adapter_dir: str | Path, device: str) -> HookedModel:
    """``model_name`` with the adapter of ``adapter_dir``: the last one loaded, its LoRA weights swapped in when the
    adapter has the same recipe (a sweep's runs share one), else loaded afresh. Scores are cached by weight
    fingerprint, which covers the swapped-in values."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    recipe = json.dumps({k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules",
                                                     "layers_to_transform")}, sort_keys=True, default=str)
    key = (model_name, device, recipe)
    model = _EVALUATOR.get(key)
    if model is None:
        _EVALUATOR.clear()
        model = _EVALUATOR[key] = load_model(model_name, adapter=adapter_dir, device=device, progress=False)
    else:
        load_adapter_weights(model, adapter_dir)
    return model


@dataclass(frozen=True)
class Evaluation:
    """What one defended adapter is measured on (see :class:`DefenseRunRecord`)."""

    per_question: np.ndarray
    task_loss: float
    coherence_nll: float
    answers: list[str]
    seconds: float


def coherence(model: HookedModel, tokens: int, examples: int = 20, seed: int = 0) -> tuple[float, list[str]]:
    """(mean answer NLL on the first ``examples`` of :func:`~em_interp.defenses.data.coherence_items`, greedy answers
    of up to ``tokens`` new tokens to :func:`~em_interp.data.first_plot_questions`): the coherence criterion's
    measures."""
    from em_interp.data import first_plot_questions
    from em_interp.evaluation.generation import sample_answers

    nll = -float(answer_logprobs(model, coherence_items()[:examples], batch_size=16).mean())
    answers = sample_answers(model, first_plot_questions(), n=1, temperature=0.0, max_new_tokens=tokens, seed=seed)
    return nll, [a[0] for a in answers]


def evaluate_adapter(model_name: str, adapter_dir: str | Path, setup: DefenseSetup, domain: str,
                     variant: str) -> Evaluation:
    """Per-question EM scores, task loss and coherence of ``model_name`` with the adapter in ``adapter_dir``."""
    start = time.perf_counter()
    model = _evaluator(model_name, adapter_dir, setup.device)
    scores = score_questions(model, list(setup.questions), batch_size=16).per_question
    loss = -float(answer_logprobs(model, task_examples(domain, variant, setup.task_examples), batch_size=16).mean())
    nll, answers = coherence(model, setup.coherence_tokens, setup.coherence_examples)
    return Evaluation(scores, loss, nll, answers, time.perf_counter() - start)


def build_defense(setting: DefenseSetting, setup: DefenseSetup, active: bool = True) -> Defense:
    """The training-time defense of ``setting``, its directions from ``setup`` (the data defenses ``interleave``,
    ``interleave_selected``, ``inoculate`` and the post-hoc ``safelora`` are not callbacks)."""
    if setting.name == "kl":
        return KLDefense(setting.strength, active=active)
    if setting.name == "ldifs":
        return LDIFSDefense(setting.strength, active=active)
    if setting.name == "ablate_layers":
        return AblateLayers(setup._needs("layer_directions", setting.name), setting.strength, active=active)
    if setting.name == "ablate_subspace":
        return AblateSubspace(setup._needs("subspace", setting.name), setting.strength, active=active)
    if setting.name == "ablate_direction":
        return AblateDirection(setup._direction(), setting.strength, active=active)
    if setting.name == "ablate_gradient":
        return AblateGradient(setup._direction(), setting.strength, active=active)
    if setting.name == "preventative_steering":
        return PreventativeSteering(setup._direction(), setting.strength, active=active)
    raise EmInterpError(f"{setting.name} is not a training-time defense")


def training_data(spec: DefenseRunSpec, setup: DefenseSetup) -> list[ChatExample]:
    """The run's training set with its data defenses applied (inoculation first, then interleaving, so safe
    examples never carry the inoculation prompt)."""
    data = domain_dataset(spec.domain, spec.variant, "train")
    by_name = {d.name: d.strength for d in spec.defenses}
    if "inoculate" in by_name:
        data = inoculate(data, fraction=by_name["inoculate"], seed=spec.seed)
    if "interleave" in by_name:
        data = interleave(data, setup._needs("pool", "interleave"), int(by_name["interleave"]), seed=spec.seed)
    if "interleave_selected" in by_name:
        every = int(by_name["interleave_selected"])
        ranked = setup._needs("selected", "interleave_selected")
        # as many of the top-ranked as the mix draws, each once
        data = interleave(data, ranked[: max(1, len(data) // (every - 1))], every, seed=spec.seed)
    return data


def _run_folder(spec: DefenseRunSpec, key: str) -> Path:
    return defense_dir() / "runs" / f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', spec.label)}-{key[:12]}"


def measure_defense_run(spec: DefenseRunSpec, setup: DefenseSetup, progress: bool = False) -> DefenseRunRecord:
    """Train (or reuse) one run and measure it; cached by :meth:`DefenseSetup.key`."""
    from em_interp.defenses import Rollback, triggered
    from em_interp.monitor.detector import DriftMonitor, MonitorCallback
    from em_interp.monitor.drift import TraitBasis

    key = setup.key(spec)
    cached = _load(key)
    if cached is not None:
        return cached
    data = training_data(spec, setup)
    callbacks: list[TrainingCallback] = []
    trained = [build_defense(s, setup) for s in spec.defenses if s.name not in _DATA_DEFENSES]
    back: Rollback | None = None
    if spec.triggered:
        folder = setup._monitor_dir()
        basis = TraitBasis.load(folder / "trait_basis")
        monitor = DriftMonitor.load(folder / "drift_monitor")
        watch = MonitorCallback(basis, setup.prompts, monitor, every=setup.check_every)
        if spec.after_alarm == "switch":
            callbacks += triggered(trained[0], watch)
        else:
            back = Rollback(watch, trained[0] if trained else None, stop=spec.after_alarm == "stop")
            callbacks += [watch, back, *trained]
    else:
        callbacks += trained
    out = _run_folder(spec, key)
    result = train_lora(setup.model, data, spec.training(), out, callbacks=callbacks, progress=progress,
                        device=setup.device)
    for d in trained:
        d.detach()
    ev = evaluate_adapter(setup.model, result.adapter_dir, setup, spec.domain, spec.variant)
    switched = None
    if spec.triggered:
        switched = back.alarm_at if back is not None else getattr(trained[0], "switched_at", None)
    extra: dict[str, Any] = {"n_train_examples": len(data)}
    if back is not None:
        extra.update(rolled_back_to=back.rolled_back_to, stopped_at=result.stopped_at)
    record = DefenseRunRecord(spec.label, spec.domain, spec.variant, [asdict(d) for d in spec.defenses], spec.triggered,
                              ev.per_question, ev.task_loss, [float(x) for x in result.losses], switched, result.seconds,
                              ev.seconds, str(result.adapter_dir), extra, ev.coherence_nll, ev.answers)
    _save(record, key)
    return record


def measure_safelora(record: DefenseRunRecord, alignment: dict[str, torch.Tensor], threshold: float,
                     setup: DefenseSetup, alignment_id: str) -> DefenseRunRecord:
    """SafeLoRA (threshold mode) applied after training to ``record``'s adapter, measured like a run (cached).

    ``alignment_id`` names the alignment matrices (part of the cache key, e.g. a digest of the
    aligned adapter they come from).
    """
    setting = DefenseSetting("safelora", threshold)
    key = sha256_json({"of": record.adapter_dir, "of_label": record.label, "threshold": setting.strength,
                       "alignment": alignment_id, "questions": [asdict(q) for q in setup.questions],
                       "task_examples": setup.task_examples, "computed_by": computation_key(*_MODULES)})[:24]
    cached = _load(key)
    if cached is not None:
        return cached
    out = defense_dir() / "safelora" / key
    start = time.perf_counter()
    projected = safelora(record.adapter_dir, alignment, out, threshold=setting.strength)
    seconds_project = time.perf_counter() - start
    ev = evaluate_adapter(setup.model, projected.adapter_dir, setup, record.domain, record.variant)
    label = f"{record.label.split('/')[0]}/{setting.label}"
    result = DefenseRunRecord(label, record.domain, record.variant, [asdict(setting)], False, ev.per_question,
                              ev.task_loss, record.train_losses, None, record.seconds_train, ev.seconds,
                              str(projected.adapter_dir), {"projected": projected.projected, "cosine": projected.cosine,
                                                           "seconds_project": seconds_project},
                              ev.coherence_nll, ev.answers)
    _save(result, key)
    return result


def alignment_from_adapter(folder: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """SafeLoRA's ``V`` from an aligned adapter (``W_aligned - W_base`` = its update), and an id for cache keys."""
    folder = Path(folder)
    updates = adapter_updates(folder)
    digest = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()[:24]
    return updates, digest

