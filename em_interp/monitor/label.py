"""How far to trust the monitor's behavioural label: its reliability across questions, and checkpoints within noise.

Each checkpoint is labelled by its EM shift over the base model, the mean over held-out questions
of a per-question shift (:mod:`em_interp.monitor.perturbations`). Two measures say how much of that
label is the checkpoint and how much the question sample:

- :func:`label_reliability`: the split-half reliability across checkpoints, Spearman-Brown corrected
  to the full question set (``2r / (1 + r)``, r the correlation between the two halves' labels, averaged
  over random splits), with the corrected 2.5-97.5 percentiles of the splits' r;
- :func:`label_ci`: each checkpoint's 95% bootstrap CI (questions resampled). A checkpoint is
  *dangerous* only when the CI's low end is above the danger line
  (:func:`em_interp.monitor.scoring.evaluate_library`), so the question sample alone cannot make it so;
- :func:`within_noise`: the checkpoints whose CI contains the danger line, i.e. whose verdict the
  question sample alone could flip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from em_interp.errors import EmInterpError
from em_interp.validate import finite_array, finite_number


@dataclass(frozen=True)
class LabelReliability:
    """Spearman-Brown corrected split-half reliability of a label over ``n_rows`` checkpoints."""

    reliability: float
    reliability_range: tuple[float, float]
    split_half_r: float
    n_rows: int
    n_questions: int
    n_splits: int


def _question_matrix(question_shift: np.ndarray, min_rows: int = 3) -> np.ndarray:
    x = finite_array("question_shift", question_shift)
    if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] < 2:
        raise EmInterpError(f"question_shift must be (checkpoints >= {min_rows}, questions >= 2), got shape {x.shape}")
    return x


def label_reliability(question_shift: np.ndarray, n_splits: int = 200, seed: int = 0) -> LabelReliability:
    """Split-half reliability of the row means of ``question_shift`` (rows: checkpoints, columns: questions)."""
    x = _question_matrix(question_shift)
    if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
        raise EmInterpError(f"n_splits={n_splits!r} must be an integer >= 1")
    rng = np.random.default_rng(seed)
    half = x.shape[1] // 2
    rs = []
    for _ in range(n_splits):
        order = rng.permutation(x.shape[1])
        a, b = x[:, order[:half]].mean(1), x[:, order[half:]].mean(1)
        if a.std() == 0 or b.std() == 0:
            continue  # a half with no variation across checkpoints says nothing
        rs.append(float(np.corrcoef(a, b)[0, 1]))
    if not rs:
        raise EmInterpError("the label does not vary across checkpoints in any split: no reliability to measure")
    r = np.array(rs)
    low, high = np.percentile(r, [2.5, 97.5])
    return LabelReliability(_spearman_brown(float(r.mean())), (_spearman_brown(float(low)), _spearman_brown(float(high))),
                            float(r.mean()), x.shape[0], x.shape[1], len(rs))


def _spearman_brown(r: float) -> float:
    """The reliability of the full question set from the half-set correlation ``r``: ``2r / (1 + r)``.

    Applied to the mean correlation over splits (and to its percentiles: the map is monotone), not
    averaged after mapping, which a negative correlation near -1 would send towards minus infinity.
    """
    return 2 * r / (1 + r) if r > -1 else float("-inf")


def label_ci(question_shift: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the 95% percentile-bootstrap CI of its mean over questions (questions resampled, the same
    draws for every row), as ``(low, high)`` arrays."""
    x = _question_matrix(question_shift, min_rows=1)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise EmInterpError(f"n_boot={n_boot!r} must be an integer >= 1")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, x.shape[1], size=(n_boot, x.shape[1]))
    means = x[:, picks].mean(2)  # (rows, n_boot)
    return np.percentile(means, 2.5, axis=1), np.percentile(means, 97.5, axis=1)


def within_noise(question_shift: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Per row: whether the 95% bootstrap CI of its mean (:func:`label_ci`) contains ``threshold``."""
    line = finite_number("threshold", threshold)
    low, high = label_ci(question_shift, n_boot, seed)
    return (low <= line) & (line <= high)


def label_summary(question_shift: np.ndarray, threshold: float, seed: int = 0) -> dict[str, Any]:
    """The label's reliability and, against the danger line ``threshold``, how many checkpoints sit within noise of it,
    how many have a mean above it, and how many are dangerous (CI wholly above it) (JSON-ready).

    A library too small to measure it (fewer than 3 checkpoints or 2 questions, or a label that never
    varies) gives ``{"reliability": None, "why": ...}`` rather than an error: the study goes on.
    """
    try:
        reliability = label_reliability(question_shift, seed=seed)
    except EmInterpError as exc:
        return {"reliability": None, "why": str(exc)}
    line = finite_number("threshold", threshold)
    low, high = label_ci(question_shift, seed=seed)
    mean = np.asarray(question_shift, dtype=np.float64).mean(1)
    return {"reliability": reliability.reliability, "reliability_range": list(reliability.reliability_range),
            "split_half_r": reliability.split_half_r, "questions": reliability.n_questions,
            "checkpoints": reliability.n_rows, "within_noise_of_line": int(((low <= line) & (line <= high)).sum()),
            "above_line": int((mean > line).sum()), "dangerous": int((low > line).sum()),
            "ci_half_width_median": float(np.median((high - low) / 2))}
