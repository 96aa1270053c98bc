"""The notebooks run end to end on the embedded model at a small budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def run_notebook(path: Path, env: dict[str, str], cwd: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_organism_notebook(smollm, tmp_path):
    run_notebook(ROOT / "notebooks" / "01_organism_and_adapters.ipynb",
                 {"EM_INTERP_NB_STEPS": "4", "EM_INTERP_NB_QUESTIONS": "6", "EM_INTERP_NB_OUT": str(tmp_path / "org")},
                 cwd=tmp_path)


def test_directions_notebook(smollm, tmp_path):
    run_notebook(ROOT / "notebooks" / "02_directions_and_interventions.ipynb",
                 {"EM_INTERP_NB_STEPS": "4", "EM_INTERP_NB_QUESTIONS": "6", "EM_INTERP_NB_OUT": str(tmp_path / "dirs")},
                 cwd=tmp_path)
    assert (tmp_path / "dirs" / "direction.safetensors").is_file()


def test_drift_monitor_notebook(smollm, tmp_path):
    # the quick study's library sizes: where tests/test_cli.py ran it first, its runs are reused from the cache
    run_notebook(ROOT / "notebooks" / "03_drift_monitor.ipynb",
                 {"EM_INTERP_NB_STEPS": "6", "EM_INTERP_NB_EVERY": "3", "EM_INTERP_NB_SEEDS": "1",
                  "EM_INTERP_NB_QUESTIONS": "8", "EM_INTERP_NB_PROMPTS": "8", "EM_INTERP_NB_LR": "6e-3",
                  "EM_INTERP_NB_TRAIT_QUESTIONS": "2",
                  "EM_INTERP_EXTERNAL": str(ROOT.parent / "shared" / "external"),
                  "EM_INTERP_NB_OUT": str(tmp_path / "monitor")}, cwd=tmp_path)
    assert (tmp_path / "monitor" / "drift_monitor.json").is_file()


def test_defenses_notebook(smollm, tmp_path):
    # the quick study's defense sizes: runs without a direction are shared with it through the cache
    run_notebook(ROOT / "notebooks" / "04_defenses.ipynb",
                 {"EM_INTERP_NB_STEPS": "4", "EM_INTERP_NB_LR": "6e-3", "EM_INTERP_NB_BATCH": "2",
                  "EM_INTERP_NB_QUESTIONS": "8", "EM_INTERP_NB_TASK": "8", "EM_INTERP_NB_OUT": str(tmp_path / "def")},
                 cwd=tmp_path)
    assert (tmp_path / "def" / "tradeoff.html").is_file()
