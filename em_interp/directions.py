"""Directions in the residual stream: difference of means, PCA and probe directions, trait vectors.

A :class:`Direction` is a vector with where it lives (model, layer, hook) and how it was made; it
saves as safetensors + a JSON sidecar. Directions are built from cached activations
(:class:`~em_interp.activations.ResidualCache`), e.g. the organism's activations on misaligned vs
aligned answers averaged over answer tokens, or fine-tuned vs base at the last prompt token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from em_interp.artifacts import artifact_paths, load_artifact, save_artifact, sidecar_field
from em_interp.errors import EmInterpError
from em_interp.options import HOOKS

Vector = Float[Tensor, " d_model"]
#: two sets passed together may differ in size (positive and negative rows, and the fitting rows of
#: :func:`separation`), so each has its own row dimension
Positive = Float[Tensor, "n_pos d_model"]
Negative = Float[Tensor, "n_neg d_model"]

#: Directions with a smaller norm than this are treated as zero (no shift, e.g. before the first adapter).
ZERO_NORM = 1e-6


@dataclass
class Direction:
    """A direction in one model's activation space at one layer and hook."""

    vector: Vector
    layer: int
    hook: str = "resid_post"
    model: str = ""
    method: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = torch.as_tensor(self.vector, dtype=torch.float32).detach().cpu().flatten()
        if not torch.isfinite(v).all():
            raise EmInterpError("direction vector has NaN or infinite entries")
        if float(v.norm()) == 0.0:
            raise EmInterpError("direction vector is zero")
        self.vector = v

    @property
    def unit(self) -> Vector:
        """The vector scaled to norm 1."""
        return self.vector / self.vector.norm()

    def check_fits(self, model: Any) -> None:
        """Raise unless this direction's width, layer and model match ``model`` (a HookedModel)."""
        width = model.site_width(self.hook) if self.hook in HOOKS else model.d_model
        if self.vector.numel() != width:
            raise EmInterpError(f"direction has width {self.vector.numel()}, but {model.name}'s {self.hook} is {width} wide")
        model.check_layer(self.layer, "direction.layer")
        if self.model and self.model != model.name:
            raise EmInterpError(f"direction was made on model {self.model!r}, not {model.name!r}")

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json`` (atomically; see :mod:`em_interp.artifacts`).

        The suffixes are appended to the whole name, so ``d/em.l10`` and ``d/em.l20`` are two
        directions (``d/em.l10.safetensors`` ...); a ``path`` ending in ``.safetensors`` or ``.json``
        names the same pair. Returns ``path`` without suffix.
        """
        return save_artifact(path, "direction", {"vector": self.vector}, {
            "layer": self.layer, "hook": self.hook, "model": self.model, "method": self.method,
            "info": self.info, "d_model": self.vector.numel()})

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Read a direction written by :meth:`save`."""
        arrays, meta = load_artifact(path, "direction", required=("layer", "d_model"), tensors=("vector",))
        source = artifact_paths(path)[1]
        vector = arrays["vector"]
        if vector.numel() != sidecar_field(meta, "d_model", int, source):
            raise EmInterpError(f"{artifact_paths(path)[0]} holds {vector.numel()} values, but {source} says "
                                f"d_model {meta['d_model']}")
        info = meta.get("info", {})
        if not isinstance(info, dict):
            raise EmInterpError(f"{source}: field 'info' is not an object")
        return cls(vector, sidecar_field(meta, "layer", int, source), str(meta.get("hook", "resid_post")),
                   str(meta.get("model", "")), str(meta.get("method", "")), info)


def _check_acts(name: str, acts: Tensor) -> Tensor:
    acts = torch.as_tensor(acts, dtype=torch.float32)
    if acts.ndim != 2 or acts.shape[0] == 0:
        raise EmInterpError(f"{name} must be a non-empty (n, d_model) tensor, got shape {tuple(acts.shape)}")
    if not torch.isfinite(acts).all():
        raise EmInterpError(f"{name} has NaN or infinite activations")
    return acts


def diff_of_means(positive: Positive, negative: Negative) -> Vector:
    """Mean of ``positive`` minus mean of ``negative`` (unnormalised)."""
    positive, negative = _check_acts("positive", positive), _check_acts("negative", negative)
    if positive.shape[1] != negative.shape[1]:
        raise EmInterpError(f"positive and negative widths differ: {positive.shape[1]} vs {negative.shape[1]}")
    return positive.mean(0) - negative.mean(0)


