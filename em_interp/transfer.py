"""Cross-model transfer (the actionable-directions paper): a ridge map between two models' residual spaces.

Both models read the same prompts; one activation per prompt and model (e.g. at the last prompt
token, so different tokenizers do not matter) gives paired rows ``X`` (donor, ``n x d_src``) and
``Y`` (receiver, ``n x d_dst``). :func:`fit_ridge_map` fits ``Y - mean(Y) = (X - mean(X)) W`` by
ridge regression, choosing the penalty on a held-out split. A direction ``v`` of the donor is a
*difference* of activations, so it maps without the means: ``v W`` (:meth:`RidgeMap.map_direction`).

The actionable-directions paper found that transferred directions worked, but random and orthogonal directions passed
through the same map worked as well: :func:`transfer_controls` builds those controls (plus a
shuffled-label direction) so every transfer result can be read against them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from em_interp.activations import cache_residuals
from em_interp.artifacts import artifact_paths, load_artifact, save_artifact, sidecar_field
from em_interp.chat import ChatExample
from em_interp.directions import (
    Direction,
    _check_acts,
    orthogonal_directions,
    random_directions,
    shuffled_label_directions,
)
from em_interp.errors import EmInterpError
from em_interp.model import HookedModel
from em_interp.options import Reduction

#: Penalties tried, as multiples of the mean squared singular value of the centred donor data.
RIDGE_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class RidgeMap:
    """A linear map from a donor's residual space (one layer) to a receiver's (one layer)."""

    weight: Float[Tensor, "d_src d_dst"]
    src_mean: Float[Tensor, " d_src"]
    dst_mean: Float[Tensor, " d_dst"]
    alpha: float
    r2: float
    n_examples: int
    src_model: str = ""
    dst_model: str = ""
    src_layer: int = -1
    dst_layer: int = -1

    def __call__(self, acts: Float[Tensor, "n d_src"]) -> Float[Tensor, "n d_dst"]:
        """Predicted receiver activations for donor activations."""
        acts = _check_acts("acts", acts)
        self._check_width(acts.shape[1])
        return (acts - self.src_mean) @ self.weight + self.dst_mean

    def _check_width(self, width: int) -> None:
        if width != self.weight.shape[0]:
            raise EmInterpError(f"the map reads width {self.weight.shape[0]} ({self.src_model or 'donor'}), got width {width}")

    def map_vector(self, vector: Tensor) -> Tensor:
        """Carry a difference vector (a direction) over: ``vector @ W``."""
        v = torch.as_tensor(vector, dtype=torch.float32).flatten()
        self._check_width(v.numel())
        if not torch.isfinite(v).all():
            raise EmInterpError("vector has NaN or infinite entries")
        return v @ self.weight

    def map_direction(self, direction: Direction) -> Direction:
        """The receiver's version of a donor :class:`Direction` (checked against the donor's model and layer)."""
        if self.src_model and direction.model and direction.model != self.src_model:
            raise EmInterpError(f"direction was made on {direction.model!r}; this map reads {self.src_model!r}")
        if self.src_layer >= 0 and direction.layer != self.src_layer:
            raise EmInterpError(f"direction is at layer {direction.layer}; this map reads layer {self.src_layer}")
        mapped = self.map_vector(direction.vector)
        return Direction(mapped, self.dst_layer if self.dst_layer >= 0 else direction.layer, direction.hook,
                         self.dst_model, f"ridge({direction.method})",
                         {**direction.info, "donor_model": direction.model, "donor_layer": direction.layer})

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json`` (atomically; suffixes appended, see
        :mod:`em_interp.artifacts`); return ``path`` without suffix."""
        return save_artifact(path, "ridge_map",
                             {"weight": self.weight, "src_mean": self.src_mean, "dst_mean": self.dst_mean},
                             {"alpha": self.alpha, "r2": self.r2, "n_examples": self.n_examples,
                              "src_model": self.src_model, "dst_model": self.dst_model, "src_layer": self.src_layer,
                              "dst_layer": self.dst_layer})

    @classmethod
    def load(cls, path: str | Path) -> RidgeMap:
        """Read a map written by :meth:`save`."""
        names = ("alpha", "r2", "n_examples", "src_model", "dst_model", "src_layer", "dst_layer")
        t, meta = load_artifact(path, "ridge_map", required=names, tensors=("weight", "src_mean", "dst_mean"))
        source = artifact_paths(path)[1]
        if t["weight"].ndim != 2 or t["weight"].shape != (t["src_mean"].numel(), t["dst_mean"].numel()):
            raise EmInterpError(f"{artifact_paths(path)[0]}: weight {tuple(t['weight'].shape)} does not match the means "
                                f"({t['src_mean'].numel()}, {t['dst_mean'].numel()})")
        return cls(t["weight"], t["src_mean"], t["dst_mean"], sidecar_field(meta, "alpha", float, source),
                   sidecar_field(meta, "r2", float, source), sidecar_field(meta, "n_examples", int, source),
                   sidecar_field(meta, "src_model", str, source), sidecar_field(meta, "dst_model", str, source),
                   sidecar_field(meta, "src_layer", int, source), sidecar_field(meta, "dst_layer", int, source))


