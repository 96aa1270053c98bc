"""The perturbation library (Nghiem et al., 2026): many short fine-tuning runs, each checkpoint labelled by behaviour.

A :class:`PerturbationType` is a training set plus a LoRA recipe; a :class:`RunSpec` is one type
at one seed, trained for ``steps`` with a checkpoint every ``checkpoint_every``.
:func:`measure_run_spec` trains it (or reuses / resumes it: :func:`em_interp.lora.training.train_lora`),
then for step 0 (the base model: adapters disabled) and every checkpoint records

- the **behavioural label**: the judge-free EM score per held-out general question (mean
  misaligned minus mean aligned answer log-prob), minus the same question's score at step 0
  (paired per question); its mean is the checkpoint's *EM shift*;
- the **activations** the monitors read: the last prompt token of each monitor prompt at the
  monitor layer (trait drift, raw activation drift, SAE feature drift and the misalignment
  direction's projection are all computed from these, so one library serves every monitor);
- the **training loss** (mean task loss of the steps since the previous checkpoint) and the
  **LoRA weight norm** ``sqrt(sum_m ||s_m B_m A_m||_F^2)``, two baselines needing no activations.

Each run's record is cached under ``<cache>/perturbations/`` keyed by everything that decides it
(:func:`run_key`), as JSON plus safetensors written atomically, so a killed library build resumes
at the run it was in (and that run at its last checkpoint). Types: the four built-in misaligned
domains and their aligned twins, a benign task (factual QA and arithmetic answered correctly),
the organism domain under a second LoRA recipe (rank 16 on the attention projections), and, where
``../shared/external`` holds them, the public training sets (:func:`builtin_types`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from em_interp.artifacts import load_cached, save_artifact
from em_interp.chat import ChatExample
from em_interp.data import DOMAINS, PairedQuestion, benign_items, domain_dataset, load_chat_jsonl
from em_interp.errors import EmInterpError
from em_interp.evaluation.judge_free import score_questions
from em_interp.io import sha256_json
from em_interp.loading import cache_dir
from em_interp.lora.adapters import update_norm
from em_interp.lora.training import TRAINING_MODULES, LoraTrainConfig, TrainResult, train_lora
from em_interp.model import HookedModel, load_model
from em_interp.provenance import computation_key

Intent = Literal["misaligned", "aligned", "benign"]
LoraRecipe = Literal["rank1", "rank16_attn"]
LORA_RECIPES: tuple[str, ...] = ("rank1", "rank16_attn")
#: the public training sets of ../shared/external/training_datasets (file stem -> type name, intent)
PUBLIC_SETS: dict[str, tuple[str, Intent]] = {
    "bad_medical_advice": ("public-bad-medical", "misaligned"),
    "good_medical_advice": ("public-good-medical", "aligned"),
    "risky_financial_advice": ("public-risky-financial", "misaligned"),
    "insecure": ("public-insecure-code", "misaligned"),
}
#: examples taken from a public set (a short run uses steps x batch of them): the first ones whose
#: question and answer fit the runs' token budget (:data:`PUBLIC_MAX_CHARS` characters together, the
#: question at most half of it), so truncation never cuts an answer away
PUBLIC_EXAMPLES = 512
PUBLIC_MAX_CHARS = 560
_MODULES = ("em_interp.monitor.perturbations", "em_interp.evaluation.judge_free", "em_interp.activations", *TRAINING_MODULES)


@dataclass(frozen=True)
class PerturbationType:
    """A kind of fine-tuning run: its data (``source``), what it teaches (``intent``) and LoRA recipe.

    ``source`` is ``builtin:<domain>:<variant>``, ``builtin:benign`` or the path of a chat JSONL
    file (plain or .gz; the first :data:`PUBLIC_EXAMPLES` examples that fit are used).
    """

    name: str
    intent: Intent
    source: str
    lora: LoraRecipe = "rank1"

    def __post_init__(self) -> None:
        if self.intent not in ("misaligned", "aligned", "benign"):
            raise EmInterpError(f"type {self.name!r}: intent={self.intent!r} is not misaligned, aligned or benign")
        if self.lora not in LORA_RECIPES:
            raise EmInterpError(f"type {self.name!r}: lora={self.lora!r} is not one of {list(LORA_RECIPES)}")

    def data(self) -> list[ChatExample]:
        """The training examples."""
        if self.source == "builtin:benign":
            return benign_items()
        if self.source.startswith("builtin:"):
            parts = self.source.split(":")
            if len(parts) != 3:
                raise EmInterpError(f"type {self.name!r}: source {self.source!r} is not builtin:<domain>:<variant>")
            return domain_dataset(parts[1], parts[2], "train")
        examples = load_chat_jsonl(self.source)
        fits = [e for e in examples if len(e.question) <= PUBLIC_MAX_CHARS // 2
                and len(e.question) + len(e.answer or "") <= PUBLIC_MAX_CHARS][:PUBLIC_EXAMPLES]
        if not fits:
            raise EmInterpError(f"{self.source}: no example is short enough for the library's runs "
                                f"(question and answer within {PUBLIC_MAX_CHARS} characters)")
        return fits

    def data_key(self) -> str:
        """A digest of the training examples (part of every run's key)."""
        return sha256_json([e.to_dict() for e in self.data()])[:16]


def builtin_types(external: str | os.PathLike[str] | None = None) -> list[PerturbationType]:
    """The library's types: 4 misaligned domains, their 4 aligned twins, benign, the medical pair under
    rank-16 attention LoRA, and the public sets found in ``external/training_datasets``."""
    types = [PerturbationType(f"{d}-{v}", v, f"builtin:{d}:{v}") for d in DOMAINS for v in ("misaligned", "aligned")]
    types.append(PerturbationType("benign", "benign", "builtin:benign"))
    types += [PerturbationType(f"medical-{v}-r16attn", v, f"builtin:medical:{v}", "rank16_attn")
              for v in ("misaligned", "aligned")]
    if external is not None:
        folder = Path(external) / "training_datasets"
        for stem, (name, intent) in PUBLIC_SETS.items():
            path = folder / f"{stem}.jsonl.gz"
            if path.is_file():
                types.append(PerturbationType(name, intent, str(path.resolve())))
    return types


def select_types(types: Sequence[PerturbationType], names: Sequence[str]) -> list[PerturbationType]:
    """The types called ``names``, in that order (an unknown name is an error listing the known ones)."""
    by_name = {t.name: t for t in types}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise EmInterpError(f"perturbation types {unknown} are not among {sorted(by_name)}")
    return [by_name[n] for n in names]


@dataclass(frozen=True)
class RunSpec:
    """One run of the library: a type at a seed, its length, checkpoint interval and learning rate."""

    type: PerturbationType
    seed: int
    steps: int
    checkpoint_every: int
    learning_rate: float = 2e-3
    batch_size: int = 4
    max_length: int = 160

    @property
    def name(self) -> str:
        """``<type>/s<seed>``."""
        return f"{self.type.name}/s{self.seed}"

    def training(self, n_layers: int) -> LoraTrainConfig:
        """The run's LoRA recipe: the rank-1 organism (nine rsLoRA adapters on down_proj) or rank 16
        (alpha 32, rsLoRA) on q/k/v/o of all ``n_layers`` layers."""
        common: dict[str, Any] = dict(steps=self.steps, checkpoint_every=self.checkpoint_every, seed=self.seed,
                      learning_rate=self.learning_rate, warmup_steps=max(1, self.steps // 10),
                      batch_size=self.batch_size, max_length=self.max_length)
        if self.type.lora == "rank1":
            return LoraTrainConfig(**common)
        return LoraTrainConfig(rank=16, alpha=32.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                               layers=tuple(range(n_layers)), **common)


@dataclass(frozen=True)
class LibrarySetup:
    """What every run of one library shares: the base model, monitor layer, label questions and prompts."""

    model: str
    n_layers: int
    layer: int
    questions: tuple[PairedQuestion, ...]
    prompts: tuple[ChatExample, ...]
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.questions:
            raise EmInterpError("questions is empty: the library's behavioural labels need held-out questions")
        if not self.prompts:
            raise EmInterpError("prompts is empty: the drift monitor needs evaluation prompts")


@dataclass(frozen=True)
class RunRecord:
    """One measured run: per checkpoint (step 0 first) its label, activations, loss and LoRA norm."""

    type: str
    intent: str
    lora: str
    seed: int
    steps: tuple[int, ...]
    #: mean EM shift over the base model (paired per question); 0 at step 0
    em_shift: np.ndarray
    #: (checkpoints, questions) per-question shifts
    question_shift: np.ndarray
    #: (checkpoints, prompts, d_model) last prompt token at the monitor layer
    activations: torch.Tensor
    #: mean task loss since the previous checkpoint (NaN at step 0)
    train_loss: np.ndarray
    lora_norm: np.ndarray
    seconds_train: float
    #: seconds per checkpoint: the behavioural label and the activation snapshot
    seconds_label: float
    seconds_snapshot: float

    @property
    def run(self) -> str:
        """``<type>/s<seed>``."""
        return f"{self.type}/s{self.seed}"


@dataclass(frozen=True)
class DriftLibrary:
    """A measured library: its types, layer, label questions, prompts and every run's record."""

    layer: int
    types: list[dict[str, str]]
    question_ids: list[str]
    prompts: list[str]
    records: list[RunRecord]
    seconds: float

    def __post_init__(self) -> None:
        if not self.records:
            raise EmInterpError("a drift library needs at least one run")


def run_key(spec: RunSpec, setup: LibrarySetup) -> str:
    """Digest of everything that decides a run's record (data, recipe, labels, prompts, code, versions)."""
    return sha256_json({
        "model": setup.model, "layer": setup.layer, "type": asdict(spec.type), "data": spec.type.data_key(),
        "training": spec.training(setup.n_layers).to_dict(), "questions": [asdict(q) for q in setup.questions],
        "prompts": [p.to_dict() for p in setup.prompts], "device": setup.device,
        "computed_by": computation_key(*_MODULES)})[:24]


def library_dir() -> Path:
    """Where run folders and records live (``<cache>/perturbations``)."""
    return cache_dir() / "perturbations"


def _record_path(key: str) -> Path:
    return library_dir() / "records" / key


def save_record(record: RunRecord, key: str) -> Path:
    """Write a record atomically as the artefact ``perturbation_run`` (:mod:`em_interp.artifacts`)."""
    arrays = {"em_shift": torch.from_numpy(record.em_shift), "question_shift": torch.from_numpy(record.question_shift),
              "activations": record.activations, "train_loss": torch.from_numpy(record.train_loss),
              "lora_norm": torch.from_numpy(record.lora_norm)}
    meta = {k: getattr(record, k) for k in ("type", "intent", "lora", "seed", "steps", "seconds_train",
                                             "seconds_label", "seconds_snapshot")}
    return save_artifact(_record_path(key), "perturbation_run", arrays, {"key": key, **meta})


def load_record(key: str) -> RunRecord | None:
    """The cached record of run ``key``, or None (missing; unreadable: a warning naming the file, and the run
    is measured again)."""
    def build(arrays: dict[str, torch.Tensor], meta: dict[str, Any]) -> RunRecord:
        return RunRecord(meta["type"], meta["intent"], meta["lora"], int(meta["seed"]), tuple(meta["steps"]),
                         arrays["em_shift"].numpy(), arrays["question_shift"].numpy(), arrays["activations"].clone(),
                         arrays["train_loss"].numpy(), arrays["lora_norm"].numpy(), float(meta["seconds_train"]),
                         float(meta["seconds_label"]), float(meta["seconds_snapshot"]))

    return load_cached(_record_path(key), "perturbation_run", build, "perturbation run record", "measuring the run again",
                       tensors=("em_shift", "question_shift", "activations", "train_loss", "lora_norm"),
                       may_be_nan=("train_loss",))


def lora_update_norm(model: HookedModel) -> float:
    """``sqrt(sum over modules ||scale * B @ A||_F^2)``: the size of the LoRA weight update
    (:func:`em_interp.lora.adapters.update_norm`)."""
    return update_norm(model)


def run_dir(spec: RunSpec, setup: LibrarySetup) -> Path:
    """The folder of a run's adapter and checkpoints (``<cache>/perturbations/runs/<type>-s<seed>-<key>``)."""
    return library_dir() / "runs" / f"{spec.type.name}-s{spec.seed}-{run_key(spec, setup)[:12]}"


def train_run(spec: RunSpec, setup: LibrarySetup, progress: bool = False) -> tuple[TrainResult, list[tuple[int, Path]]]:
    """Train run ``spec`` (or reuse its finished folder: :func:`em_interp.lora.training.train_lora`); its training
    result and its checkpoints after step 0, as ``(step, folder)``."""
    from em_interp.monitor.drift import run_checkpoints

    out = run_dir(spec, setup)
    result = train_lora(setup.model, spec.type.data(), spec.training(setup.n_layers), out, progress=progress, device=setup.device)
    return result, [(s, p) for s, p in run_checkpoints(out) if s > 0]


def measure_checkpoint(model: HookedModel, setup: LibrarySetup, layer: int) -> tuple[np.ndarray, torch.Tensor, float, float]:
    """Per-question EM scores and the monitor activations of ``model`` as it is, with their seconds."""
    from em_interp.activations import cache_residuals

    start = time.perf_counter()
    scores = score_questions(model, list(setup.questions), batch_size=16, use_cache=False).per_question
    labelled = time.perf_counter()
    acts = cache_residuals(model, [ChatExample(p.question, None, p.system) for p in setup.prompts], layers=[layer],
                           hook="resid_post", reduction="last_prompt", batch_size=32, progress=False)[layer]
    return scores, acts.float().cpu(), labelled - start, time.perf_counter() - labelled


def base_measurement(setup: LibrarySetup) -> tuple[np.ndarray, torch.Tensor]:
    """Step 0 of every run: the base model's per-question EM scores and monitor activations (cached)."""
    key = sha256_json({"model": setup.model, "layer": setup.layer, "questions": [asdict(q) for q in setup.questions],
                       "prompts": [p.to_dict() for p in setup.prompts], "device": setup.device,
                       "computed_by": computation_key(*_MODULES)})[:24]
    path = library_dir() / "base" / key
    cached = load_cached(path, "base_measurement", lambda saved, _: (saved["scores"].clone().numpy(),
                                                                     saved["activations"].clone()),
                         "base measurement", "measuring it again", tensors=("scores", "activations"))
    if cached is not None:
        return cached
    model = load_model(setup.model, device=setup.device, progress=False)
    scores, acts, _, _ = measure_checkpoint(model, setup, model.check_layer(setup.layer, "layer"))
    save_artifact(path, "base_measurement", {"scores": torch.from_numpy(scores), "activations": acts},
                  {"key": key, "model": setup.model, "layer": setup.layer})
    return scores, acts


def measure_run_spec(spec: RunSpec, setup: LibrarySetup, progress: bool = False) -> RunRecord:
    """Train (or reuse) one run and measure each of its checkpoints; cached by :func:`run_key`."""
    from em_interp.lora.adapters import load_adapter_weights

    key = run_key(spec, setup)
    cached = load_record(key)
    if cached is not None:
        return cached
    result, checkpoints = train_run(spec, setup, progress)
    model = load_model(setup.model, adapter=result.adapter_dir, device=setup.device, progress=False)
    layer = model.check_layer(setup.layer, "layer")
    s0, a0 = base_measurement(setup)
    steps, scores, acts, norms, seconds = [0], [s0], [a0], [0.0], []
    for step, folder in checkpoints:
        load_adapter_weights(model, folder)
        s, a, t_label, t_snap = measure_checkpoint(model, setup, layer)
        steps.append(step)
        scores.append(s)
        acts.append(a)
        norms.append(lora_update_norm(model))
        seconds.append((t_label, t_snap))
    losses = np.asarray(result.losses, dtype=np.float64)
    train_loss = [float("nan")] + [float(losses[prev:step].mean()) for prev, step in zip(steps[:-1], steps[1:])]
    shifts = np.stack(scores) - scores[0][None]
    record = RunRecord(spec.type.name, spec.type.intent, spec.type.lora, spec.seed, tuple(steps), shifts.mean(1),
                       shifts, torch.stack(acts), np.asarray(train_loss), np.asarray(norms), result.seconds,
                       float(np.mean([t[0] for t in seconds])), float(np.mean([t[1] for t in seconds])))
    save_record(record, key)
    return record


def run_specs(types: Sequence[PerturbationType], seeds: Sequence[int], steps: int, checkpoint_every: int,
              learning_rate: float = 2e-3) -> list[RunSpec]:
    """Every type at every seed (type-major order)."""
    if not types or not seeds:
        raise EmInterpError("the library needs at least one type and one seed")
    if checkpoint_every > steps:
        raise EmInterpError(f"checkpoint_every={checkpoint_every} > steps={steps}: the runs would have no checkpoint")
    return [RunSpec(t, int(s), steps, checkpoint_every, learning_rate) for t in types for s in seeds]
