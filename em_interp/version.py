"""Package version (kept in one place; recorded in every artefact sidecar)."""

__version__ = "0.1.0"
