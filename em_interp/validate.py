"""One numeric guard at the API boundary: user-supplied numbers and tensors must be finite.

NaN and infinity never flow silently into a computation (``temperature=nan`` used to mean greedy,
``alpha=inf`` a steered model of NaNs): every public function that takes a float or a tensor from
its caller passes it through :func:`finite_number` or :func:`finite_tensor`, which raise an
:class:`~em_interp.errors.EmInterpError` naming the argument.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from em_interp.errors import EmInterpError


def finite_number(name: str, value: Any, minimum: float | None = None, strictly: bool = False) -> float:
    """``value`` as a float, if it is a finite real number (and >= / > ``minimum`` when given)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, Tensor) and value.numel() == 1):
        raise EmInterpError(f"{name}={value!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise EmInterpError(f"{name}={number} must be a finite number")
    if minimum is not None and (number < minimum or (strictly and number == minimum)):
        raise EmInterpError(f"{name}={number} must be {'>' if strictly else '>='} {minimum}")
    return number


def finite_tensor(name: str, value: Any) -> Tensor:
    """``value`` as a float32 tensor, if every entry is finite."""
    try:
        tensor = torch.as_tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EmInterpError(f"{name} is not a numeric tensor: {exc}") from None
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise EmInterpError(f"{name} has {bad} NaN or infinite entries")
    return tensor


def finite_array(name: str, value: Any) -> np.ndarray:
    """``value`` as a float64 numpy array, if every entry is finite (e.g. detector scores, EM shifts)."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EmInterpError(f"{name} is not numeric: {exc}") from None
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise EmInterpError(f"{name} has {bad} NaN or infinite entries")
    return array
