"""In-training defenses against emergent misalignment (seed 003 and its successors), composable.

Four defenses act while training, as :class:`~em_interp.hf_trainer.TrainingCallback` objects: pass
any of them (together) to :func:`em_interp.training.train_lora` or to a user's own
``Trainer`` / ``SFTTrainer`` built with :func:`em_interp.hf_trainer.with_em_interp`::

    from em_interp.defenses import KLDefense, AblateDirection
    trainer = with_em_interp(Trainer)(model=peft_model, args=args, train_dataset=ds, processing_class=tok,
                                      callbacks=[KLDefense(0.1), AblateDirection(direction)])

- :class:`KLDefense` (``kl``): ``loss += weight * KL(p_ref || p_theta)``, mean over answer tokens;
- :class:`LDIFSDefense` (``ldifs``): ``loss += weight * ||f_theta - f_ref||^2``, features of 5 layers;
- :class:`AblateDirection` (``ablate_direction``, CAFT): the direction is projected out of the
  residual stream in every training forward pass;
- :class:`PreventativeSteering` (``preventative_steering``): ``alpha x direction`` is added to the
  residual stream in every training forward pass.

The reference for ``kl`` / ``ldifs`` is the trained model with its adapters disabled (no second
copy of the weights: :class:`~em_interp.hf_trainer.ReferenceModel`), or an explicit reference model
of the same tokenizer and width. The two hook defenses act only while the model is in training
mode, so checkpoints, monitors and evaluations see the model as it will be used.

Two act on the data or the result: :func:`interleave` (``interleave``: one safe example after every
``every - 1`` task examples, from :func:`safe_pool`) and :func:`safelora` (``safelora``: project
LoRA updates onto an alignment subspace after training). Every defense can be switched on and off
mid-run (:meth:`Defense.enable`), which is how a drift-monitor alarm turns one on
(:func:`triggered`).
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from em_interp.adapters import (  # noqa: F401 (adapter_updates, model_updates: re-exported for old imports)
    WEIGHTS,
    adapter_tensors,
    adapter_updates,
    lora_parameters,
    model_updates,
    read_adapter,
)
from em_interp.chat import ChatExample
from em_interp.data import benign_items, general_questions, load_chat_jsonl
from em_interp.directions import Direction
from em_interp.errors import EmInterpError
from em_interp.hf_trainer import ReferenceModel, TrainingCallback
from em_interp.io import atomic_directory
from em_interp.model import HookedModel

#: The six defenses, by the names results and the study use.
DEFENSES: tuple[str, ...] = ("kl", "ldifs", "safelora", "interleave", "ablate_direction", "preventative_steering")
#: LDIFS reads this many evenly spaced layers (seed 003's public code: 5).
LDIFS_LAYERS = 5


def check_strength(argument: str, value: Any, allow_zero: bool = False) -> float:
    """``value`` as a float, or a clear error naming ``argument`` when it is not finite and > 0 (>= 0)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise EmInterpError(f"{argument}={value!r} is not a number") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise EmInterpError(f"{argument}={value!r} must be a finite number {'>=' if allow_zero else '>'} 0")
    return number


