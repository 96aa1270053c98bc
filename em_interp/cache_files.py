"""The files of an activation cache on disk: its JSON sidecar (:class:`CacheMeta`) and its shards.

:func:`~em_interp.activations.cache_residuals` streams shards here (``out_dir=``) and
:class:`~em_interp.activations.ResidualCache` reads them back; every shard is checked against the
sidecar (size, layers, hash) before use, and a run with other inputs never reuses another's shards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from em_interp.errors import EmInterpError
from em_interp.io import atomic_write_bytes
from em_interp.provenance import computation_key
from em_interp.version import __version__

META_FILE = "meta.json"


@dataclass
class CacheMeta:
    """Everything needed to know where cached activations came from (the JSON sidecar)."""

    model: str
    load_flags: dict[str, Any]
    layers: list[int]
    hook: str
    reduction: str
    examples_hash: str
    n_examples: int
    d_model: int
    max_length: int | None
    package_version: str = __version__
    computed_by: dict[str, str] = field(default_factory=lambda: computation_key("em_interp.activations"))
    shard_size: int | None = None
    shards: list[dict[str, int | str]] = field(default_factory=list)
    complete: bool = False
    #: the model's block count, so that ``cache[-1]`` means the last block as everywhere else
    n_layers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> CacheMeta:
        """Build from a dict read from a sidecar, naming ``source`` on error."""
        # a sidecar written before caches were keyed by code and library versions is of unknown provenance
        if not isinstance(data, dict):
            raise EmInterpError(f"{source}: not an em_interp activation cache sidecar (not a JSON object)")
        data = {"computed_by": {}, **data}
        try:
            return cls(**data)
        except TypeError as exc:
            raise EmInterpError(f"{source}: not an em_interp activation cache sidecar ({exc})") from exc

    def same_run(self, other: CacheMeta) -> bool:
        """Whether two sidecars describe the same inputs (so shards can be reused)."""
        keys = ("model", "load_flags", "layers", "hook", "reduction", "examples_hash", "n_examples", "max_length",
                "computed_by", "shard_size")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def check_shard(meta: CacheMeta, root: Path, shard: dict[str, Any]) -> None:
    """Raise unless ``shard``'s file holds exactly the rows and widths ``meta`` promises for it."""
    from safetensors import safe_open

    path = root / str(shard.get("file", ""))
    try:
        start, stop = int(shard["start"]), int(shard["stop"])
    except (KeyError, TypeError, ValueError):
        raise EmInterpError(f"{root / META_FILE}: shard entry {shard!r} lacks start/stop") from None
    if not path.is_file():
        raise EmInterpError(f"activation shard {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            offsets = handle.get_tensor("offsets") if "offsets" in shapes else None
    except Exception as exc:  # safetensors raises several kinds on a damaged file
        raise EmInterpError(f"activation shard {path} is not readable ({type(exc).__name__}: {exc})") from None
    if meta.reduction == "answer_tokens":
        if offsets is None or len(offsets) != stop - start + 1:
            raise EmInterpError(f"activation shard {path}: offsets do not cover examples {start}..{stop - 1}")
        rows = int(offsets[-1])
    else:
        rows = stop - start
    for layer in meta.layers:
        shape = shapes.get(f"layer.{layer}")
        if shape != (rows, meta.d_model):
            raise EmInterpError(f"activation shard {path}: layer {layer} has shape {shape}, but {root / META_FILE} "
                                f"promises ({rows}, {meta.d_model})")


def verify_shards(meta: CacheMeta, root: Path) -> None:
    """Raise unless the shards cover examples 0..n_examples-1 exactly once and each holds what meta says."""
    spans = sorted((int(s.get("start", -1)), int(s.get("stop", -1))) for s in meta.shards)
    expected = 0
    for start, stop in spans:
        if start != expected or stop <= start:
            raise EmInterpError(f"{root / META_FILE}: the shards do not cover examples 0..{meta.n_examples - 1} "
                                f"exactly once (a shard starts at {start}, expected {expected})")
        expected = stop
    if expected != meta.n_examples:
        raise EmInterpError(f"{root / META_FILE}: the shards cover {expected} examples, but n_examples is {meta.n_examples}")
    for shard in meta.shards:
        check_shard(meta, root, shard)


def write_shard(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors))


def resume_shards(root: Path, meta: CacheMeta) -> list[dict[str, int | str]]:
    """Shards already written by an identical earlier run in ``root`` (cleared if the inputs differ)."""
    meta_path = root / META_FILE
    if not meta_path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        return []
    try:
        old = CacheMeta.from_dict(json.loads(meta_path.read_text()), str(meta_path))
    except (json.JSONDecodeError, EmInterpError) as exc:
        raise EmInterpError(f"out_dir {root} holds a {META_FILE} that is not an em_interp activation cache") from exc
    if not old.same_run(meta):
        # An earlier cache of other inputs: remove only the files this module writes.
        for stale in root.glob("shard-*.safetensors"):
            stale.unlink()
        meta_path.unlink()
        return []
    kept = []
    for shard in old.shards:
        try:
            check_shard(meta, root, shard)
        except EmInterpError:
            continue  # damaged or missing: computed again
        kept.append(shard)
    return kept
