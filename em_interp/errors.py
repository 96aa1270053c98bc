"""Exceptions raised by em_interp.

Every error a user can cause by passing bad input is an :class:`EmInterpError` (a ``ValueError``)
whose message names the argument, file or line at fault.
"""

from __future__ import annotations


class EmInterpError(ValueError):
    """Bad input to an em_interp function: the message names the argument, file or line."""


class ModelLoadError(EmInterpError):
    """A model, GGUF file, converted cache or adapter could not be loaded."""


class NetworkDisabledError(EmInterpError):
    """A model hub id was requested without opting in to network access."""
