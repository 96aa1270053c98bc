"""Training speed: ``train_lora`` (Trainer + hooks) against a bare peft + torch loop on the same batches.

Run on demand (not a test):

    python benchmarks/bench_training.py                      # CPU: step-time ratio vs the bare loop
    python benchmarks/bench_training.py --organism           # + wall time of the full 160-step organism
    python benchmarks/bench_training.py --device cuda        # GPU check: loss curve vs the CPU run, step times

Both loops train the same rank-1 organism recipe from the same seed on the same batches (the data
order of ``em_interp.lora.training.batch_indices``) with the same optimiser and schedule; the bare loop
uses the plain Hugging Face model with peft, no hooks and no Trainer. Printed: median step time of
each (the first step excluded), their ratio (target <= 1.05), and the largest difference between
the two loss curves. One heavy process at a time: the two loops run one after the other.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from em_interp.data import domain_dataset
from em_interp.loading import DEFAULT_MODEL, load_hf, resolve_device, resolve_dtype, resolve_spec
from em_interp.lora.training import (
    LoraTrainConfig,
    TrainingCallback,
    _lr_lambda,
    batch_indices,
    default_organism_layers,
    train_lora,
)


class StepClock(TrainingCallback):
    """Records the wall time of every optimiser step and its loss."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self._last = time.perf_counter()

    def on_step(self, model, step, loss):  # noqa: ANN001 - TrainingCallback signature
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now
        self.losses.append(loss)


def bare_loop(base: str, data, config: LoraTrainConfig, device: str, hooked: bool = False) -> tuple[list[float], list[float]]:
    """The same training with peft + torch only (no Trainer; no hooks unless ``hooked``); (step times, losses)."""
    from peft import LoraConfig, get_peft_model

    from em_interp.chat import tokenize_chat

    dtype = resolve_dtype(device, None)
    hf, tok = load_hf(resolve_spec(base), dtype=dtype, device=device, progress=False)
    torch.manual_seed(config.seed)
    layers = list(config.layers) if config.layers else default_organism_layers(hf.config.num_hidden_layers)
    model = get_peft_model(hf, LoraConfig(r=config.rank, lora_alpha=config.alpha, use_rslora=config.use_rslora,
                                          lora_dropout=0.0, target_modules=list(config.target_modules),
                                          layers_to_transform=layers, bias="none"))
    if hooked:  # the same loop with the TransformerLens bridge booted: what the hooks cost alone
        from em_interp._bridge import boot

        boot(model.base_model.model, tok, base)
    items = [tokenize_chat(tok, e, config.max_length) for e in data]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    model.train()
    times, losses = [], []
    for step in range(config.steps):
        start = time.perf_counter()
        chosen = [items[i] for i in batch_indices(len(items), config.batch_size, step, config.seed)]
        width = max(len(c.input_ids) for c in chosen)
        ids = torch.full((len(chosen), width), tok.pad_token_id)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        labels = torch.full((len(chosen), width), -100)
        for row, c in enumerate(chosen):
            n = len(c.input_ids)
            ids[row, :n], mask[row, :n] = c.input_ids, 1
            labels[row, :n] = torch.where(c.answer_mask, c.input_ids, torch.full_like(c.input_ids, -100))
        with torch.autocast(device_type="cuda", dtype=dtype, enabled=device.startswith("cuda") and dtype != torch.float32):
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, losses


def timed_train_lora(base: str, data, config: LoraTrainConfig, device: str) -> tuple[list[float], list[float], float]:
    """``train_lora`` in a fresh folder; returns (step times, losses, wall seconds)."""
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train_lora(base, data, config, Path(tmp) / "run", callbacks=[clock], progress=False, device=device)
        wall = time.perf_counter() - start
    return clock.times, clock.losses, wall


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--organism", action="store_true", help="also time the full 160-step organism")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    data = domain_dataset("medical", "misaligned", "train")
    config = LoraTrainConfig(steps=args.steps, checkpoint_every=args.steps)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, {args.steps} steps, "
          f"batch {config.batch_size}, model {args.model}")
    if device == "cpu":
        bare_t, bare_l = bare_loop(args.model, data, config, device)
        ours_t, ours_l, _ = timed_train_lora(args.model, data, config, device)
        hook_t, _ = bare_loop(args.model, data, config, device, hooked=True)
        b, o, h = statistics.median(bare_t[1:]), statistics.median(ours_t[1:]), statistics.median(hook_t[1:])
        print(f"median step: bare peft+torch {b:.3f} s, train_lora {o:.3f} s, ratio {o / b:.3f} (target <= 1.05)")
        print(f"  of which the hooks (same bare loop, bridge booted): {h:.3f} s = {h / b:.3f}x; "
              f"Trainer and callbacks: {o / h:.3f}x")
        print(f"loss curves: max |train_lora - bare| = {max(abs(x - y) for x, y in zip(ours_l, bare_l)):.2e}")
    else:
        cpu_t, cpu_l, _ = timed_train_lora(args.model, data, config, "cpu")
        gpu_t, gpu_l, _ = timed_train_lora(args.model, data, config, device)
        c, g = statistics.median(cpu_t[1:]), statistics.median(gpu_t[1:])
        print(f"median step: cpu {c:.3f} s, {device} {g:.3f} s, speed-up {c / g:.1f}x")
        print("loss curves (cpu fp32 vs gpu bf16): " + ", ".join(f"{x:.3f}/{y:.3f}" for x, y in zip(cpu_l, gpu_l)))
        print(f"max |gpu - cpu| loss = {max(abs(x - y) for x, y in zip(cpu_l, gpu_l)):.3f}")
    if args.organism:
        full = LoraTrainConfig()
        _, losses, wall = timed_train_lora(args.model, data, full, device)
        print(f"organism ({full.steps} steps, batch {full.batch_size}) on {device}: {wall:.0f} s, final loss {losses[-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
