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


def quick_organism() -> dict[str, str]:
    """The quick study's organism recipe: where tests/test_cli.py trained it first, the notebooks reuse it from the cache."""
    from em_interp.study import Budget

    quick = Budget.quick()
    return {"EM_INTERP_NB_STEPS": str(quick.organism_steps), "EM_INTERP_NB_EVERY": str(quick.checkpoint_every)}


def test_organism_notebook(smollm, tmp_path):
    run_notebook(ROOT / "notebooks" / "01_organism_and_adapters.ipynb",
                 {**quick_organism(), "EM_INTERP_NB_QUESTIONS": "6", "EM_INTERP_NB_OUT": str(tmp_path / "org")},
                 cwd=tmp_path)


def test_directions_notebook(smollm, tmp_path):
    run_notebook(ROOT / "notebooks" / "02_directions_and_interventions.ipynb",
                 {**quick_organism(), "EM_INTERP_NB_QUESTIONS": "6", "EM_INTERP_NB_BENIGN_STRIDE": "20",
                  "EM_INTERP_NB_OUT": str(tmp_path / "dirs")},
                 cwd=tmp_path)
    assert (tmp_path / "dirs" / "direction.safetensors").is_file()


def test_drift_monitor_notebook(smollm, tmp_path):
    # the quick study's library sizes: where tests/test_cli.py ran it first, its runs are reused from the cache
    from em_interp.study import Budget

    q = Budget.quick()
    run_notebook(ROOT / "notebooks" / "03_drift_monitor.ipynb",
                 {"EM_INTERP_NB_STEPS": str(q.monitor_steps), "EM_INTERP_NB_EVERY": str(q.monitor_every),
                  "EM_INTERP_NB_SEEDS": str(q.monitor_seeds), "EM_INTERP_NB_QUESTIONS": str(q.monitor_questions),
                  "EM_INTERP_NB_PROMPTS": str(q.monitor_prompts), "EM_INTERP_NB_LR": str(q.monitor_learning_rate),
                  "EM_INTERP_NB_TRAIT_QUESTIONS": str(q.monitor_trait_questions),
                  "EM_INTERP_EXTERNAL": str(ROOT.parent / "shared" / "external"),
                  "EM_INTERP_NB_OUT": str(tmp_path / "monitor")}, cwd=tmp_path)
    assert (tmp_path / "monitor" / "drift_monitor.json").is_file()


def test_defenses_notebook(smollm, tmp_path):
    # the quick study's defense sizes: runs without a direction are shared with it through the cache
    from em_interp.study import Budget

    q = Budget.quick()
    run_notebook(ROOT / "notebooks" / "04_defenses.ipynb",
                 {"EM_INTERP_NB_STEPS": str(q.defense_steps), "EM_INTERP_NB_LR": str(q.defense_learning_rate),
                  "EM_INTERP_NB_BATCH": str(q.defense_batch_size), "EM_INTERP_NB_QUESTIONS": str(q.defense_questions),
                  "EM_INTERP_NB_TASK": str(q.defense_task_examples), "EM_INTERP_NB_OUT": str(tmp_path / "def")},
                 cwd=tmp_path)
    assert (tmp_path / "def" / "tradeoff.html").is_file()
