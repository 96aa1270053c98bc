"""What a cached result depends on besides its inputs: the code that computed it and the libraries.

Every on-disk cache of em_interp (EM scores, activation shards, trained organisms) puts
:func:`computation_key` into its key, so a result computed by other code or under another torch,
transformers, TransformerLens or peft version is never served again: it is recomputed. (A
transformers release once changed how KV caches reach attention and silently corrupted scores;
keyed like this, the wrong scores would not have outlived the fix.)

**What counts as "the code".** A module enters a key by its *normalised syntax tree*
(:func:`normalised_source`): docstrings, comments and formatting are dropped, and so is the package
path of its em_interp imports (``from em_interp.monitor.detector.perturbations import x`` reads as ``from
perturbations import x``); the modules' own names do not enter the key either. So a docstring edit, a
reformatting or a move of a module into a subpackage reuses every cache, while any change to what the
code does (a statement, a constant, an imported name) recomputes. The rule is tested both ways in
``tests/test_provenance.py``; the guarded reference numbers catch a change of numbers that slipped past it.
"""

from __future__ import annotations

import ast
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


def normalised_source(source: str, filename: str = "<source>") -> str:
    """The syntax tree of ``source`` without what cannot change what it computes (see the module docstring).

    Docstrings (the first string statement of the module, a class or a function), comments and
    layout are dropped; ``em_interp`` imports keep only their last path component.
    """
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "em_interp":
            node.module = (node.module or "").rsplit(".", 1)[-1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "em_interp" and alias.asname is not None:
                    alias.name = alias.name.rsplit(".", 1)[-1]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def _source_digest(path: Path) -> str:
    return hashlib.sha256(normalised_source(path.read_text(encoding="utf-8"), str(path)).encode()).hexdigest()


def _digest_of(digests: list[str]) -> str:
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:16]


@functools.cache
def code_hash(*modules: str) -> str:
    """16 hex digits over the normalised source of the named modules (plus the core modules).

    Module names do not enter the hash: the same code under another module path gives the same hash.
    """
    names = sorted({*CORE_MODULES, *modules})
    return _digest_of([_source_digest(Path(importlib.import_module(name).__file__ or "")) for name in names])


def computation_key(*modules: str) -> dict[str, str]:
    """Package version, hash of the computing code and library versions: part of every cache key.

    ``modules`` names the modules (besides :data:`CORE_MODULES`) whose code computes the cached
    result, e.g. ``"em_interp.evaluation.judge_free"`` for EM scores.
    """
    return {"em_interp": __version__, "code": code_hash(*modules), **library_versions()}


@functools.cache
def package_code_hash() -> str:
    """16 hex digits over the normalised source of every Python file of the installed em_interp package.

    File paths do not enter the hash, so moving modules between folders keeps it (see :func:`code_hash`).
    """
    root = Path(__file__).resolve().parent
    return _digest_of([_source_digest(path) for path in sorted(root.rglob("*.py"))])
