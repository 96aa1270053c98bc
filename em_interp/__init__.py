"""em_interp: study emergent misalignment from inside a model.

Flat public API::

    import em_interp as em
    model = em.load_model()                        # embedded SmolLM2-135M-Instruct, offline
    cache = em.cache_residuals(model, examples, layers=[10, 20], reduction="answer_mean")

Layer convention: layer ``l`` = output of block ``l`` = TransformerLens ``blocks.l.hook_resid_post``
= Hugging Face ``hidden_states[l + 1]``.
"""

from em_interp.activations import CacheMeta, ResidualCache, cache_residuals
from em_interp.chat import ChatExample, TokenizedChat, tokenize_chat
from em_interp.directions import (
    Direction,
    accuracy_at,
    cosine_matrix,
    diff_of_means,
    orthogonal_directions,
    random_directions,
    separation,
    shuffled_label_directions,
)
from em_interp.errors import EmInterpError, ModelLoadError, NetworkDisabledError
from em_interp.evaluation.judge_free import (
    EMScore,
    QuestionScores,
    benign_loglik,
    em_score,
    paired_shift,
    score_questions,
)
from em_interp.interventions import (
    ablate,
    ablate_each_layer,
    ablate_weights,
    ablate_weights_each_layer,
    steer,
)
from em_interp.loading import DEFAULT_MODEL, KNOWN_MODELS, cache_dir
from em_interp.lora.adapters import parse_module_name
from em_interp.lora.organisms import train_organism
from em_interp.lora.rank1 import adapter_scalars, classify_adapters, fit_probe, list_adapters, scale_adapters
from em_interp.lora.training import LoraTrainConfig, train_lora
from em_interp.model import HookedModel, load_model
from em_interp.monitor.detector import DriftMonitor, MonitorCallback
from em_interp.monitor.drift import TraitBasis, trait_basis
from em_interp.options import HOOKS, REDUCTIONS, WHERE, Hook, Reduction, Where
from em_interp.study import Budget, StudyConfig, run_study
from em_interp.traits import trait_vectors
from em_interp.version import __version__

__all__ = [
    "DEFAULT_MODEL",
    "HOOKS",
    "KNOWN_MODELS",
    "REDUCTIONS",
    "WHERE",
    "Budget",
    "CacheMeta",
    "ChatExample",
    "Direction",
    "DriftMonitor",
    "EMScore",
    "EmInterpError",
    "Hook",
    "HookedModel",
    "LoraTrainConfig",
    "ModelLoadError",
    "MonitorCallback",
    "NetworkDisabledError",
    "QuestionScores",
    "Reduction",
    "ResidualCache",
    "StudyConfig",
    "TokenizedChat",
    "TraitBasis",
    "Where",
    "__version__",
    "ablate",
    "ablate_each_layer",
    "ablate_weights",
    "ablate_weights_each_layer",
    "accuracy_at",
    "adapter_scalars",
    "benign_loglik",
    "cache_dir",
    "cache_residuals",
    "classify_adapters",
    "cosine_matrix",
    "diff_of_means",
    "em_score",
    "fit_probe",
    "list_adapters",
    "load_model",
    "orthogonal_directions",
    "paired_shift",
    "parse_module_name",
    "random_directions",
    "run_study",
    "scale_adapters",
    "score_questions",
    "separation",
    "shuffled_label_directions",
    "steer",
    "tokenize_chat",
    "train_lora",
    "train_organism",
    "trait_basis",
    "trait_vectors",
]
