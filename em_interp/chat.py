"""Chat examples and their tokenisation with a mask of the answer tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from em_interp.errors import EmInterpError

#: Used when a tokenizer has no chat template of its own (base models, tiny test models).
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}System: {{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n\n"
    "{% else %}Assistant: {{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class ChatExample:
    """One chat turn: an optional system prompt, a user question and (optionally) an answer.

    ``answer=None`` means a prompt only (e.g. for last-prompt-token caching or generation).
    """

    question: str
    answer: str | None = None
    system: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (used for hashing and JSON)."""
        return asdict(self)

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        """The chat as a list of ``{"role", "content"}`` messages."""
        msgs: list[dict[str, str]] = []
        if self.system is not None:
            msgs.append({"role": "system", "content": self.system})
        msgs.append({"role": "user", "content": self.question})
        if with_answer and self.answer is not None:
            msgs.append({"role": "assistant", "content": self.answer})
        return msgs


@dataclass(frozen=True)
class TokenizedChat:
    """Token ids of a rendered chat, with boolean masks over its positions.

    ``answer_mask`` marks the tokens of the answer text (not the end-of-turn tokens after it);
    ``prompt_mask`` marks every token before the first answer token (the whole sequence when there
    is no answer).
    """

    input_ids: torch.Tensor
    answer_mask: torch.Tensor
    prompt_mask: torch.Tensor

    @property
    def n_answer_tokens(self) -> int:
        """How many answer tokens the example has."""
        return int(self.answer_mask.sum())

    @property
    def last_prompt_index(self) -> int:
        """Position of the last prompt token (the one that predicts the first answer token)."""
        return int(self.prompt_mask.nonzero().max())


def render_chat(tokenizer: Any, example: ChatExample) -> tuple[str, str]:
    """Render ``example`` with the tokenizer's chat template; return (prompt_text, full_text).

    ``prompt_text`` ends with the generation prompt; ``full_text`` adds the answer and the
    template's end-of-turn text. If there is no answer the two are equal.
    """
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template(
        example.messages(with_answer=False), tokenize=False, add_generation_prompt=True, chat_template=template
    )
    if example.answer is None:
        return prompt, prompt
    full = tokenizer.apply_chat_template(
        example.messages(with_answer=True), tokenize=False, add_generation_prompt=False, chat_template=template
    )
    return prompt, full


def tokenize_chat(tokenizer: Any, example: ChatExample, max_length: int | None = None) -> TokenizedChat:
    """Tokenise ``example`` and mark its answer tokens.

    The answer span is located in the rendered text and mapped to tokens through the tokenizer's
    character offsets, so the ids are exactly those of tokenising the full chat in one go.
    ``max_length`` truncates from the right.
    """
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise EmInterpError(f"max_length={max_length!r} must be a positive integer (or None for no truncation)")
    if not example.question:
        raise EmInterpError("example has an empty question")
    if example.answer is not None and not example.answer.strip():
        raise EmInterpError("example has an empty answer (use answer=None for a prompt only)")
    controls = control_strings(tokenizer)
    if any(c in text for text in (example.system, example.question, example.answer) if text for c in controls):
        ids, answer_mask = _tokenize_by_segments(tokenizer, example)
        return _finish(ids, answer_mask, example.answer is not None, max_length)
    prompt_text, full_text = render_chat(tokenizer, example)
    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    offsets = enc["offset_mapping"]
    answer_mask = torch.zeros(len(ids), dtype=torch.bool)
    if example.answer is not None:
        start = _answer_start(prompt_text, full_text, example.answer)
        end = start + len(example.answer)
        for i, (a, b) in enumerate(offsets):
            if b > start and a < end:
                answer_mask[i] = True
    return _finish(ids, answer_mask, example.answer is not None, max_length)


