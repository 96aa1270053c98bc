"""What a cached result depends on besides its inputs: the code that computed it and the libraries.

Every on-disk cache of em_interp (EM scores, activation shards, trained organisms) puts
:func:`computation_key` into its key, so a result computed by other code or under another torch,
transformers, TransformerLens or peft version is never served again: it is recomputed. (A
transformers release once changed how KV caches reach attention and silently corrupted scores;
keyed like this, the wrong scores would not have outlived the fix.)
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from em_interp.version import __version__

#: Distributions whose versions can change what em_interp computes.
TRACKED_LIBRARIES: tuple[str, ...] = ("torch", "transformers", "transformer-lens", "peft")

#: The modules whose code shapes every model computation (loading, tokenisation, hooks).
CORE_MODULES: tuple[str, ...] = ("em_interp._bridge", "em_interp.model", "em_interp.chat", "em_interp.loading")


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`TRACKED_LIBRARIES` (``"absent"`` where one is not installed)."""
    out = {}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


@functools.cache
def code_hash(*modules: str) -> str:
    """SHA-256 (16 hex digits) of the source files of the named modules (plus the core modules)."""
    digest = hashlib.sha256()
    for name in sorted({*CORE_MODULES, *modules}):
        source = Path(importlib.import_module(name).__file__ or "")
        digest.update(name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def computation_key(*modules: str) -> dict[str, str]:
    """Package version, hash of the computing code and library versions: part of every cache key.

    ``modules`` names the modules (besides :data:`CORE_MODULES`) whose code computes the cached
    result, e.g. ``"em_interp.evaluation"`` for EM scores.
    """
    return {"em_interp": __version__, "code": code_hash(*modules), **library_versions()}


@functools.cache
def package_code_hash() -> str:
    """SHA-256 (16 hex digits) of every Python source file of the installed em_interp package."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
