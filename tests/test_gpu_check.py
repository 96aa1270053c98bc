"""The GPU check's dry run: every measurement of benchmarks/gpu_check.py at tiny sizes on the CPU."""

from __future__ import annotations

import json
import math
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_gpu_check_dry_run_measures_everything_and_writes_json(tmp_path, capsys):
    import gpu_check

    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["shape"] for r in result["shapes"]] == list(gpu_check.DRY_SHAPES)
    assert result["info"]["bf16_matmul_peak_tflops"] > 0
    for row in result["shapes"]:
        for section in ("caching", "scoring", "training", "sampling", "agreement"):
            assert row[section] and all(math.isfinite(v) for v in row[section].values()), (row["shape"], section)
        assert row["caching"]["cache_ratio"] > 0 and row["training"]["fraction_of_peak"] > 0
        # em_interp's scoring equals a bare transformers forward on the same answers
        assert row["scoring"]["max_abs_diff_vs_bare"] < 1e-4
        # on the CPU both "dtypes" of the dry run are compared for real: bf16 is close to fp32, not equal
        agreement = row["agreement"]
        assert 0 < agreement["score_max_abs_diff"] < 0.5 and agreement["direction_cosine"] > 0.9
    printed = capsys.readouterr().out
    assert "cache x" in printed and "tiny-qwen2" in printed


def test_gpu_check_refuses_unknown_shapes_and_missing_output_folders(tmp_path, capsys):
    import gpu_check
    import pytest

    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--shapes", "gpt-17"])
    assert "gpt-17" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--out", str(tmp_path / "missing" / "x.json")])
    assert "does not exist" in capsys.readouterr().err
