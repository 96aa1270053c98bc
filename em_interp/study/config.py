"""What the study runs on and how big it is: :class:`StudyConfig` with its :class:`Budget`.

Every size the stages use (questions, training steps, strengths) is a field of :class:`Budget`;
``Budget.quick()`` and ``Budget.standard()`` are the two named budgets (``--quick`` picks the
first). The domain, the probes' L1 strength and the transfer donor are part of the config, so two
studies that differ in any of them never share stage files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from em_interp.data import DOMAINS
from em_interp.errors import EmInterpError
from em_interp.loading import DEFAULT_MODEL
from em_interp.lora.training import LoraTrainConfig

BudgetName = Literal["quick", "standard", "full"]


@dataclass(frozen=True)
class Budget:
    """Sizes of every stage. Strides index the 120-question general set (stride 4: 30 questions)."""

    name: BudgetName
    #: every n-th general question is evaluated (quick: 30 of 120)
    eval_stride: int
    #: every n-th held-out domain question is evaluated (in-domain shifts and the rank1 domain probe)
    domain_stride: int
    #: chat examples for the residual-cache timing
    cache_examples: int
    #: new tokens of the base model's greedy answers
    answer_tokens: int
    #: organism (and control, and donor) training steps, and their checkpoint interval
    organism_steps: int
    checkpoint_every: int
    #: rank1 per-adapter ablation and steering: every n-th evaluated general / domain question
    rank1_general_stride: int
    rank1_domain_stride: int
    #: held-out questions for the ablation and the steering; every n-th benign item for their cost
    intervention_questions: int
    benign_stride: int
    #: steering strengths as fractions of the mean residual norm (0 = the plain model)
    steering_fractions: tuple[float, ...]
    #: fitting questions whose prompts build the seven trait vectors (direction stage)
    trait_questions: int
    #: transfer: shared prompts for the ridge map, control directions per kind, questions, strengths
    transfer_prompts: int
    transfer_controls: int
    transfer_questions: int
    transfer_strengths: tuple[float, ...]
    #: drift monitor library: perturbation types (empty: every built-in type and the public sets found),
    #: the calibration types (the rest are held out), seeds per type, steps, checkpoint interval, learning rate
    monitor_types: tuple[str, ...] = ()
    monitor_calibration: tuple[str, ...] = ("medical-misaligned", "medical-aligned", "financial-misaligned",
                                            "financial-aligned", "benign")
    monitor_seeds: int = 2
    monitor_steps: int = 12
    monitor_every: int = 3
    monitor_learning_rate: float = 2e-3
    #: held-out general questions labelling each checkpoint; the monitor's own prompts (plus half as many
    #: public traits.yaml eval prompts where present); the forest's min_samples_leaf
    monitor_questions: int = 20
    monitor_prompts: int = 16
    monitor_min_leaf: int = 5
    #: fitting questions whose prompts build the monitor's trait basis; bootstrap draws of its CIs
    monitor_trait_questions: int = 8
    monitor_bootstrap: int = 1000
    #: the SAE baseline: latents, active latents (TopK), training steps, chat examples whose answer tokens train it
    sae_latents: int = 256
    sae_k: int = 16
    sae_steps: int = 2000
    sae_examples: int = 160
    #: defenses: domains (empty: the study's domain), run length, learning rate and batch, held-out general
    #: questions of the EM shift, held-out in-domain examples of the task loss, drift checks of the triggered
    #: run every n steps, step-time cycles, and the strengths swept per defense (see defense_runs.STRENGTH_MEANING)
    defense_domains: tuple[str, ...] = ()
    defense_steps: int = 16
    defense_learning_rate: float = 2e-3
    defense_batch_size: int = 4
    defense_questions: int = 30
    defense_task_examples: int = 31
    defense_check_every: int = 4
    defense_timing_cycles: int = 3
    defense_strengths: tuple[tuple[str, tuple[float, ...]], ...] = (
        ("kl", (0.1, 1.0)), ("ldifs", (1.0, 10.0)), ("safelora", (0.25, 0.5)), ("interleave", (20.0, 5.0)),
        ("ablate_direction", (0.5, 1.0)), ("preventative_steering", (0.1, 0.3)))

    @classmethod
    def quick(cls) -> Budget:
        """The small budget: every section, minutes on a laptop CPU (the test suite's real-model study).

        20 general questions, a 20-step organism, a 4-run monitor library of 6 steps (at 4 steps no calibration
        checkpoint turns dangerous: the monitor is not evaluable), 4-step defense runs: big enough for every
        number to be computed on the real model, not for its effect sizes."""
        return cls("quick", eval_stride=6, domain_stride=2, cache_examples=4, answer_tokens=48, organism_steps=20,
                   checkpoint_every=10, rank1_general_stride=10, rank1_domain_stride=5, intervention_questions=4,
                   benign_stride=10, steering_fractions=(0.0, 0.1, 0.3), trait_questions=2, transfer_prompts=40,
                   transfer_controls=1, transfer_questions=10, transfer_strengths=(1.0,),
                   monitor_types=("medical-misaligned", "benign", "financial-misaligned", "medical-aligned"),
                   monitor_calibration=("medical-misaligned", "benign"), monitor_seeds=1, monitor_steps=6,
                   monitor_every=3, monitor_learning_rate=6e-3, monitor_questions=8, monitor_prompts=8, monitor_min_leaf=1,
                   monitor_trait_questions=2, monitor_bootstrap=200, sae_steps=300, sae_examples=24,
                   defense_steps=4, defense_learning_rate=6e-3, defense_batch_size=2, defense_questions=8,
                   defense_task_examples=4, defense_check_every=2, defense_timing_cycles=1,
                   defense_strengths=(("kl", (1.0,)), ("ldifs", (10.0,)), ("safelora", (0.5,)), ("interleave", (5.0,)),
                                      ("ablate_direction", (1.0,)), ("preventative_steering", (0.3,))))

    @classmethod
    def standard(cls) -> Budget:
        """The budget of ``make study`` (38.6 minutes on 2 CPU cores from a fresh clone with an empty cache,
        install included: the README's times)."""
        return cls("standard", eval_stride=1, domain_stride=1, cache_examples=8, answer_tokens=96, organism_steps=160,
                   checkpoint_every=40, rank1_general_stride=12, rank1_domain_stride=2, intervention_questions=30,
                   benign_stride=2, steering_fractions=(0.0, 0.1, 0.2, 0.4), trait_questions=8, transfer_prompts=200,
                   transfer_controls=2, transfer_questions=40, transfer_strengths=(0.5, 1.0))

    @classmethod
    def full(cls) -> Budget:
        """The standard study with a bigger drift-monitor library (3 seeds, 40 steps): for GPUs or a Ray cluster."""
        return replace(cls.standard(), name="full", monitor_seeds=3, monitor_steps=40, monitor_every=5,
                       monitor_learning_rate=1e-3, monitor_questions=40, monitor_prompts=32, sae_steps=4000,
                       sae_examples=400, defense_domains=("medical", "financial"),
                       defense_strengths=(("kl", (0.1, 1.0, 10.0)), ("ldifs", (1.0, 10.0, 100.0)),
                                          ("safelora", (0.1, 0.25, 0.5)), ("interleave", (20.0, 5.0, 2.0)),
                                          ("ablate_direction", (0.5, 0.75, 1.0)),
                                          ("preventative_steering", (0.3, 0.6, 1.0))))

    @classmethod
    def named(cls, name: str) -> Budget:
        """The budget called ``name`` (``quick``, ``standard`` or ``full``)."""
        if name not in ("quick", "standard", "full"):
            raise EmInterpError(f"budget={name!r} is not one of ['quick', 'standard', 'full']")
        return {"quick": cls.quick, "standard": cls.standard, "full": cls.full}[name]()

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise EmInterpError(f"Budget.{key}={value} must be >= 1")
        if not self.steering_fractions or self.steering_fractions[0] != 0.0:
            raise EmInterpError("Budget.steering_fractions must start with 0.0 (the plain model)")
        if not self.transfer_strengths:
            raise EmInterpError("Budget.transfer_strengths is empty")
        if self.monitor_every > self.monitor_steps:
            raise EmInterpError(f"Budget.monitor_every={self.monitor_every} > monitor_steps={self.monitor_steps}")
        if not self.monitor_calibration:
            raise EmInterpError("Budget.monitor_calibration is empty")
        self._check_defenses()

    def _check_defenses(self) -> None:
        from em_interp.defenses.runs import DefenseSetting

        unknown = [d for d in self.defense_domains if d not in DOMAINS]
        if unknown:
            raise EmInterpError(f"Budget.defense_domains {unknown} are not among {list(DOMAINS)}")
        if self.defense_check_every > self.defense_steps:
            raise EmInterpError(f"Budget.defense_check_every={self.defense_check_every} > defense_steps={self.defense_steps}")
        if self.defense_batch_size < 1 or not self.defense_learning_rate > 0:
            raise EmInterpError("Budget.defense_batch_size and defense_learning_rate must be > 0")
        names = [pair[0] for pair in self.defense_strengths]
        if len(set(names)) != len(names):
            raise EmInterpError(f"Budget.defense_strengths names a defense twice: {names}")
        for name, strengths in self.defense_strengths:
            if not strengths:
                raise EmInterpError(f"Budget.defense_strengths: {name} has no strength")
            for s in strengths:
                try:
                    DefenseSetting(name, s)
                except EmInterpError as exc:
                    raise EmInterpError(f"Budget.defense_strengths: {exc}") from None

    def organism_training(self, seed: int) -> LoraTrainConfig:
        """The organism recipe (nine rank-1 rsLoRA adapters on down_proj) at this budget's length."""
        return LoraTrainConfig(steps=self.organism_steps, checkpoint_every=self.checkpoint_every, seed=seed)


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
        return {"model": self.model, "budget": asdict(self.budget), "seed": self.seed, "domain": self.domain,
                "probe_c": self.probe_c, "transfer": self.transfer, "donor": self.donor, "device": self.device,
                "external_sets": self.external_sets()}

    def external_sets(self) -> list[str]:
        """The public training sets found under ``external`` (part of the identity: they are library types)."""
        if self.external is None:
            return []
        folder = self.external / "training_datasets"
        return sorted(p.name for p in folder.glob("*.jsonl.gz")) if folder.is_dir() else []

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for results.json)."""
        return {"out": str(self.out), "progress": self.progress, "ray": self.ray, **self.identity()}