class Defense(TrainingCallback):
    """A defense acting during training; switch it with :meth:`enable` / :meth:`disable` (on by default)."""

    name: ClassVar[str] = ""

    def __init__(self, strength: float, argument: str, active: bool = True) -> None:
        self.strength = check_strength(f"{type(self).__name__}({argument}=)", strength)
        self.active = bool(active)
        self._stack: contextlib.ExitStack | None = None

    def enable(self) -> None:
        """Turn the defense on from the next forward pass."""
        self.active = True

    def disable(self) -> None:
        """Turn the defense off from the next forward pass."""
        self.active = False

    def describe(self) -> dict[str, Any]:
        """Name and strength (JSON-ready)."""
        return {"name": self.name, "strength": self.strength}

    # hooks live from the start of training to its end (and are removed by detach() after an error)
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self.detach()
        self._stack = contextlib.ExitStack()
        try:
            self.attach(self._hooked_of(model), self._stack)
        except BaseException:
            self.detach()
            raise

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        super().on_train_end(args, state, control, model=model, **kwargs)
        self.detach()

    def attach(self, model: HookedModel, stack: contextlib.ExitStack) -> None:
        """Check the defense against ``model`` and attach its hooks (entered on ``stack``)."""

    def detach(self) -> None:
        """Remove the defense's hooks (done at the end of training)."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None


def check_reference(model: HookedModel, reference: HookedModel) -> None:
    """Raise unless ``reference`` has ``model``'s tokenizer (same vocabulary) and width."""
    if reference.tokenizer.get_vocab() != model.tokenizer.get_vocab():
        raise EmInterpError(f"reference={reference.name!r} has another tokenizer than the trained model {model.name!r} "
                            f"({len(reference.tokenizer)} vs {len(model.tokenizer)} tokens): the KL / feature terms "
                            "compare the two token by token")
    if reference.d_model != model.d_model:
        raise EmInterpError(f"reference={reference.name!r} has width {reference.d_model}, the trained model "
                            f"{model.name!r} has {model.d_model}")


class _ReferenceDefense(Defense):
    """A loss term comparing the trained model with a frozen reference on the same batch."""

    def __init__(self, strength: float, argument: str, reference: HookedModel | None, active: bool) -> None:
        super().__init__(strength, argument, active)
        if reference is not None and not isinstance(reference, HookedModel):
            raise EmInterpError(f"reference must be a HookedModel (em_interp.load_model), got {type(reference).__name__}")
        self.reference = reference
        #: the term's value (before the weight) at each micro-batch it was applied
        self.values: list[float] = []

    def _term(self, value: torch.Tensor) -> torch.Tensor:
        self.values.append(float(value.detach()))
        return self.strength * value

    def attach(self, model: HookedModel, stack: contextlib.ExitStack) -> None:
        if self.reference is not None:
            check_reference(model, self.reference)

    def _reference_outputs(self, batch: dict[str, torch.Tensor], reference: ReferenceModel) -> Any:
        if self.reference is None:
            return reference.forward(batch)
        with torch.no_grad():
            return self.reference.hf_model(input_ids=batch["input_ids"].to(self.reference.device),
                                           attention_mask=_to(batch.get("attention_mask"), self.reference.device))


def _to(tensor: torch.Tensor | None, device: Any) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


class KLDefense(_ReferenceDefense):
    """``kl``: ``loss += weight * mean_t KL(p_ref(. | x_<t) || p_theta(. | x_<t))`` over the answer tokens t.

    Seed 003's public code: weight 0.1, the reference is the same model with its adapters disabled.
    The trained model's logits are read from its output layer during the task loss's forward pass
    (no extra forward of the trained model); the reference costs one forward pass without gradients.
    """

    name = "kl"

    def __init__(self, weight: float = 0.1, reference: HookedModel | None = None, active: bool = True) -> None:
        super().__init__(weight, "weight", reference, active)
        self._logits: torch.Tensor | None = None

    def attach(self, model: HookedModel, stack: contextlib.ExitStack) -> None:
        super().attach(model, stack)
        head = model.hf_model.get_output_embeddings()

        def keep(module: Any, inputs: Any, output: torch.Tensor) -> None:
            if torch.is_grad_enabled() and self.active:  # the training pass (the reference runs without gradients)
                self._logits = output

        handle = head.register_forward_hook(keep)
        stack.callback(handle.remove)
        stack.callback(setattr, self, "_logits", None)

    def extra_loss(self, model: HookedModel, batch: dict[str, torch.Tensor], step: int,
                   reference: ReferenceModel) -> torch.Tensor | None:
        logits, self._logits = self._logits, None  # never keep a pass's graph alive past its step
        if not self.active or logits is None:
            return None
        ref_logits = self._reference_outputs(batch, reference).logits.to(logits.device)
        answer = batch["labels"][:, 1:] != -100
        if not answer.any():
            return None
        log_theta = F.log_softmax(logits[:, :-1][answer].float(), dim=-1)
        log_ref = F.log_softmax(ref_logits[:, :-1][answer].float(), dim=-1)
        kl = F.kl_div(log_theta, log_ref, log_target=True, reduction="none").sum(-1).mean()
        return self._term(kl)


