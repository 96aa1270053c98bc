"""Guard the science: the embedded model's key numbers equal a known-good run's, within float noise.

The study half of the reference is checked by ``tests/test_cli.py`` (it runs the quick study once);
this file checks the base-model half and the comparison rules themselves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from em_interp.errors import EmInterpError
from em_interp.reference import (
    TOLERANCES,
    base_model_numbers,
    compare,
    load_reference,
    monitor_numbers,
    readable,
)

REFERENCE = Path(__file__).parent / "reference" / "quick_study.json"


def test_compare_flags_only_what_moves_beyond_tolerance():
    ref = {"a": {"mean": 0.2, "ci_low": 0.1}, "logprobs": [-1.0], "greedy": {"q": "Paris."}}
    same = {"a": {"mean": 0.2 + TOLERANCES["mean"] / 2, "ci_low": 0.1 - TOLERANCES["ci"] / 2},
            "logprobs": [-1.0 + TOLERANCES["logprob"] / 2], "greedy": {"q": "Paris."}}
    assert compare(ref, same) == []
    moved = {"a": {"mean": 0.3, "ci_low": float("nan")}, "logprobs": [-1.01], "greedy": {"q": "Paris!"}}
    problems = compare(ref, moved)
    assert len(problems) == 4 and any("/a/mean" in p for p in problems) and any("greedy/q" in p for p in problems)
    assert compare(ref, {"a": {}}) and compare(ref, {**ref, "logprobs": []})


def test_monitor_rates_must_repeat_and_undefined_stays_undefined():
    ref = {"monitor": {"status": "evaluated", "detectors": {"monitor": {"auroc": 1.0, "fnr": 0.0, "fpr": None}}}}
    assert compare(ref, {"monitor": {"status": "evaluated",
                                     "detectors": {"monitor": {"auroc": 1.0, "fnr": 1e-9, "fpr": None}}}}) == []
    moved = compare(ref, {"monitor": {"status": "not evaluable: x",
                                      "detectors": {"monitor": {"auroc": 0.99, "fnr": 0.0, "fpr": 0.5}}}})
    assert len(moved) == 3 and any("/monitor/status" in p for p in moved) and any("fpr: expected None" in p for p in moved)
    assert compare({"x": 0.5}, {"x": None})  # a defined number may not become undefined


def test_monitor_numbers_keep_every_detector_or_only_the_status():
    d = {"auroc": 0.9, "fnr": 0.1, "fpr": 0.05, "auroc_ci": [0.8, 1.0]}
    entry = {"status": "evaluated", "kind": "forest", "auroc": 0.9, "fnr": 0.1, "fpr": 0.05,
             "variants": {"logistic": d}, "baselines": {"pca": d, "sae": d}, "sae": {"over_seeds": {"auroc_mean": 0.7}}}
    got = monitor_numbers(entry)
    assert sorted(got["detectors"]) == ["logistic", "monitor", "pca", "sae"] and got["sae_auroc_mean_over_seeds"] == 0.7
    assert got["detectors"]["pca"] == {"auroc": 0.9, "fnr": 0.1, "fpr": 0.05}
    assert monitor_numbers({"status": "not evaluable: why"}) == {"status": "not evaluable: why"}


def test_readable():
    assert readable("The capital of France is Paris.")
    assert not readable("I-----------------") and not readable("Hello------------") and not readable("....")


def test_bad_reference_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "ref.json"
    bad.write_text("{not json")
    with pytest.raises(EmInterpError, match="ref.json"):
        load_reference(bad)
    bad.write_text("{}")
    with pytest.raises(EmInterpError, match="not an em_interp reference"):
        load_reference(bad)


@pytest.mark.integration
def test_base_model_numbers_match_reference(smollm):
    reference = load_reference(REFERENCE)
    got = base_model_numbers(smollm)
    assert compare(reference["base_model"], got) == []
    assert "Paris" in got["greedy"]["What is the capital of France?"]
    assert all(readable(a) for a in got["greedy"].values())
    # shared-prompt scoring equals one pass per example on the real model
    assert compare({"x": got["logprobs_plain"]}, {"x": got["logprobs_shared"]}, "/logprobs") == []
