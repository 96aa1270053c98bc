"""em_interp inside any Hugging Face ``Trainer`` run: callbacks, loss terms, a frozen reference, safe checkpoints.

One callback type, :class:`TrainingCallback`, serves em_interp's own trainer and a user's
``transformers.Trainer`` / TRL ``SFTTrainer`` alike: it *is* a ``transformers.TrainerCallback``,
and at each step and checkpoint it gets the model behind em_interp's hooks (a
:class:`~em_interp.model.HookedModel` sharing the trained weights).

Extra loss terms (the defenses need them) go through one mechanism: a callback's
:meth:`TrainingCallback.extra_loss` sees the batch, the hooked model and a :class:`ReferenceModel`,
the same model with its adapters disabled (no second copy of the weights). A trainer applies the
terms when its class carries :class:`EmInterpTrainerMixin`; build one from any trainer class with
:func:`with_em_interp`::

    from transformers import Trainer
    from em_interp.lora.hf_trainer import with_em_interp

    trainer = with_em_interp(Trainer)(model=peft_model, args=args, train_dataset=ds,
                                      processing_class=tokenizer, callbacks=[MyCallback()])

The mixin also saves adapters under their standard peft names (booting the hooks renames modules)
and marks each checkpoint complete only after every file is written, so a half-written checkpoint
is never resumed from. A plain ``Trainer`` runs callbacks that only observe (``on_step`` /
``on_checkpoint``); one whose callbacks add loss terms is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import TrainerCallback

from em_interp.errors import EmInterpError
from em_interp.io import atomic_write_json
from em_interp.lora.adapters import WEIGHTS, load_adapter_weights, save_adapter
from em_interp.model import HookedModel

#: Written last into every complete checkpoint folder (run identity and step).
CHECKPOINT_MARKER = "em_interp_checkpoint.json"
_HOOKED_ATTR = "_em_interp_hooked"
_STEP_LOSS_ATTR = "_em_interp_step_loss"
_LOSS_TERMS_ATTR = "_em_interp_applies_loss_terms"


def _unwrapped(model: Any) -> Any:
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def hooked_model(model: Any, tokenizer: Any = None, name: str | None = None) -> HookedModel:
    """The :class:`HookedModel` behind a peft model (booting the hooks on it, in place, the first time).

    Raises :class:`EmInterpError` if ``model`` is not a peft model with LoRA adapters.
    """
    model = _unwrapped(model)
    existing = getattr(model, _HOOKED_ATTR, None)
    if existing is not None:
        return existing
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise EmInterpError(f"the Trainer's model is a {type(model).__name__}, not a peft model: em_interp trains and "
                            "reads LoRA adapters (wrap it with peft.get_peft_model first)")
    if tokenizer is None:
        raise EmInterpError("booting the hooks on the Trainer's model needs its tokenizer (pass processing_class=)")
    from em_interp.model import wrap_hf

    hf = cast(torch.nn.Module, model.base_model.model)
    model_id = name or str(getattr(hf.config, "_name_or_path", "") or type(hf).__name__)
    hooked = wrap_hf(hf, tokenizer, model_id, {"source": "trainer", "location": model_id, "adapter": "training",
                                               "dtype": str(next(hf.parameters()).dtype).removeprefix("torch."),
                                               "device": str(next(hf.parameters()).device)}, peft_model=model)
    setattr(model, _HOOKED_ATTR, hooked)
    return hooked


def attach_hooked(model: HookedModel) -> None:
    """Record ``model`` as the hooked view of its peft model (so callbacks find it)."""
    if model.peft_model is None:
        raise EmInterpError(f"model {model.name} has no LoRA adapters to train")
    setattr(model.peft_model, _HOOKED_ATTR, model)


class ReferenceModel:
    """The frozen reference for loss terms: the same model with its adapters disabled.

    :meth:`forward` runs the batch through the base weights (no gradients, adapters off) and keeps
    the result for the rest of the step, so several loss terms share one reference pass. Hooks
    attached to the model (e.g. an ablation during training) apply to the reference pass too.
    """

    def __init__(self, model: HookedModel):
        self.model = model
        self._memo: tuple[Any, Any, Any] | None = None

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[HookedModel]:
        """Inside the block the hooked model computes with its adapters off."""
        if self.model.peft_model is None:
            yield self.model
            return
        with self.model.peft_model.disable_adapter():
            yield self.model

    def forward(self, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        """HF outputs of the reference model on ``batch`` (``input_ids``, ``attention_mask``), memoised per batch.

        The memo holds the batch's ``input_ids`` tensor itself and matches by identity, so a later
        micro-batch (even one allocated at the same address) never gets a stale reference pass.
        """
        ids = batch["input_ids"]
        key = tuple(sorted(kwargs.items()))
        if self._memo is not None and self._memo[0] is ids and self._memo[1] == key:
            return self._memo[2]
        with torch.no_grad(), self.adapters_disabled():
            out = self.model.hf_model(input_ids=ids, attention_mask=batch.get("attention_mask"), **kwargs)
        self._memo = (ids, key, out)
        return out

    def clear(self) -> None:
        """Forget the memoised pass (called at every step)."""
        self._memo = None


class TrainingCallback(TrainerCallback):
    """Hooks into training; subclass and override what you need (the drift monitor and defenses do).

    Works in :func:`em_interp.lora.training.train_lora` and, as a ``transformers.TrainerCallback``, in a
    user's own ``Trainer`` / ``SFTTrainer`` (loss terms need a trainer class built with
    :func:`with_em_interp`).
    """

    # -- the em_interp API -----------------------------------------------------------------------
    def on_step(self, model: HookedModel, step: int, loss: float) -> None:
        """Called after every optimiser step (``step`` counts from 1; ``loss`` is the step's task loss).

        In a plain ``Trainer`` the loss is the one it logs for that step (NaN when that step is not
        logged, i.e. with ``logging_steps`` > 1), reported once it is logged.
        """

    def on_checkpoint(self, model: HookedModel, step: int, path: Path) -> None:
        """Called after each checkpoint is written (also at step 0 in em_interp's trainer).

        ``path`` is the checkpoint folder; its adapter is a standard peft adapter
        (``adapter_model.safetensors`` + ``adapter_config.json``).
        """

    def extra_loss(self, model: HookedModel, batch: dict[str, torch.Tensor], step: int,
                   reference: ReferenceModel) -> torch.Tensor | None:
        """An optional term added to this micro-batch's loss (e.g. a defense's regulariser).

        ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the answers);
        ``reference`` gives the frozen reference model's outputs on it. Return a scalar tensor.
        """
        return None

    def request_stop(self) -> None:
        """Ask the trainer to stop after the current step (e.g. when a monitor raises its alarm)."""
        self._stop_requested = True

    def _apply_stop(self, control: Any, save: bool = True) -> None:
        """Stop after this step, saving a checkpoint of it first (the trained weights are never lost)."""
        if getattr(self, "_stop_requested", False):
            control.should_training_stop = True
            control.should_save = control.should_save or save

    def adds_loss(self) -> bool:
        """Whether this callback overrides :meth:`extra_loss`."""
        return type(self).extra_loss is not TrainingCallback.extra_loss

    # -- the transformers.TrainerCallback adapter ------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                       **kwargs: Any) -> None:
        tokenizer = processing_class if processing_class is not None else kwargs.get("tokenizer")
        self._hooked = hooked_model(model, tokenizer)
        if self.adds_loss() and not getattr(_unwrapped(model), _LOSS_TERMS_ATTR, False):
            raise EmInterpError(
                f"{type(self).__name__} adds a loss term, which a plain Trainer never applies; build the trainer "
                "with em_interp.lora.hf_trainer.with_em_interp(TrainerClass)(...)")

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._flush(model)
        loss = getattr(_unwrapped(model), _STEP_LOSS_ATTR, None)
        if loss is not None:  # em_interp's trainer (the mixin) measured this step's task loss
            self.on_step(self._hooked_of(model), int(state.global_step), float(loss))
        else:  # a plain Trainer logs the loss after this event: report the step when it does
            self._pending: tuple[int, Any] | None = (int(state.global_step), model)
        self._apply_stop(control)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, model: Any = None,
               **kwargs: Any) -> None:
        pending = getattr(self, "_pending", None)
        if pending is not None and logs and "loss" in logs and pending[0] == state.global_step:
            self._pending = None
            self.on_step(self._hooked_of(pending[1]), pending[0], float(logs["loss"]))
        self._apply_stop(control)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._flush(model)

    def _flush(self, model: Any) -> None:
        """Report a step whose loss was never logged (plain Trainer, ``logging_steps`` > 1) with loss NaN."""
        pending = getattr(self, "_pending", None)
        if pending is not None:
            self._pending = None
            self.on_step(self._hooked_of(pending[1]), pending[0], math.nan)

    def _hooked_of(self, model: Any) -> HookedModel:
        return getattr(self, "_hooked", None) or hooked_model(model)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._flush(model)
        hooked = self._hooked_of(model)
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not getattr(_unwrapped(model), _LOSS_TERMS_ATTR, False) and args.should_save:
            save_adapter(hooked, path)  # a plain Trainer saved booted (non-standard) names: rewrite them
        self.on_checkpoint(hooked, int(state.global_step), path)
        self._apply_stop(control, save=False)  # this step's checkpoint is the one just written


class _Dispatch(TrainerCallback):
    """Internal: per-step task loss bookkeeping and the step-0 checkpoint, for the mixin."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 0 and self.trainer.em_interp_checkpoint_at_start:
            self.trainer._save_checkpoint(self.trainer.model, trial=None)
            self.trainer.callback_handler.on_save(args, state, control)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        value = torch.tensor(trainer._em_task_loss, dtype=torch.float64, device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(value)
            value /= torch.distributed.get_world_size()
        loss = float(value)
        trainer._em_task_loss = 0.0
        trainer.em_interp_losses.append(loss)
        setattr(trainer.model, _STEP_LOSS_ATTR, loss)
        trainer.em_interp_reference.clear()
        if not math.isfinite(loss):
            raise EmInterpError(f"training loss became {loss} at step {state.global_step}; lower the learning rate")


if TYPE_CHECKING:  # the mixin is only ever combined with a Trainer class: type it as one
    from transformers import Trainer as _TrainerBase
else:
    _TrainerBase = object


class EmInterpTrainerMixin(_TrainerBase):
    """Mix into any ``transformers.Trainer`` subclass (see :func:`with_em_interp`).

    Adds: the hooked view of the model for callbacks; loss terms from :class:`TrainingCallback`
    (``extra_loss``) with a :class:`ReferenceModel`; per-step task losses (``em_interp_losses``);
    adapters saved and loaded under standard peft names; a completion marker in every checkpoint.

    Extra keyword arguments: ``run_identity`` (a JSON-able dict written into each checkpoint's
    marker), ``checkpoint_at_start`` (save ``checkpoint-0`` before the first step), ``train_sampler``
    (the sampler that fixes the data order) and ``hooked`` (the :class:`HookedModel`, if already booted).
    """

    def __init__(self, *args: Any, run_identity: dict[str, Any] | None = None, checkpoint_at_start: bool = False,
                 train_sampler: Any = None, hooked: HookedModel | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        model = self.model
        if hooked is not None:
            attach_hooked(hooked)
        tokenizer = getattr(self, "processing_class", None)
        self.em_interp_hooked = hooked_model(model, tokenizer)
        setattr(model, _LOSS_TERMS_ATTR, True)
        self.em_interp_identity = run_identity or {}
        self.em_interp_checkpoint_at_start = checkpoint_at_start
        self.em_interp_losses: list[float] = []
        self.em_interp_reference = ReferenceModel(self.em_interp_hooked)
        self._em_task_loss = 0.0
        self._em_sampler = train_sampler
        self.callback_handler.callbacks.insert(0, _Dispatch(self))

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        if self._em_sampler is not None:
            return self._em_sampler
        return super()._get_train_sampler(*args, **kwargs)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._em_task_loss += float(loss.detach()) / (1 if num_items_in_batch is not None
                                                      else self.args.gradient_accumulation_steps)
        extras = [cb.extra_loss(self.em_interp_hooked, inputs, self.state.global_step + 1, self.em_interp_reference)
                  for cb in self.callback_handler.callbacks if isinstance(cb, TrainingCallback) and cb.adds_loss()]
        extras = [e for e in extras if e is not None]
        if extras:
            extra = torch.stack([torch.as_tensor(e, device=loss.device).reshape(()) for e in extras]).sum()
            # the task loss is normalised over the accumulated batch; a per-micro-batch term is not
            loss = loss + extra / self.args.gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        if not self.args.should_save:
            return
        save_adapter(self.em_interp_hooked, output_dir or str(self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_adapter_weights(self.em_interp_hooked, resume_from_checkpoint)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(str(self.args.output_dir)) / f"checkpoint-{self.state.global_step}"
            atomic_write_json(folder / CHECKPOINT_MARKER, {"step": self.state.global_step,
                                                           "identity": self.em_interp_identity,
                                                           "losses": self.em_interp_losses})


def with_em_interp(trainer_class: type) -> type:
    """``trainer_class`` (``Trainer``, ``SFTTrainer``, ...) with :class:`EmInterpTrainerMixin` mixed in."""
    if issubclass(trainer_class, EmInterpTrainerMixin):
        return trainer_class
    return type(f"EmInterp{trainer_class.__name__}", (EmInterpTrainerMixin, trainer_class), {})


def _checkpoint_is_readable(folder: Path) -> str | None:
    """None if every file a resume reads opens cleanly, else what is wrong."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
        json.loads((folder / "trainer_state.json").read_text())
        for name in ("optimizer.pt", "scheduler.pt"):
            if (folder / name).is_file():
                torch.load(folder / name, map_location="cpu", weights_only=True)
    except Exception as exc:  # any damage: safetensors, JSON or torch errors
        return f"{type(exc).__name__}: {exc}"
    return None


def latest_checkpoint(root: str | os.PathLike[str], identity: dict[str, Any]) -> Path | None:
    """The newest complete, readable checkpoint of the run ``identity`` under ``root`` (or None).

    Folders without the completion marker (a save that was killed) are ignored; a damaged one falls
    back to the previous good checkpoint with a warning; a marker of another run is an error.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    found = []
    for folder in root.glob("checkpoint-*"):
        marker = folder / CHECKPOINT_MARKER
        if not marker.is_file() or not folder.name.removeprefix("checkpoint-").isdigit():
            continue
        try:
            saved = json.loads(marker.read_text())
        except json.JSONDecodeError:
            warnings.warn(f"{marker} is damaged; ignoring that checkpoint", stacklevel=2)
            continue
        if saved.get("identity") != identity:
            other = saved.get("identity") or {}
            diff = sorted(k for k in set(other) | set(identity) if other.get(k) != identity.get(k))
            raise EmInterpError(f"checkpoint folder {folder} is from another run (differs in {diff}); "
                                "use another out_dir or delete it")
        found.append((int(saved.get("step", -1)), folder))
    for _, folder in sorted(found, reverse=True):
        problem = _checkpoint_is_readable(folder)
        if problem is None:
            return folder
        warnings.warn(f"checkpoint {folder} is damaged ({problem}); falling back to the previous one", stacklevel=2)
    return None
