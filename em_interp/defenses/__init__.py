"""In-training defenses against emergent misalignment (Kaczér et al., 2025, and later work), composable.

Four defenses act while training, as :class:`~em_interp.lora.hf_trainer.TrainingCallback` objects: pass
any of them (together) to :func:`em_interp.lora.training.train_lora` or to a user's own
``Trainer`` / ``SFTTrainer`` built with :func:`em_interp.lora.hf_trainer.with_em_interp`::

    from em_interp.defenses import KLDefense, AblateDirection
    trainer = with_em_interp(Trainer)(model=peft_model, args=args, train_dataset=ds, processing_class=tok,
                                      callbacks=[KLDefense(0.1), AblateDirection(direction)])

- :class:`KLDefense` (``kl``): ``loss += weight * KL(p_ref || p_theta)``, mean over answer tokens;
- :class:`LDIFSDefense` (``ldifs``): ``loss += weight * ||f_theta - f_ref||^2``, features of 5 layers;
- :class:`AblateDirection` (``ablate_direction``, CAFT): the direction is projected out of the
  residual stream in every training forward pass;
- :class:`PreventativeSteering` (``preventative_steering``): ``alpha x direction`` is added to the
  residual stream in every training forward pass.

The reference for ``kl`` / ``ldifs`` is the trained model with its adapters disabled (no second
copy of the weights: :class:`~em_interp.lora.hf_trainer.ReferenceModel`), or an explicit reference model
of the same tokenizer and width. The two hook defenses act only while the model is in training
mode, so checkpoints, monitors and evaluations see the model as it will be used.

Two act on the data or the result: :func:`interleave` (``interleave``: one safe example after every
``every - 1`` task examples, from :func:`safe_pool`) and :func:`safelora` (``safelora``: project
LoRA updates onto an alignment subspace after training). Every defense can be switched on and off
mid-run (:meth:`Defense.enable`), which is how a drift-monitor alarm turns one on
(:func:`triggered`).

Modules, one per kind: :mod:`~em_interp.defenses.base` (the switchable callback),
:mod:`~em_interp.defenses.reference` (KL, LDIFS), :mod:`~em_interp.defenses.hooks` (CAFT, preventative
steering), :mod:`~em_interp.defenses.data` (safe-data interleaving), :mod:`~em_interp.defenses.safelora`,
:mod:`~em_interp.defenses.triggering` (on the monitor's alarm) and :mod:`~em_interp.defenses.runs` (training
and measuring defended runs, the study's sweep).
"""


from em_interp.defenses.base import DEFENSES, Defense, check_strength
from em_interp.defenses.data import INOCULATION_PROMPT, inoculate, interleave, safe_pool
from em_interp.defenses.hooks import AblateDirection, PreventativeSteering
from em_interp.defenses.reference import LDIFS_LAYERS, KLDefense, LDIFSDefense, check_reference, ldifs_layers
from em_interp.defenses.safelora import SafeLoRAResult, alignment_matrices, safelora
from em_interp.defenses.triggering import triggered
from em_interp.lora.adapters import adapter_updates, model_updates, read_adapter

__all__ = [
    "AblateDirection",
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
