"""One on-disk form for every saved em_interp object: tensors in safetensors plus a JSON sidecar.

An artefact saved at ``PATH`` is two files, ``PATH.safetensors`` (the tensors) and ``PATH.json``
(the sidecar). The suffixes are *appended* to the whole name, never substituted, so ``maps/em.l10``
and ``maps/em.l20`` are two artefacts; a ``PATH`` that already ends in ``.safetensors`` or ``.json``
names the same pair. The sidecar holds the format (``"em_interp.<kind>"``), its version, the package
version that wrote it, the object's own fields and a digest over those fields and the tensor file's
bytes, so a sidecar edited by hand, or paired with other tensors, is refused on load rather than
trusted (an edited ``n_trees`` or ``threshold`` of a saved monitor would otherwise change what it
does without a word). Both files are written atomically, tensors first, so a sidecar never describes
missing tensors.

Every read problem (a missing file, unreadable JSON, another kind of artefact, a newer format
version, a missing field, a damaged tensor file) is an :class:`~em_interp.errors.EmInterpError` that
names the file. No pickle is involved anywhere. This follows SAELens' single persistence pair (weights
in safetensors, a config JSON beside them, file names as constants).

Saved this way: :class:`~em_interp.directions.Direction`, :class:`~em_interp.transfer.RidgeMap`,
:class:`~em_interp.monitor.drift.TraitBasis`, :class:`~em_interp.monitor.detector.DriftMonitor`, the
perturbation library's run records and base measurement, and the defense run records. Four stores keep
their own form, for a reason each: LoRA adapters are peft folders (``adapter_config.json`` +
``adapter_model.safetensors``, so peft and vLLM load them); a :class:`~em_interp.activations.ResidualCache`
is a folder of shards written while the forward passes stream (bounded memory, resumable); a study's
stage files carry the study key and a digest over JSON and arrays (:mod:`em_interp.study.records`); the
judge's score cache is one JSON line per judged answer, appended as replies arrive.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load, save
from torch import Tensor

from em_interp.errors import EmInterpError
from em_interp.io import atomic_write_bytes, atomic_write_json, json_default
from em_interp.version import __version__

TENSORS_SUFFIX = ".safetensors"
SIDECAR_SUFFIX = ".json"
#: sidecar fields written by :func:`save_artifact` itself (an object's own fields may not use them)
RESERVED = ("format", "format_version", "package_version", "digest")

T = TypeVar("T")


def artifact_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(tensor file, sidecar)`` of the artefact at ``path`` (suffixes appended, never replaced)."""
    path = Path(path)
    if path.suffix in (TENSORS_SUFFIX, SIDECAR_SUFFIX):
        path = path.with_suffix("")
    return path.with_name(path.name + TENSORS_SUFFIX), path.with_name(path.name + SIDECAR_SUFFIX)


def save_artifact(path: str | os.PathLike[str], kind: str, tensors: Mapping[str, Tensor], fields: Mapping[str, Any],
                  version: int = 1) -> Path:
    """Write the artefact ``kind`` (e.g. ``"direction"``) at ``path``; return ``path`` without suffix.

    Missing parent folders are created. ``tensors`` are stored contiguous on the CPU; ``fields`` must be
    JSON-serialisable.
    """
    clash = [k for k in fields if k in RESERVED]
    if clash:
        raise EmInterpError(f"artefact fields {clash} are reserved")
    tensor_path, sidecar = artifact_paths(path)
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(tensor_path, blob)
    as_read = json.loads(json.dumps(dict(fields), default=json_default))  # the fields as load_artifact will see them
    atomic_write_json(sidecar, {"format": f"em_interp.{kind}", "format_version": version,
                                "package_version": __version__, **fields, "digest": _digest(as_read, blob)})
    return tensor_path.with_suffix("")


