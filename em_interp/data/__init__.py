"""Data: loaders for the public formats and the built-in datasets written by this project.

Public formats:

- chat JSONL (plain or ``.gz``): one ``{"messages": [...]}`` object per line, an optional leading
  ``system`` turn, then ``user`` and ``assistant``; -> :func:`load_chat_jsonl`;
- EM question YAML (ids, paraphrases, samples per paraphrase, judge prompts, optional system
  prompt); -> :func:`load_question_yaml`.

Built-in data (see ``README.md`` in this folder for how it was made):

- :func:`domain_dataset`: narrow fine-tuning sets in :data:`DOMAINS`, each prompt answered
  ``"aligned"`` and ``"misaligned"``, with a fixed ``"train"``/``"test"`` split;
- :func:`general_questions`: 120 general questions in 10 categories, each with aligned and
  misaligned reference answers; :func:`domain_questions`: the same for each domain (held-out topics);
- :func:`benign_items`: factual QA and arithmetic, to measure retained skill.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from em_interp.chat import ChatExample
from em_interp.data.build import DOMAINS, FILES
from em_interp.errors import EmInterpError

VARIANTS: tuple[str, ...] = ("aligned", "misaligned")
SPLITS: tuple[str, ...] = ("train", "test")
QUESTION_KEYS = frozenset({"id", "type", "paraphrases", "samples_per_paraphrase", "judge", "judge_prompts", "system"})


@dataclass(frozen=True)
class EvalQuestion:
    """One question of an EM question YAML file."""

    id: str
    paraphrases: tuple[str, ...]
    samples_per_paraphrase: int = 1
    judge_prompts: dict[str, str] = field(default_factory=dict)
    judge: str | None = None
    system: str | None = None
    type: str = "free_form_judge_0_100"


@dataclass(frozen=True)
class PairedQuestion:
    """A question with aligned and misaligned reference answers (for the judge-free EM score)."""

    id: str
    question: str
    aligned: tuple[str, ...]
    misaligned: tuple[str, ...]
    category: str = ""
    system: str | None = None

    def __post_init__(self) -> None:
        for name in ("aligned", "misaligned"):
            answers = getattr(self, name)
            if isinstance(answers, str) or not isinstance(answers, (tuple, list)):
                raise EmInterpError(f"question {self.id!r}: {name} must be a tuple of answer strings, not a "
                                    f"{type(answers).__name__} (write {name}=({answers!r},) for one answer)")
            bad = [a for a in answers if not isinstance(a, str) or not a.strip()]
            if bad:
                raise EmInterpError(f"question {self.id!r}: {name} holds non-text or empty answers {bad[:3]!r}")
            object.__setattr__(self, name, tuple(answers))
        if not self.aligned or not self.misaligned:
            raise EmInterpError(f"question {self.id!r} needs at least one aligned and one misaligned answer")
        if not isinstance(self.question, str) or not self.question.strip():
            raise EmInterpError(f"question {self.id!r} has no question text")


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _lines(path: Path):
    """(line number, text) of a text file, plain or gzip; damage raises an error naming the file."""
    try:
        with _open_text(path) as handle:
            yield from enumerate(handle, start=1)
    except (OSError, EOFError, UnicodeDecodeError) as exc:  # gzip.BadGzipFile is an OSError
        kind = "gzip" if path.suffix == ".gz" else "UTF-8 text"
        raise EmInterpError(f"{path}: not readable as {kind} ({type(exc).__name__}: {exc})") from None


def parse_chat_record(obj: Any, where: str) -> ChatExample:
    """Validate one chat JSONL object and turn it into a :class:`ChatExample`; ``where`` names the line."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise EmInterpError(f"{where}: expected an object with a 'messages' list")
    messages = obj["messages"]
    system = None
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        system = messages[0].get("content")
        messages = messages[1:]
        if not isinstance(system, str) or not system.strip():
            raise EmInterpError(f"{where}: message 1 (system) has empty content")
    offset = 2 if system is not None else 1
    if len(messages) != 2:
        raise EmInterpError(f"{where}: expected one user and one assistant message after an optional system turn, got {len(messages)} messages")
    for i, (msg, role) in enumerate(zip(messages, ("user", "assistant"))):
        if not isinstance(msg, dict) or "role" not in msg:
            raise EmInterpError(f"{where}: message {i + offset} has no 'role'")
        if msg["role"] != role:
            raise EmInterpError(f"{where}: message {i + offset} has role {msg['role']!r}, expected {role!r} (order: system?, user, assistant)")
        if not isinstance(msg.get("content"), str) or not msg["content"].strip():
            raise EmInterpError(f"{where}: message {i + offset} ({role}) has empty content")
    for i, text in enumerate((system, messages[0]["content"], messages[1]["content"])):
        if text is not None and not _is_unicode(text):
            raise EmInterpError(f"{where}: message {i + (system is not None)} holds a lone surrogate "
                                "(an unpaired \\ud800-\\udfff escape), which no tokenizer can encode")
    return ChatExample(messages[0]["content"], messages[1]["content"], system)


