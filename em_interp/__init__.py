"""em_interp: study emergent misalignment from inside a model.

Flat public API::

    import em_interp as em
    model = em.load_model()                        # embedded SmolLM2-135M-Instruct, offline
    cache = em.cache_residuals(model, examples, layers=[10, 20], reduction="answer_mean")

Layer convention: layer ``l`` = output of block ``l`` = TransformerLens ``blocks.l.hook_resid_post``
= Hugging Face ``hidden_states[l + 1]``.
"""

from em_interp.activations import REDUCTIONS, CacheMeta, ResidualCache, cache_residuals
from em_interp.chat import ChatExample, TokenizedChat, tokenize_chat
from em_interp.directions import Direction
from em_interp.errors import EmInterpError, ModelLoadError, NetworkDisabledError
from em_interp.interventions import ablate, steer
from em_interp.loading import DEFAULT_MODEL, KNOWN_MODELS, cache_dir
from em_interp.model import HookedModel, load_model
from em_interp.version import __version__

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "REDUCTIONS",
    "CacheMeta",
    "ChatExample",
    "Direction",
    "EmInterpError",
    "HookedModel",
    "ModelLoadError",
    "NetworkDisabledError",
    "ResidualCache",
    "TokenizedChat",
    "__version__",
    "ablate",
    "cache_dir",
    "cache_residuals",
    "load_model",
    "steer",
    "tokenize_chat",
]
