"""Benchmark: what each part of the drift monitor's behavioural label adds to its reliability, on the embedded model.

Rescores checkpoints of the perturbation library a study left in the cache (run ``em-interp study`` first;
the newest run folder of each type and seed, ``--per-run`` checkpoints of each, evenly spaced, the last
included) and the base model, then forms each checkpoint's label (per question: mean misaligned minus mean
aligned answer log-prob, minus the base model's) under several label designs:

- ``20q x 1``: 20 held-out questions, one reference answer a side (the label before this benchmark);
- ``40q x 1``: every held-out label question, one answer a side;
- ``40q x all``: every held-out label question, every reference answer (the study's label);
- with ``../shared/external`` present, ``real`` (the non-medical ``response_data`` questions, their first
  ``--real-answers`` judged aligned and misaligned answers of a real EM organism a side) and ``40q x all +
  real`` (those questions as extra label columns).

Per design it prints the Spearman-Brown corrected split-half reliability across checkpoints (with the 2.5-97.5
percentiles of the splits), the median 95% CI half width of a checkpoint's label, that half width over the
spread (SD) of the labels, the checkpoints within noise of a danger line set as in the study (95th
percentile of the aligned and benign runs' checkpoints), and the scoring seconds per checkpoint of each
question set (the 20 x 1 set scored on its own, to time the earlier label on the same machine).
Run: ``.venv/bin/python benchmarks/bench_label.py [--per-run 2] [--real-answers 4]``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from em_interp import load_model
from em_interp.data import PairedQuestion, load_response_data
from em_interp.evaluation.judge_free import QuestionScores, score_questions
from em_interp.lora.adapters import load_adapter_weights
from em_interp.model import HookedModel
from em_interp.monitor.drift import label_questions, run_checkpoints
from em_interp.monitor.label import label_summary
from em_interp.monitor.perturbations import builtin_types, library_dir
from em_interp.monitor.scoring import DANGER_PERCENTILE

EXTERNAL = Path(__file__).resolve().parents[1].parent / "shared" / "external"


def _runs(per_run: int) -> list[tuple[str, list[Path]]]:
    """``(type, checkpoint folders)`` of the newest run folder per type and seed."""
    newest: dict[str, Path] = {}
    for folder in sorted((library_dir() / "runs").glob("*-s*-*"), key=lambda p: p.stat().st_mtime):
        newest[folder.name.rsplit("-", 1)[0]] = folder
    runs = []
    for name, folder in sorted(newest.items()):
        ckpts = [p for s, p in run_checkpoints(folder) if s > 0]
        picks = sorted({round(i) for i in np.linspace(len(ckpts) - 1, 0, per_run, endpoint=False)})
        runs.append((name.rsplit("-s", 1)[0], [ckpts[i] for i in picks]))
    return runs


def _score(model: HookedModel, sets: dict[str, list[PairedQuestion]]) -> tuple[dict[str, QuestionScores], float]:
    start = time.perf_counter()
    scores = {k: score_questions(model, qs, use_cache=False) for k, qs in sets.items()}
    return scores, time.perf_counter() - start


def _shift(scores: QuestionScores, n: int, k: int | None) -> np.ndarray:
    """Per question (first ``n``): mean of the first ``k`` misaligned minus mean of the first ``k`` aligned."""
    return np.array([m[:k].mean() - a[:k].mean() for a, m in zip(scores.aligned[:n], scores.misaligned[:n])])


def main() -> None:
    """Rescore the library's checkpoints and print one row per label design."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-run", type=int, default=2, help="checkpoints per run (evenly spaced, the last included)")
    parser.add_argument("--real-answers", type=int, default=4, help="response_data answers a side per question")
    args = parser.parse_args()
    # the 20 x 1 label is scored on its own only to time it (its values are the "label" set's, sliced)
    sets = {"label": label_questions(40), "20q x 1 (timing)": label_questions(20, answers=1)}
    if EXTERNAL.is_dir():
        real = load_response_data(EXTERNAL / "response_data", "non_medical")
        sets["real"] = [PairedQuestion(q.id, q.question, q.aligned[:args.real_answers], q.misaligned[:args.real_answers],
                                       q.category, q.system) for q in real]
    runs = _runs(args.per_run)
    if not runs:
        raise SystemExit(f"no perturbation runs under {library_dir() / 'runs'}: run `em-interp study` first")
    intent = {t.name: t.intent for t in builtin_types(EXTERNAL if EXTERNAL.is_dir() else None)}
    base, _ = _score(load_model(), sets)
    rows: list[dict[str, QuestionScores]] = []
    safe: list[bool] = []
    seconds = defaultdict(float)
    for kind, ckpts in runs:
        model = load_model(adapter=ckpts[0])
        for folder in ckpts:
            load_adapter_weights(model, folder)
            entry: dict[str, QuestionScores] = {}
            for key, qs in sets.items():
                scores, t = _score(model, {key: qs})
                entry.update(scores)
                seconds[key] += t
            rows.append(entry)
            safe.append(intent.get(kind, "") in ("aligned", "benign"))
        print(f"scored {kind}: {len(ckpts)} checkpoints", flush=True)
    designs = {"20q x 1": ("label", 20, 1), "40q x 1": ("label", 40, 1), "40q x all": ("label", 40, None)}
    if "real" in sets:
        designs["real"] = ("real", len(sets["real"]), None)
    matrices = {name: np.stack([_shift(r[key], n, k) - _shift(base[key], n, k) for r in rows])
                for name, (key, n, k) in designs.items()}
    if "real" in sets:
        matrices["40q x all + real"] = np.concatenate([matrices["40q x all"], matrices["real"]], axis=1)
    n = len(rows)
    print(f"\n{n} checkpoints of {len(runs)} runs; seconds per checkpoint: "
          + ", ".join(f"{k} {v / n:.2f}" for k, v in seconds.items()))
    print(f"{'label design':20s}{'questions':>10s}{'reliability':>13s}{'  range':16s}{'CI half':>9s}{'half/SD':>9s}"
          f"{'line':>9s}{'near line':>11s}")
    for name, x in matrices.items():
        line = max(0.0, float(np.percentile(x.mean(1)[np.array(safe)], DANGER_PERCENTILE))) if any(safe) else 0.0
        s = label_summary(x, line)
        if s["reliability"] is None:
            print(f"{name:20s}{x.shape[1]:10d}  not measurable: {s['why']}")
            continue
        lo, hi = s["reliability_range"]
        print(f"{name:20s}{x.shape[1]:10d}{s['reliability']:13.3f}  [{lo:5.2f}, {hi:5.2f}]"
              f"{s['ci_half_width_median']:9.4f}{s['ci_half_width_median'] / x.mean(1).std():9.2f}"
              f"{line:+9.4f}{s['within_noise_of_line']:7d}/{n}")


if __name__ == "__main__":
    main()