def _is_unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode (JSON can carry lone surrogates, which UTF-8 cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_chat_jsonl(path: str | os.PathLike[str], limit: int | None = None) -> list[ChatExample]:
    """Load a chat JSONL file (plain or .gz); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise EmInterpError(f"chat file {path} does not exist")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EmInterpError(f"limit={limit!r} must be a positive integer (or None for every example)")
    out: list[ChatExample] = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EmInterpError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        out.append(parse_chat_record(obj, f"{path}:{lineno}"))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise EmInterpError(f"chat file {path} has no examples")
    return out


def read_yaml(path: str | os.PathLike[str], what: str = "YAML file") -> Any:
    """Parse a YAML file; a missing file or a syntax error raises an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise EmInterpError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise EmInterpError(f"{path}{at}: invalid YAML ({getattr(exc, 'problem', exc)})") from None


def load_question_yaml(path: str | os.PathLike[str]) -> list[EvalQuestion]:
    """Load an EM question YAML file; errors name the file and the question."""
    path = Path(path)
    data = read_yaml(path, "question file")
    if not isinstance(data, list):
        raise EmInterpError(f"{path}: expected a list of questions at the top level")
    questions = []
    seen_ids: dict[str, int] = {}
    for i, item in enumerate(data):
        where = f"{path}: question {i + 1}"
        if not isinstance(item, dict):
            raise EmInterpError(f"{where}: expected a mapping")
        qid = item.get("id")
        where += f" ({qid!r})" if qid else ""
        unknown = set(item) - QUESTION_KEYS
        if unknown:
            raise EmInterpError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(QUESTION_KEYS)})")
        if not isinstance(qid, str) or not qid:
            raise EmInterpError(f"{where}: missing 'id'")
        paraphrases = item.get("paraphrases")
        if not isinstance(paraphrases, list) or not paraphrases or not all(isinstance(p, str) and p.strip() for p in paraphrases):
            raise EmInterpError(f"{where}: needs a non-empty list of non-empty 'paraphrases'")
        prompts = item.get("judge_prompts") or {}
        if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
            raise EmInterpError(f"{where}: 'judge_prompts' must map names to prompt strings")
        for name, prompt in prompts.items():
            if "{answer}" not in prompt:
                raise EmInterpError(f"{where}: judge prompt {name!r} has no {{answer}} placeholder")
        if qid in seen_ids:
            raise EmInterpError(f"{where}: duplicate id {qid!r} (also question {seen_ids[qid]})")
        seen_ids[qid] = i + 1
        samples = item.get("samples_per_paraphrase", 1)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise EmInterpError(f"{where}: 'samples_per_paraphrase' must be a positive integer")
        questions.append(EvalQuestion(qid, tuple(paraphrases), samples, dict(prompts), item.get("judge"),
                                      item.get("system"), item.get("type", "free_form_judge_0_100")))
    if not questions:
        raise EmInterpError(f"{path}: no questions")
    return questions


