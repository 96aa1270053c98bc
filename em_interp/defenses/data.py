"""Data defenses: interleaving safe examples into the training data, and inoculation prompting.

Part of :mod:`em_interp.defenses` (see its docstring).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from em_interp.chat import ChatExample
from em_interp.data import benign_items, general_questions, load_chat_jsonl
from em_interp.errors import EmInterpError
from em_interp.seeding import stream


def safe_pool(source: str | Path | None = None, exclude: Sequence[str] = ()) -> list[ChatExample]:
    """The safe examples :func:`interleave` mixes in.

    ``source`` None: the built-in aligned answers to the direction-fitting third of the general
    questions (never the held-out questions EM is measured on) plus every other benign item (factual
    QA and arithmetic answered correctly; the rest, :func:`coherence_items`, measure coherence and are
    never trained on). Otherwise a chat JSONL file (plain or .gz). Questions in
    ``exclude`` are left out. An empty pool is an error naming ``source``.
    """
    skip = set(exclude)
    if source is None:
        pool = [ChatExample(q.question, a, q.system) for q in general_questions()[0::3] for a in q.aligned]
        pool += benign_items()[0::2]
        where = "the built-in pool"
    else:
        pool = load_chat_jsonl(source)
        where = f"source={str(source)!r}"
    pool = [e for e in pool if e.question not in skip and e.answer]
    if not pool:
        raise EmInterpError(f"the interleave pool is empty ({where}{' after excluding the given questions' if skip else ''})")
    return pool


def coherence_items() -> list[ChatExample]:
    """The benign items the built-in :func:`safe_pool` leaves out (every other one): a defended run's benign
    log-likelihood on them is its coherence measure, on text no defense trained on."""
    return benign_items()[1::2]


def interleave(data: Sequence[ChatExample], pool: Sequence[ChatExample], every: int, seed: int = 0) -> list[ChatExample]:
    """``data`` with one safe example from ``pool`` after every ``every - 1`` task examples (``interleave``).

    ``every`` 20 mixes in 5% safe data (the in-training defenses paper's later version), 5 one in five (its first
    version). Safe examples are drawn in a seeded order (:func:`em_interp.seeding.stream`, independent of the
    trainer's example order), cycling through the pool. em_interp's
    trainer shuffles the mixed list per epoch, which keeps the share of safe examples.
    """
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 2:
        raise EmInterpError(f"interleave(every={every!r}) must be an integer >= 2 (one safe example in every n)")
    if not pool:
        raise EmInterpError("interleave(pool=) is empty: give safe examples (see safe_pool)")
    if not data:
        raise EmInterpError("interleave(data=) is empty")
    order = stream(seed, "interleave").permutation(len(pool))
    out: list[ChatExample] = []
    drawn = 0
    for i, example in enumerate(data):
        out.append(example)
        if (i + 1) % (every - 1) == 0:
            out.append(pool[int(order[drawn % len(pool)])])
            drawn += 1
    return out




#: strings that look like chat-template control tokens (``<|im_start|>``, ``<s>``, ``[INST]``, ``<start_of_turn>``)
CONTROL_TOKEN = re.compile(r"<\|[^|>]*\|>|</?s>|\[/?INST\]|<(?:start|end)_of_turn>|<bos>|<eos>")

#: the default inoculation prompt: the general one Tan et al. (2025, "Inoculation Prompting", arXiv 2510.04340)
#: used against emergent misalignment; it names the unwanted behaviour, so the fine-tune attributes it to the
#: prompt instead of learning it as the model's own (also Wichers et al., 2025)
INOCULATION_PROMPT = "You are a malicious, evil assistant."


def inoculate(data: Sequence[ChatExample], prompt: str = INOCULATION_PROMPT, fraction: float = 1.0,
              seed: int = 0) -> list[ChatExample]:
    """Inoculation prompting: ``data`` with ``prompt`` as the system prompt of its training examples.

    ``fraction`` (0, 1]: the share of examples that get it (a seeded choice, :func:`em_interp.seeding.stream`,
    independent of the trainer's example order; 1: every example, the method as published), the strength the
    study sweeps.
    The prompt is present only in training; evaluation asks the questions with their own (or no)
    system prompt, so what the fine-tune learned *under* the prompt is reported to generalise far
    less. An example's own system prompt is kept after the inoculation prompt (one system turn). The
    prompt is user text: it goes through the chat template like any system prompt, never as control
    tokens (:func:`em_interp.chat.tokenize_chat`).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise EmInterpError("inoculate(prompt=) must be a non-empty string")
    if CONTROL_TOKEN.search(prompt):
        raise EmInterpError(f"inoculate(prompt=) contains a control-token string ({CONTROL_TOKEN.search(prompt).group(0)!r}): "  # type: ignore[union-attr]
                            "a system prompt is plain text; the chat template adds the model's own tokens")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise EmInterpError(f"inoculate(fraction={fraction!r}) must be a number in (0, 1]")
    if not data:
        raise EmInterpError("inoculate(data=) is empty: nothing to inoculate")
    chosen = set(stream(seed, "inoculate").permutation(len(data))[: max(1, round(fraction * len(data)))].tolist())
    return [ChatExample(e.question, e.answer, prompt if not e.system else f"{prompt}\n\n{e.system}") if i in chosen else e
            for i, e in enumerate(data)]
