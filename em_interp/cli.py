"""Command line: ``em-interp study --out DIR [--quick]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from em_interp.errors import EmInterpError
from em_interp.loading import DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    """The ``em-interp`` argument parser."""
    parser = argparse.ArgumentParser(prog="em-interp", description="Study emergent misalignment from inside a model.")
    sub = parser.add_subparsers(dest="command", required=True)
    study = sub.add_parser("study", help="run the EM study and write results.json + report.html")
    study.add_argument("--out", type=Path, required=True, help="output folder")
    study.add_argument("--quick", action="store_true", help="smaller budget, same sections")
    study.add_argument("--model", default=DEFAULT_MODEL, help="model name, Hugging Face folder or .gguf file")
    study.add_argument("--seed", type=int, default=0)
    study.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "study":
        from em_interp.study import StudyConfig, run_study

        config = StudyConfig(out=args.out, quick=args.quick, model=args.model, seed=args.seed,
                             progress=not args.no_progress)
        try:
            results = run_study(config)
        except EmInterpError as exc:
            print(f"em-interp: error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.out / 'results.json'} and {args.out / 'report.html'} "
              f"({results['study']['seconds']['total']:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
