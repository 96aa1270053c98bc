"""Step-time cost of the training-time defenses, measured against no defense in one training run.

Part of :mod:`em_interp.defenses` (see its docstring); :func:`step_time_ratios` is what the study's
defenses stage and ``benchmarks/bench_defenses.py`` report.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Sequence
from typing import Any

from em_interp.chat import ChatExample
from em_interp.defenses.base import Defense
from em_interp.defenses.runs import defense_dir
from em_interp.errors import EmInterpError
from em_interp.lora.hf_trainer import TrainingCallback
from em_interp.lora.training import LoraTrainConfig, train_lora


class _StepTimer(TrainingCallback):
    """Turns exactly one defense (or none) on before each step, cycling, and times each step."""

    def __init__(self, defenses: Sequence[Defense]):
        self.defenses = list(defenses)
        self.times: list[tuple[int, float]] = []  # (index into [none, *defenses], seconds)
        self._start = 0.0
        self._which = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._which = state.global_step % (len(self.defenses) + 1)
        for i, d in enumerate(self.defenses, start=1):
            d.active = i == self._which
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.times.append((self._which, time.perf_counter() - self._start))
        super().on_step_end(args, state, control, model=model, **kwargs)


def step_time_ratios(model_name: str, data: Sequence[ChatExample], defenses: Sequence[Defense], cycles: int = 3,
                     batch_size: int = 4, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Median step time with each defense on over the median with none, measured in one training run.

    The run cycles through [none, each defense] ``cycles + 1`` times (the first cycle is warm-up
    and dropped), so every defense is timed against the same machine state. KL and LDIFS use the
    same weights with adapters disabled as their reference (no second copy in memory).
    """
    if cycles < 1:
        raise EmInterpError(f"cycles={cycles} must be >= 1")
    if not defenses:
        raise EmInterpError("defenses is empty: nothing to time")
    timer = _StepTimer(defenses)
    steps = (cycles + 1) * (len(defenses) + 1)
    config = LoraTrainConfig(steps=steps, checkpoint_every=steps, seed=seed, learning_rate=1e-4, warmup_steps=1,
                             batch_size=batch_size)
    out = defense_dir() / "timing" / f"run-{time.time_ns()}"
    try:
        train_lora(model_name, data, config, out, callbacks=[*defenses, timer], progress=False, device=device)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        for d in defenses:
            d.detach()
            d.enable()
    kept = timer.times[len(defenses) + 1:]
    base = statistics.median(t for w, t in kept if w == 0)
    ratios = {d.name: statistics.median(t for w, t in kept if w == i) / base for i, d in enumerate(defenses, start=1)}
    return {"ratios": ratios, "seconds_off": base, "steps": steps, "cycles": cycles}
