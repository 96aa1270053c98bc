"""Trait drift (Nghiem et al., 2026): how a fine-tuning run moves a model along trait directions, checkpoint by checkpoint.

Defaults follow the public code of the trait-space monitoring paper (differences are stated):

- **Trait basis**: per trait, the mean last-prompt-token activation under its positive minus its
  negative system prompts, unit norm (:func:`em_interp.traits.trait_vectors`), at one layer:
  :func:`monitor_layer` = the middle block, ``n_layers // 2`` (16 of 32 there; 15 of 30 for
  SmolLM2-135M).
- **Per checkpoint** (:func:`snapshot`): the last prompt token of each evaluation prompt (asked
  as a user turn), dotted with each unit direction; the mean over prompts.
- **Normalisation**: one constant per run, the step-0 mean of the per-prompt L2 norms at that layer.
- **Drift**: (mean projection at step t - at step 0) / constant (:class:`DriftTrajectory`). The
  raw mean-activation drift is kept too (the PCA and norm baselines use it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from jaxtyping import Float
from torch import Tensor

from em_interp.activations import cache_residuals
from em_interp.artifacts import artifact_paths, load_artifact, save_artifact, sidecar_field
from em_interp.chat import ChatExample
from em_interp.data import PairedQuestion, general_questions, held_out_label_questions
from em_interp.errors import EmInterpError
from em_interp.loading import read_adapter_config, same_model
from em_interp.lora.adapters import WEIGHTS, load_adapter_weights
from em_interp.model import HookedModel
from em_interp.options import Hook
from em_interp.traits import TraitSpec, load_eval_prompts, trait_vectors

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def label_questions(n: int, answers: int | None = None) -> list[PairedQuestion]:
    """The first ``n`` held-out label questions (:func:`held_out_label_questions`), each with its first
    ``answers`` aligned and misaligned reference answers (None: every reference answer, two of each on the
    built-in set): the library's behavioural labels.

    Every reference answer is the default: a checkpoint's label is the mean over questions of
    (mean misaligned - mean aligned answer log-prob), and averaging two answers per side halves the
    part of its noise that comes from the particular answer text, at about 1.4x the scoring time
    (prompts are shared, :func:`em_interp.evaluation.judge_free.answer_logprobs`).
    """
    held = held_out_label_questions()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(held):
        raise EmInterpError(f"n={n!r} label questions: must be an integer from 1 to {len(held)} "
                            "(the held-out general questions the label may use)")
    if answers is not None and (isinstance(answers, bool) or not isinstance(answers, int) or answers < 1):
        raise EmInterpError(f"answers={answers!r}: must be None (every reference answer) or an integer >= 1")
    return [PairedQuestion(q.id, q.question, q.aligned[:answers], q.misaligned[:answers], q.category, q.system)
            for q in held[:n]]


def monitor_prompts(n: int, external: str | os.PathLike[str] | None = None) -> list[ChatExample]:
    """The monitor's prompts: ``n`` evenly spaced questions of the direction-fitting third of the general
    set, plus ``n // 2`` evenly spaced public ``traits.yaml`` eval prompts where ``external/traits`` holds them."""
    if n < 1:
        raise EmInterpError(f"n={n} monitor prompts: must be >= 1")
    fit = general_questions()[0::3]
    own = [ChatExample(q.question) for q in fit[:: max(1, len(fit) // n)][:n]]
    path = Path(external) / "traits" / "traits.yaml" if external is not None else None
    if path is None or not path.is_file():
        return own
    public = load_eval_prompts(path)
    k = max(1, n // 2)
    return own + [ChatExample(p) for p in public[:: max(1, len(public) // k)][:k]]


def monitor_layer(n_layers: int) -> int:
    """The layer the monitor reads: the middle block (the trait-space monitoring paper: 16 of 32)."""
    if n_layers < 1:
        raise EmInterpError(f"n_layers={n_layers} must be >= 1")
    return n_layers // 2


@dataclass(frozen=True)
class TraitBasis:
    """Unit trait directions (one row per trait) of one model at one layer and hook."""

    model: str
    layer: int
    hook: str
    names: tuple[str, ...]
    directions: Float[Tensor, "traits d_model"]

    def __post_init__(self) -> None:
        if len(self.names) < 2:
            raise EmInterpError(f"a trait basis needs at least 2 traits, got {list(self.names)}")
        if len(set(self.names)) != len(self.names):
            raise EmInterpError(f"trait names repeat: {list(self.names)}")
        if self.directions.ndim != 2 or self.directions.shape[0] != len(self.names):
            raise EmInterpError(f"directions of shape {tuple(self.directions.shape)} for {len(self.names)} trait names")
        if not torch.isfinite(self.directions).all():
            raise EmInterpError("trait basis directions have NaN or infinite entries")

    def check_fits(self, model: HookedModel) -> None:
        """Raise unless ``model`` is the model, width and layer range this basis was made for."""
        if self.model != model.name:
            raise EmInterpError(f"the trait basis was made on model {self.model!r}, not {model.name!r}")
        if self.directions.shape[1] != model.d_model:
            raise EmInterpError(f"the trait basis has width {self.directions.shape[1]}, {model.name} has {model.d_model}")
        model.check_layer(self.layer, "basis.layer")

    def project(self, acts: Float[Tensor, "n d_model"]) -> Float[Tensor, "n traits"]:
        """Dot products of activation rows with each unit direction."""
        return acts.float() @ self.directions.T

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json`` atomically (see :mod:`em_interp.artifacts`)."""
        return save_artifact(path, "trait_basis", {"directions": self.directions},
                             {"model": self.model, "layer": self.layer, "hook": self.hook, "names": list(self.names)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TraitBasis:
        """Read a basis written by :meth:`save`."""
        arrays, meta = load_artifact(path, "trait_basis", required=("model", "layer", "hook", "names"),
                                     tensors=("directions",))
        source = artifact_paths(path)[1]
        names = meta["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise EmInterpError(f"{source}: field 'names' is not a list of trait names")
        try:
            return cls(sidecar_field(meta, "model", str, source), sidecar_field(meta, "layer", int, source),
                       sidecar_field(meta, "hook", str, source), tuple(names), arrays["directions"].clone())
        except EmInterpError as exc:
            raise EmInterpError(f"{source}: {exc}") from None


def trait_basis(model: HookedModel, questions: Sequence[str], layer: int | None = None,
                traits: Mapping[str, TraitSpec] | None = None, progress: bool = False) -> TraitBasis:
    """The trait basis of ``model`` at ``layer`` (default :func:`monitor_layer`) from contrastive system prompts."""
    if traits is not None and len(traits) < 2:
        raise EmInterpError(f"traits has {len(traits)} trait(s); the drift monitor needs at least 2")
    layer = model.check_layer(monitor_layer(model.n_layers) if layer is None else layer)
    vectors = trait_vectors(model, questions, layer, traits=traits, progress=progress)
    names = tuple(vectors)
    return TraitBasis(model.name, layer, "resid_post", names, torch.stack([vectors[n].vector for n in names]))


@dataclass(frozen=True)
class Snapshot:
    """One checkpoint's measurement: per-prompt projections and norms, and the mean activation."""

    step: int
    projections: Float[Tensor, "prompts traits"]
    norms: Float[Tensor, " prompts"]
    mean_activation: Float[Tensor, " d_model"]


def snapshot(model: HookedModel, basis: TraitBasis, prompts: Sequence[ChatExample], step: int,
             batch_size: int = 16) -> Snapshot:
    """Measure ``model`` (as it is now, hooks and adapters included) on the evaluation prompts."""
    if not prompts:
        raise EmInterpError("prompts is empty: the drift monitor needs evaluation prompts")
    basis.check_fits(model)
    acts = cache_residuals(model, [ChatExample(p.question, None, p.system) for p in prompts], layers=[basis.layer],
                           hook=cast(Hook, basis.hook), reduction="last_prompt", batch_size=batch_size, progress=False)[basis.layer]
    return Snapshot(int(step), basis.project(acts), acts.norm(dim=-1), acts.mean(0))


@dataclass(frozen=True)
class DriftTrajectory:
    """Drift of one run: trait drift and raw activation drift per checkpoint, relative to step 0."""

    steps: tuple[int, ...]
    names: tuple[str, ...]
    scale: float
    drift: Float[Tensor, "checkpoints traits"]
    activation_drift: Float[Tensor, "checkpoints d_model"]

    @classmethod
    def from_snapshots(cls, snapshots: Sequence[Snapshot], names: Sequence[str]) -> DriftTrajectory:
        """Normalise by the step-0 mean per-prompt norm and subtract step 0."""
        if not snapshots or snapshots[0].step != 0:
            raise EmInterpError("a drift trajectory needs the step-0 snapshot first (the model before training)")
        steps = [s.step for s in snapshots]
        if steps != sorted(set(steps)):
            raise EmInterpError(f"snapshot steps {steps} are not strictly increasing")
        scale = float(snapshots[0].norms.mean())
        if not scale > 0:
            raise EmInterpError("the step-0 activations have zero norm")
        means = torch.stack([s.projections.mean(0) for s in snapshots])
        acts = torch.stack([s.mean_activation for s in snapshots])
        return cls(tuple(steps), tuple(names), scale, (means - means[0]) / scale, (acts - acts[0]) / scale)


def run_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every peft checkpoint of a training run, in step order.

    Reads em_interp runs (``RUN/checkpoints/checkpoint-N``) and plain ``Trainer`` output folders
    (``OUT/checkpoint-N``); a checkpoint counts when it holds ``adapter_model.safetensors``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EmInterpError(f"run folder {run_dir} does not exist")
    root = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    found = sorted((int(m.group(1)), p) for p in root.iterdir()
                   if p.is_dir() and (m := _CHECKPOINT.match(p.name)) and (p / WEIGHTS).is_file())
    if not found:
        raise EmInterpError(f"{root} holds no peft checkpoints (checkpoint-N/{WEIGHTS})")
    return found


def _check_base(folder: Path, model_ids: tuple[str, ...]) -> None:
    """Raise unless the peft checkpoint in ``folder`` was trained on one of ``model_ids``."""
    base = read_adapter_config(folder).get("base_model_name_or_path")
    if base and not any(same_model(base, m) for m in model_ids):
        raise EmInterpError(f"{folder} was trained on base model {base!r}, not on {model_ids[0]!r} "
                            "(adapter_config.json: base_model_name_or_path)")


def measure_run(model: HookedModel, run_dir: str | os.PathLike[str], basis: TraitBasis,
                prompts: Sequence[ChatExample]) -> DriftTrajectory:
    """Trait drift over a finished run's checkpoints; ``model`` carries the run's adapter shape.

    Step 0 is ``model`` with its adapters disabled (the base model); each checkpoint's adapter
    weights are then copied in (a checkpoint of another base model or adapter shape is refused,
    naming its file). The model's own adapter weights are put back at the end.
    """
    if model.peft_model is None:
        raise EmInterpError("measure_run needs the model loaded with one of the run's adapters (adapter=...)")
    checkpoints = run_checkpoints(run_dir)
    from em_interp.lora.adapters import lora_parameters

    saved = {k: p.detach().clone() for k, p in lora_parameters(model).items()}
    try:
        with model.peft_model.disable_adapter():
            snapshots = [snapshot(model, basis, prompts, 0)]
        ids = (model.name, str(model.load_flags.get("location") or model.name))
        for step, folder in checkpoints:
            if step == 0:
                continue
            _check_base(folder, ids)  # another base model: an error naming the checkpoint
            load_adapter_weights(model, folder)  # another adapter shape: an error naming the file
            snapshots.append(snapshot(model, basis, prompts, step))
    finally:
        with torch.no_grad():
            for k, p in lora_parameters(model).items():
                p.copy_(saved[k])
    return DriftTrajectory.from_snapshots(snapshots, basis.names)
