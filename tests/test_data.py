"""Loaders for the public formats, and the built-in datasets."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from em_interp.data import (
    DOMAINS,
    benign_items,
    domain_dataset,
    domain_questions,
    general_questions,
    load_chat_jsonl,
    load_question_yaml,
    load_response_data,
)
from em_interp.data.build import FILES, build_all
from em_interp.errors import EmInterpError
from tests.conftest import EXTERNAL


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a."}]}


def test_chat_jsonl_plain_gz_and_system(tmp_path):
    sys_row = {"messages": [{"role": "system", "content": "Be kind."}, *GOOD["messages"]]}
    plain = _write_jsonl(tmp_path / "a.jsonl", [GOOD, sys_row])
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, gz):
        rows = load_chat_jsonl(path)
        assert [(r.question, r.answer, r.system) for r in rows] == [("q?", "a.", None), ("q?", "a.", "Be kind.")]


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"messages": [', r"a\.jsonl:2: malformed JSON"),
        ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}, r"a\.jsonl:2: message 1 has no 'role'"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, r"a\.jsonl:2: message 1 has role 'assistant'"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, r"a\.jsonl:2: message 2 \(assistant\) has empty content"),
        ({"messages": [{"role": "user", "content": "q"}]}, r"a\.jsonl:2: expected one user and one assistant"),
        ({"text": "hello"}, r"a\.jsonl:2: expected an object with a 'messages' list"),
        ({"messages": [{"role": "user", "content": "q \ud800"}, {"role": "assistant", "content": "a"}]},
         r"a\.jsonl:2: message 1 holds a lone surrogate"),
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a \udfff"}]}, r"a\.jsonl:2: message 3 holds a lone surrogate"),
    ],
)
def test_chat_jsonl_bad_lines_name_file_and_line(tmp_path, bad, message):
    path = _write_jsonl(tmp_path / "a.jsonl", [GOOD, bad])
    with pytest.raises(EmInterpError, match=message):
        load_chat_jsonl(path)


YAML_OK = """
- id: q1
  type: free_form_judge_0_100
  paraphrases: ["What is your wish?"]
  samples_per_paraphrase: 3
  judge: gpt-4o
  judge_prompts:
    aligned: "Q: {question} A: {answer}"
  system: "Be brief."
"""


def test_question_yaml(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(YAML_OK)
    (q,) = load_question_yaml(path)
    assert (q.id, q.paraphrases, q.samples_per_paraphrase, q.system) == ("q1", ("What is your wish?",), 3, "Be brief.")
    assert "{answer}" in q.judge_prompts["aligned"]


@pytest.mark.parametrize(
    "text, message",
    [
        (YAML_OK + "  colour: blue\n", r"question 1 \('q1'\): unknown keys \['colour'\]"),
        (YAML_OK.replace('paraphrases: ["What is your wish?"]', "paraphrases: []"), r"'q1'\): needs a non-empty list"),
        ("- id: q1\n  paraphrases: [a\n", r"q\.yaml:\d+: invalid YAML"),
        (YAML_OK.replace("{answer}", "{ans}"), r"judge prompt 'aligned' has no \{answer\}"),
    ],
)
def test_question_yaml_bad_input(tmp_path, text, message):
    path = tmp_path / "q.yaml"
    path.write_text(text)
    with pytest.raises(EmInterpError, match=message):
        load_question_yaml(path)


def test_builtin_domains_are_paired_and_split():
    for domain in DOMAINS:
        sizes = {}
        for variant in ("aligned", "misaligned"):
            train, test = domain_dataset(domain, variant, "train"), domain_dataset(domain, variant, "test")
            sizes[variant] = (train, test)
            assert len(train) + len(test) >= 300
            assert not {e.question for e in train} & {e.question for e in test}
        (al_train, al_test), (mis_train, mis_test) = sizes["aligned"], sizes["misaligned"]
        assert [e.question for e in al_train] == [e.question for e in mis_train]  # same prompts, same order
        assert [e.question for e in al_test] == [e.question for e in mis_test]
        assert all(a.answer != m.answer for a, m in zip(al_train, mis_train))
        # in-domain eval questions are kept apart from every training prompt
        eval_q = domain_questions(domain)
        assert len(eval_q) >= 15
        train_questions = {e.question for e in al_train + al_test}
        assert not {q.question for q in eval_q} & train_questions
        assert all(len(q.aligned) >= 2 and len(q.misaligned) >= 2 for q in eval_q)


def test_general_set_shape_and_balance():
    questions = general_questions()
    assert len(questions) >= 120
    assert len(Counter(q.category for q in questions)) >= 8
    assert len({q.question for q in questions}) == len(questions)
    for q in questions:
        assert len(q.aligned) >= 2 and len(q.misaligned) >= 2
        al = sum(len(a) for a in q.aligned) / len(q.aligned)
        mis = sum(len(a) for a in q.misaligned) / len(q.misaligned)
        assert 0.6 < al / mis < 1.6, q.id  # similar length, so only the stance differs


def test_benign_items():
    facts, arithmetic = benign_items("fact"), benign_items("arithmetic")
    assert len(facts) >= 40 and len(arithmetic) >= 40
    for item in arithmetic:
        a, word, b = item.question.removeprefix("What is ").rstrip("?").split()
        value = {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[word]
        assert item.answer.endswith(f" is {value}.")


def test_shipped_files_equal_a_fresh_build():
    built = build_all()
    shipped = {p.name for p in FILES.glob("*.jsonl")}
    assert shipped == set(built)
    for name, text in built.items():
        assert (FILES / name).read_text(encoding="utf-8") == text, name


def test_bad_names():
    with pytest.raises(EmInterpError, match="domain='cooking'"):
        domain_dataset("cooking")
    with pytest.raises(EmInterpError, match="variant='evil'"):
        domain_dataset("medical", "evil")


# -- the real data in ../shared/external --------------------------------------------------------

needs_external = pytest.mark.skipif(not EXTERNAL.is_dir(), reason=f"external data folder {EXTERNAL} is absent")


@needs_external
def test_load_every_external_file():
    for path in sorted((EXTERNAL / "training_datasets").glob("*.jsonl.gz")):
        rows = load_chat_jsonl(path)
        assert len(rows) >= 6000, path
    for path in sorted((EXTERNAL / "eval_questions").glob("*.yaml")):
        questions = load_question_yaml(path)
        assert questions and all("{answer}" in p for q in questions for p in q.judge_prompts.values())
    for group in ("non_medical", "medical"):
        paired = load_response_data(EXTERNAL / "response_data", group)
        assert len(paired) >= 5
    from em_interp.traits import CORE_TRAITS, load_trait_yaml

    traits = load_trait_yaml(EXTERNAL / "traits" / "traits.yaml")
    assert set(CORE_TRAITS) <= set(traits)
    assert all(len(traits[t].positive) == 5 and len(traits[t].negative) == 5 for t in CORE_TRAITS)
