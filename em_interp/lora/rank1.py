"""Read and interpret rank-1 LoRA adapters through their scalar hidden states (Soligo et al., 2025).

For a rank-1 adapter on ``down_proj`` at layer l, A (1 x d_mlp) reads the MLP hidden activation x
(the input of ``down_proj``) and B (d_model x 1) writes to the residual stream. The adapter's scalar
hidden state at a token is ``s = (A . x) * scale``, and the adapter adds ``s * B``. A rank-r adapter is
read as r coordinates. Scalars are read through hooks on any dataset, without retraining, and
aggregated per answer (mean over answer tokens by default).

Interpretation: L1 logistic regressions on the z-scored scalars, repeated over stratified 80/20
splits, (i) misaligned vs aligned answers to general questions, and (ii) domain vs other among
misaligned answers; then :func:`classify_adapters` labels each adapter (rule in its docstring).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from em_interp.activations import cache_residuals
from em_interp.chat import ChatExample
from em_interp.errors import EmInterpError
from em_interp.lora.adapters import ModuleName, lora_parameters, parse_module_name
from em_interp.model import HookedModel
from em_interp.options import Reduction
from em_interp.validate import finite_number

Scalars = Float[Tensor, "examples coordinates"]


@dataclass(frozen=True)
class AdapterInfo:
    """One LoRA adapter: where it sits, its rank, its scale and its reader/writer weights."""

    layer: int
    module: str
    rank: int
    scale: float
    A: Tensor  # (rank, d_in): the reader
    B: Tensor  # (d_out, rank): the writer

    @property
    def label(self) -> str:
        """Short name, e.g. ``L9.down_proj``."""
        return f"L{self.layer}.{self.module}"


def list_adapters(model: HookedModel, require_rank: int | None = None) -> list[AdapterInfo]:
    """The model's LoRA adapters, ordered by layer; ``require_rank=1`` rejects other ranks."""
    params = lora_parameters(model)
    found: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, param in params.items():
        parsed = parse_module_name(key)
        if parsed is None or parsed.part not in ("lora_A", "lora_B"):
            continue
        found.setdefault((parsed.layer, parsed.module), {})[parsed.part[-1]] = param.detach()
    scaling = _scalings(model)
    adapters = []
    for (layer, module), weights in sorted(found.items()):
        a, b = weights["A"], weights["B"]
        if require_rank is not None and a.shape[0] != require_rank:
            raise EmInterpError(f"the adapter at layer {layer} ({module}) has rank {a.shape[0]}; rank {require_rank} is required")
        adapters.append(AdapterInfo(layer, module, int(a.shape[0]), scaling[(layer, module)], a, b))
    if not adapters:
        raise EmInterpError(f"model {model.name} has no LoRA adapters to read")
    return adapters


def _scalings(model: HookedModel) -> dict[tuple[int, str], float]:
    from em_interp import _bridge

    out = {}
    for name, module in model.peft_model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling:
            parsed = parse_module_name(_bridge.hf_name(name))
            if parsed is not None and parsed.part is None:
                out[(parsed.layer, parsed.module)] = float(scaling["default"])
    return out


@dataclass(frozen=True)
class AdapterScalars:
    """Scalar hidden states per example: ``values[:, j]`` is coordinate ``columns[j]``."""

    values: Scalars
    columns: tuple[str, ...]
    adapters: tuple[AdapterInfo, ...]


def adapter_scalars(model: HookedModel, examples: Sequence[ChatExample], reduction: Reduction = "answer_mean",
                    batch_size: int = 8, progress: bool = False) -> AdapterScalars:
    """Read every adapter's scalar hidden state ``(A . x) * scale`` on ``examples``, reduced per example.

    Only ``down_proj`` adapters are supported (their input x is the ``mlp_post`` hook). The
    reduction is linear, so reducing x first and then projecting is exact.
    """
    adapters = list_adapters(model)
    unsupported = sorted({a.module for a in adapters if a.module != "down_proj"})
    if unsupported:
        raise EmInterpError(f"reading scalars is implemented for down_proj adapters; this model also has {unsupported}")
    layers = sorted({a.layer for a in adapters})
    cache = cache_residuals(model, examples, layers=layers, hook="mlp_post", reduction=reduction,
                            batch_size=batch_size, progress=progress)
    columns: list[str] = []
    blocks: list[Tensor] = []
    for a in adapters:
        blocks.append(cache[a.layer] @ a.A.T.float() * a.scale)
        columns.extend(a.label if a.rank == 1 else f"{a.label}[{k}]" for k in range(a.rank))
    return AdapterScalars(torch.cat(blocks, dim=1), tuple(columns), tuple(adapters))


