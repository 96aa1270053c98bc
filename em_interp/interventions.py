"""Interventions through hooks: directional ablation and steering, with matched controls.

Hook functions are built by small factories and attached only inside context managers (through
:meth:`HookedModel.hooks`), so they are removed on exit, also after an error. They apply to every
forward pass inside the block: scoring (:mod:`em_interp.evaluation.judge_free`) and generation (with a KV
cache) alike.

Steering positions (``where=``): ``"all"`` adds at every position; under generation,
``"prompt"`` adds only in the first forward pass of each ``generate`` call (the prompt) and
``"generated"`` only in the later one-token passes (the generated tokens).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from em_interp import _bridge
from em_interp._bridge import HookFn
from em_interp.directions import Direction, Vector
from em_interp.errors import EmInterpError
from em_interp.lora.adapters import lora_parameters, parse_module_name
from em_interp.model import HookedModel
from em_interp.options import WEIGHT_TARGETS, WHERE, Hook, WeightTarget, Where, check_option
from em_interp.validate import finite_number, finite_tensor


def _unit(vector: Tensor) -> Tensor:
    v = torch.as_tensor(vector, dtype=torch.float32).flatten()
    norm = v.norm()
    if not torch.isfinite(v).all() or norm == 0:
        raise EmInterpError("direction must be finite and non-zero")
    return v / norm


def ablation_hook(directions: Sequence[Vector], reference: Vector | None = None, strength: float = 1.0) -> HookFn:
    """A hook that projects the span of ``directions`` out of the activation.

    With ``reference`` (an activation vector, e.g. a mean activation of another model or dataset),
    the component along the span is set to the reference's component instead of zero ("mean
    ablation"): ``h - ((h - reference) Q) Q^T``. ``strength`` in (0, 1] removes that fraction of the
    component (``h - s ((h - reference) Q) Q^T``; CAFT's partial ablation).
    """
    q = _orthonormal(directions)
    ref = None if reference is None else torch.as_tensor(reference, dtype=torch.float32).flatten()
    if ref is not None and (ref.numel() != q.shape[0] or not torch.isfinite(ref).all()):
        raise EmInterpError(f"reference must be a finite vector of width {q.shape[0]}, got {ref.numel()} entries")
    kept = None if ref is None else (ref @ q) @ q.T

    def hook(tensor: Tensor, *, hook: Any) -> Tensor:
        basis = q.to(tensor.device, tensor.dtype)
        # multiplying by strength 1.0 is exact: full ablation gives the same bits as without the factor
        out = tensor - strength * (tensor @ basis) @ basis.T
        return out if kept is None else out + strength * kept.to(tensor.device, tensor.dtype)

    return hook


def gated(fn: HookFn, on: Callable[[], bool]) -> HookFn:
    """``fn`` while ``on()`` is true, the activation unchanged otherwise (the defenses: training passes only)."""

    def hook(tensor: Tensor, *, hook: Any) -> Tensor:
        return fn(tensor, hook=hook) if on() else tensor

    return hook


def steering_hook(vector: Vector, alpha: float, where: Where = "all") -> HookFn:
    """A hook that adds ``alpha * vector`` at the positions ``where`` says (see module docstring)."""
    check_option("where", where, WHERE)
    v = torch.as_tensor(vector, dtype=torch.float32).flatten()

    def hook(tensor: Tensor, *, hook: Any) -> Tensor:
        single_token_step = tensor.shape[1] == 1
        if where == "prompt" and single_token_step:
            return tensor
        if where == "generated" and not single_token_step:
            return tensor
        return tensor + alpha * v.to(tensor.device, tensor.dtype)

    return hook


def _as_vector(model: HookedModel, direction: Direction | Tensor, hook: str | None = None) -> Tensor:
    if isinstance(direction, Direction):
        direction.check_fits(model)
        if hook is not None and direction.hook != hook:
            raise EmInterpError(f"direction was made at hook site {direction.hook!r}, not {hook!r}: apply it at "
                                f"hook={direction.hook!r} (or build it from {hook!r} activations)")
        return direction.vector
    v = finite_tensor("direction", direction).flatten()
    if v.numel() != model.d_model:
        raise EmInterpError(f"direction has width {v.numel()}, but {model.name} has d_model {model.d_model}")
    return v


def _as_vectors(model: HookedModel, directions: Direction | Tensor | Sequence[Direction | Tensor],
                hook: str | None = None) -> list[Tensor]:
    """One or several directions as checked plain vectors of the model's width (made at ``hook``)."""
    items = list(directions) if isinstance(directions, (list, tuple)) else [directions]
    if not items:
        raise EmInterpError("directions is empty")
    return [_as_vector(model, cast(Direction | Tensor, d), hook) for d in items]


def _site(directions: Direction | Tensor | Sequence[Direction | Tensor], hook: Hook | None) -> Hook:
    """The hook site to act at: ``hook`` if given, else the directions' own (default ``resid_post``)."""
    if hook is not None:
        return hook
    items = list(directions) if isinstance(directions, (list, tuple)) else [directions]
    sites = {cast(Hook, d.hook) for d in items if isinstance(d, Direction)}
    if len(sites) > 1:
        raise EmInterpError(f"directions were made at different hook sites {sorted(sites)}; pass hook= explicitly")
    return sites.pop() if sites else "resid_post"


#: a unit direction whose component outside the span of the earlier ones is shorter than this adds nothing
SPAN_TOLERANCE = 1e-4


def _orthonormal(vectors: Sequence[Tensor]) -> Tensor:
    """An orthonormal basis (d_model, k) of the span of ``vectors`` (k <= len(vectors)).

    A direction that lies in the span of the earlier ones (a repeat, or a combination) adds no column:
    QR would otherwise complete the basis with an arbitrary direction, and ablating ``[d, d]`` would
    remove ``d`` plus something else.
    """
    q, r = torch.linalg.qr(torch.stack([_unit(v) for v in vectors]).T)
    keep = r.diagonal().abs() > SPAN_TOLERANCE
    dropped = [i for i, k in enumerate(keep.tolist()) if not k]
    if dropped:
        warnings.warn(f"directions {dropped} (0-based) lie in the span of the earlier ones and add nothing: "
                      f"acting on a {int(keep.sum())}-dimensional subspace of {len(vectors)} directions", stacklevel=3)
    return q[:, keep]


@contextlib.contextmanager
def ablate(model: HookedModel, directions: Direction | Vector | Sequence[Direction | Vector],
           layers: Sequence[int] | None = None, hook: Hook | None = None,
           reference: Vector | None = None) -> Iterator[HookedModel]:
    """Project one or more directions out of ``hook`` at ``layers`` (default: every layer).

    ``hook`` defaults to the site the directions were made at (``resid_post`` for plain tensors);
    a :class:`Direction` made at another site than an explicit ``hook`` is an error.
    ``reference``: keep this activation's component along the directions instead of zero (mean
    ablation, e.g. to the control model's mean activation at that layer); see :func:`ablation_hook`.
    """
    hook = _site(directions, hook)
    vectors = _as_vectors(model, directions, hook)
    layer_list = [model.check_layer(layer, "layers") for layer in (layers if layers is not None else range(model.n_layers))]
    if not layer_list:
        raise EmInterpError("layers is empty")
    fn = ablation_hook(vectors, reference)
    key = _key("ablate", vectors + ([torch.as_tensor(reference)] if reference is not None else []),
               layers=layer_list, hook=hook, reference=reference is not None)
    with model.hooks([(model.hook_name(layer, hook), fn) for layer in layer_list], key=key):
        yield model


@contextlib.contextmanager
def steer(model: HookedModel, direction: Direction | Vector, alpha: float, layer: int | None = None,
          where: Where = "all", hook: Hook | None = None) -> Iterator[HookedModel]:
    """Add ``alpha * direction`` at ``layer`` (default: the direction's own layer) and ``hook``.

    ``hook`` defaults to the site the direction was made at (``resid_post`` for a plain tensor); a
    :class:`Direction` made at another site than an explicit ``hook`` is an error. ``alpha`` must
    be finite.
    """
    alpha = finite_number("alpha", alpha)
    if layer is None:
        if not isinstance(direction, Direction):
            raise EmInterpError("layer is required when steering with a plain tensor")
        layer = direction.layer
    hook = _site(direction, hook)
    vector = _as_vector(model, direction, hook)
    layer = model.check_layer(layer)
    key = _key("steer", [vector], layer=layer, hook=hook, alpha=float(alpha), where=where)
    with model.hooks([(model.hook_name(layer, hook), steering_hook(vector, alpha, where))], key=key):
        yield model


def _writer_weights(model: HookedModel, target: WeightTarget) -> dict[int, list[torch.nn.Parameter]]:
    """Per layer, the weights whose output rows live in the residual stream (d_model first)."""
    check_option("target", target, WEIGHT_TARGETS)
    out: dict[int, list[torch.nn.Parameter]] = {}
    if target == "adapters":
        for key, param in lora_parameters(model).items():
            if (parsed := parse_module_name(key)) is not None and parsed.part == "lora_B":
                if param.shape[0] != model.d_model:
                    raise EmInterpError(f"adapter {key} writes width {param.shape[0]}, not the residual stream "
                                        f"(d_model {model.d_model}); only writers such as down_proj/o_proj can be ablated")
                out.setdefault(parsed.layer, []).append(param)
    else:
        for name, param in model.hf_model.named_parameters():
            parsed = parse_module_name(_bridge.hf_name(name))
            if parsed is not None and parsed.module == "down_proj" and parsed.part in (None, "base_layer") \
                    and name.endswith("weight"):
                out.setdefault(parsed.layer, []).append(param)
    if not out:
        raise EmInterpError(f"model {model.name} has no {target} weights to ablate")
    return out


@contextlib.contextmanager
def ablate_weights(model: HookedModel, directions: Direction | Vector | Sequence[Direction | Vector],
                   target: WeightTarget = "adapters", layers: Sequence[int] | None = None) -> Iterator[HookedModel]:
    """Weight-space ablation: remove the directions from what the chosen weights write (restored on exit).

    ``target="adapters"``: project the directions out of every LoRA writer B (for rank-1 down_proj
    adapters, the adapter can then no longer move the residual stream along them);
    ``target="down_proj"``: out of the base MLP output matrices, i.e. of every MLP write. ``layers``
    limits the edit (default: every layer that has such weights). Unlike activation ablation
    (:func:`ablate`), what attention and the embeddings write along the directions stays.
    """
    vectors = _as_vectors(model, directions)
    q = _orthonormal(vectors)
    weights = _writer_weights(model, target)
    chosen = sorted(weights) if layers is None else [model.check_layer(layer, "layers") for layer in layers]
    missing = [layer for layer in chosen if layer not in weights]
    if missing:
        raise EmInterpError(f"no {target} weights at layers {missing} (they exist at {sorted(weights)})")
    params = [p for layer in chosen for p in weights[layer]]
    saved = [p.detach().clone() for p in params]
    key = _key("ablate_weights", vectors, target=target, layers=chosen)
    try:
        with torch.no_grad():
            for p in params:
                basis = q.to(p.device, p.dtype)
                p.sub_(basis @ (basis.T @ p))
        with model.intervention(key):
            yield model
    finally:
        with torch.no_grad():
            for p, original in zip(params, saved):
                p.copy_(original)


def _key(kind: str, vectors: Sequence[Tensor], **settings: Any) -> str:
    """A hash naming an intervention exactly (kind, vectors' values, settings), for result caches."""
    digest = hashlib.sha256(json.dumps([kind, settings], sort_keys=True).encode())
    for v in vectors:
        digest.update(v.detach().cpu().float().contiguous().numpy().tobytes())
    return f"{kind}:{digest.hexdigest()[:24]}"


@contextlib.contextmanager
def ablate_each_layer(model: HookedModel, directions: Mapping[int, Direction | Vector],
                      references: Mapping[int, Vector] | None = None, hook: Hook | None = None) -> Iterator[HookedModel]:
    """Ablate each layer's own direction at that layer only (:func:`ablate` per layer).

    ``references`` (same layers): mean ablation to that layer's reference activation.
    """
    if references is not None and set(references) != set(directions):
        raise EmInterpError(f"references has layers {sorted(references)}, directions has {sorted(directions)}")
    with contextlib.ExitStack() as stack:
        for layer, d in directions.items():
            ref = references[layer] if references is not None else None
            stack.enter_context(ablate(model, d, layers=[layer], hook=hook, reference=ref))
        yield model


@contextlib.contextmanager
def ablate_weights_each_layer(model: HookedModel, directions: Mapping[int, Direction | Vector],
                              target: WeightTarget = "adapters") -> Iterator[HookedModel]:
    """Remove each layer's own direction from that layer's writers only (:func:`ablate_weights` per layer)."""
    with contextlib.ExitStack() as stack:
        for layer, d in directions.items():
            stack.enter_context(ablate_weights(model, d, target=target, layers=[layer]))
        yield model
