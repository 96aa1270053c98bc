"""Random streams by purpose: one seed, independent draws for each thing it decides.

``np.random.default_rng(seed)`` in two places gives the *same* stream, and so does
``default_rng([seed, 0])`` (a :class:`numpy.random.SeedSequence` ignores trailing zero words): the trainer
orders its first epoch with ``default_rng([seed, 0])``, so a data defense that chose its examples with
``default_rng(seed)`` picked exactly the examples the trainer draws first (inoculating "half" the data put
the prompt on every example a 64-example run saw). :func:`stream` derives a stream from the seed and a
purpose name (its spawn key), independent of the trainer's and of every other purpose's.
"""

from __future__ import annotations

import hashlib

import numpy as np


def stream(seed: int, purpose: str) -> np.random.Generator:
    """A generator for ``purpose`` (e.g. ``"inoculate"``) under ``seed``: the same for the same pair, independent of
    ``default_rng(seed)``, of ``default_rng([seed, epoch])`` and of other purposes."""
    key = int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:4], "little")
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(key,)))
