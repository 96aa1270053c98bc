"""Stage files: each finished stage's typed result, written atomically to ``OUT/stages/<name>.json``.

A result is a dataclass registered with :func:`record_type` (or a plain JSON value); its tensors
and arrays go to ``<name>.safetensors`` beside the JSON, which is written second and names the
arrays file's SHA-256, so a JSON file on disk always describes a complete record. Reading never
unpickles anything: JSON, safetensors, and the registered dataclasses only.

:class:`StageStore` also holds the study's identity (``OUT/stages/study.json``): a folder made by
another study (other model or config) is refused unless ``force``, which clears its stage files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import Tensor

from em_interp.errors import EmInterpError
from em_interp.evaluation.judge_free import EMScore, QuestionScores
from em_interp.io import atomic_write_bytes, atomic_write_json, sha256_file, sha256_json

FORMAT = "em_interp.stage/1"
_TYPES: dict[str, type] = {}
C = TypeVar("C", bound=type)


class StageFileError(EmInterpError):
    """A stage file that cannot be used (corrupt, incomplete or from another study)."""


def record_type(cls: C) -> C:
    """Register a dataclass so that stage files can hold it (by class name)."""
    if not dataclasses.is_dataclass(cls):
        raise EmInterpError(f"{cls.__name__} is not a dataclass")
    _TYPES[cls.__name__] = cls
    return cls


record_type(QuestionScores)
record_type(EMScore)


def encode(value: Any, arrays: dict[str, Tensor], path: str = "r") -> Any:
    """``value`` as JSON, with every tensor or array moved into ``arrays`` under its path."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, Tensor):
        arrays[path] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        arrays[path] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"__ndarray__": path}
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, arrays, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, arrays, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode(v, arrays, f"{path}.{k}") for k, v in value.items()}
        return {"__items__": [[encode(k, arrays, f"{path}.k{i}"), encode(v, arrays, f"{path}.v{i}")]
                              for i, (k, v) in enumerate(value.items())]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if _TYPES.get(name) is not type(value):
            raise EmInterpError(f"{name} is not registered with em_interp.study.records.record_type")
        return {"__type__": name, "fields": {f.name: encode(getattr(value, f.name), arrays, f"{path}.{f.name}")
                                             for f in dataclasses.fields(value)}}
    raise EmInterpError(f"cannot store a {type(value).__name__} at {path} in a stage file")


def decode(value: Any, arrays: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return arrays[value["__tensor__"]]
    if "__ndarray__" in value:
        return arrays[value["__ndarray__"]].numpy()
    if "__path__" in value:
        return Path(value["__path__"])
    if "__tuple__" in value:
        return tuple(decode(v, arrays) for v in value["__tuple__"])
    if "__items__" in value:
        return {decode(k, arrays): decode(v, arrays) for k, v in value["__items__"]}
    if "__type__" in value:
        cls = _TYPES.get(value["__type__"])
        if cls is None:
            raise StageFileError(f"unknown record type {value['__type__']!r}")
        return cls(**{k: decode(v, arrays) for k, v in value["fields"].items()})
    return {k: decode(v, arrays) for k, v in value.items()}


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """A finished stage as stored: its result, the key of its inputs, and how long it took."""

    stage: str
    key: str
    digest: str
    seconds: float
    result: Any


class StageStore:
    """The ``OUT/stages`` folder of one study."""

    def __init__(self, out: Path, identity: Mapping[str, Any], force: bool = False) -> None:
        self.folder = Path(out) / "stages"
        self.identity = json.loads(json.dumps(dict(identity)))  # as stored: tuples become lists
        self.study_key = sha256_json(self.identity)
        self.force = force

    def claim(self) -> None:
        """Check (or write) the folder's study identity; refuse another study's files unless ``force``."""
        marker = self.folder / "study.json"
        if marker.is_file():
            try:
                theirs = json.loads(marker.read_text())
                same = theirs.get("key") == self.study_key
            except (OSError, json.JSONDecodeError, AttributeError):
                theirs, same = {}, False
            if not same:
                if not self.force:
                    diff = _differences(theirs.get("identity", {}) if isinstance(theirs, dict) else {}, self.identity)
                    raise StageFileError(
                        f"{self.folder} holds the stage files of another study ({diff or 'unreadable ' + str(marker)}); "
                        "use another --out, or --force to discard them")
                self.clear()
        elif self.folder.is_dir() and any(self.folder.glob("*.json")):
            if not self.force:
                raise StageFileError(f"{self.folder} holds stage files without {marker.name}; use --force to discard them")
            self.clear()
        for leftover in self.folder.glob(".*.tmp"):  # what a killed write leaves behind; never a valid record
            leftover.unlink(missing_ok=True)
        atomic_write_json(marker, {"key": self.study_key, "identity": self.identity})

    def clear(self) -> None:
        """Remove every stage file (not the folder's other content)."""
        for path in self.folder.glob("*"):
            if path.is_file() and (path.suffix in (".json", ".safetensors") or path.name.startswith(".")):
                path.unlink()

    def json_path(self, stage: str) -> Path:
        """Where stage ``stage``'s record lives."""
        return self.folder / f"{stage}.json"

    def save(self, stage: str, key: str, result: Any, seconds: float) -> StageRecord:
        """Write the record atomically (arrays first, JSON last) and return it."""
        arrays: dict[str, Tensor] = {}
        encoded = encode(result, arrays)
        arrays_info = None
        if arrays:
            blob = save_tensors(arrays)
            path = atomic_write_bytes(self.folder / f"{stage}.safetensors", blob)
            arrays_info = {"file": path.name, "sha256": hashlib.sha256(blob).hexdigest()}
        digest = sha256_json({"result": encoded, "arrays": arrays_info})
        atomic_write_json(self.json_path(stage), {
            "format": FORMAT, "stage": stage, "study": self.study_key, "key": key, "digest": digest,
            "seconds": round(seconds, 3), "arrays": arrays_info, "result": encoded})
        return StageRecord(stage, key, digest, round(seconds, 3), result)

    def load(self, stage: str, key: str | None, then: str = "rerunning stage") -> StageRecord | None:
        """The stored record of ``stage`` if it exists and matches ``key`` (None: any key); else None.

        A corrupt or incomplete file, or one written by a version whose result type had other fields,
        is reported with a warning naming it and what happens ``then``, and treated as absent
        (the stage reruns); a file whose inputs changed is absent too (it reruns silently).
        """
        path = self.json_path(stage)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("stage") != stage:
                raise StageFileError("not a stage file of this stage")
            if data.get("study") != self.study_key or (key is not None and data.get("key") != key):
                return None
            arrays: dict[str, Tensor] = {}
            info = data.get("arrays")
            if info is not None:
                arrays_path = self.folder / info["file"]
                if not arrays_path.is_file() or sha256_file(arrays_path) != info["sha256"]:
                    raise StageFileError(f"its arrays file {arrays_path.name} is missing or does not match")
                # fresh, aligned copies: math on memory-mapped rows can round differently from the run that made them
                arrays = {k: v.clone() for k, v in load_file(arrays_path).items()}
            if sha256_json({"result": data["result"], "arrays": info}) != data.get("digest"):
                raise StageFileError("its content does not match its digest")
            result = decode(data["result"], arrays)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"stage file {path} is corrupt or from another em_interp version ({exc}); {then} {stage!r}",
                          stacklevel=2)
            return None
        return StageRecord(stage, data["key"], data["digest"], float(data.get("seconds", 0.0)), result)


def _differences(theirs: Mapping[str, Any], ours: Mapping[str, Any], prefix: str = "") -> str:
    """What differs between two identities, e.g. ``budget.base.eval_stride: 4 there, 1 here``."""
    out = []
    for k in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(k), ours.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.append(_differences(a, b, f"{prefix}{k}."))
        elif a != b or (k in theirs) != (k in ours):  # a setting new in this version differs even when it is None
            there = f"{a!r} there" if k in theirs else "absent there"
            here = f"{b!r} here" if k in ours else "absent here"
            out.append(f"{prefix}{k}: {there}, {here}")
    return "; ".join(x for x in out if x)
