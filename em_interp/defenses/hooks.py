"""Hook defenses: ablating (CAFT) or adding (preventative steering) a direction in training passes only.

Part of :mod:`em_interp.defenses` (see its docstring).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import cast

import torch

from em_interp.defenses.base import Defense
from em_interp.directions import Direction
from em_interp.errors import EmInterpError
from em_interp.interventions import ablation_hook, gated, steering_hook
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


class AblateDirection(Defense):
    """``ablate_direction`` (CAFT): ``h <- h - strength * (h Q) Q^T`` at each direction's layer while training.

    ``directions``: one :class:`~em_interp.directions.Direction` or several (a subspace; those of
    one layer are orthonormalised together, each acts at its own ``layer`` and ``hook``).
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
        by_site: dict[tuple[int, str], list[torch.Tensor]] = {}
        for i, d in enumerate(self.directions):
            _checked_direction(model, d, None, f"AblateDirection(directions[{i}])")
            by_site.setdefault((d.layer, d.hook), []).append(d.unit)
        training = model.hf_model

        def on() -> bool:
            return self.active and training.training

        stack.enter_context(model.hooks([(model.hook_name(layer, cast(Hook, site)),
                                          gated(ablation_hook(v, strength=self.strength), on))
                                         for (layer, site), v in by_site.items()]))


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