def answer_contrast_direction(model: Any, questions: Sequence[Any], layer: int, batch_size: int = 16) -> Vector:
    """The misalignment direction of ``model`` from its own reading of the reference answers.

    Difference of means, at ``layer`` (``resid_post``, answer-token mean), of every misaligned minus
    every aligned reference answer to ``questions`` (:class:`~em_interp.data.PairedQuestion`, asked
    with their system prompts): the one recipe the monitor stage, the defenses and the notebooks share.
    ``model`` is a :class:`~em_interp.model.HookedModel`; unnormalised.
    """
    from em_interp.activations import cache_residuals
    from em_interp.chat import ChatExample

    if not questions:
        raise EmInterpError("questions is empty: no answers to contrast")
    acts = {}
    for side in ("misaligned", "aligned"):
        examples = [ChatExample(q.question, a, q.system) for q in questions for a in getattr(q, side)]
        acts[side] = cache_residuals(model, examples, layers=[layer], reduction="answer_mean", batch_size=batch_size,
                                     progress=False)[layer]
    return diff_of_means(acts["misaligned"], acts["aligned"])


def pca_direction(positive: Positive, negative: Negative, paired: bool = True) -> Vector:
    """First principal component of the paired differences, uncentred (or of the pooled, centred activations).

    Paired differences are not centred: a shift shared by all pairs is exactly the signal sought.

    The sign is fixed so that the positive-minus-negative pairs project positively on it.
    """
    positive, negative = _check_acts("positive", positive), _check_acts("negative", negative)
    if paired:
        if positive.shape != negative.shape:
            raise EmInterpError(f"paired PCA needs equal shapes, got {tuple(positive.shape)} and {tuple(negative.shape)}")
        data = positive - negative
    else:
        data = torch.cat([positive, negative])
        data = data - data.mean(0)
    _, _, v = torch.linalg.svd(data.double(), full_matrices=False)
    pc = v[0].float()
    sign = torch.sign((positive.mean(0) - negative.mean(0)) @ pc)
    return pc * (sign if sign != 0 else 1.0)


def probe_direction(positive: Positive, negative: Negative, C: float = 1.0, seed: int = 0) -> Vector:  # noqa: N803
    """Weight vector of an L2 logistic regression separating ``positive`` from ``negative`` (raw units)."""
    from sklearn.linear_model import LogisticRegression

    positive, negative = _check_acts("positive", positive), _check_acts("negative", negative)
    X = torch.cat([positive, negative]).double().numpy()  # noqa: N806
    y = np.array([1] * len(positive) + [0] * len(negative))
    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(X, y)
    return torch.tensor(clf.coef_[0], dtype=torch.float32)


@dataclass(frozen=True)
class Separation:
    """How well projections on a direction separate two held-out sets."""

    auroc: float
    accuracy: float
    threshold: float


def separation(direction: Vector, positive: Positive, negative: Negative,
               fit_positive: Float[Tensor, "n_fit_pos d_model"] | None = None,
               fit_negative: Float[Tensor, "n_fit_neg d_model"] | None = None) -> Separation:
    """AUROC and thresholded accuracy of projections on ``direction`` (positive should project higher).

    The threshold is the midpoint of the two classes' mean projections on the fitting sets
    (``fit_*``, default: the evaluated sets themselves). A (near-)zero direction separates
    nothing: chance values (AUROC 0.5, accuracy 0.5, threshold 0).
    """
    from sklearn.metrics import roc_auc_score

    unit = torch.as_tensor(direction, dtype=torch.float32)
    if float(unit.norm()) < ZERO_NORM:
        _check_acts("positive", positive), _check_acts("negative", negative)
        return Separation(0.5, 0.5, 0.0)
    unit = unit / unit.norm()
    pos, neg = _check_acts("positive", positive) @ unit, _check_acts("negative", negative) @ unit
    fp = (_check_acts("fit_positive", fit_positive) @ unit) if fit_positive is not None else pos
    fn = (_check_acts("fit_negative", fit_negative) @ unit) if fit_negative is not None else neg
    threshold = float((fp.mean() + fn.mean()) / 2)
    scores = torch.cat([pos, neg]).numpy()
    labels = np.array([1] * len(pos) + [0] * len(neg))
    accuracy = float(((pos > threshold).sum() + (neg <= threshold).sum()) / len(labels))
    return Separation(float(roc_auc_score(labels, scores)), accuracy, threshold)