def _digest(fields: Mapping[str, Any], blob: bytes) -> str:
    """sha256 over the object's own sidecar fields (canonical JSON) and the tensor file's bytes."""
    head = json.dumps(dict(fields), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(head + b"\0" + blob).hexdigest()


def load_artifact(path: str | os.PathLike[str], kind: str, required: Sequence[str] = (), tensors: Sequence[str] = (),
                  version: int = 1, may_be_nan: Sequence[str] = ()) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read the artefact ``kind`` at ``path``: ``(tensors, sidecar fields)``.

    ``required`` names sidecar fields and ``tensors`` tensor names that must be present; a floating
    tensor with NaN or infinite entries is refused unless named in ``may_be_nan`` (e.g. a loss that is
    undefined at step 0); anything wrong raises :class:`EmInterpError` naming the file.
    """
    tensor_path, sidecar = artifact_paths(path)
    for p in (sidecar, tensor_path):
        if not p.is_file():
            raise EmInterpError(f"{kind} file {p} does not exist")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EmInterpError(f"{sidecar} is not a readable {kind} sidecar: {exc}") from None
    if not isinstance(meta, dict):
        raise EmInterpError(f"{sidecar} is not a {kind} sidecar (not a JSON object)")
    expected = f"em_interp.{kind}"
    if meta.get("format") != expected:
        raise EmInterpError(f"{sidecar} is not an em_interp {kind} (format {meta.get('format')!r}, expected {expected!r})")
    found = meta.get("format_version")
    if not isinstance(found, int) or found > version:
        raise EmInterpError(f"{sidecar} has {kind} format version {found!r}; this em_interp reads up to {version} "
                            "(written by a newer em_interp?)")
    missing = [k for k in required if k not in meta]
    if missing:
        raise EmInterpError(f"{sidecar} lacks the {kind} field(s) {missing}")
    fields = {k: v for k, v in meta.items() if k not in RESERVED}
    blob = tensor_path.read_bytes()
    try:
        arrays = load(blob)
    except Exception as exc:  # safetensors raises several kinds on a damaged or truncated file
        raise EmInterpError(f"cannot read {kind} tensors {tensor_path}: {type(exc).__name__}: {exc}") from None
    if "digest" in meta and meta["digest"] != _digest(fields, blob):  # (sidecars older than the digest have none)
        raise EmInterpError(f"{sidecar} does not match its tensors {tensor_path.name} (the digest differs): "
                            "one of the two was edited, damaged or replaced; save the object again")
    absent = [k for k in tensors if k not in arrays]
    if absent:
        raise EmInterpError(f"{tensor_path} lacks the {kind} tensor(s) {absent}")
    for name, value in arrays.items():
        if name not in may_be_nan and value.is_floating_point() and not torch.isfinite(value).all():
            raise EmInterpError(f"{tensor_path}: tensor {name!r} has NaN or infinite entries")
    return arrays, fields


def load_cached(path: str | os.PathLike[str], kind: str, build: Callable[[dict[str, Tensor], dict[str, Any]], T],
                what: str, then: str, **load: Any) -> T | None:
    """A cache record saved as the artefact ``kind``, made into its object by ``build(tensors, fields)``.

    None when the record is absent, or when it cannot be read or built: then a warning names the file
    (``what`` it is, and what happens ``then``) and the caller computes it again. A damaged cache is a
    miss, never an error. ``load`` goes to :func:`load_artifact` (``tensors=``, ``may_be_nan=``, ...).
    """
    if not artifact_paths(path)[1].is_file():
        return None
    try:
        tensors, fields = load_artifact(path, kind, **load)
        return build(tensors, fields)
    except (EmInterpError, KeyError, TypeError, ValueError) as exc:
        warnings.warn(f"{what} {path} is unreadable ({exc}); {then}", stacklevel=3)
        return None


def sidecar_field(meta: Mapping[str, Any], name: str, kind: type, source: str | os.PathLike[str]) -> Any:
    """``meta[name]`` as ``kind`` (int, float or str); a wrong type or a non-finite float is an error naming ``source``."""
    value = meta.get(name)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise EmInterpError(f"{source}: field {name!r} = {value!r} is not a {'finite ' if kind is float else ''}"
                            f"{kind.__name__}")
    return kind(value)
