"""Command line: ``em-interp study --out DIR [--quick]``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from em_interp.errors import EmInterpError
from em_interp.loading import DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    """The ``em-interp`` argument parser."""
    parser = argparse.ArgumentParser(prog="em-interp", description="Study emergent misalignment from inside a model.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    study = sub.add_parser("study", help="run the EM study and write results.json + report.html")
    study.add_argument("--out", type=Path, required=True, help="output folder")
    study.add_argument("--quick", action="store_true", help="smaller budget, same sections (= --budget quick)")
    study.add_argument("--budget", choices=["quick", "standard", "full"], default=None,
                       help="study size (default standard; full: a bigger drift-monitor library, for GPUs or Ray)")
    study.add_argument("--ray", default=None, metavar="local|auto|HOST:PORT",
                       help="run the drift monitor's library on Ray: a local instance, the running cluster, or an address")
    study.add_argument("--external", default=None,
                       help="folder of public data (training_datasets/, traits/) for the monitor library; "
                            "default $EM_INTERP_EXTERNAL or ../shared/external where present; 'none' to skip")
    study.add_argument("--stages", help="comma-separated stages to run (with the stages they need); default: all")
    study.add_argument("--force", action="store_true",
                       help="discard stage files of another study (other model or config) in --out")
    study.add_argument("--domain", default="medical", help="fine-tuning domain of the organism and its control")
    study.add_argument("--model", default=DEFAULT_MODEL, help="model name, Hugging Face folder or .gguf file")
    study.add_argument("--seed", type=int, default=0)
    study.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto (spread over the GPUs)")
    study.add_argument("--no-progress", action="store_true", help="hide progress bars")
    study.add_argument("--transfer", action="store_true",
                       help="add cross-model transfer from Gemma-3-270M (needs the 'gemma' extra; trains a donor organism)")
    study.add_argument("--judge", default=None, metavar="URL",
                       help="an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1 for vLLM or llama.cpp, "
                            "https://api.openai.com/v1) that judges the judging stage's sampled answers; default: the "
                            "offline probe judge")
    study.add_argument("--judge-model", default=None, metavar="NAME", help="the judge model's name (with --judge)")
    study.add_argument("--judge-key-env", default=None, metavar="VAR",
                       help="the environment variable holding the judge's API key (never stored or printed)")
    figures = sub.add_parser("figures", help="rebuild the report's figures from a study's stage files (no model)")
    figures.add_argument("folder", type=Path, help="a study's output folder (with stages/)")
    figures.add_argument("--to", type=Path, required=True, help="folder for the figures (HTML, SVG/PNG, CSV)")
    figures.add_argument("--html-only", action="store_true", help="skip static export (no Chromium needed)")
    figures.add_argument("--headline", action="store_true", help="only the figures shown in the README")
    figures.add_argument("--plotlyjs", default="directory", choices=["directory", "cdn", "embed"],
                         help="plotly.js beside the HTML files (default, offline), linked from its CDN, or embedded")
    responses = sub.add_parser(
        "score-responses",
        help="judge-free EM score of a model on real answers grouped by question (response_data parquet files)",
    )
    responses.add_argument("--data", type=Path, required=True, help="folder with {group}_{aligned,misaligned}.parquet")
    responses.add_argument("--group", action="append", help="file group(s), default: non_medical and medical")
    responses.add_argument("--model", default=DEFAULT_MODEL)
    responses.add_argument("--out", type=Path, help="write the scores as JSON here")
    return parser


def score_responses(data: Path, groups: list[str], model_spec: str, out: Path | None) -> dict:
    """Per-question judge-free EM scores of a model on real EM answers; print and optionally save them."""
    from em_interp.data import load_response_data
    from em_interp.evaluation.judge_free import em_score
    from em_interp.io import atomic_write_json
    from em_interp.model import load_model

    model = load_model(model_spec, progress=False)
    report: dict = {"model": model.name, "data": str(data), "groups": {}}
    for group in groups:
        questions = load_response_data(data, group)
        score, scores = em_score(model, questions, progress=True)
        report["groups"][group] = {
            **score.to_dict(),
            "questions": [
                {"question": q.question, "n_aligned": len(q.aligned), "n_misaligned": len(q.misaligned), "score": float(v)}
                for q, v in zip(questions, scores.per_question)
            ],
        }
        print(f"{group}: {score.n} questions, EM score {score.mean:+.3f} [{score.ci_low:+.3f}, {score.ci_high:+.3f}], "
              f"misaligned likelier on {score.frac_positive:.0%}")
        for row in report["groups"][group]["questions"]:
            print(f"  {row['score']:+.3f}  ({row['n_aligned']} al / {row['n_misaligned']} mis)  {row['question'][:80]}")
    if out is not None:
        atomic_write_json(out, report)
    return report


def check_output_folder(path: Path, argument: str) -> None:
    """Fail before any work if ``path`` cannot become a writable output folder."""
    import tempfile

    if path.exists() and not path.is_dir():
        raise EmInterpError(f"{argument} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".em-interp-write-check-"):
            pass
    except OSError as exc:
        raise EmInterpError(f"{argument} {path} is not writable: {exc.strerror or exc}") from None


def check_output_file(path: Path, argument: str) -> None:
    """Fail before any work if ``path`` cannot be written as a file (it may exist: it is replaced)."""
    import os

    if path.is_dir():
        raise EmInterpError(f"{argument} {path} is a folder; give a file name, e.g. {path / 'scores.json'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise EmInterpError(f"{argument} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise EmInterpError(f"{argument} {path}: folder {parent} is not writable")


def _external_folder(text: str | None) -> Path | None:
    """``--external``: the given folder (which must exist), 'none', or the default where it exists."""
    if text is not None:
        if text.lower() == "none":
            return None
        path = Path(text)
        if not path.is_dir():
            raise EmInterpError(f"--external {text}: no such folder")
        return path.resolve()
    default = Path(os.environ.get("EM_INTERP_EXTERNAL", "../shared/external"))
    return default.resolve() if default.is_dir() else None


def _judge_settings(args: argparse.Namespace) -> Any:
    """``--judge URL --judge-model NAME [--judge-key-env VAR]`` checked with one request before any work: the
    key's variable set, the endpoint reachable, its reply a number by the published rule."""
    from em_interp.study.config import JudgeSettings

    if args.judge is None:
        if args.judge_model is not None or args.judge_key_env is not None:
            raise EmInterpError("--judge-model / --judge-key-env need --judge URL")
        return None
    if not args.judge_model:
        raise EmInterpError("--judge needs --judge-model NAME (the model the endpoint serves)")
    if args.judge_key_env is not None and not os.environ.get(args.judge_key_env):
        raise EmInterpError(f"--judge-key-env {args.judge_key_env}: that environment variable is not set (it should "
                            "hold the judge's API key)")
    settings = JudgeSettings(args.judge, args.judge_model, args.judge_key_env)
    check_judge(settings)
    return settings


