"""The defense base class: a training callback that can be switched on and off, and the strength check.

Part of :mod:`em_interp.defenses` (see its docstring).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar

from em_interp.errors import EmInterpError
from em_interp.lora.hf_trainer import TrainingCallback
from em_interp.model import HookedModel

#: The defenses, by the names results and the study use (see :data:`em_interp.defenses.runs.STRENGTH_MEANING`).
DEFENSES: tuple[str, ...] = ("kl", "ldifs", "safelora", "interleave", "interleave_selected", "inoculate",
                             "ablate_direction", "ablate_layers", "ablate_subspace", "ablate_gradient",
                             "preventative_steering")



def check_strength(argument: str, value: Any, allow_zero: bool = False) -> float:
    """``value`` as a float, or a clear error naming ``argument`` when it is not finite and > 0 (>= 0)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise EmInterpError(f"{argument}={value!r} is not a number") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise EmInterpError(f"{argument}={value!r} must be a finite number {'>=' if allow_zero else '>'} 0")
    return number


class Defense(TrainingCallback):
    """A defense acting during training; switch it with :meth:`enable` / :meth:`disable` (on by default)."""

    name: ClassVar[str] = ""

    def __init__(self, strength: float, argument: str, active: bool = True) -> None:
        self.strength = check_strength(f"{type(self).__name__}({argument}=)", strength)
        self.active = bool(active)
        self._stack: contextlib.ExitStack | None = None

    def enable(self) -> None:
        """Turn the defense on from the next forward pass."""
        self.active = True

    def disable(self) -> None:
        """Turn the defense off from the next forward pass."""
        self.active = False

    def describe(self) -> dict[str, Any]:
        """Name and strength (JSON-ready)."""
        return {"name": self.name, "strength": self.strength}

    # hooks live from the start of training to its end (and are removed by detach() after an error)
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                       **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, model=model, processing_class=processing_class, **kwargs)
        self.detach()
        self._stack = contextlib.ExitStack()
        try:
            self.attach(self._hooked_of(model), self._stack)
        except BaseException:
            self.detach()
            raise

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        super().on_train_end(args, state, control, model=model, **kwargs)
        self.detach()

    def attach(self, model: HookedModel, stack: contextlib.ExitStack) -> None:
        """Check the defense against ``model`` and attach its hooks (entered on ``stack``)."""

    def detach(self) -> None:
        """Remove the defense's hooks (done at the end of training)."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None