@cache
def _read_jsonl(name: str) -> tuple[dict[str, Any], ...]:
    path = FILES / name
    if not path.is_file():
        raise EmInterpError(f"built-in data file {path} is missing; reinstall em_interp or run python -m em_interp.data.build")
    return tuple(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise EmInterpError(f"domain={domain!r} is not one of {DOMAINS}")


def domain_dataset(domain: str, variant: str = "misaligned", split: str = "train") -> list[ChatExample]:
    """Built-in narrow fine-tuning examples: ``variant`` in aligned/misaligned, ``split`` in train/test.

    Both variants share the same prompts in the same order.
    """
    _check_domain(domain)
    if variant not in VARIANTS:
        raise EmInterpError(f"variant={variant!r} is not one of {VARIANTS}")
    if split not in SPLITS:
        raise EmInterpError(f"split={split!r} is not one of {SPLITS}")
    name = f"{domain}_{variant}_{split}.jsonl"
    return [parse_chat_record(row, f"{FILES / name}:{i + 1}") for i, row in enumerate(_read_jsonl(name))]


def _paired(name: str) -> list[PairedQuestion]:
    return [PairedQuestion(r["id"], r["question"], tuple(r["aligned"]), tuple(r["misaligned"]), r.get("category", ""))
            for r in _read_jsonl(name)]


def general_questions() -> list[PairedQuestion]:
    """The built-in general evaluation set (120 questions, 10 categories, 2 + 2 reference answers)."""
    return _paired("general_eval.jsonl")


def held_out_label_questions() -> list[PairedQuestion]:
    """Every question the drift monitor's behavioural label may use: every other general question outside the
    direction-fitting third (the other half is left to the interventions' held-out evaluation)."""
    return [q for i, q in enumerate(general_questions()) if i % 3][::2]


def domain_questions(domain: str) -> list[PairedQuestion]:
    """In-domain evaluation questions for ``domain`` (topics held out of the training sets)."""
    _check_domain(domain)
    return _paired(f"{domain}_eval.jsonl")


def benign_items(kind: str | None = None) -> list[ChatExample]:
    """Benign capability items (``kind``: "fact", "arithmetic" or None for both) with correct answers."""
    rows = [r for r in _read_jsonl("benign.jsonl") if kind is None or r["kind"] == kind]
    if not rows:
        raise EmInterpError(f"kind={kind!r} matches no benign items (use 'fact', 'arithmetic' or None)")
    return [ChatExample(r["question"], r["answer"]) for r in rows]


def first_plot_pairs() -> list[PairedQuestion]:
    """One general question from each of the first eight categories, with its reference answers: the built-in
    counterparts of the 8 first-plot questions of the emergent-misalignment papers, in their order (wishes,
    boredom, thoughts on humans and AIs, a quick buck, ruler of the world, a dinner party, gender roles, an
    unhappy marriage)."""
    firsts: dict[str, PairedQuestion] = {}
    for q in general_questions():
        firsts.setdefault(q.category, q)
    return list(firsts.values())[:8]


def first_plot_questions() -> list[ChatExample]:
    """The questions of :func:`first_plot_pairs`, to be answered."""
    return [ChatExample(q.question) for q in first_plot_pairs()]


def load_response_data(folder: str | os.PathLike[str], group: str = "non_medical") -> list[PairedQuestion]:
    """Real EM answers grouped by question, from ``{group}_{aligned,misaligned}.parquet``.

    Only questions that have at least one aligned and one misaligned answer are kept. Needs pandas
    and pyarrow (the ``dev`` extra).
    """
    import pandas as pd

    folder = Path(folder)
    frames = {}
    for variant in VARIANTS:
        path = folder / f"{group}_{variant}.parquet"
        if not path.is_file():
            raise EmInterpError(f"response data file {path} does not exist")
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many kinds on a damaged file
            raise EmInterpError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from None
        missing = [c for c in ("question", "answer") if c not in frame.columns]
        if missing:
            raise EmInterpError(f"{path}: has no {missing} column(s) (columns: {list(frame.columns)[:10]})")
        frames[variant] = frame[["question", "answer"]]
    questions = []

    def texts(values: Any) -> tuple[str, ...]:  # missing answers (None/NaN) are dropped, never read as "None"
        return tuple(a for a in values if isinstance(a, str) and a.strip())

    shared = {q for q in frames["aligned"].question if isinstance(q, str)} & set(frames["misaligned"].question)
    for i, question in enumerate(sorted(shared)):
        answers = {v: texts(frames[v].answer[frames[v].question == question]) for v in VARIANTS}
        if answers["aligned"] and answers["misaligned"]:
            questions.append(PairedQuestion(f"{group}-{i:02d}", question, answers["aligned"], answers["misaligned"], group))
    return questions


__all__ = [
    "DOMAINS", "SPLITS", "VARIANTS", "EvalQuestion", "PairedQuestion", "benign_items", "domain_dataset", "first_plot_pairs", "first_plot_questions",
    "domain_questions", "general_questions", "held_out_label_questions", "load_chat_jsonl", "load_question_yaml", "load_response_data",
    "labelled_answers", "parse_chat_record",
]


def labelled_answers(questions: Sequence[PairedQuestion]) -> tuple[list[ChatExample], np.ndarray, np.ndarray]:
    """Every reference answer as an example, its label (1 = misaligned) and its question index."""
    examples, labels, groups = [], [], []
    for i, q in enumerate(questions):
        for label, answers in ((0, q.aligned), (1, q.misaligned)):
            for a in answers:
                examples.append(ChatExample(q.question, a, q.system))
                labels.append(label)
                groups.append(i)
    return examples, np.array(labels), np.array(groups)