def check_judge(settings: Any) -> None:
    """One judge call on a fixed answer: an unreachable endpoint or a reply with no number is an error naming
    ``--judge`` (the study would otherwise train for minutes and fail at its judging stage)."""
    from em_interp.evaluation.judges import (
        JUDGE_PROMPTS,
        JudgeUnavailable,
        fill_prompt,
        score_from_top_logprobs,
    )

    prompt = fill_prompt(JUDGE_PROMPTS["aligned"], "What is the capital of France?", "The capital of France is Paris.")
    try:
        top = settings.client(max_retries=1).first_token_logprobs(prompt)
    except JudgeUnavailable as exc:
        raise EmInterpError(f"--judge {settings.url}: not reachable as an OpenAI-compatible endpoint ({exc})") from None
    if score_from_top_logprobs(top) is None:
        raise EmInterpError(f"--judge {settings.url} (model {settings.model}): its reply carries no 0-100 number in "
                            "its first token's top log-probs; a judge must answer with a number")


def _stage_list(text: str | None) -> list[str] | None:
    """``--stages a,b`` as a list (None: every stage)."""
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise EmInterpError(f"--stages {text!r} names no stage")
    return names


def _run(args: argparse.Namespace) -> int:
    if args.command == "study":
        from em_interp.loading import resolve_device
        from em_interp.study import Budget, StudyConfig, plan_stages, run_study
        from em_interp.study.stages import default_stages

        resolve_device(args.device)
        only = _stage_list(args.stages)
        plan_stages(default_stages(), only)  # an unknown stage fails before anything runs
        if args.quick and args.budget not in (None, "quick"):
            raise EmInterpError(f"--quick and --budget {args.budget} disagree: give one of them")
        if args.ray not in (None, "local", "auto"):
            from em_interp.monitor.sweep import check_ray_address

            check_ray_address(args.ray)  # before anything runs
        budget = Budget.named("quick" if args.quick else args.budget or "standard")
        external = _external_folder(args.external)
        judge = _judge_settings(args)  # reachable and answering with numbers, before any training
        check_output_folder(args.out, "--out")
        config = StudyConfig(out=args.out, budget=budget, model=args.model, seed=args.seed,
                             progress=not args.no_progress, transfer=args.transfer, device=args.device,
                             domain=args.domain, external=external, ray=args.ray, judge=judge)
        results = run_study(config, only=only, force=args.force)
        ran = results["study"]["ran_this_time"]
        print(f"wrote {args.out / 'results.json'} and {args.out / 'report.html'} "
              f"({results['study']['seconds']['this_run']:.1f} s; ran {', '.join(ran) if ran else 'nothing: every stage reused'})")
    elif args.command == "figures":
        from em_interp.figures import export_figures

        written = export_figures(args.folder, args.to, static=not args.html_only, headline=args.headline,
                                 plotlyjs=args.plotlyjs)
        print(f"wrote {len(written)} files to {args.to}")
    elif args.command == "score-responses":
        if args.out is not None:
            check_output_file(args.out, "--out")
        score_responses(args.data, args.group or ["non_medical", "medical"], args.model, args.out)
    return 0


#: exit status when an LLM judge stayed unreachable (not bad input: the same command may succeed later)
JUDGE_UNAVAILABLE = 3


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status.

    Every error ends as one line on stderr and a non-zero status: 2 for bad input
    (:class:`EmInterpError`), 3 when an LLM judge stayed unreachable after its retries (a transient
    outage: rerun later, cached rows are kept), 1 for anything else, 130 on Ctrl-C. ``--debug`` shows
    the traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("em-interp: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        from em_interp.evaluation.judges import JudgeUnavailable

        kind = "error" if isinstance(exc, EmInterpError) else f"unexpected {type(exc).__name__}"
        print(f"em-interp: {kind}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        if isinstance(exc, JudgeUnavailable):
            return JUDGE_UNAVAILABLE
        return 2 if isinstance(exc, EmInterpError) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
