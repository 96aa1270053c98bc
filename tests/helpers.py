"""Builders for tiny random-init models of real architectures (they live in :mod:`em_interp.testing`)."""

from em_interp.testing import (
    ARCHITECTURES,
    CHATML_TEMPLATE,
    CORPUS,
    SPECIAL,
    make_tokenizer,
    save_seeded_model,
    save_tiny_model,
    tiny_config,
)

__all__ = ["ARCHITECTURES", "CHATML_TEMPLATE", "CORPUS", "SPECIAL", "make_tokenizer", "save_seeded_model",
           "save_tiny_model", "tiny_config"]
