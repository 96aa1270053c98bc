"""Defenses that hold the model near a frozen reference: KL on the answer tokens, LDIFS on features.

Part of :mod:`em_interp.defenses` (see its docstring).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from em_interp.defenses.base import Defense
from em_interp.errors import EmInterpError
from em_interp.lora.hf_trainer import ReferenceModel
from em_interp.model import HookedModel

#: LDIFS reads this many evenly spaced layers (the in-training defenses paper's public code: 5).
LDIFS_LAYERS = 5



def check_reference(model: HookedModel, reference: HookedModel) -> None:
    """Raise unless ``reference`` has ``model``'s tokenizer (same vocabulary) and width."""
    if reference.tokenizer.get_vocab() != model.tokenizer.get_vocab():
        raise EmInterpError(f"reference={reference.name!r} has another tokenizer than the trained model {model.name!r} "
                            f"({len(reference.tokenizer)} vs {len(model.tokenizer)} tokens): the KL / feature terms "
                            "compare the two token by token")
    if reference.d_model != model.d_model:
        raise EmInterpError(f"reference={reference.name!r} has width {reference.d_model}, the trained model "
                            f"{model.name!r} has {model.d_model}")


class _ReferenceDefense(Defense):
    """A loss term comparing the trained model with a frozen reference on the same batch."""

    def __init__(self, strength: float, argument: str, reference: HookedModel | None, active: bool) -> None:
        super().__init__(strength, argument, active)
        if reference is not None and not isinstance(reference, HookedModel):
            raise EmInterpError(f"reference must be a HookedModel (em_interp.load_model), got {type(reference).__name__}")
        self.reference = reference
        #: the term's value (before the weight) at each micro-batch it was applied
        self.values: list[float] = []

    def _term(self, value: torch.Tensor) -> torch.Tensor:
        self.values.append(float(value.detach()))
        return self.strength * value

    def attach(self, model: HookedModel, stack: contextlib.ExitStack) -> None:
        if self.reference is not None:
            check_reference(model, self.reference)

    def _reference_outputs(self, batch: dict[str, torch.Tensor], reference: ReferenceModel) -> Any:
        if self.reference is None:
            return reference.forward(batch)
        with torch.no_grad():
            return self.reference.hf_model(input_ids=batch["input_ids"].to(self.reference.device),
                                           attention_mask=_to(batch.get("attention_mask"), self.reference.device))


def _to(tensor: torch.Tensor | None, device: Any) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


class KLDefense(_ReferenceDefense):
    """``kl``: ``loss += weight * mean_t KL(p_ref(. | x_<t) || p_theta(. | x_<t))`` over the answer tokens t.

    The in-training defenses paper's public code: weight 0.1, the reference is the same model with its adapters disabled.
    The trained model's logits are read from its output layer during the task loss's forward pass
    (no extra forward of the trained model); the reference costs one forward pass without gradients.
    """

    name = "kl"

    def __init__(self, weight: float = 0.1, reference: HookedModel | None = None, active: bool = True) -> None:
        super().__init__(weight, "weight", reference, active)
        self._logits: torch.Tensor | None = None

    def attach(self, model: HookedModel, stack: contextlib.ExitStack) -> None:
        super().attach(model, stack)
        head = cast(Any, model.hf_model).get_output_embeddings()

        def keep(module: Any, inputs: Any, output: torch.Tensor) -> None:
            if torch.is_grad_enabled() and self.active:  # the training pass (the reference runs without gradients)
                self._logits = output

        handle = head.register_forward_hook(keep)
        stack.callback(handle.remove)
        stack.callback(setattr, self, "_logits", None)

    def extra_loss(self, model: HookedModel, batch: dict[str, torch.Tensor], step: int,
                   reference: ReferenceModel) -> torch.Tensor | None:
        logits, self._logits = self._logits, None  # never keep a pass's graph alive past its step
        if not self.active or logits is None:
            return None
        ref_logits = self._reference_outputs(batch, reference).logits.to(logits.device)
        answer = batch["labels"][:, 1:] != -100
        if not answer.any():
            return None
        log_theta = F.log_softmax(logits[:, :-1][answer].float(), dim=-1)
        log_ref = F.log_softmax(ref_logits[:, :-1][answer].float(), dim=-1)
        kl = F.kl_div(log_theta, log_ref, log_target=True, reduction="none").sum(-1).mean()
        return self._term(kl)