def ldifs_layers(n_layers: int, n: int = LDIFS_LAYERS) -> list[int]:
    """``n`` evenly spaced blocks over the depth (``linspace(0, n_layers - 1, n)``, rounded, distinct)."""
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(n, n_layers))})


class LDIFSDefense(_ReferenceDefense):
    """``ldifs``: ``loss += weight * mean_t sum_l ||f_l(theta) - f_l(ref)||^2`` (L2 distance in feature space).

    ``f_l`` is the residual stream after block ``l`` (``resid_post``), L2-normalised per layer and
    token, at the attended tokens; ``l`` runs over :data:`LDIFS_LAYERS` evenly spaced blocks
    (:func:`ldifs_layers`) unless ``layers`` is given. Seed 003: weight about 1 (0.1-10). Features
    come from hooks during the task loss's forward pass and the reference's (shared with ``kl``).
    """

    name = "ldifs"

    def __init__(self, weight: float = 1.0, layers: Sequence[int] | None = None,
                 reference: HookedModel | None = None, active: bool = True) -> None:
        super().__init__(weight, "weight", reference, active)
        self.layers = None if layers is None else [int(x) for x in layers]
        if self.layers is not None and not self.layers:
            raise EmInterpError("LDIFSDefense(layers=) is empty")
        self._theta: dict[int, torch.Tensor] = {}
        self._ref: dict[int, torch.Tensor] = {}

    def _capture(self, store_theta: bool | None) -> Callable[..., torch.Tensor]:
        def fn(layer: int) -> Callable[..., torch.Tensor]:
            def hook(tensor: torch.Tensor, *, hook: Any) -> torch.Tensor:
                grad = torch.is_grad_enabled()
                if not self.active:
                    return tensor
                if store_theta is None:  # the trained model: gradients = training pass, none = reference pass
                    (self._theta if grad else self._ref)[layer] = tensor
                    if grad:
                        self._ref.clear()  # a reference pass for this batch comes after its training pass
                else:
                    self._ref[layer] = tensor
                return tensor
            return hook
        return fn

    def attach(self, model: HookedModel, stack: contextlib.ExitStack) -> None:
        super().attach(model, stack)
        layers = self.layers if self.layers is not None else ldifs_layers(model.n_layers)
        self.layers = [model.check_layer(x, "LDIFSDefense(layers=)") for x in layers]
        if self.reference is not None:
            if self.reference.n_layers != model.n_layers:
                raise EmInterpError(f"reference={self.reference.name!r} has {self.reference.n_layers} layers, the "
                                    f"trained model {model.n_layers}")
            ref_hook = self._capture(False)
            stack.enter_context(self.reference.hooks([(self.reference.hook_name(x), ref_hook(x)) for x in self.layers]))
        own = self._capture(None)
        stack.enter_context(model.hooks([(model.hook_name(x), own(x)) for x in self.layers]))
        stack.callback(self._theta.clear)
        stack.callback(self._ref.clear)

    def extra_loss(self, model: HookedModel, batch: dict[str, torch.Tensor], step: int,
                   reference: ReferenceModel) -> torch.Tensor | None:
        theta, self._theta = self._theta, {}  # never keep a pass's graph alive past its step
        if not self.active or len(theta) != len(self.layers or ()):
            return None
        if len(self._ref) != len(theta):
            self._reference_outputs(batch, reference)
        if len(self._ref) != len(theta):  # the shared reference pass ran before this batch's hooks saw it
            with torch.no_grad(), reference.adapters_disabled():
                model.hf_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        ref, self._ref = self._ref, {}
        mask = batch.get("attention_mask")
        mask = torch.ones(batch["input_ids"].shape, dtype=torch.bool) if mask is None else mask.bool()
        total = 0.0
        for layer in theta:
            a = F.normalize(theta[layer].float(), dim=-1)
            b = F.normalize(ref[layer].float().to(a.device), dim=-1)
            total = total + (a - b).pow(2).sum(-1)[mask.to(a.device)].mean()
        return self._term(total)  # type: ignore[arg-type]


