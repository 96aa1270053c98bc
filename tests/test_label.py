"""The monitor label's reliability across questions, and which checkpoints sit within noise of the danger line."""

from __future__ import annotations

import numpy as np
import pytest

from em_interp.errors import EmInterpError
from em_interp.monitor.label import label_reliability, within_noise


def _label(signal_sd: float, noise_sd: float, rows: int = 60, questions: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, signal_sd, (rows, 1)) + rng.normal(0, noise_sd, (rows, questions))


def test_reliability_tracks_the_signal_share_as_spearman_brown_predicts():
    for signal, noise in [(1.0, 1.0), (1.0, 3.0), (0.5, 3.0)]:
        expected = signal**2 / (signal**2 + noise**2 / 40)  # reliability of a 40-question mean
        got = label_reliability(_label(signal, noise, rows=1000))
        assert got.reliability == pytest.approx(expected, abs=0.05)
        assert got.reliability_range[0] <= got.reliability <= got.reliability_range[1]
        assert (got.n_rows, got.n_questions, got.n_splits) == (1000, 40, 200)
    assert label_reliability(_label(0.0, 1.0)).reliability < 0.3  # pure noise: no reliability
    assert label_reliability(_label(1.0, 1.0), seed=3) == label_reliability(_label(1.0, 1.0), seed=3)  # seeded


def test_within_noise_marks_the_rows_whose_ci_holds_the_line():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(m, 0.5, 30) for m in (-2.0, 0.02, 2.0)])
    assert within_noise(x, 0.0).tolist() == [False, True, False]


def test_bad_label_input_is_named():
    with pytest.raises(EmInterpError, match="question_shift has 1 NaN"):
        label_reliability(np.array([[0.1, np.nan], [0.2, 0.3], [0.1, 0.1]]))
    with pytest.raises(EmInterpError, match="checkpoints >= 3, questions >= 2"):
        label_reliability(np.ones((2, 5)))
    with pytest.raises(EmInterpError, match="does not vary"):
        label_reliability(np.ones((4, 6)))
    with pytest.raises(EmInterpError, match="threshold=nan"):
        within_noise(np.ones((4, 6)), float("nan"))
