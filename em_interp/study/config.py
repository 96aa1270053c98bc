"""What the study runs on and how big it is: :class:`StudyConfig` with its :class:`Budget`.

Every size the stages use (questions, training steps, strengths) is a field of one of
:class:`Budget`'s nested group budgets (:mod:`em_interp.study.budget`); ``Budget.quick()``,
``Budget.standard()`` and ``Budget.full()`` are the named budgets (``--quick`` picks the first). The domain, the probes' L1 strength and the transfer donor are part of the config, so two
studies that differ in any of them never share stage files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from em_interp.data import DOMAINS
from em_interp.errors import EmInterpError
from em_interp.loading import DEFAULT_MODEL
from em_interp.study.budget import Budget


@dataclass(frozen=True)
class JudgeSettings:
    """An LLM judge behind an OpenAI-compatible chat-completions endpoint (``em-interp study --judge URL
    --judge-model NAME --judge-key-env VAR``). The key is read from the environment variable at request time:
    never stored in the config, the results or the report."""

    url: str
    model: str
    key_env: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise EmInterpError(f"judge url={self.url!r} must be an http:// or https:// URL")
        if not isinstance(self.model, str) or not self.model.strip():
            raise EmInterpError("judge model must be a non-empty name (--judge-model)")

    def client(self, max_retries: int = 6) -> Any:
        """The :class:`~em_interp.evaluation.judges.HTTPJudge` of these settings."""
        from em_interp.evaluation.judges import HTTPJudge

        return HTTPJudge(self.url, self.model, api_key_env=self.key_env, max_retries=max_retries)

    def identity(self) -> dict[str, str]:
        """What makes two judges the same (the key's variable name is not part of it)."""
        return {"url": self.url, "model": self.model}


@dataclass(frozen=True)
class StudyConfig:
    """One study: output folder, model, budget, seed and the scientific choices.

    ``identity()`` is what makes two studies the same study: everything but the output folder,
    progress bars and device-independent display options.
    """

    out: Path
    budget: Budget = field(default_factory=Budget.standard)
    model: str = DEFAULT_MODEL
    seed: int = 0
    progress: bool = True
    #: the narrow fine-tuning domain of the organism and its control
    domain: str = "medical"
    #: L1 strength of the rank1 probes. Soligo et al.'s C=0.01 zeroes every coefficient of the
    #: misaligned-vs-aligned probe at this model size (measured), so the study uses 0.1.
    probe_c: float = 0.1
    #: cross-model transfer (needs the "gemma" extra; trains a donor organism)
    transfer: bool = False
    donor: str = "gemma-3-270m"
    #: "cpu", "cuda", "cuda:N" or "auto" (models and organism training)
    device: str = "cpu"
    #: real data this project did not write (public training sets for the monitor's library); used where present
    external: Path | None = None
    #: where the monitor library's runs go: None (this process), "local", "auto" or a Ray address
    ray: str | None = None
    #: an LLM judge for the judging stage's EM rates (None: the offline probe judge, and the report says so)
    judge: JudgeSettings | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.external is not None:
            object.__setattr__(self, "external", Path(self.external))
        if self.domain not in DOMAINS:
            raise EmInterpError(f"domain={self.domain!r} is not one of {sorted(DOMAINS)}")
        if not self.probe_c > 0:
            raise EmInterpError(f"probe_c={self.probe_c} must be > 0")

    @property
    def quick(self) -> bool:
        """Whether this is the quick budget."""
        return self.budget.name == "quick"

    def with_budget(self, name: str) -> StudyConfig:
        """The same study at another named budget."""
        return replace(self, budget=Budget.named(name))

    def identity(self) -> dict[str, Any]:
        """What two runs must share to reuse each other's stage files."""
        return {"model": self.model, "budget": self.budget.to_dict(), "seed": self.seed, "domain": self.domain,
                "probe_c": self.probe_c, "transfer": self.transfer, "donor": self.donor, "device": self.device,
                "external_sets": self.external_sets(), "judge": None if self.judge is None else self.judge.identity()}

    def external_sets(self) -> list[str]:
        """The public training sets found under ``external`` (part of the identity: they are library types)."""
        if self.external is None:
            return []
        folder = self.external / "training_datasets"
        return sorted(p.name for p in folder.glob("*.jsonl.gz")) if folder.is_dir() else []

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for results.json)."""
        return {"out": str(self.out), "progress": self.progress, "ray": self.ray, **self.identity()}
