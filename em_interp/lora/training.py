"""LoRA supervised fine-tuning of model organisms on ``transformers.Trainer``, resumable, on any device.

The default organism follows Soligo et al.: nine rank-1 rsLoRA adapters on ``mlp.down_proj`` in three
groups of three consecutive layers spread over depth (15-17, 21-23, 27-29 of 48 layers, scaled to
the model: 9-11, 13-15, 17-19 of SmolLM2's 30). The loss is on the answer tokens only.

Why ``Trainer`` and not TRL's ``SFTTrainer``: em_interp tokenises chats itself (answer masks from
the chat template, the same code that scores and caches), so SFTTrainer's dataset formatting would
be a second, different path; ``Trainer`` gives the engine (devices, mixed precision, gradient
accumulation, ``torchrun`` / ``accelerate launch`` data parallelism, logging) and our callbacks
plug into SFTTrainer runs all the same (:mod:`em_interp.lora.hf_trainer`).

Guarantees: the data order is a function of (seed, step) (:func:`batch_indices`), whatever the
number of processes or accumulation steps (the global batch is split between them); checkpoints
every ``checkpoint_every`` steps hold the adapter in standard peft format plus optimizer, scheduler
and RNG state, read back with ``weights_only=True`` (nothing is unpickled); a checkpoint counts only
once its completion marker is written, so a run killed at any point and started again resumes from
its last complete checkpoint and ends with the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from em_interp.chat import ChatExample, TokenizedChat
from em_interp.errors import EmInterpError
from em_interp.io import atomic_directory, atomic_write_json, sha256_json
from em_interp.loading import load_hf, resolve_device, resolve_dtype, resolve_spec
from em_interp.lora.adapters import save_adapter
from em_interp.lora.hf_trainer import (
    CHECKPOINT_MARKER,
    TrainingCallback,
    attach_hooked,
    latest_checkpoint,
    with_em_interp,
)
from em_interp.model import HookedModel, wrap_hf
from em_interp.provenance import computation_key
from em_interp.validate import finite_number
from em_interp.version import __version__

__all__ = ["LoraTrainConfig", "TrainResult", "TrainingCallback", "batch_indices", "build_lora_model",
           "default_organism_layers", "make_batch", "train_lora"]

ORGANISM_GROUP_STARTS = (15, 21, 27)
#: Modules whose code decides what a training run produces (part of every run's identity).
TRAINING_MODULES = ("em_interp.lora.training", "em_interp.lora.hf_trainer", "em_interp.lora.adapters")
ORGANISM_REFERENCE_LAYERS = 48


def default_organism_layers(n_layers: int, group_size: int = 3) -> list[int]:
    """Soligo et al.'s three groups of three consecutive layers (15-17, 21-23, 27-29 of 48), scaled to ``n_layers``."""
    layers: list[int] = []
    for start in ORGANISM_GROUP_STARTS:
        first = min(round(start * n_layers / ORGANISM_REFERENCE_LAYERS), n_layers - group_size)
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
        self.learning_rate = finite_number("learning_rate", self.learning_rate, minimum=0.0, strictly=True)
        self.alpha = finite_number("alpha", self.alpha, minimum=0.0, strictly=True)
        self.weight_decay = finite_number("weight_decay", self.weight_decay, minimum=0.0)
        if int(self.warmup_steps) < 0:
            raise EmInterpError(f"warmup_steps={self.warmup_steps} must be >= 0")
        self.target_modules = tuple(self.target_modules)
        self.layers = tuple(self.layers) if self.layers is not None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class TrainResult:
    """Where the trained adapter is and how training went."""

    adapter_dir: Path
    losses: list[float]
    seconds: float
    steps: int
    resumed_from: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    #: the step a callback stopped training at (e.g. a drift monitor's alarm); None: it ran to the end
    stopped_at: int | None = None


