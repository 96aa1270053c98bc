"""The run-time shape checker of the unit tests: jaxtyping's array annotations, checked by beartype.

``make test`` runs the tiny-model tests with ``--jaxtyping-packages=em_interp,tests.shapes.shape_checked``:
jaxtyping's import hook wraps every function of the package, and this checker checks only the
parameters and return values annotated with an array type (``Float[Tensor, "n d_model"]`` and the
aliases built from it), so a dimension that disagrees within one call (two ``n`` that differ) or an
array of the wrong rank fails the test that made it. Other annotations are left to mypy: the package's
own checks must still answer a bad argument with an ``EmInterpError`` naming it (the tests that pass
wrong types on purpose check that), not with a type-checker's exception.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

from beartype import beartype
from jaxtyping import AbstractArray


def _is_shape_hint(hint: Any) -> bool:
    """Whether ``hint`` is or contains a jaxtyping array type (e.g. ``Float[Tensor, "n d"] | None``)."""
    if isinstance(hint, type) and issubclass(hint, AbstractArray):
        return True
    return any(_is_shape_hint(arg) for arg in typing.get_args(hint))


def shape_checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """beartype over ``fn``'s array-typed parameters and return value only; ``fn`` unchanged if it has none.

    jaxtyping hands the checker a signature-only stand-in of each function (its annotations already
    resolved), so rewriting the stand-in's annotations changes nothing but what is checked.
    """
    annotations = getattr(fn, "__annotations__", None)
    if not annotations or not any(_is_shape_hint(h) for h in annotations.values()):
        return fn
    fn.__annotations__ = {k: (h if _is_shape_hint(h) else Any) for k, h in annotations.items()}
    return beartype(fn)
