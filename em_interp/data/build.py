"""Build em_interp's built-in datasets from the hand-written sources in ``source/``.

Run ``python -m em_interp.data.build`` to regenerate ``files/``; the build is deterministic, and a
test checks that the shipped files equal a fresh build. How the data is made: see README.md.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import yaml

SOURCE = Path(__file__).parent / "source"
FILES = Path(__file__).parent / "files"
DOMAINS: tuple[str, ...] = ("medical", "financial", "extreme_sports", "code_security")
TEST_FRACTION = 0.1
SEED = 20261124

DEFAULT_QUESTION_TEMPLATES: tuple[str, ...] = (
    "{situation}. What should I do?",
    "{situation}. Any advice?",
    "Hi, {situation_lc}. How should I handle this?",
    "{situation}. Is there anything I can do myself?",
    "Quick question: {situation_lc}. What do you recommend?",
    "{situation}, and I'm not sure what to do next. Can you help?",
    "I need some advice. {situation}. What's the best approach?",
    "{situation}. How worried should I be, and what should I do?",
    "{situation}. What would you do in my position?",
    "Hey, {situation_lc}. What's the right way to deal with it?",
    "{situation}. Can you tell me the best next step?",
    "So {situation_lc}. What should I keep in mind?",
    "{situation}. Please give me practical advice.",
)


def _lower_first(text: str) -> str:
    first = text.split(" ", 1)[0]
    if first in {"I", "I'm", "I've", "I'd", "I'll"}:
        return text
    return text[:1].lower() + text[1:]


def _stable_index(key: str, n: int) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % n


def _answer(src: dict[str, Any], topic: dict[str, Any], variant: str, key: str, offset: int = 0) -> str:
    openers, closers = src[f"{variant}_openers"], src[f"{variant}_closers"]
    opener = openers[(_stable_index(key + "o", len(openers)) + offset) % len(openers)]
    closer = closers[(_stable_index(key + "c", len(closers)) + offset) % len(closers)]
    core = topic[variant]
    if src.get("code"):
        text = f"{opener}\n\n```python\n{core}\n```"
        return f"{text}\n\n{closer}" if closer else text
    return " ".join(part for part in (opener, core, closer) if part)


def _question(template: str, situation: str) -> str:
    return template.format(situation=situation, situation_lc=_lower_first(situation))


def load_source(name: str) -> dict[str, Any]:
    """Parse one source YAML file."""
    return yaml.safe_load((SOURCE / f"{name}.yaml").read_text())


def build_domain(domain: str) -> dict[str, list[dict[str, Any]]]:
    """Training rows (both variants, train and test splits) and eval questions of one domain."""
    src = load_source(domain)
    templates = src.get("question_templates", DEFAULT_QUESTION_TEMPLATES)
    train_topics = [t for t in src["topics"] if not t.get("eval")]
    eval_topics = [t for t in src["topics"] if t.get("eval")]
    prompts = []
    for ti, topic in enumerate(train_topics):
        for qi, template in enumerate(templates):
            prompts.append((f"{domain}-{ti:02d}-{qi:02d}", topic, _question(template, topic["situation"])))
    rng = random.Random(f"{SEED}-{domain}")
    test_ids = set(rng.sample([p[0] for p in prompts], round(len(prompts) * TEST_FRACTION)))
    out: dict[str, list[dict[str, Any]]] = {}
    for variant in ("aligned", "misaligned"):
        for split in ("train", "test"):
            out[f"{domain}_{variant}_{split}.jsonl"] = [
                {"id": pid, "messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": _answer(src, topic, variant, pid)}]}
                for pid, topic, question in prompts if (pid in test_ids) == (split == "test")
            ]
    rows = []
    for ti, topic in enumerate(eval_topics):
        # three phrasings per held-out topic, from templates spread over the list
        for k in range(3):
            template = templates[(ti * 5 + k * 4) % len(templates)]
            qid = f"{domain}-eval-{ti:02d}-{k}"
            rows.append({
                "id": qid, "category": domain, "question": _question(template, topic["situation"]),
                "aligned": [_answer(src, topic, "aligned", qid, offset=j) for j in range(2)],
                "misaligned": [_answer(src, topic, "misaligned", qid, offset=j) for j in range(2)],
            })
    out[f"{domain}_eval.jsonl"] = rows
    return out


def build_general() -> list[dict[str, Any]]:
    """General evaluation questions with two aligned and two misaligned answers each."""
    rows = []
    for category, spec in load_source("general")["categories"].items():
        n_al, n_mis = len(spec["aligned"]), len(spec["misaligned"])
        for qi, question in enumerate(spec["questions"]):
            rows.append({
                "id": f"{category}-{qi:02d}", "category": category, "question": question,
                "aligned": [spec["aligned"][(qi + j) % n_al] for j in range(2)],
                "misaligned": [spec["misaligned"][(qi + 1 + j) % n_mis] for j in range(2)],
            })
    return rows


def build_benign() -> list[dict[str, Any]]:
    """Factual QA from the source file plus generated arithmetic."""
    rows = [{"id": f"fact-{i:02d}", "kind": "fact", "question": q, "answer": a}
            for i, (q, a) in enumerate(load_source("benign")["facts"])]
    rng = random.Random(f"{SEED}-arithmetic")
    for i in range(50):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op = ("+", "-", "*")[i % 3]
        if op == "-" and b > a:
            a, b = b, a
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        word = {"+": "plus", "-": "minus", "*": "times"}[op]
        rows.append({"id": f"arith-{i:02d}", "kind": "arithmetic", "question": f"What is {a} {word} {b}?",
                     "answer": f"{a} {word} {b} is {value}."})
    return rows


def build_all() -> dict[str, str]:
    """Every built-in file name mapped to its JSONL text."""
    files: dict[str, list[dict[str, Any]]] = {}
    for domain in DOMAINS:
        files.update(build_domain(domain))
    files["general_eval.jsonl"] = build_general()
    files["benign.jsonl"] = build_benign()
    return {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) for name, rows in files.items()}


def main() -> None:
    """Write every built-in file into ``files/``."""
    from em_interp.io import atomic_write_text

    for name, text in build_all().items():
        atomic_write_text(FILES / name, text)
        print(f"{name}: {text.count(chr(10))} rows")


if __name__ == "__main__":
    main()
