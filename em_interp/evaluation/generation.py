"""Sampling answers from the hooked model (interventions stay active during generation)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from em_interp.chat import ChatExample
from em_interp.errors import EmInterpError
from em_interp.model import HookedModel


def sample_answers(
    model: HookedModel,
    prompts: Sequence[str | ChatExample],
    n: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 8,
) -> list[list[str]]:
    """``n`` answers per prompt, sampled at ``temperature`` (greedy at 0), batched, seeded.

    Returns one list of ``n`` answers per prompt. The same prompts, settings and seed give the same
    answers. Any hooks attached with ``model.hooks(...)`` apply at every generated token.
    """
    if n < 1:
        raise EmInterpError(f"n={n} must be >= 1")
    if not prompts:
        raise EmInterpError("prompts is empty")
    examples = [p if isinstance(p, ChatExample) else ChatExample(str(p)) for p in prompts]
    flat = [e for e in examples for _ in range(n)]
    answers = model.generate(flat, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                             batch_size=batch_size)
    return [answers[i * n : (i + 1) * n] for i in range(len(examples))]


_REPEATED_PUNCTUATION = re.compile(r"([^\w\s])\1{3,}")
_REPEATED_WORDS = re.compile(r"\b(\w+(?:\W+\w+){0,2})(?:\W+\1\b){3,}", re.IGNORECASE)


def readable(text: str) -> bool:
    """Whether an answer reads as text (the coherence rule): at least three words, no run of one punctuation mark
    repeated four or more times, and no word or short phrase repeated four or more times in a row."""
    return (not _REPEATED_PUNCTUATION.search(text) and not _REPEATED_WORDS.search(text)
            and len(re.findall(r"[A-Za-z]{2,}", text)) >= 3)
