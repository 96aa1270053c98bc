"""In-training defenses against emergent misalignment (Kaczér et al., 2025, and later work), composable.

Training-time defenses are :class:`~em_interp.lora.hf_trainer.TrainingCallback` objects: pass any of
them (together) to :func:`em_interp.lora.training.train_lora` or to a user's own ``Trainer`` /
``SFTTrainer`` built with :func:`em_interp.lora.hf_trainer.with_em_interp`::

    from em_interp.defenses import KLDefense, AblateDirection
    trainer = with_em_interp(Trainer)(model=peft_model, args=args, train_dataset=ds, processing_class=tok,
                                      callbacks=[KLDefense(0.1), AblateDirection(direction)])

- :class:`KLDefense` (``kl``): ``loss += weight * KL(p_ref || p_theta)``, mean over answer tokens;
- :class:`LDIFSDefense` (``ldifs``): ``loss += weight * ||f_theta - f_ref||^2``, features of 5 layers;
- :class:`AblateDirection` (``ablate_direction``, CAFT): ``h <- h - s (h Q) Q^T`` in every training forward
  pass; several directions of one layer span a subspace (:class:`AblateSubspace`, ``ablate_subspace``),
  directions of several layers act each at its own layer (:class:`AblateLayers`, ``ablate_layers``);
- :class:`AblateGradient` (``ablate_gradient``, CAFT gradient-only): the forward pass unchanged, the gradient
  at the layer loses its component along the directions, ``g <- g - s (g Q) Q^T``;
- :class:`PreventativeSteering` (``preventative_steering``): ``alpha x direction`` is added to the
  residual stream in every training forward pass.

The reference for ``kl`` / ``ldifs`` is the trained model with its adapters disabled (no second
copy of the weights: :class:`~em_interp.lora.hf_trainer.ReferenceModel`), or an explicit reference model
of the same tokenizer and width. The hook defenses act only while the model is in training
mode, so checkpoints, monitors and evaluations see the model as it will be used.

Three act on the data: :func:`interleave` (``interleave``: one safe example after every ``every - 1`` task
examples, from :func:`safe_pool`), the same with the safe examples chosen by :func:`select_safe`
(``interleave_selected``, "Interleaving++": ranked by ``NLL_misaligned - NLL_aligned``, refusals dropped) and
:func:`inoculate` (``inoculate``: a system prompt naming the unwanted behaviour on training examples only).
One acts on the result: :func:`safelora` (``safelora``: project LoRA updates onto an alignment subspace after
training). Every training-time defense can be switched on and off mid-run (:meth:`Defense.enable`), which is
how a drift-monitor alarm turns one on (:func:`triggered`), or rolls the weights back to the last check before
the alarm and goes on defended or stops there (:func:`rollback`, :class:`Rollback`; after the fact:
:func:`checkpoint_before`).

Modules, one per kind: :mod:`~em_interp.defenses.base` (the switchable callback),
:mod:`~em_interp.defenses.reference` (KL, LDIFS), :mod:`~em_interp.defenses.hooks` (CAFT and its gradient-only
variant, preventative steering), :mod:`~em_interp.defenses.data` (interleaving, inoculation),
:mod:`~em_interp.defenses.selection` (loss-gap selection), :mod:`~em_interp.defenses.safelora`,
:mod:`~em_interp.defenses.triggering` (on the monitor's alarm: switch, rollback) and
:mod:`~em_interp.defenses.runs` (training and measuring defended runs, the study's sweep).
"""


from em_interp.defenses.base import DEFENSES, Defense, check_strength
from em_interp.defenses.data import INOCULATION_PROMPT, coherence_items, inoculate, interleave, safe_pool
from em_interp.defenses.hooks import (
    AblateDirection,
    AblateGradient,
    AblateLayers,
    AblateSubspace,
    PreventativeSteering,
    subspace_basis,
)
from em_interp.defenses.reference import LDIFS_LAYERS, KLDefense, LDIFSDefense, check_reference, ldifs_layers
from em_interp.defenses.safelora import SafeLoRAResult, alignment_matrices, safelora
from em_interp.defenses.selection import SafeSelection, is_refusal, select_safe
from em_interp.defenses.triggering import Rollback, checkpoint_before, rollback, triggered
from em_interp.lora.adapters import adapter_updates, model_updates, read_adapter

__all__ = [
    "AblateDirection",
    "AblateGradient",
    "AblateLayers",
    "AblateSubspace",
    "Rollback",
    "SafeSelection",
    "checkpoint_before",
    "coherence_items",
    "is_refusal",
    "rollback",
    "select_safe",
    "subspace_basis",
    "DEFENSES",
    "INOCULATION_PROMPT",
    "Defense",
    "KLDefense",
    "LDIFSDefense",
    "LDIFS_LAYERS",
    "PreventativeSteering",
    "SafeLoRAResult",
    "adapter_updates",
    "alignment_matrices",
    "check_reference",
    "check_strength",
    "inoculate",
    "interleave",
    "ldifs_layers",
    "model_updates",
    "read_adapter",
    "safe_pool",
    "safelora",
    "triggered",
]