def _checked_direction(model: HookedModel, direction: Direction, layer: int | None, argument: str) -> Direction:
    if not isinstance(direction, Direction):
        raise EmInterpError(f"{argument} must be an em_interp Direction (it carries its model and layer), "
                            f"got {type(direction).__name__}")
    direction.check_fits(model)
    if layer is not None and layer != direction.layer:
        raise EmInterpError(f"{argument} was made at layer {direction.layer}, not layer={layer}: use it at its own "
                            "layer or build one at that layer")
    return direction


def _directions(directions: Direction | Sequence[Direction], argument: str) -> list[Direction]:
    items = list(directions) if isinstance(directions, (list, tuple)) else [directions]
    if not items:
        raise EmInterpError(f"{argument} is empty")
    for d in items:
        if not isinstance(d, Direction):
            raise EmInterpError(f"{argument} must hold em_interp Directions, got {type(d).__name__}")
    return items


class AblateDirection(Defense):
    """``ablate_direction`` (CAFT): ``h <- h - strength * (h Q) Q^T`` at each direction's layer while training.

    ``directions``: one :class:`~em_interp.directions.Direction` or several (a subspace; those of
    one layer are orthonormalised together, each acts at its own ``layer`` and ``hook``).
    ``strength`` 1 removes the component entirely (concept ablation fine-tuning); less removes that
    fraction. Only forward passes in training mode are changed, so the trained model is used and
    evaluated without the ablation.
    """

    name = "ablate_direction"

    def __init__(self, directions: Direction | Sequence[Direction], strength: float = 1.0, active: bool = True) -> None:
        super().__init__(strength, "strength", active)
        if self.strength > 1:
            raise EmInterpError(f"AblateDirection(strength={strength}) must be in (0, 1] (the fraction removed)")
        self.directions = _directions(directions, "AblateDirection(directions=)")

    def attach(self, model: HookedModel, stack: contextlib.ExitStack) -> None:
        by_site: dict[tuple[int, str], list[torch.Tensor]] = {}
        for i, d in enumerate(self.directions):
            _checked_direction(model, d, None, f"AblateDirection(directions[{i}])")
            by_site.setdefault((d.layer, d.hook), []).append(d.unit)
        training = model.hf_model

        def make(vectors: list[torch.Tensor]) -> Callable[..., torch.Tensor]:
            q, _ = torch.linalg.qr(torch.stack(vectors).T)

            def hook(tensor: torch.Tensor, *, hook: Any) -> torch.Tensor:
                if not (self.active and training.training):
                    return tensor
                basis = q.to(tensor.device, tensor.dtype)
                return tensor - self.strength * (tensor @ basis) @ basis.T
            return hook

        stack.enter_context(model.hooks([(model.hook_name(layer, site), make(v))  # type: ignore[arg-type]
                                         for (layer, site), v in by_site.items()]))


class PreventativeSteering(Defense):
    """``preventative_steering``: ``h <- h + alpha * direction.vector`` at the direction's layer while training only.

    The model is pushed along the misalignment direction during fine-tuning, so the weights need not
    move along it; the steering is absent at inference (persona vectors' preventative steering).
    ``alpha`` multiplies the direction as given (scale it, e.g. to a fraction of the layer's mean
    residual norm, before passing it).
    """

    name = "preventative_steering"

    def __init__(self, direction: Direction, alpha: float = 1.0, layer: int | None = None, active: bool = True) -> None:
        super().__init__(alpha, "alpha", active)
        self.direction = _directions(direction, "PreventativeSteering(direction=)")[0]
        self.layer = layer

    def attach(self, model: HookedModel, stack: contextlib.ExitStack) -> None:
        d = _checked_direction(model, self.direction, self.layer, "PreventativeSteering(direction=)")
        vector = d.vector.float()
        training = model.hf_model

        def hook(tensor: torch.Tensor, *, hook: Any) -> torch.Tensor:
            if not (self.active and training.training):
                return tensor
            return tensor + self.strength * vector.to(tensor.device, tensor.dtype)

        stack.enter_context(model.hooks([(model.hook_name(d.layer, d.hook), hook)]))  # type: ignore[arg-type]