def _finish(ids: torch.Tensor, answer_mask: torch.Tensor, has_answer: bool, max_length: int | None) -> TokenizedChat:
    """Prompt mask from the answer mask, then right truncation to ``max_length``."""
    if has_answer:
        if not answer_mask.any():
            raise EmInterpError("the answer produced no tokens")
        first = int(answer_mask.nonzero().min())
        prompt_mask = torch.zeros_like(answer_mask)
        prompt_mask[:first] = True
    else:
        prompt_mask = torch.ones_like(answer_mask)
    if max_length is not None and len(ids) > max_length:
        ids, answer_mask, prompt_mask = ids[:max_length], answer_mask[:max_length], prompt_mask[:max_length]
    return TokenizedChat(ids, answer_mask, prompt_mask)


def control_strings(tokenizer: Any) -> tuple[str, ...]:
    """Strings the tokenizer turns into single added/special tokens (``<|im_end|>``, ``<start_of_turn>``...)."""
    cached = getattr(tokenizer, "_em_interp_control_strings", None)
    if cached is not None:
        return cached
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    strings = {getattr(t, "content", str(t)) for t in added.values()} | set(getattr(tokenizer, "all_special_tokens", []))
    out = tuple(sorted(x for x in strings if x))
    try:
        tokenizer._em_interp_control_strings = out
    except AttributeError:  # pragma: no cover - a tokenizer that refuses attributes
        pass
    return out


#: Private-use characters that stand for the user's texts while the template is rendered.
_PLACEHOLDERS = {"system": "\ue000S\ue001", "question": "\ue000Q\ue001", "answer": "\ue000A\ue001"}


def _tokenize_by_segments(tokenizer: Any, example: ChatExample) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise a chat whose texts contain control-token strings, keeping those strings plain text.

    The template is rendered with placeholders for the system prompt, question and answer; the
    template's own parts are tokenised as usual (its control tokens stay control tokens), the user's
    texts with ``split_special_tokens=True``, so ``<|im_end|>`` typed by a user is text, never a turn.
    """
    import re

    stand_in = ChatExample(_PLACEHOLDERS["question"], _PLACEHOLDERS["answer"] if example.answer is not None else None,
                           _PLACEHOLDERS["system"] if example.system is not None else None)
    _, full = render_chat(tokenizer, stand_in)
    by_marker = {v: k for k, v in _PLACEHOLDERS.items()}
    ids: list[int] = []
    answer: list[bool] = []
    seen: list[str] = []
    pos = 0

    def add(text: str, user: bool, is_answer: bool) -> None:
        if text:
            new = tokenizer(text, add_special_tokens=False, split_special_tokens=user)["input_ids"]
            ids.extend(new)
            answer.extend([is_answer] * len(new))

    for match in re.finditer("|".join(map(re.escape, _PLACEHOLDERS.values())), full):
        add(full[pos:match.start()], user=False, is_answer=False)
        field_name = by_marker[match.group()]
        seen.append(field_name)
        add(getattr(example, field_name), user=True, is_answer=field_name == "answer")
        pos = match.end()
    add(full[pos:], user=False, is_answer=False)
    expected = [f for f in ("system", "question", "answer") if getattr(example, f) is not None]
    if sorted(seen) != sorted(expected):
        raise EmInterpError("the text contains control-token strings and the chat template does not render each "
                            "message verbatim, so they cannot be kept as plain text; remove them from the text")
    return torch.tensor(ids, dtype=torch.long), torch.tensor(answer, dtype=torch.bool)


def _answer_start(prompt_text: str, full_text: str, answer: str) -> int:
    # Most templates render the answer right after the generation prompt. Some render the turn
    # differently once it has an answer (e.g. drop a thinking block), so search from where the
    # two renderings first differ, and as a last resort take the last occurrence.
    common = 0
    for a, b in zip(prompt_text, full_text):
        if a != b:
            break
        common += 1
    pos = full_text.find(answer, common)
    if pos < 0:
        pos = full_text.rfind(answer)
    if pos < 0:
        raise EmInterpError("the chat template did not render the answer text verbatim; cannot mark answer tokens")
    return pos
