"""em_interp: study emergent misalignment from inside a model.

The top level holds the verbs a study is written with (listed in ``__all__``); everything else
lives in its subpackage (``em_interp.lora``, ``.evaluation``, ``.monitor``, ``.defenses``,
``.study``) or core module (``em_interp.directions``, ``.interventions``, ...)::

    import em_interp as em
    model = em.load_model()                        # embedded SmolLM2-135M-Instruct, offline
    cache = em.cache_residuals(model, examples, layers=[10, 20], reduction="answer_mean")
    kl = em.defenses.KLDefense(1.0)                # subpackages load on first use

Nothing heavy is imported by ``import em_interp``: each name loads its module on first use
(PEP 562), so a script that only reads a saved direction never imports the Trainer stack.

Layer convention: layer ``l`` = output of block ``l`` = TransformerLens ``blocks.l.hook_resid_post``
= Hugging Face ``hidden_states[l + 1]``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from em_interp.errors import EmInterpError
from em_interp.version import __version__

if TYPE_CHECKING:  # the same names, for type checkers and IDEs (kept equal to _PUBLIC by a test)
    from em_interp.activations import ResidualCache, cache_residuals
    from em_interp.chat import ChatExample
    from em_interp.directions import (
        Direction,
        cosine_matrix,
        diff_of_means,
        orthogonal_directions,
        random_directions,
        separation,
        shuffled_label_directions,
    )
    from em_interp.evaluation.judge_free import benign_loglik, em_score, paired_shift, score_questions
    from em_interp.interventions import ablate, ablate_each_layer, ablate_weights, steer
    from em_interp.loading import DEFAULT_MODEL
    from em_interp.lora.organisms import train_organism
    from em_interp.lora.rank1 import adapter_scalars, classify_adapters
    from em_interp.lora.training import LoraTrainConfig, train_lora
    from em_interp.model import HookedModel, load_model
    from em_interp.monitor.detector import DriftMonitor, MonitorCallback
    from em_interp.monitor.drift import TraitBasis, trait_basis
    from em_interp.study import Budget, StudyConfig, run_study
    from em_interp.traits import trait_vectors

#: the top-level names and the module each is defined in (loaded on first use)
_PUBLIC: dict[str, str] = {
    "DEFAULT_MODEL": "em_interp.loading", "load_model": "em_interp.model", "HookedModel": "em_interp.model",
    "ChatExample": "em_interp.chat",
    "cache_residuals": "em_interp.activations", "ResidualCache": "em_interp.activations",
    "Direction": "em_interp.directions", "diff_of_means": "em_interp.directions",
    "random_directions": "em_interp.directions", "orthogonal_directions": "em_interp.directions",
    "shuffled_label_directions": "em_interp.directions", "separation": "em_interp.directions",
    "cosine_matrix": "em_interp.directions",
    "ablate": "em_interp.interventions", "ablate_each_layer": "em_interp.interventions",
    "ablate_weights": "em_interp.interventions", "steer": "em_interp.interventions",
    "trait_vectors": "em_interp.traits",
    "em_score": "em_interp.evaluation.judge_free", "score_questions": "em_interp.evaluation.judge_free",
    "paired_shift": "em_interp.evaluation.judge_free", "benign_loglik": "em_interp.evaluation.judge_free",
    "LoraTrainConfig": "em_interp.lora.training", "train_lora": "em_interp.lora.training",
    "train_organism": "em_interp.lora.organisms",
    "adapter_scalars": "em_interp.lora.rank1", "classify_adapters": "em_interp.lora.rank1",
    "trait_basis": "em_interp.monitor.drift", "TraitBasis": "em_interp.monitor.drift",
    "DriftMonitor": "em_interp.monitor.detector", "MonitorCallback": "em_interp.monitor.detector",
    "run_study": "em_interp.study", "StudyConfig": "em_interp.study", "Budget": "em_interp.study",
}

#: names the top level exported before the API was curated: still resolved, with a DeprecationWarning
#: naming their home (kept for one release)
_MOVED: dict[str, str] = {
    "CacheMeta": "em_interp.cache_files", "TokenizedChat": "em_interp.chat", "tokenize_chat": "em_interp.chat",
    "accuracy_at": "em_interp.directions", "EMScore": "em_interp.evaluation.judge_free",
    "QuestionScores": "em_interp.evaluation.judge_free", "ablate_weights_each_layer": "em_interp.interventions",
    "KNOWN_MODELS": "em_interp.loading", "cache_dir": "em_interp.loading",
    "parse_module_name": "em_interp.lora.adapters", "fit_probe": "em_interp.lora.rank1",
    "list_adapters": "em_interp.lora.rank1", "scale_adapters": "em_interp.lora.rank1",
    "HOOKS": "em_interp.options", "REDUCTIONS": "em_interp.options", "WHERE": "em_interp.options",
    "Hook": "em_interp.options", "Reduction": "em_interp.options", "Where": "em_interp.options",
    "ModelLoadError": "em_interp.errors", "NetworkDisabledError": "em_interp.errors",
}

#: subpackages and core modules reachable as attributes (``em.defenses.KLDefense``)
_SUBMODULES = ("activations", "chat", "data", "defenses", "directions", "evaluation", "interventions", "loading",
               "lora", "model", "monitor", "study", "traits", "transfer")

__all__ = ["EmInterpError", "__version__", *sorted(_PUBLIC)]


def __getattr__(name: str) -> Any:
    """Load a top-level name's module on first use (PEP 562); moved names warn and still resolve."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    if name in _MOVED:
        warnings.warn(f"em_interp.{name} is deprecated: import it from {_MOVED[name]} (the top level lists only "
                      "the verbs of a study)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"em_interp.{name}")
    raise AttributeError(f"module 'em_interp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBMODULES, *globals()})