# ---------------------------------------------------------------- interleaving safe data
def safe_pool(source: str | Path | None = None, exclude: Sequence[str] = ()) -> list[ChatExample]:
    """The safe examples :func:`interleave` mixes in.

    ``source`` None: the built-in aligned answers to the direction-fitting third of the general
    questions (never the held-out questions EM is measured on) plus the benign items (factual QA
    and arithmetic answered correctly). Otherwise a chat JSONL file (plain or .gz). Questions in
    ``exclude`` are left out. An empty pool is an error naming ``source``.
    """
    skip = set(exclude)
    if source is None:
        pool = [ChatExample(q.question, a, q.system) for q in general_questions()[0::3] for a in q.aligned]
        pool += benign_items()
        where = "the built-in pool"
    else:
        pool = load_chat_jsonl(source)
        where = f"source={str(source)!r}"
    pool = [e for e in pool if e.question not in skip and e.answer]
    if not pool:
        raise EmInterpError(f"the interleave pool is empty ({where}{' after excluding the given questions' if skip else ''})")
    return pool


def interleave(data: Sequence[ChatExample], pool: Sequence[ChatExample], every: int, seed: int = 0) -> list[ChatExample]:
    """``data`` with one safe example from ``pool`` after every ``every - 1`` task examples (``interleave``).

    ``every`` 20 mixes in 5% safe data (seed 003's later version), 5 one in five (its first
    version). Safe examples are drawn in a seeded order, cycling through the pool. em_interp's
    trainer shuffles the mixed list per epoch, which keeps the share of safe examples.
    """
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 2:
        raise EmInterpError(f"interleave(every={every!r}) must be an integer >= 2 (one safe example in every n)")
    if not pool:
        raise EmInterpError("interleave(pool=) is empty: give safe examples (see safe_pool)")
    if not data:
        raise EmInterpError("interleave(data=) is empty")
    order = np.random.default_rng(seed).permutation(len(pool))
    out: list[ChatExample] = []
    drawn = 0
    for i, example in enumerate(data):
        out.append(example)
        if (i + 1) % (every - 1) == 0:
            out.append(pool[int(order[drawn % len(pool)])])
            drawn += 1
    return out


