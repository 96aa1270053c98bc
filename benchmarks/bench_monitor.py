"""Benchmark: the drift monitor's cost per checkpoint against one behavioural evaluation, on the embedded model.

Both are timed in this process on the same model: the monitor (a snapshot of the prompts at the
monitor layer plus the forest's score) and a small behavioural evaluation (one sampled answer per
held-out general question plus their judge-free EM score), from whose sampling the model's generation
cost per token gives the field's evaluation (8 first-plot questions x 50 answers x up to 600 tokens,
plus 800 judge calls; :func:`em_interp.monitor.detector.monitor_cost`). Prints seconds, the ratios
(target <= 1% of the field's evaluation), what the monitor keeps in memory, and peak RSS. With ``--monitor OUT/monitor`` it uses the
monitor and trait basis a study saved; otherwise a forest fitted on random drift rows (its
prediction time does not depend on what it learnt).
Run: ``.venv/bin/python benchmarks/bench_monitor.py [--monitor runs/study/monitor] [--questions 40] [--prompts 24]``.
"""

from __future__ import annotations

import argparse
import resource

import numpy as np

from em_interp import ChatExample, load_model
from em_interp.data import general_questions
from em_interp.monitor.detector import DriftMonitor, monitor_cost
from em_interp.monitor.drift import TraitBasis, trait_basis


def main() -> None:
    """Time the monitor and a behavioural evaluation; print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--monitor", help="a study's OUT/monitor folder (drift_monitor + trait_basis)")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--answer-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = load_model()
    qs = general_questions()
    held = [q for i, q in enumerate(qs) if i % 3][: args.questions]
    prompts = [ChatExample(q.question) for q in qs[0::3][: args.prompts]]
    if args.monitor:
        basis = TraitBasis.load(f"{args.monitor}/trait_basis")
        monitor = DriftMonitor.load(f"{args.monitor}/drift_monitor", model=model.name, layer=basis.layer)
    else:
        basis = trait_basis(model, [q.question for q in qs[0::3][:4]])
        rng = np.random.default_rng(0)
        monitor = DriftMonitor(model.name, basis.layer, basis.names).fit(rng.normal(size=(200, 7)), rng.normal(size=200))
        monitor.threshold = 0.0
    runs = [monitor_cost(model, basis, monitor, prompts, held, args.answer_tokens) for _ in range(args.repeats)]
    best = {k: min(r[k] for r in runs) for k in ("monitor_seconds", "behavioural_eval_seconds", "field_eval_generation_seconds")}
    print(f"{'':44s}{'seconds':>10s}")
    print(f"{'monitor (per checkpoint)':44s}{best['monitor_seconds']:10.3f}")
    print(f"{'small evaluation (1 answer/question + score)':44s}{best['behavioural_eval_seconds']:10.3f}")
    print(f"{'field evaluation, generation (8 x 50 x 600 t)':44s}{best['field_eval_generation_seconds']:10.1f}"
          f"  (t = {min(r['generation_seconds_per_token'] for r in runs) * 1e3:.2f} ms/token; plus 800 judge calls)")
    print(f"ratio monitor / field evaluation: {best['monitor_seconds'] / best['field_eval_generation_seconds']:.3%} "
          "(target <= 1%)")
    print(f"ratio monitor / small evaluation: {best['monitor_seconds'] / best['behavioural_eval_seconds']:.2%}")
    print(f"monitor state kept between checkpoints: {runs[0]['monitor_state_bytes'] / 1024:.1f} KiB; "
          f"snapshot activations {runs[0]['snapshot_activation_bytes'] / 1024:.1f} KiB; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
