"""Hook defenses: ablating (CAFT) a direction or subspace, removing only its gradient, or adding (preventative
steering) a direction, in training passes only.

Part of :mod:`em_interp.defenses` (see its docstring).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch

from em_interp.defenses.base import Defense
from em_interp.directions import Direction
from em_interp.errors import EmInterpError
from em_interp.interventions import SPAN_TOLERANCE, ablation_hook, gated, steering_hook
from em_interp.model import HookedModel
from em_interp.options import Hook


def _checked_direction(model: HookedModel, direction: Direction, layer: int | None, argument: str) -> Direction:
    if not isinstance(direction, Direction):
        raise EmInterpError(f"{argument} must be an em_interp Direction (it carries its model and layer), "
                            f"got {type(direction).__name__}")
    direction.check_fits(model)
    if layer is not None and layer != direction.layer:
        raise EmInterpError(f"{argument} was made at layer {direction.layer}, not layer={layer}: use it at its own "
                            "layer or build one at that layer")
    return direction


def _directions(directions: Direction | Sequence[Direction], argument: str) -> list[Direction]:
    items = list(directions) if isinstance(directions, (list, tuple)) else [directions]
    if not items:
        raise EmInterpError(f"{argument} is empty")
    for d in items:
        if not isinstance(d, Direction):
            raise EmInterpError(f"{argument} must hold em_interp Directions, got {type(d).__name__}")
    return cast(list[Direction], items)


def subspace_basis(vectors: Sequence[torch.Tensor], argument: str) -> torch.Tensor:
    """An orthonormal basis ``(d_model, k)`` of ``k`` directions; a non-finite or zero direction, or one in the span
    of the earlier ones (a subspace of dependent directions), is an error naming ``argument`` and its index."""
    units = []
    for i, v in enumerate(vectors):
        v = torch.as_tensor(v, dtype=torch.float32).flatten()
        if not torch.isfinite(v).all() or float(v.norm()) == 0:
            raise EmInterpError(f"{argument}[{i}] is not a finite non-zero direction")
        units.append(v / v.norm())
    q, r = torch.linalg.qr(torch.stack(units).T)
    dependent = [i for i, x in enumerate(r.diagonal().abs().tolist()) if x <= SPAN_TOLERANCE]
    if dependent:
        raise EmInterpError(f"{argument}: directions {dependent} (0-based) lie in the span of the earlier ones; a "
                            "subspace needs independent directions (drop them, or orthonormalise and keep the rank)")
    return q


def _sites(model: HookedModel, directions: list[Direction], argument: str) -> dict[tuple[int, str], torch.Tensor]:
    """The directions grouped by (layer, hook) site, each group an orthonormal basis (checked independent)."""
    by_site: dict[tuple[int, str], list[torch.Tensor]] = {}
    for i, d in enumerate(directions):
        _checked_direction(model, d, None, f"{argument}[{i}]")
        by_site.setdefault((d.layer, d.hook), []).append(d.unit)
    return {site: subspace_basis(v, f"{argument} at layer {site[0]}") for site, v in by_site.items()}


def gradient_projection_hook(basis: torch.Tensor, strength: float = 1.0) -> Callable[..., torch.Tensor]:
    """A hook that leaves the activation as it is but removes ``strength`` of its gradient's component in the span
    of ``basis`` (orthonormal columns) on the way back: ``g <- g - strength (g Q) Q^T``."""
    def hook(tensor: torch.Tensor, *, hook: Any) -> torch.Tensor:
        if tensor.requires_grad:
            q = basis.to(tensor.device, tensor.dtype)
            tensor.register_hook(lambda g: g - strength * (g @ q) @ q.T)
        return tensor

    return hook


class AblateDirection(Defense):
    """``ablate_direction`` (CAFT): ``h <- h - strength * (h Q) Q^T`` at each direction's layer while training.

    ``directions``: one :class:`~em_interp.directions.Direction` or several: those of one layer span a
    subspace (orthonormalised together; dependent or non-finite ones are an error), and each acts at its own
    ``layer`` and ``hook``, so directions of several layers ablate at several layers (multi-layer CAFT).
    ``strength`` 1 removes the component entirely (concept ablation fine-tuning); less removes that
    fraction. Only forward passes in training mode are changed, so the trained model is used and
    evaluated without the ablation.
    """

    name = "ablate_direction"

    def __init__(self, directions: Direction | Sequence[Direction], strength: float = 1.0, active: bool = True) -> None:
        super().__init__(strength, "strength", active)
        if self.strength > 1:
            raise EmInterpError(f"AblateDirection(strength={strength}) must be in (0, 1] (the fraction removed)")
        self.directions = _directions(directions, "AblateDirection(directions=)")

    def attach(self, model: HookedModel, stack: contextlib.ExitStack) -> None:
        sites = _sites(model, self.directions, f"{type(self).__name__}(directions)")
        training = model.hf_model

        def on() -> bool:
            return self.active and training.training

        stack.enter_context(model.hooks([(model.hook_name(layer, cast(Hook, site)), gated(self._hook(q), on))
                                         for (layer, site), q in sites.items()]))

    def _hook(self, basis: torch.Tensor) -> Callable[..., torch.Tensor]:
        return ablation_hook(list(basis.T), strength=self.strength)


class AblateLayers(AblateDirection):
    """``ablate_layers``: :class:`AblateDirection` given one direction per layer (e.g. each adapter layer's
    organism-minus-control direction), each ablated at its own layer: multi-layer CAFT under its own name."""

    name = "ablate_layers"


class AblateSubspace(AblateDirection):
    """``ablate_subspace``: :class:`AblateDirection` given several directions at one layer, whose span is ablated
    there: subspace CAFT under its own name."""

    name = "ablate_subspace"


class AblateGradient(AblateDirection):
    """``ablate_gradient`` (CAFT, gradient only): the forward pass unchanged; on the way back the gradient at each
    direction's layer loses ``strength`` of its component along the directions: ``g <- g - strength (g Q) Q^T``.

    CAFT's authors report that removing only the gradient along the direction keeps most of the effect of
    ablating the activation; here the model trains on its own unmodified activations, so nothing downstream of
    the layer sees a changed input, and only the update that would move the residual stream along the direction
    (through this layer) is withheld. Same arguments and checks as :class:`AblateDirection`.
    """

    name = "ablate_gradient"

    def _hook(self, basis: torch.Tensor) -> Callable[..., torch.Tensor]:
        return gradient_projection_hook(basis, self.strength)


class PreventativeSteering(Defense):
    """``preventative_steering``: ``h <- h + alpha * direction.vector`` at the direction's layer while training only.

    The model is pushed along the misalignment direction during fine-tuning, so the weights need not
    move along it; the steering is absent at inference (persona vectors' preventative steering).
    ``alpha`` multiplies the direction as given (scale it, e.g. to a fraction of the layer's mean
    residual norm, before passing it).
    """

    name = "preventative_steering"

    def __init__(self, direction: Direction, alpha: float = 1.0, layer: int | None = None, active: bool = True) -> None:
        super().__init__(alpha, "alpha", active)
        self.direction = _directions(direction, "PreventativeSteering(direction=)")[0]
        self.layer = layer

    def attach(self, model: HookedModel, stack: contextlib.ExitStack) -> None:
        d = _checked_direction(model, self.direction, self.layer, "PreventativeSteering(direction=)")
        training = model.hf_model

        def on() -> bool:
            return self.active and training.training

        stack.enter_context(model.hooks([(model.hook_name(d.layer, cast(Hook, d.hook)),
                                          gated(steering_hook(d.vector.float(), self.strength), on))]))


