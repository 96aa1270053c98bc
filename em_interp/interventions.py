"""Interventions through hooks: directional ablation and steering, with matched controls.

Hook functions are built by small factories and attached only inside context managers (through
:meth:`HookedModel.hooks`), so they are removed on exit, also after an error. They apply to every
forward pass inside the block: scoring (:mod:`em_interp.evaluation`) and generation (with a KV
cache) alike.

Steering positions (``where=``): ``"all"`` adds at every position; under generation,
``"prompt"`` adds only in the first forward pass of each ``generate`` call (the prompt) and
``"generated"`` only in the later one-token passes (the generated tokens).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from em_interp.directions import Direction
from em_interp.errors import EmInterpError
from em_interp.model import HookedModel

WHERE = ("all", "prompt", "generated")


def _unit(vector: Tensor) -> Tensor:
    v = torch.as_tensor(vector, dtype=torch.float32).flatten()
    norm = v.norm()
    if not torch.isfinite(v).all() or norm == 0:
        raise EmInterpError("direction must be finite and non-zero")
    return v / norm


def ablation_hook(directions: Sequence[Tensor]):
    """A hook that projects the span of ``directions`` out of the activation."""
    q, _ = torch.linalg.qr(torch.stack([_unit(d) for d in directions]).T)  # (d_model, k), orthonormal

    def hook(tensor: Tensor, *, hook: Any) -> Tensor:
        basis = q.to(tensor.device, tensor.dtype)
        return tensor - (tensor @ basis) @ basis.T

    return hook


def steering_hook(vector: Tensor, alpha: float, where: str = "all"):
    """A hook that adds ``alpha * vector`` at the positions ``where`` says (see module docstring)."""
    if where not in WHERE:
        raise EmInterpError(f"where={where!r} must be one of {WHERE}")
    v = torch.as_tensor(vector, dtype=torch.float32).flatten()

    def hook(tensor: Tensor, *, hook: Any) -> Tensor:
        single_token_step = tensor.shape[1] == 1
        if where == "prompt" and single_token_step:
            return tensor
        if where == "generated" and not single_token_step:
            return tensor
        return tensor + alpha * v.to(tensor.device, tensor.dtype)

    return hook


def _as_vector(model: HookedModel, direction: Direction | Tensor) -> Tensor:
    if isinstance(direction, Direction):
        direction.check_fits(model)
        return direction.vector
    v = torch.as_tensor(direction, dtype=torch.float32).flatten()
    if v.numel() != model.d_model:
        raise EmInterpError(f"direction has width {v.numel()}, but {model.name} has d_model {model.d_model}")
    return v


@contextlib.contextmanager
def ablate(model: HookedModel, directions: Direction | Tensor | Sequence[Direction | Tensor],
           layers: Sequence[int] | None = None, hook: str = "resid_post") -> Iterator[HookedModel]:
    """Project one or more directions out of ``hook`` at ``layers`` (default: every layer)."""
    items = list(directions) if isinstance(directions, (list, tuple)) else [directions]
    if not items:
        raise EmInterpError("directions is empty")
    vectors = [_as_vector(model, d) for d in items]
    layer_list = [model.check_layer(layer, "layers") for layer in (layers if layers is not None else range(model.n_layers))]
    if not layer_list:
        raise EmInterpError("layers is empty")
    fn = ablation_hook(vectors)
    key = _key("ablate", vectors, layers=layer_list, hook=hook)
    with model.hooks([(model.hook_name(layer, hook), fn) for layer in layer_list], key=key):
        yield model


@contextlib.contextmanager
def steer(model: HookedModel, direction: Direction | Tensor, alpha: float, layer: int | None = None,
          where: str = "all", hook: str = "resid_post") -> Iterator[HookedModel]:
    """Add ``alpha * direction`` at ``layer`` (default: the direction's own layer)."""
    if layer is None:
        if not isinstance(direction, Direction):
            raise EmInterpError("layer is required when steering with a plain tensor")
        layer = direction.layer
    vector = _as_vector(model, direction)
    layer = model.check_layer(layer)
    key = _key("steer", [vector], layer=layer, hook=hook, alpha=float(alpha), where=where)
    with model.hooks([(model.hook_name(layer, hook), steering_hook(vector, alpha, where))], key=key):
        yield model


def _key(kind: str, vectors: Sequence[Tensor], **settings: Any) -> str:
    """A hash naming an intervention exactly (kind, vectors' values, settings), for result caches."""
    digest = hashlib.sha256(json.dumps([kind, settings], sort_keys=True).encode())
    for v in vectors:
        digest.update(v.detach().cpu().float().contiguous().numpy().tobytes())
    return f"{kind}:{digest.hexdigest()[:24]}"


def random_directions(d_model: int, n: int, norm: float = 1.0, seed: int = 0) -> list[Tensor]:
    """``n`` Gaussian random directions of the given norm (norm-matched controls), seeded."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(n, d_model, generator=gen)
    return list(out / out.norm(dim=1, keepdim=True) * norm)


def orthogonal_directions(direction: Tensor, n: int = 1, seed: int = 0) -> list[Tensor]:
    """``n`` random directions orthogonal to ``direction``, with the same norm, seeded."""
    v = torch.as_tensor(direction, dtype=torch.float32).flatten()
    u = _unit(v)
    out = []
    for r in random_directions(v.numel(), n, seed=seed):
        r = r - (r @ u) * u
        out.append(r / r.norm() * v.norm())
    return out