def build_lora_model(base: str, config: LoraTrainConfig, progress: bool = True, device: str = "cpu",
                     dtype: torch.dtype | str | None = None) -> HookedModel:
    """Load ``base`` and inject fresh (seeded) trainable LoRA adapters as ``config`` says."""
    from peft import LoraConfig, get_peft_model

    device = resolve_device(device)
    dtype = resolve_dtype(device, dtype)
    resolved = resolve_spec(base)
    hf_model, tokenizer = load_hf(resolved, dtype=dtype, device=device, progress=progress)
    n_layers = hf_model.config.num_hidden_layers
    layers = list(config.layers) if config.layers is not None else default_organism_layers(n_layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise EmInterpError(f"layers={bad} out of range: {resolved.model_id} has layers 0..{n_layers - 1}")
    torch.manual_seed(config.seed)
    # peft annotates lora_alpha as int but scales by any float
    lora = LoraConfig(r=config.rank, lora_alpha=cast(int, config.alpha), use_rslora=config.use_rslora, lora_dropout=0.0,
                      target_modules=list(config.target_modules), layers_to_transform=layers, bias="none")
    peft_model = get_peft_model(hf_model, lora)
    peft_model.peft_config["default"].base_model_name_or_path = resolved.model_id
    model = wrap_hf(cast(torch.nn.Module, peft_model.base_model.model), tokenizer, resolved.model_id,
                    {"source": resolved.source, "location": resolved.location,
                     "dtype": str(dtype).removeprefix("torch."), "device": device, "adapter": "training"},
                    peft_model=peft_model)
    attach_hooked(model)
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


def precision(device: str = "cpu", dtype: torch.dtype | str | None = None) -> str:
    """What a run's numbers depend on beyond its config: the device kind and the compute dtype (``"cpu:float32"``).

    Part of every run's identity, so an organism trained on a CPU in fp32 is not reused for a GPU run in
    bf16 (or the reverse); which GPU of several does not matter.
    """
    device = resolve_device(device)
    kind = "cpu" if device == "cpu" else "cuda"
    return f"{kind}:{str(resolve_dtype(device, dtype)).removeprefix('torch.')}"


def _run_identity(base: str, config: LoraTrainConfig, data: Sequence[ChatExample],
                  run_precision: str = "cpu:float32") -> dict[str, Any]:
    identity = {"base": base, "config": config.to_dict(), "data_sha256": sha256_json([e.to_dict() for e in data]),
                "n_examples": len(data), "precision": run_precision, "computed_by": computation_key(*TRAINING_MODULES)}
    return json.loads(json.dumps(identity))  # as it reads back from a checkpoint marker (tuples become lists)


class _Indices(Dataset):
    """Example indices (the collator turns them into padded batches)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


class StepOrderSampler(Sampler[int]):
    """Example indices in training order: step ``s`` takes ``batch_indices(n, batch_size, s, seed)``.

    With several processes or accumulation steps the Trainer's dataloader cuts this stream into
    per-device micro-batches; each optimiser step still consumes exactly the step's global batch.
    """

    def __init__(self, n_examples: int, batch_size: int, steps: int, seed: int):
        self.n, self.batch_size, self.steps, self.seed = n_examples, batch_size, steps, seed

    def __iter__(self):
        for step in range(self.steps):
            yield from batch_indices(self.n, self.batch_size, step, self.seed)

    def __len__(self) -> int:
        return self.steps * self.batch_size


class _Collator:
    def __init__(self, model: HookedModel, items: Sequence[TokenizedChat]):
        self.model, self.items = model, items

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return make_batch(self.model, [self.items[i] for i in indices])


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def train_lora(
    base: str,
    data: Sequence[ChatExample],
    config: LoraTrainConfig,
    out_dir: str | Path,
    callbacks: Sequence[TrainingCallback] = (),
    progress: bool = True,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    gradient_accumulation_steps: int = 1,
    report_to: str | list[str] = "none",
) -> TrainResult:
    """Fine-tune LoRA adapters on ``base`` with the chat ``data``; write ``out_dir/adapter`` (peft format).

    Runs on ``transformers.Trainer``. If ``out_dir`` already holds a finished run with the same base,
    config, data and code/library versions, it is reused; if it holds complete checkpoints of the
    same run, training resumes from the latest readable one; checkpoints of another run are an error.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (model spread over the GPUs).
            Launched with ``torchrun`` / ``accelerate launch``, each process trains on its own device
            (gloo on CPU) and the global batch ``config.batch_size`` is split between processes.
        dtype: compute dtype; default float32 on CPU, bfloat16 (mixed precision, fp32 adapters) on GPUs.
        gradient_accumulation_steps: micro-batches per optimiser step (same global batch).
        report_to: Trainer logging integrations (default none; ``"tensorboard"`` works offline).
    """
    from transformers import Trainer, TrainingArguments

    out = Path(out_dir)
    identity = _run_identity(str(base), config, data, precision(device, dtype))
    final = out / "adapter"
    summary = out / "training.json"
    if summary.is_file() and final.is_dir():
        saved = json.loads(summary.read_text())
        if saved.get("identity") == identity and saved.get("stopped_at") is None:  # a stopped run resumes
            return TrainResult(final, saved["losses"], saved["seconds"], config.steps, config=config.to_dict())
    world = _world_size()
    if gradient_accumulation_steps < 1 or config.batch_size % (gradient_accumulation_steps * world):
        raise EmInterpError(f"batch_size={config.batch_size} must split evenly over gradient_accumulation_steps="
                            f"{gradient_accumulation_steps} x {world} process(es)")
    device = resolve_device(device)
    dtype = resolve_dtype(device, dtype)
    ckpt_root = out / "checkpoints"
    resume = latest_checkpoint(ckpt_root, identity)
    model = build_lora_model(str(base), config, progress=progress, device=device, dtype=dtype)
    items = model.tokenize_many(data, config.max_length, require_answer=True, what="training data")
    params = [p for p in model.peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    on_gpu = device == "auto" or device.startswith("cuda")
    args = TrainingArguments(
        output_dir=str(ckpt_root), max_steps=config.steps,
        per_device_train_batch_size=config.batch_size // (gradient_accumulation_steps * world),
        gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, max_grad_norm=0.0, save_strategy="steps", save_steps=config.checkpoint_every,
        logging_steps=1, report_to=report_to, seed=config.seed, data_seed=config.seed, use_cpu=device == "cpu",
        bf16=on_gpu and dtype == torch.bfloat16, fp16=on_gpu and dtype == torch.float16,
        disable_tqdm=not progress, dataloader_num_workers=0, remove_unused_columns=False, label_names=["labels"],
        ddp_backend="gloo" if world > 1 and device == "cpu" else None, ddp_find_unused_parameters=False,
        save_only_model=False, average_tokens_across_devices=True,
    )
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    trainer = with_em_interp(Trainer)(
        model=model.peft_model, args=args, train_dataset=_Indices(len(items)), data_collator=_Collator(model, items),
        optimizers=(optimizer, scheduler), callbacks=list(callbacks), processing_class=model.tokenizer,
        run_identity=identity, checkpoint_at_start=resume is None, hooked=model,
        train_sampler=StepOrderSampler(len(items), config.batch_size, config.steps, config.seed),
    )
    _quiet_logs(trainer, progress)
    trainer.em_interp_losses = _previous_losses(resume)
    model.hf_model.train()
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    finally:
        model.hf_model.eval()
    seconds = time.perf_counter() - started
    resumed_from = int(resume.name.removeprefix("checkpoint-")) if resume is not None else 0
    losses = list(trainer.em_interp_losses)
    step = int(trainer.state.global_step)
    stopped_at = step if step < config.steps else None  # a callback stopped training (its checkpoint is saved)
    if args.should_save:
        last = ckpt_root / f"checkpoint-{step}"
        with atomic_directory(final, overwrite=True) as tmp:
            if (last / "adapter_model.safetensors").is_file():
                for name in ("adapter_model.safetensors", "adapter_config.json"):
                    shutil.copy2(last / name, tmp / name)
            else:  # stopped by a callback that set should_training_stop itself, without a checkpoint
                save_adapter(model, tmp)
        atomic_write_json(summary, {"identity": identity, "losses": losses, "seconds": seconds,
                                    "resumed_from": resumed_from, "package_version": __version__,
                                    "world_size": world, "device": device, "dtype": str(dtype),
                                    "stopped_at": stopped_at})
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process returns only once the main one has written the adapter
    return TrainResult(final, losses, seconds, step, resumed_from=resumed_from, config=config.to_dict(),
                       stopped_at=stopped_at)


def _quiet_logs(trainer: Any, progress: bool) -> None:
    """Keep the Trainer's progress bar (when ``progress``) but not its per-step log lines on stdout.

    The losses are in :class:`TrainResult` and, with ``report_to``, in the logging integrations.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, *args: Any, **kwargs: Any) -> None:
            return None

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(QuietProgress)


def _previous_losses(checkpoint: Path | None) -> list[float]:
    """Per-step task losses recorded up to ``checkpoint`` (in its completion marker)."""
    if checkpoint is None:
        return []
    return [float(v) for v in json.loads((checkpoint / CHECKPOINT_MARKER).read_text()).get("losses", [])]
