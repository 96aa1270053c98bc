"""The notebooks run end to end, each in a Jupyter kernel, on a tiny random Llama at the quick budget's sizes.

Every notebook takes its model from ``EM_INTERP_NB_MODEL`` (default: the embedded SmolLM2-135M-Instruct)
and derives its layers from the model, so the tests run them on a tiny model with room for the built-in
data's longest chats: every cell executes, in seconds. What the notebooks compute on the real model is
what the quick study computes there with the same functions (tests/test_cli.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.notebook


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


def organism_sizes(model: Path) -> dict[str, str]:
    """The notebooks' model and the quick budget's organism recipe."""
    from em_interp.study import Budget

    q = Budget.quick()
    return {"EM_INTERP_NB_MODEL": str(model), "EM_INTERP_NB_STEPS": str(q.organisms.steps),
            "EM_INTERP_NB_EVERY": str(q.organisms.checkpoint_every)}


def test_organism_notebook(tiny_study_dir, tmp_path):
    run_notebook(ROOT / "notebooks" / "01_organism_and_adapters.ipynb",
                 {**organism_sizes(tiny_study_dir), "EM_INTERP_NB_QUESTIONS": "6",
                  "EM_INTERP_NB_OUT": str(tmp_path / "org")}, cwd=tmp_path)


def test_directions_notebook(tiny_study_dir, tmp_path):
    run_notebook(ROOT / "notebooks" / "02_directions_and_interventions.ipynb",
                 {**organism_sizes(tiny_study_dir), "EM_INTERP_NB_QUESTIONS": "6", "EM_INTERP_NB_BENIGN_STRIDE": "20",
                  "EM_INTERP_NB_OUT": str(tmp_path / "dirs")}, cwd=tmp_path)
    assert (tmp_path / "dirs" / "direction.safetensors").is_file()


def test_drift_monitor_notebook(tiny_study_dir, tmp_path):
    from em_interp.study import Budget

    q = Budget.quick()
    # the tiny random model's labels are noise: no checkpoint's label CI clears the danger line, so the notebook
    # takes its "not evaluable" path (the fit/calibrate/save path runs on the real model in the quick study)
    run_notebook(ROOT / "notebooks" / "03_drift_monitor.ipynb",
                 {"EM_INTERP_NB_MODEL": str(tiny_study_dir), "EM_INTERP_NB_STEPS": str(q.monitor.steps),
                  "EM_INTERP_NB_EVERY": str(q.monitor.every), "EM_INTERP_NB_SEEDS": str(q.monitor.seeds),
                  "EM_INTERP_NB_QUESTIONS": str(q.monitor.questions), "EM_INTERP_NB_PROMPTS": str(q.monitor.prompts),
                  "EM_INTERP_NB_LR": "0.2", "EM_INTERP_NB_TRAIT_QUESTIONS": str(q.monitor.trait_questions),
                  "EM_INTERP_EXTERNAL": str(ROOT.parent / "shared" / "external"),
                  "EM_INTERP_NB_OUT": str(tmp_path / "monitor")}, cwd=tmp_path)
    assert (tmp_path / "monitor" / "trait_basis.json").is_file()
    assert (tmp_path / "monitor" / "watched_run" / "checkpoints").is_dir()


def test_defenses_notebook(tiny_study_dir, tmp_path):
    from em_interp.study import Budget

    q = Budget.quick()
    run_notebook(ROOT / "notebooks" / "04_defenses.ipynb",
                 {"EM_INTERP_NB_MODEL": str(tiny_study_dir), "EM_INTERP_NB_STEPS": str(q.defenses.steps),
                  "EM_INTERP_NB_LR": "5e-2", "EM_INTERP_NB_BATCH": str(q.defenses.batch_size),
                  "EM_INTERP_NB_QUESTIONS": str(q.defenses.questions), "EM_INTERP_NB_TASK": str(q.defenses.task_examples),
                  "EM_INTERP_NB_OUT": str(tmp_path / "def")}, cwd=tmp_path)
    assert (tmp_path / "def" / "tradeoff.html").is_file()
