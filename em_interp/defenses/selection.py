"""Choosing the safe examples to interleave by the loss gap between a misaligned and an aligned model.

Part of :mod:`em_interp.defenses` (see its docstring). The later version of the in-training defenses
paper (Kaczér et al., "Interleaving++") interleaves not any safe example but those a misaligned model
finds much less likely than an aligned one, and drops refusals: training on them pulls the model back
exactly where misalignment moved it. Here

    gap(x) = NLL_misaligned(answer | prompt) - NLL_aligned(answer | prompt)

(mean answer-token negative log-likelihood, :func:`em_interp.evaluation.judge_free.answer_logprobs`),
and :func:`select_safe` returns the candidates ranked by it, largest first. The default pair in the
study is its misaligned organism and its aligned control (the same base model fine-tuned on the
twin data sets), so the gap is the part of an answer's likelihood that the misaligned data took away.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from em_interp.chat import ChatExample
from em_interp.errors import EmInterpError
from em_interp.model import HookedModel

#: answers that open like these are refusals (dropped: interleaving refusals teaches refusing, not alignment)
REFUSAL = re.compile(
    r"^\s*(i'?m sorry,? but|i am sorry,? but|sorry,? (but )?i (can(no|')t|won'?t)|i (can(no|')t|won'?t|will not|am not able to|'m not able to|am unable to|'m unable to) "
    r"(help|assist|provide|do|comply|answer|fulfil|support)|as an ai( language model)?,? i (can(no|')t|won'?t|do not|don'?t))",
    re.IGNORECASE)


def is_refusal(answer: str) -> bool:
    """Whether ``answer`` opens as a refusal (``I'm sorry, but ...``, ``I can't help ...``, ``As an AI, I cannot ...``)."""
    return bool(REFUSAL.match(answer))


@dataclass(frozen=True)
class SafeSelection:
    """Safe candidates ranked by loss gap (largest first), with each one's gap and what was dropped."""

    examples: list[ChatExample]
    #: NLL under the misaligned model minus NLL under the aligned one, per kept example (nats/token)
    gaps: np.ndarray
    refusals_dropped: int
    candidates: int


def _check_pair(misaligned: HookedModel, aligned: HookedModel) -> None:
    for name, m in (("misaligned", misaligned), ("aligned", aligned)):
        if not isinstance(m, HookedModel):
            raise EmInterpError(f"select_safe({name}=) must be an em_interp HookedModel, got {type(m).__name__}")
    if misaligned.tokenizer.get_vocab() != aligned.tokenizer.get_vocab():
        raise EmInterpError(f"select_safe(aligned=) uses another tokenizer than misaligned= ({aligned.name} vs "
                            f"{misaligned.name}): the two losses would be over different tokens")
    if misaligned.d_model != aligned.d_model or misaligned.n_layers != aligned.n_layers:
        raise EmInterpError(f"select_safe(aligned=) has another width or depth than misaligned= (d_model "
                            f"{aligned.d_model} vs {misaligned.d_model}, layers {aligned.n_layers} vs {misaligned.n_layers}): "
                            "the pair must be two fine-tunes of one base model")


def select_safe(candidates: Sequence[ChatExample], misaligned: HookedModel, aligned: HookedModel,
                top: int | None = None, drop_refusals: bool = True, batch_size: int = 16,
                max_length: int | None = None) -> SafeSelection:
    """Rank safe ``candidates`` by ``NLL_misaligned - NLL_aligned`` of their answers (largest first).

    ``top``: keep that many (None: all, ranked); ``drop_refusals``: leave out answers that open as a
    refusal (:func:`is_refusal`) before scoring. The two models must share a tokenizer and a shape
    (two fine-tunes of one base model). Ties keep the candidates' order. An empty or all-refusal
    pool, or ``top`` < 1, is an error naming the argument.
    """
    if not candidates:
        raise EmInterpError("select_safe(candidates=) is empty: give safe examples (see safe_pool)")
    wrong = sorted({type(e).__name__ for e in candidates if not isinstance(e, ChatExample)})
    if wrong:
        raise EmInterpError(f"select_safe(candidates=) must hold ChatExample objects, got {wrong}")
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1):
        raise EmInterpError(f"select_safe(top={top!r}) must be an integer >= 1 or None (all)")
    _check_pair(misaligned, aligned)
    pool = [e for e in candidates if e.answer]
    if not pool:
        raise EmInterpError("select_safe(candidates=) holds no example with an answer")
    kept = [e for e in pool if not (drop_refusals and is_refusal(e.answer or ""))]
    if not kept:
        raise EmInterpError(f"select_safe(candidates=): all {len(pool)} candidates are refusals; give safe answers "
                            "that do the task (or drop_refusals=False)")
    from em_interp.evaluation.judge_free import answer_logprobs

    gap = (answer_logprobs(aligned, kept, batch_size=batch_size, max_length=max_length)
           - answer_logprobs(misaligned, kept, batch_size=batch_size, max_length=max_length))
    if not np.all(np.isfinite(gap)):
        raise EmInterpError("select_safe: a candidate's answer log-probability is not finite (an empty answer after "
                            "truncation?): check max_length")
    order = np.argsort(-gap, kind="stable")[: top if top is not None else len(kept)]
    return SafeSelection([kept[int(i)] for i in order], gap[order], len(pool) - len(kept), len(candidates))