# -- logistic probes --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """Repeated-split L1 logistic regression on z-scored scalars."""

    coef_mean: list[float]
    coef_std: list[float]
    nonzero_frac: list[float]
    accuracy_mean: float
    accuracy_std: float
    n_splits: int
    n_examples: int

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def fit_probe(features: np.ndarray | Tensor, labels: Sequence[int] | np.ndarray, C: float = 0.01,  # noqa: N803
              n_splits: int = 20, test_size: float = 0.2, seed: int = 0,
              groups: Sequence[int] | np.ndarray | None = None) -> ProbeResult:
    """Fit L1 logistic regression (z-scored features, balanced classes) on repeated 80/20 splits.

    ``C=0.01`` is Soligo et al.'s setting. With ``groups`` (e.g. the question each answer belongs to),
    features are first centred within each group, so that what differs between questions (topic)
    cannot masquerade as what differs between labels, and splits keep each group whole.
    Returns the coefficients' mean and spread over splits, the fraction of splits where each is
    non-zero, and the held-out accuracy.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupShuffleSplit, StratifiedShuffleSplit
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)  # noqa: N806
    y = np.asarray(labels)
    if X.ndim != 2 or len(X) != len(y):
        raise EmInterpError(f"features {X.shape} and labels ({len(y)}) do not match")
    if len(set(y.tolist())) != 2:
        raise EmInterpError("labels must contain exactly two classes")
    if groups is not None:
        g = np.asarray(groups)
        if len(g) != len(y):
            raise EmInterpError(f"groups ({len(g)}) and labels ({len(y)}) differ in length")
        X = X.copy()  # noqa: N806
        for value in np.unique(g):
            X[g == value] -= X[g == value].mean(axis=0)
        splits = GroupShuffleSplit(n_splits=n_splits, test_size=test_size, random_state=seed).split(X, y, g)
    else:
        splits = StratifiedShuffleSplit(n_splits=n_splits, test_size=test_size, random_state=seed).split(X, y)
    coefs, accs = [], []
    for train, test in splits:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, solver="liblinear", class_weight="balanced",
                                                                 random_state=seed, **_l1_penalty()))
        clf.fit(X[train], y[train])
        coefs.append(clf[-1].coef_[0])
        accs.append(float((clf.predict(X[test]) == y[test]).mean()))
    c = np.array(coefs)
    return ProbeResult(c.mean(0).tolist(), c.std(0).tolist(), (c != 0).mean(0).tolist(), float(np.mean(accs)),
                       float(np.std(accs)), n_splits, int(len(y)))


def _l1_penalty() -> dict[str, object]:
    """scikit-learn >= 1.8 spells an L1 penalty ``l1_ratio=1`` (``penalty=`` is deprecated there)."""
    import sklearn

    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    return {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}


def classify_adapters(general: ProbeResult, domain: ProbeResult, min_nonzero: float = 0.8,
                      min_relative: float = 0.1) -> list[str]:
    """Label each adapter ``"general"``, ``"domain-specific"`` or ``"inactive"``.

    Rule: a coefficient is *reliable* when it is non-zero in at least ``min_nonzero`` of the splits,
    its mean is at least twice its spread, and its size is at least ``min_relative`` of the largest
    mean coefficient of that probe. An adapter whose domain coefficient (domain vs other, among
    misaligned answers) is reliable and larger in size than its general coefficient (misaligned vs
    aligned) is domain-specific; otherwise one with a reliable general coefficient is general; the
    rest are inactive.
    """
    def reliable(p: ProbeResult) -> list[bool]:
        top = max(abs(m) for m in p.coef_mean) or 1.0
        return [nz >= min_nonzero and abs(m) >= 2 * s and abs(m) >= min_relative * top
                for m, s, nz in zip(p.coef_mean, p.coef_std, p.nonzero_frac)]

    g_ok, d_ok = reliable(general), reliable(domain)
    labels = []
    for i in range(len(general.coef_mean)):
        if d_ok[i] and abs(domain.coef_mean[i]) > abs(general.coef_mean[i]):
            labels.append("domain-specific")
        elif g_ok[i]:
            labels.append("general")
        else:
            labels.append("inactive")
    return labels


# -- steering and ablation --------------------------------------------------------------------


@contextlib.contextmanager
def scale_adapters(model: HookedModel, factors: Mapping[int, float]) -> Iterator[HookedModel]:
    """Multiply the scalar hidden state of the adapters at the given layers (0 ablates, 2 doubles).

    Scaling an adapter's scalar is the same as scaling its writer B; the original weights are put
    back on exit, also after an error.
    """
    factors = {model.check_layer(layer, "factors"): finite_number(f"factors[{layer}]", f) for layer, f in factors.items()}
    adapters = {a.layer for a in list_adapters(model)}
    missing = sorted(set(factors) - adapters)
    if missing:
        raise EmInterpError(f"no adapter at layers {missing} (adapters at {sorted(adapters)})")
    params = lora_parameters(model)
    writers = {k: parse_module_name(k) for k in params}
    targets = {k: p for k, p in params.items() if (n := writers[k]) is not None and n.part == "lora_B" and n.layer in factors}
    saved = {k: p.detach().clone() for k, p in targets.items()}
    try:
        with torch.no_grad():
            for k, p in targets.items():
                p.mul_(float(factors[cast(ModuleName, writers[k]).layer]))
        yield model
    finally:
        with torch.no_grad():
            for k, p in targets.items():
                p.copy_(saved[k])


# -- figures ----------------------------------------------------------------------------------


def coefficient_figure(labels: Sequence[str], general: ProbeResult, domain: ProbeResult, domain_name: str) -> go.Figure:
    """Bar chart of both probes' coefficients per adapter, with their spread over splits."""
    fig = go.Figure()
    fig.add_bar(x=list(labels), y=general.coef_mean, error_y={"array": general.coef_std},
                name=f"misaligned vs aligned (acc {general.accuracy_mean:.2f})")
    fig.add_bar(x=list(labels), y=domain.coef_mean, error_y={"array": domain.coef_std},
                name=f"{domain_name} vs other (acc {domain.accuracy_mean:.2f})")
    fig.update_layout(barmode="group", title="L1 logistic-regression coefficients per adapter (z-scored scalars)",
                      yaxis_title="coefficient", template="plotly_white", height=400)
    return fig


def steering_figure(factors: Sequence[float], curves: Mapping[str, Sequence[float]], title: str) -> go.Figure:
    """EM score against the multiplier applied to a set of adapters' scalars."""
    fig = go.Figure()
    for name, values in curves.items():
        fig.add_trace(go.Scatter(x=list(factors), y=list(values), mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title="scalar multiplier", yaxis_title="EM score (nats/token)",
                      template="plotly_white", height=400)
    return fig