def ldifs_layers(n_layers: int, n: int = LDIFS_LAYERS) -> list[int]:
    """``n`` evenly spaced blocks over the depth (``linspace(0, n_layers - 1, n)``, rounded, distinct)."""
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(n, n_layers))})


class LDIFSDefense(_ReferenceDefense):
    """``ldifs``: ``loss += weight * mean_t sum_l ||f_l(theta) - f_l(ref)||^2`` (L2 distance in feature space).

    ``f_l`` is the residual stream after block ``l`` (``resid_post``), L2-normalised per layer and
    token, at the attended tokens; ``l`` runs over :data:`LDIFS_LAYERS` evenly spaced blocks
    (:func:`ldifs_layers`) unless ``layers`` is given. The in-training defenses paper: weight about 1 (0.1-10). Features
    come from hooks during the task loss's forward pass and the reference's (shared with ``kl``).
    """

    name = "ldifs"

    def __init__(self, weight: float = 1.0, layers: Sequence[int] | None = None,
                 reference: HookedModel | None = None, active: bool = True) -> None:
        super().__init__(weight, "weight", reference, active)
        self.layers = None if layers is None else [int(x) for x in layers]
        if self.layers is not None and not self.layers:
            raise EmInterpError("LDIFSDefense(layers=) is empty")
        self._theta: dict[int, torch.Tensor] = {}
        self._ref: dict[int, torch.Tensor] = {}

    def _capture(self, store_theta: bool | None) -> Callable[[int], Callable[..., torch.Tensor]]:
        def fn(layer: int) -> Callable[..., torch.Tensor]:
            def hook(tensor: torch.Tensor, *, hook: Any) -> torch.Tensor:
                grad = torch.is_grad_enabled()
                if not self.active:
                    return tensor
                if store_theta is None:  # the trained model: gradients = training pass, none = reference pass
                    (self._theta if grad else self._ref)[layer] = tensor
                    if grad:
                        self._ref.clear()  # a reference pass for this batch comes after its training pass
                else:
                    self._ref[layer] = tensor
                return tensor
            return hook
        return fn

    def attach(self, model: HookedModel, stack: contextlib.ExitStack) -> None:
        super().attach(model, stack)
        layers = self.layers if self.layers is not None else ldifs_layers(model.n_layers)
        self.layers = [model.check_layer(x, "LDIFSDefense(layers=)") for x in layers]
        if self.reference is not None:
            if self.reference.n_layers != model.n_layers:
                raise EmInterpError(f"reference={self.reference.name!r} has {self.reference.n_layers} layers, the "
                                    f"trained model {model.n_layers}")
            ref_hook = self._capture(False)
            stack.enter_context(self.reference.hooks([(self.reference.hook_name(x), ref_hook(x)) for x in self.layers]))
        own = self._capture(None)
        stack.enter_context(model.hooks([(model.hook_name(x), own(x)) for x in self.layers]))
        stack.callback(self._theta.clear)
        stack.callback(self._ref.clear)

    def extra_loss(self, model: HookedModel, batch: dict[str, torch.Tensor], step: int,
                   reference: ReferenceModel) -> torch.Tensor | None:
        theta, self._theta = self._theta, {}  # never keep a pass's graph alive past its step
        if not self.active or len(theta) != len(self.layers or ()):
            return None
        if len(self._ref) != len(theta):
            self._reference_outputs(batch, reference)
        if len(self._ref) != len(theta):  # the shared reference pass ran before this batch's hooks saw it
            with torch.no_grad(), reference.adapters_disabled():
                model.hf_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        ref, self._ref = self._ref, {}
        mask = batch.get("attention_mask")
        mask = torch.ones(batch["input_ids"].shape, dtype=torch.bool) if mask is None else mask.bool()
        total: torch.Tensor | float = 0.0
        for layer in theta:
            a = F.normalize(theta[layer].float(), dim=-1)
            b = F.normalize(ref[layer].float().to(a.device), dim=-1)
            total = total + (a - b).pow(2).sum(-1)[mask.to(a.device)].mean()
        return self._term(total)  # type: ignore[arg-type]