def _ridge_solve(x: Tensor, y: Tensor, penalties: Sequence[float]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Centred ridge solutions for each penalty (float64, via the SVD of x)."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    u, s, vt = torch.linalg.svd(x - x_mean, full_matrices=False)
    uty = u.T @ (y - y_mean)
    scale = float((s**2).mean())
    return x_mean, y_mean, [vt.T @ ((s / (s**2 + p * scale))[:, None] * uty) for p in penalties]


def _r2(pred: Tensor, target: Tensor) -> float:
    """Fraction of the target's variance (around its own mean) explained, pooled over dimensions."""
    resid = ((target - pred) ** 2).sum()
    total = ((target - target.mean(0)) ** 2).sum()
    return float(1 - resid / total)


def fit_ridge_map(src: Float[Tensor, "n d_src"], dst: Float[Tensor, "n d_dst"], penalties: Sequence[float] = RIDGE_GRID,
                  holdout: float = 0.25, seed: int = 0, src_model: str = "", dst_model: str = "",
                  src_layer: int = -1, dst_layer: int = -1) -> RidgeMap:
    """Fit a ridge map from paired rows (the same prompts through both models).

    The penalty is chosen by R^2 on a seeded held-out fraction ``holdout`` of the rows; the map is
    then refitted on every row and ``r2`` reports the held-out R^2 of the chosen penalty.
    """
    src, dst = _check_acts("src", src).double(), _check_acts("dst", dst).double()
    if src.shape[0] != dst.shape[0]:
        raise EmInterpError(f"src has {src.shape[0]} examples but dst has {dst.shape[0]}: fit the map on the same "
                            "prompts in the same order")
    n = src.shape[0]
    n_test = int(round(n * holdout))
    if n_test < 2 or n - n_test < 2:
        raise EmInterpError(f"{n} examples are too few to fit and check a ridge map (holdout={holdout})")
    if not penalties or any(p <= 0 for p in penalties):
        raise EmInterpError(f"penalties must be positive, got {list(penalties)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_test], perm[n_test:]
    x_mean, y_mean, weights = _ridge_solve(src[train], dst[train], penalties)
    scores = [_r2((src[test] - x_mean) @ w + y_mean, dst[test]) for w in weights]
    best = max(range(len(penalties)), key=lambda i: scores[i])
    x_mean, y_mean, (weight,) = _ridge_solve(src, dst, [penalties[best]])
    return RidgeMap(weight.float(), x_mean.float(), y_mean.float(), float(penalties[best]), float(scores[best]), n,
                    src_model, dst_model, src_layer, dst_layer)


def paired_activations(src_model: HookedModel, dst_model: HookedModel, examples: Sequence[ChatExample], src_layer: int,
                       dst_layer: int, reduction: Reduction = "last_prompt", batch_size: int = 8,
                       progress: bool = False) -> tuple[Tensor, Tensor]:
    """One activation per example from each model (same examples, same order) at the given layers."""
    src = cache_residuals(src_model, examples, layers=[src_layer], reduction=reduction, batch_size=batch_size,
                          progress=progress)[src_layer]
    dst = cache_residuals(dst_model, examples, layers=[dst_layer], reduction=reduction, batch_size=batch_size,
                          progress=progress)[dst_layer]
    return src, dst


def transfer_controls(ridge: RidgeMap, direction: Direction, positive: Tensor | None = None,
                      negative: Tensor | None = None, n: int = 3, seed: int = 0) -> dict[str, list[Direction]]:
    """The transferred direction and its controls, all carried through the same map.

    ``random``: norm-matched random donor directions; ``orthogonal``: random donor directions
    orthogonal to ``direction`` with its norm; ``shuffled_label`` (when the donor's ``positive`` and
    ``negative`` activations are given): difference of means under permuted labels. Every mapped
    control is rescaled to the norm of the mapped direction, so strengths compare in the receiver.
    """
    mapped = ridge.map_direction(direction)
    target = float(mapped.vector.norm())
    donor = {
        "random": random_directions(direction.vector.numel(), n, norm=float(direction.vector.norm()), seed=seed),
        "orthogonal": orthogonal_directions(direction.vector, n, seed=seed + 1),
    }
    if positive is not None and negative is not None:
        donor["shuffled_label"] = shuffled_label_directions(positive, negative, n, seed=seed + 2)
    out: dict[str, list[Direction]] = {"transferred": [mapped]}
    for kind, vectors in donor.items():
        out[kind] = []
        for i, v in enumerate(vectors):
            m = ridge.map_vector(v)
            out[kind].append(Direction(m / m.norm() * target, mapped.layer, mapped.hook, mapped.model,
                                       f"ridge({kind} control {i})", {"donor_norm": float(v.norm())}))
    return out
