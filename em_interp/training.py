"""LoRA supervised fine-tuning of model organisms, with resumable checkpoints and callbacks.

The default organism follows seed 001: nine rank-1 rsLoRA adapters on ``mlp.down_proj`` in three
groups of three consecutive layers spread over depth (15-17, 21-23, 27-29 of 48 layers, scaled to
the model: 9-11, 13-15, 17-19 of SmolLM2's 30). The loss is on the answer tokens only.

Checkpoints (every ``checkpoint_every`` steps) hold the adapter in peft format plus the optimizer,
scheduler and RNG state; the data order is a function of (seed, step). A run killed at any point and
started again with the same arguments resumes from its last checkpoint and ends with the same
adapter as an uninterrupted run. Every checkpoint is written atomically.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from em_interp.adapters import load_adapter_weights, save_adapter
from em_interp.chat import ChatExample, TokenizedChat
from em_interp.errors import EmInterpError
from em_interp.io import atomic_directory, atomic_write_json, sha256_json
from em_interp.loading import load_hf, resolve_spec
from em_interp.model import HookedModel, wrap_hf
from em_interp.provenance import computation_key
from em_interp.version import __version__

SEED_001_GROUP_STARTS = (15, 21, 27)
#: Modules whose code decides what a training run produces (part of every run's identity).
TRAINING_MODULES = ("em_interp.training", "em_interp.adapters")
SEED_001_N_LAYERS = 48


def default_organism_layers(n_layers: int, group_size: int = 3) -> list[int]:
    """Seed 001's three groups of three consecutive layers (15-17, 21-23, 27-29 of 48), scaled to ``n_layers``."""
    layers: list[int] = []
    for start in SEED_001_GROUP_STARTS:
        first = min(round(start * n_layers / SEED_001_N_LAYERS), n_layers - group_size)
        layers.extend(range(first, first + group_size))
    return sorted(set(layers))


@dataclass
class LoraTrainConfig:
    """Everything that defines a LoRA fine-tuning run (part of the run's identity)."""

    rank: int = 1
    alpha: float = 64.0
    use_rslora: bool = True
    target_modules: tuple[str, ...] = ("down_proj",)
    layers: tuple[int, ...] | None = None  # None: default_organism_layers
    learning_rate: float = 5e-4
    warmup_steps: int = 10
    steps: int = 160
    batch_size: int = 4
    max_length: int = 160
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 40

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch_size", "max_length", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise EmInterpError(f"{name}={getattr(self, name)} must be >= 1")
        if self.learning_rate <= 0:
            raise EmInterpError(f"learning_rate={self.learning_rate} must be > 0")
        self.target_modules = tuple(self.target_modules)
        self.layers = tuple(self.layers) if self.layers is not None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