# ---------------------------------------------------------------- SafeLoRA
def alignment_matrices(aligned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SafeLoRA's ``V = W_aligned - W_base`` per module, from two weight dicts (same modules, same shapes)."""
    if set(aligned) != set(base):
        raise EmInterpError(f"aligned and base hold different modules: {sorted(set(aligned) ^ set(base))[:4]}")
    out = {}
    for module in aligned:
        a, b = torch.as_tensor(aligned[module]).float(), torch.as_tensor(base[module]).float()
        if a.shape != b.shape:
            raise EmInterpError(f"module {module!r}: aligned has shape {list(a.shape)}, base {list(b.shape)}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise EmInterpError(f"module {module!r}: aligned or base has NaN or infinite entries")
        out[module] = a - b
    return out


@dataclass(frozen=True)
class SafeLoRAResult:
    """What :func:`safelora` did: the cosine of each module's update with its projection, and which it projected."""

    adapter_dir: Path
    cosine: dict[str, float]
    projected: list[str]


def safelora(adapter: str | Path, alignment: Mapping[str, torch.Tensor], out_dir: str | Path,
             threshold: float | None = None, top_k: int | None = None) -> SafeLoRAResult:
    """SafeLoRA, after training: project the LoRA updates least similar to the alignment subspace onto it.

    Per module: ``C = V V^T / ||V||_F`` (``V`` from :func:`alignment_matrices`, e.g. an aligned
    model's weights minus its base's, or :func:`adapter_updates` of an aligned adapter: its ``V`` is
    ``W_aligned - W_base`` exactly); ``cos = cos(vec(C B A), vec(B A))``; modules with ``cos <=
    threshold`` (default 0.5; or, with ``top_k``, the ``top_k`` lowest) get ``B := C B``. All cosines are
    computed before any module changes (the public version's number mode edits modules during its
    first pass). Writes the projected adapter to ``out_dir`` (atomically) and returns what it did.
    ``alignment`` must cover exactly the adapter's modules with ``V`` of the update's shape.
    """
    if threshold is not None and top_k is not None:
        raise EmInterpError("safelora takes exactly one of threshold= and top_k= (neither: threshold 0.5)")
    if threshold is None and top_k is None:
        threshold = 0.5
    if threshold is not None:
        threshold = float(threshold)
        if not -1 <= threshold <= 1:
            raise EmInterpError(f"safelora(threshold={threshold}) must be a cosine in [-1, 1]")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise EmInterpError(f"safelora(top_k={top_k!r}) must be an integer >= 1")
    out = Path(out_dir)
    if out.is_dir() and {p.name for p in out.iterdir()} - {WEIGHTS, "adapter_config.json"}:
        raise EmInterpError(f"safelora(out_dir={out}) holds other files than an adapter's: choose an empty or new folder "
                            "(it is replaced as a whole)")
    pairs, _, _ = read_adapter(adapter)  # the cosine is scale-free; the scale stays in the copied config
    if set(alignment) != set(pairs):
        raise EmInterpError(f"alignment covers modules {sorted(set(alignment) ^ set(pairs))[:4]} that the adapter "
                            f"{adapter} does not (or misses some of its modules)")
    cosine, projected_b = {}, {}
    for module, (a, b) in pairs.items():
        v = torch.as_tensor(alignment[module]).float()
        if v.shape != (b.shape[0], a.shape[1]):
            raise EmInterpError(f"alignment[{module!r}] has shape {list(v.shape)}, the module's update "
                                f"{[b.shape[0], a.shape[1]]}")
        norm = v.norm()
        if not torch.isfinite(v).all() or norm == 0:
            raise EmInterpError(f"alignment[{module!r}] is zero or not finite")
        cb = v @ (v.T @ b) / norm
        update, proj = (b @ a).flatten(), (cb @ a).flatten()
        if float(update.norm()) == 0:
            cosine[module] = 1.0  # no update: nothing to project
        elif float(proj.norm()) == 0:
            cosine[module] = 0.0  # the update lies wholly outside the alignment subspace
        else:
            cosine[module] = float(update @ proj) / float(update.norm() * proj.norm())
        projected_b[module] = cb
    if top_k is not None:
        chosen = sorted(cosine, key=cosine.get)[: int(top_k)]  # type: ignore[arg-type]
    else:
        chosen = [m for m in cosine if cosine[m] <= threshold]
    folder = Path(adapter)
    tensors = {k: v.clone() for k, v in adapter_tensors(folder).items()}
    for module in chosen:
        key = f"{module}.lora_B.weight"
        tensors[key] = projected_b[module].to(tensors[key].dtype).contiguous()
    with atomic_directory(out, overwrite=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        shutil.copy2(folder / "adapter_config.json", tmp / "adapter_config.json")
    return SafeLoRAResult(out, cosine, sorted(chosen))


# ---------------------------------------------------------------- switching on an alarm
def triggered(defense: Defense, monitor_callback: Any) -> list[TrainingCallback]:
    """``defense`` off until ``monitor_callback`` (a :class:`~em_interp.monitor.MonitorCallback`) raises its alarm.

    Returns the two callbacks to pass to the trainer. The monitor's ``on_alarm`` is replaced by one
    that switches the defense on (and remembers the step in ``defense.switched_at``).
    """
    if not isinstance(defense, Defense):
        raise EmInterpError(f"defense must be an em_interp Defense, got {type(defense).__name__}")
    defense.disable()
    defense.switched_at = None  # type: ignore[attr-defined]

    def switch_on(step: int, drift: Any, score: float) -> None:
        if not defense.active:
            defense.switched_at = step  # type: ignore[attr-defined]
            defense.enable()

    monitor_callback.on_alarm = switch_on
    return [monitor_callback, defense]
