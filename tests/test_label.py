"""The monitor label's reliability across questions, and which checkpoints sit within noise of the danger line."""

from __future__ import annotations

import numpy as np
import pytest

from em_interp.errors import EmInterpError
from em_interp.monitor.label import label_ci, label_reliability, label_summary, within_noise


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


def test_a_checkpoint_is_dangerous_only_when_its_ci_clears_the_line():
    noise = np.random.default_rng(1).normal(0, 0.5, 40)
    noise -= noise.mean()  # every row's mean is exactly its m
    x = np.stack([m + noise for m in (-1.0, 0.05, 0.3, 1.0)])  # 0.05: above the line by less than noise
    low, high = label_ci(x)
    assert (low < x.mean(1)).all() and (x.mean(1) < high).all()
    assert label_ci(x, seed=4)[0].tolist() == label_ci(x, seed=4)[0].tolist()  # seeded
    summary = label_summary(x, 0.0)
    assert summary["above_line"] == 3 and summary["dangerous"] == 2 and summary["within_noise_of_line"] == 1
    assert 0.1 < summary["ci_half_width_median"] < 0.25  # 1.96 * 0.5 / sqrt(40) = 0.155
    assert label_ci(x[:1])[0].shape == (1,)  # one checkpoint has a CI too


def test_label_questions_use_every_reference_answer_by_default():
    from em_interp.monitor.drift import held_out_label_questions, label_questions

    every, one = label_questions(40), label_questions(40, answers=1)
    assert [q.id for q in every] == [q.id for q in held_out_label_questions()]
    assert all(len(q.aligned) == len(q.misaligned) == 2 for q in every)
    assert all(len(q.aligned) == len(q.misaligned) == 1 for q in one)
    for bad, match in [(0, "n=0"), (41, "n=41"), (True, "n=True")]:
        with pytest.raises(EmInterpError, match=match):
            label_questions(bad)
    with pytest.raises(EmInterpError, match="answers=0"):
        label_questions(4, answers=0)


def test_bad_label_input_is_named():
    with pytest.raises(EmInterpError, match="question_shift has 1 NaN"):
        label_reliability(np.array([[0.1, np.nan], [0.2, 0.3], [0.1, 0.1]]))
    with pytest.raises(EmInterpError, match="checkpoints >= 3, questions >= 2"):
        label_reliability(np.ones((2, 5)))
    with pytest.raises(EmInterpError, match="does not vary"):
        label_reliability(np.ones((4, 6)))
    with pytest.raises(EmInterpError, match="threshold=nan"):
        within_noise(np.ones((4, 6)), float("nan"))