class TrainingCallback:
    """Hooks into training; subclass and override what you need (the drift monitor and defenses do)."""

    def on_step(self, model: HookedModel, step: int, loss: float) -> None:
        """Called after every optimiser step (``step`` counts from 1)."""

    def on_checkpoint(self, model: HookedModel, step: int, path: Path) -> None:
        """Called after each checkpoint is written (also at step 0, before training)."""

    def extra_loss(self, model: HookedModel, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor | None:
        """An optional term added to the loss of this step (e.g. a defense's regulariser)."""
        return None


@dataclass
class TrainResult:
    """Where the trained adapter is and how training went."""

    adapter_dir: Path
    losses: list[float]
    seconds: float
    steps: int
    resumed_from: int = 0
    config: dict[str, Any] = field(default_factory=dict)


def build_lora_model(base: str, config: LoraTrainConfig, progress: bool = True) -> HookedModel:
    """Load ``base`` and inject fresh (seeded) trainable LoRA adapters as ``config`` says."""
    from peft import LoraConfig, get_peft_model

    resolved = resolve_spec(base)
    hf_model, tokenizer = load_hf(resolved, dtype=torch.float32, device="cpu", progress=progress)
    n_layers = hf_model.config.num_hidden_layers
    layers = list(config.layers) if config.layers is not None else default_organism_layers(n_layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise EmInterpError(f"layers={bad} out of range: {resolved.model_id} has layers 0..{n_layers - 1}")
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, use_rslora=config.use_rslora, lora_dropout=0.0,
                      target_modules=list(config.target_modules), layers_to_transform=layers, bias="none")
    peft_model = get_peft_model(hf_model, lora)
    peft_model.peft_config["default"].base_model_name_or_path = resolved.model_id
    model = wrap_hf(peft_model.base_model.model, tokenizer, resolved.model_id,
                    {"source": resolved.source, "location": resolved.location, "dtype": "float32",
                     "device": "cpu", "adapter": "training"}, peft_model=peft_model)
    return model


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of (0-based) ``step``: consecutive slices of seeded per-epoch permutations."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n_examples)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n_examples)[pos]))
    return out


def make_batch(model: HookedModel, items: Sequence[TokenizedChat]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the answers)."""
    padded = model.pad(items, padding_side="right")
    labels = torch.where(padded.answer_mask, padded.input_ids, torch.full_like(padded.input_ids, -100))
    return {"input_ids": padded.input_ids, "attention_mask": padded.attention_mask, "labels": labels}


def _lr_lambda(config: LoraTrainConfig):
    def fn(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))
    return fn


def _run_identity(base: str, config: LoraTrainConfig, data: Sequence[ChatExample]) -> dict[str, Any]:
    identity = {"base": base, "config": config.to_dict(), "data_sha256": sha256_json([e.to_dict() for e in data]),
                "n_examples": len(data), "computed_by": computation_key(*TRAINING_MODULES)}
    return json.loads(json.dumps(identity))  # as it reads back from run.json (tuples become lists)


def _save_checkpoint(model: HookedModel, path: Path, optimizer: torch.optim.Optimizer, scheduler: Any,
                     step: int, losses: list[float], identity: dict[str, Any]) -> None:
    with atomic_directory(path, overwrite=True) as tmp:
        save_adapter(model, tmp / "adapter")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                    "losses": losses, "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
        atomic_write_json(tmp / "run.json", identity)


def _latest_checkpoint(root: Path, identity: dict[str, Any]) -> Path | None:
    ckpt_root = root / "checkpoints"
    if not ckpt_root.is_dir():
        return None
    found = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.pt").is_file() and (p / "run.json").is_file())
    if not found:
        return None
    latest = found[-1]
    saved = json.loads((latest / "run.json").read_text())
    if saved != identity:
        diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
        raise EmInterpError(
            f"checkpoint directory {ckpt_root} is from another run (differs in {diff}); use another out_dir or delete it"
        )
    return latest


def train_lora(
    base: str,
    data: Sequence[ChatExample],
    config: LoraTrainConfig,
    out_dir: str | Path,
    callbacks: Sequence[TrainingCallback] = (),
    progress: bool = True,
) -> TrainResult:
    """Fine-tune LoRA adapters on ``base`` with the chat ``data``; write ``out_dir/adapter`` (peft format).

    If ``out_dir`` already holds a finished run with the same base, config and data, it is reused.
    If it holds checkpoints of the same run, training resumes from the latest one; checkpoints of a
    different run are an error.
    """
    out = Path(out_dir)
    identity = _run_identity(str(base), config, data)
    final = out / "adapter"
    summary = out / "training.json"
    if summary.is_file() and final.is_dir():
        saved = json.loads(summary.read_text())
        if saved.get("identity") == identity:
            return TrainResult(final, saved["losses"], saved["seconds"], config.steps, config=config.to_dict())
    resume = _latest_checkpoint(out, identity)
    model = build_lora_model(str(base), config, progress=progress)
    items = model.tokenize_many(data, config.max_length, require_answer=True, what="training data")
    params = [p for p in model.peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    start_step, losses = 0, []
    if resume is not None:
        state = torch.load(resume / "state.pt", weights_only=False)
        load_adapter_weights(model, resume / "adapter")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_step, losses = int(state["step"]), list(state["losses"])
    else:
        _save_checkpoint(model, out / "checkpoints" / "step-000000", optimizer, scheduler, 0, [], identity)
        for cb in callbacks:
            cb.on_checkpoint(model, 0, out / "checkpoints" / "step-000000")
    model.hf_model.train()
    started = time.perf_counter()
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc="train LoRA",
               disable=not progress, unit="step")
    try:
        for step in bar:
            batch = make_batch(model, [items[i] for i in batch_indices(len(items), config.batch_size, step, config.seed)])
            out_ = model.hf_model(**batch)
            loss = out_.loss
            for cb in callbacks:
                extra = cb.extra_loss(model, batch, step + 1)
                if extra is not None:
                    loss = loss + extra
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(out_.loss.detach())
            if not math.isfinite(value):
                raise EmInterpError(f"training loss became {value} at step {step + 1}; lower learning_rate")
            losses.append(value)
            bar.set_postfix(loss=f"{value:.3f}")
            for cb in callbacks:
                cb.on_step(model, step + 1, value)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                path = out / "checkpoints" / f"step-{step + 1:06d}"
                model.hf_model.eval()
                _save_checkpoint(model, path, optimizer, scheduler, step + 1, losses, identity)
                for cb in callbacks:
                    cb.on_checkpoint(model, step + 1, path)
                model.hf_model.train()
    finally:
        bar.close()
        model.hf_model.eval()
    seconds = time.perf_counter() - started
    last = out / "checkpoints" / f"step-{config.steps:06d}" / "adapter"
    with atomic_directory(final, overwrite=True) as tmp:
        for f in last.iterdir():
            shutil.copy2(f, tmp / f.name)
    atomic_write_json(summary, {"identity": identity, "losses": losses, "seconds": seconds,
                                "resumed_from": start_step, "package_version": __version__})
    return TrainResult(final, losses, seconds, config.steps, resumed_from=start_step, config=config.to_dict())
