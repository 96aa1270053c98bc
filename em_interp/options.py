"""Option strings of the public API: one ``Literal`` type per concept, checked once by :func:`check_option`.

- :data:`Hook` (argument ``hook``): the hook site at a layer, e.g. ``"resid_post"``;
- :data:`Reduction` (argument ``reduction``): how token activations become one row per example;
- :data:`Where` (argument ``where``): at which positions a steering vector is added;
- :data:`WeightTarget` (argument ``target``): which weights a weight-space ablation edits.
"""

from __future__ import annotations

from typing import Literal, TypeVar, get_args

from em_interp.errors import EmInterpError

Hook = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_post"]
Reduction = Literal["answer_mean", "last_prompt", "prompt_mean", "answer_tokens"]
Where = Literal["all", "prompt", "generated"]
WeightTarget = Literal["adapters", "down_proj"]

HOOKS: tuple[str, ...] = get_args(Hook)
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
WHERE: tuple[str, ...] = get_args(Where)
WEIGHT_TARGETS: tuple[str, ...] = get_args(WeightTarget)

S = TypeVar("S", bound=str)


def check_option(argument: str, value: S, allowed: tuple[str, ...]) -> S:
    """Return ``value`` if it is one of ``allowed``; else raise an error naming ``argument``."""
    if value not in allowed:
        raise EmInterpError(f"{argument}={value!r} must be one of {list(allowed)}")
    return value
