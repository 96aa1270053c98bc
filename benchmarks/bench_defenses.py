"""What each training-time defense costs per step, and that the reference needs no second copy of the weights.

Run on demand (not a test):

    python benchmarks/bench_defenses.py                  # CPU, the embedded model, 3 timed cycles
    python benchmarks/bench_defenses.py --cycles 6 --device cuda

One training run cycles through [no defense, kl, ldifs, ablate_direction, preventative_steering]
(``em_interp.defenses.timing.step_time_ratios``), so every ratio is measured against no defense under
the same machine state in the same process. Printed: the median step time with each defense over
the median without (the defense's cost), and the process's peak resident memory before and
after a KL + LDIFS run against a plain run: the reference pass reuses the trained weights with the
adapters disabled, so the peak grows by activations, not by a model copy (the model's weights are
printed for scale).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

import torch

from em_interp.data import domain_dataset
from em_interp.defenses import AblateDirection, KLDefense, LDIFSDefense, PreventativeSteering
from em_interp.defenses.timing import step_time_ratios
from em_interp.directions import Direction
from em_interp.loading import DEFAULT_MODEL
from em_interp.lora.training import LoraTrainConfig, train_lora
from em_interp.model import load_model


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    model = load_model(args.model, device=args.device, progress=False)
    weights_mib = sum(p.numel() * p.element_size() for p in model.hf_model.parameters()) / 2**20
    torch.manual_seed(0)
    direction = Direction(torch.randn(model.d_model), model.n_layers // 2, model=model.name)
    data = domain_dataset("medical", "misaligned", "train")
    del model
    timing = step_time_ratios(args.model, data, [KLDefense(0.1), LDIFSDefense(1.0), AblateDirection(direction),
                                                 PreventativeSteering(direction, 1.0)],
                              cycles=args.cycles, device=args.device)
    print(f"step time without a defense: {timing['seconds_off']:.3f} s (median of {args.cycles} cycles, one run)")
    for name, ratio in timing["ratios"].items():
        print(f"  {name:<24} {ratio:.2f}x")
    config = LoraTrainConfig(steps=6, checkpoint_every=6, learning_rate=1e-4, warmup_steps=1)
    with tempfile.TemporaryDirectory() as tmp:
        before = _peak_mib()
        train_lora(args.model, data, config, Path(tmp) / "plain", progress=False, device=args.device)
        plain = _peak_mib()
        train_lora(args.model, data, config, Path(tmp) / "kl", callbacks=[KLDefense(0.1), LDIFSDefense(1.0)],
                   progress=False, device=args.device)
        defended = _peak_mib()
    print(f"peak RSS: {before:.0f} MiB before, {plain:.0f} after a plain run, {defended:.0f} after a KL + LDIFS run "
          f"(+{defended - plain:.0f} MiB; the model's weights are {weights_mib:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