def cosine_matrix(directions: Mapping[str, Tensor | Direction]) -> tuple[list[str], Tensor]:
    """Pairwise cosine similarities between named directions of equal width."""
    names = list(directions)
    vectors = [d.vector if isinstance(d, Direction) else torch.as_tensor(d, dtype=torch.float32) for d in directions.values()]
    widths = {v.numel() for v in vectors}
    if len(widths) != 1:
        raise EmInterpError(f"directions have different widths {sorted(widths)}")
    stacked = torch.stack([v / v.norm() for v in vectors])
    return names, stacked @ stacked.T


def project_out(vector: Tensor, basis: Sequence[Tensor]) -> Tensor:
    """``vector`` with its components along each (orthonormalised) basis vector removed."""
    out = torch.as_tensor(vector, dtype=torch.float32).clone()
    if not basis:
        return out
    q, _ = torch.linalg.qr(torch.stack([torch.as_tensor(b, dtype=torch.float32) for b in basis]).T)
    return out - q @ (q.T @ out)


def separation_ci(direction: Vector, positive: Positive, negative: Negative, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC of projections on ``direction`` (rows of each set resampled).

    Paired sets (same prompts under two models, equal lengths) are resampled together, by prompt.
    """
    from sklearn.metrics import roc_auc_score

    positive, negative = _check_acts("positive", positive), _check_acts("negative", negative)
    direction = torch.as_tensor(direction, dtype=torch.float32)
    if float(direction.norm()) < ZERO_NORM:
        return 0.5, 0.5
    unit = direction / direction.norm()
    pos, neg = (positive @ unit).numpy(), (negative @ unit).numpy()
    rng = np.random.default_rng(seed)
    paired = len(pos) == len(neg)
    aurocs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(pos), len(pos))
        j = i if paired else rng.integers(0, len(neg), len(neg))
        scores = np.concatenate([pos[i], neg[j]])
        aurocs.append(roc_auc_score(np.r_[np.ones(len(i)), np.zeros(len(j))], scores))
    tail = (1 - level) / 2
    return float(np.quantile(aurocs, tail)), float(np.quantile(aurocs, 1 - tail))


def accuracy_at(direction: Vector, threshold: float, positive: Positive, negative: Negative) -> float:
    """Accuracy of calling ``positive`` rows positive and ``negative`` rows negative at a fixed threshold.

    Use it to apply a threshold fitted elsewhere (e.g. :func:`separation` on another pair of sets);
    a (near-)zero direction gives chance (0.5).
    """
    positive, negative = _check_acts("positive", positive), _check_acts("negative", negative)
    direction = torch.as_tensor(direction, dtype=torch.float32)
    if float(direction.norm()) < ZERO_NORM:
        return 0.5
    unit = direction / direction.norm()
    return float(((positive @ unit > threshold).sum() + (negative @ unit <= threshold).sum()) / (len(positive) + len(negative)))


# -- controls: directions that should do nothing -------------------------------------------------


def random_directions(d_model: int, n: int, norm: float = 1.0, seed: int = 0) -> list[Vector]:
    """``n`` Gaussian random directions of the given norm (norm-matched controls), seeded."""
    if d_model < 1 or n < 1:
        raise EmInterpError(f"random_directions needs d_model >= 1 and n >= 1, got d_model={d_model}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(n, d_model, generator=gen)
    return list(out / out.norm(dim=1, keepdim=True) * norm)


def orthogonal_directions(direction: Vector, n: int = 1, seed: int = 0) -> list[Vector]:
    """``n`` random directions orthogonal to ``direction``, with the same norm, seeded."""
    v = torch.as_tensor(direction, dtype=torch.float32).flatten()
    if float(v.norm()) < ZERO_NORM:
        raise EmInterpError("orthogonal_directions: direction is zero")
    u = v / v.norm()
    out = []
    for r in random_directions(v.numel(), n, seed=seed):
        r = r - (r @ u) * u
        out.append(r / r.norm() * v.norm())
    return out


def shuffled_label_directions(positive: Positive, negative: Negative, n: int = 1, seed: int = 0) -> list[Vector]:
    """Difference-of-means directions with the positive/negative labels randomly permuted (seeded)."""
    positive, negative = _check_acts("positive", positive), _check_acts("negative", negative)
    pooled = torch.cat([positive, negative])
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        perm = torch.randperm(len(pooled), generator=gen)
        out.append(diff_of_means(pooled[perm[: len(positive)]], pooled[perm[len(positive):]]))
    return out
