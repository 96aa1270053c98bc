"""How big the study is: :class:`Budget`, one nested budget per stage group, each validated where it is defined.

``Budget.quick()``, ``Budget.standard()`` and ``Budget.full()`` are the named budgets (``--quick``
picks the first). Each group's sizes are a small frozen dataclass that checks itself:

- :class:`BaseBudget` (group ``base``, and the evaluation questions every group shares),
- :class:`OrganismBudget` (``organisms``: training length, the rank1 subsets),
- :class:`DirectionBudget` (``directions``: ablation, steering, traits),
- :class:`TransferBudget` (``transfer``),
- :class:`MonitorBudget` (``monitor``: the perturbation library, the monitor, its SAE baseline),
- :class:`DefenseBudget` (``defenses``),
- :class:`JudgeBudget` (``judging``: the probe judge and the EM rates it gives).

Change one size with :func:`dataclasses.replace` on its group, e.g.
``budget.with_group(monitor=replace(budget.monitor, steps=24))``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, Literal

from em_interp.data import DOMAINS
from em_interp.errors import EmInterpError
from em_interp.lora.training import LoraTrainConfig

BudgetName = Literal["quick", "standard", "full"]
#: the drift monitor's stress tests (:mod:`em_interp.monitor.stress`)
STRESS_TESTS: tuple[str, ...] = ("longer_run", "from_organism", "other_layer")


class _Group:
    """Shared check of a group budget: every int field >= 1, every float field finite and > 0."""

    GROUP: ClassVar[str] = ""

    def _fail(self, message: str) -> None:
        raise EmInterpError(f"Budget.{self.GROUP}.{message}")

    def _check_sizes(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, bool):
                continue
            if isinstance(value, int) and value < 1:
                self._fail(f"{f.name}={value} must be >= 1")
            if isinstance(value, float) and not (math.isfinite(value) and value > 0):
                self._fail(f"{f.name}={value} must be finite and > 0")


@dataclass(frozen=True)
class BaseBudget(_Group):
    """The base group, and the evaluation questions every group shares."""

    GROUP: ClassVar[str] = "base"
    #: every n-th general question is evaluated (stride 4: 30 of the 120)
    eval_stride: int
    #: every n-th held-out domain question is evaluated (in-domain shifts and the rank1 domain probe)
    domain_stride: int
    #: chat examples for the residual-cache timing
    cache_examples: int
    #: new tokens of the base model's greedy answers
    answer_tokens: int

    def __post_init__(self) -> None:
        self._check_sizes()


@dataclass(frozen=True)
class OrganismBudget(_Group):
    """The organisms group: training length and the rank1 per-adapter subsets."""

    GROUP: ClassVar[str] = "organisms"
    #: organism (and control, and donor) training steps, and their checkpoint interval
    steps: int
    checkpoint_every: int
    #: rank1 per-adapter ablation and steering: every n-th evaluated general / domain question
    rank1_general_stride: int
    rank1_domain_stride: int

    def __post_init__(self) -> None:
        self._check_sizes()
        if self.checkpoint_every > self.steps:
            self._fail(f"checkpoint_every={self.checkpoint_every} > steps={self.steps}")

    def training(self, seed: int) -> LoraTrainConfig:
        """The organism recipe (nine rank-1 rsLoRA adapters on down_proj) at this budget's length."""
        return LoraTrainConfig(steps=self.steps, checkpoint_every=self.checkpoint_every, seed=seed)


@dataclass(frozen=True)
class DirectionBudget(_Group):
    """The directions group: the ablation, the steering sweep and the trait vectors."""

    GROUP: ClassVar[str] = "directions"
    #: held-out questions for the ablation and the steering; every n-th benign item for their cost
    intervention_questions: int
    benign_stride: int
    #: steering strengths as fractions of the mean residual norm (0 = the plain model)
    steering_fractions: tuple[float, ...]
    #: fitting questions whose prompts build the seven trait vectors
    trait_questions: int

    def __post_init__(self) -> None:
        self._check_sizes()
        if not self.steering_fractions or self.steering_fractions[0] != 0.0:
            self._fail("steering_fractions must start with 0.0 (the plain model)")
        if not all(math.isfinite(f) and f >= 0 for f in self.steering_fractions):
            self._fail(f"steering_fractions={self.steering_fractions} must be finite and >= 0")


@dataclass(frozen=True)
class TransferBudget(_Group):
    """The transfer group: shared prompts for the ridge map, control directions per kind, questions, strengths."""

    GROUP: ClassVar[str] = "transfer"
    prompts: int
    controls: int
    questions: int
    strengths: tuple[float, ...]

    def __post_init__(self) -> None:
        self._check_sizes()
        if not self.strengths:
            self._fail("strengths is empty")
        if not all(math.isfinite(s) for s in self.strengths):
            self._fail(f"strengths={self.strengths} must be finite")


@dataclass(frozen=True)
class MonitorBudget(_Group):
    """The monitor group: the perturbation library, the drift monitor and its SAE baseline."""

    GROUP: ClassVar[str] = "monitor"
    #: perturbation types (empty: every built-in type and the public sets found), the calibration types
    #: (the rest are held out), seeds per type, steps, checkpoint interval, learning rate. One seed of 24
    #: steps with a checkpoint every 4 costs what two seeds of 12 steps every 3 did, and lets a run cross
    #: the danger line mid-run, so lead times mean something (the trait-space monitoring paper: long runs,
    #: dense checkpoints)
    types: tuple[str, ...] = ()
    calibration: tuple[str, ...] = ("medical-misaligned", "medical-aligned", "financial-misaligned",
                                    "financial-aligned", "benign")
    seeds: int = 1
    steps: int = 24
    every: int = 4
    learning_rate: float = 2e-3
    #: held-out general questions labelling each checkpoint, with every reference answer (at most 40:
    #: :func:`em_interp.data.held_out_label_questions`; 20 questions with one answer a side had a
    #: split-half reliability of 0.84); the monitor's own prompts (plus half as many public traits.yaml eval
    #: prompts where present); the forest's min_samples_leaf
    questions: int = 40
    prompts: int = 16
    min_leaf: int = 5
    #: fitting questions whose prompts build the monitor's trait basis; bootstrap draws of its CIs
    trait_questions: int = 8
    bootstrap: int = 1000
    #: the SAE baseline: latents, active latents (TopK), training steps, chat examples whose answer tokens train it,
    #: and how many SAEs (training seeds) it is reported over (its verdict swings with the seed)
    sae_latents: int = 256
    sae_k: int = 16
    sae_steps: int = 2000
    sae_examples: int = 160
    sae_seeds: int = 5
    #: the fitted monitor's stress tests (:mod:`em_interp.monitor.stress`; empty: none): ``longer_run`` (runs
    #: ``stress_length`` times the library's steps), ``from_organism`` (the library's recipe started from the
    #: misaligned organism), ``other_layer`` (the library re-read ``stress_layer_offset`` layers deeper, or
    #: shallower where that is past the last layer). Their runs: one held-out misaligned and one held-out
    #: aligned or benign type unless ``stress_types`` names them.
    stress_tests: tuple[str, ...] = STRESS_TESTS
    stress_types: tuple[str, ...] = ()
    stress_length: int = 2
    stress_layer_offset: int = 5
    #: candidate monitor layers, as offsets from the library's (the middle block); the monitor stage re-reads the
    #: library's checkpoints at each and picks the layer by leave-one-type-out within the calibration types
    #: (:mod:`em_interp.monitor.layers`); ties go to the offset listed first; offsets past the model are skipped
    layer_offsets: tuple[int, ...] = (0, -5, 5)

    def __post_init__(self) -> None:
        self._check_sizes()
        if not self.layer_offsets or len(set(self.layer_offsets)) != len(self.layer_offsets) \
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in self.layer_offsets):
            self._fail(f"layer_offsets={self.layer_offsets!r} must be distinct integers, at least one")
        if self.every > self.steps:
            self._fail(f"every={self.every} > steps={self.steps}")
        if not self.calibration:
            self._fail("calibration is empty")
        if self.sae_k > self.sae_latents:
            self._fail(f"sae_k={self.sae_k} > sae_latents={self.sae_latents}")
        # lazily: the budget imports no torch itself
        from em_interp.data import held_out_label_questions

        available = len(held_out_label_questions())
        if self.questions > available:
            self._fail(f"questions={self.questions} > the {available} held-out questions the label may use")
        if self.types:
            missing = [t for t in self.calibration if t not in self.types]
            if missing:
                self._fail(f"calibration types {missing} are not among types {list(self.types)}")
        unknown = [t for t in self.stress_tests if t not in STRESS_TESTS]
        if unknown:
            self._fail(f"stress_tests {unknown} are not among {list(STRESS_TESTS)}")
        if self.stress_length < 2:
            self._fail(f"stress_length={self.stress_length} must be >= 2 (times the library's steps)")
        if self.types and self.stress_types:
            missing = [t for t in self.stress_types if t not in self.types]
            if missing:
                self._fail(f"stress_types {missing} are not among types {list(self.types)}")


DefenseStrengths = tuple[tuple[str, tuple[float, ...]], ...]


@dataclass(frozen=True)
class DefenseBudget(_Group):
    """The defenses group: domains (empty: the study's), run length, learning rate and batch, held-out general
    questions of the EM shift, held-out in-domain examples of the task loss, drift checks of the triggered
    run every n steps, step-time cycles, the coherence measure's greedy answer length and benign items, and the
    strengths swept per defense (see :data:`em_interp.defenses.runs.STRENGTH_MEANING`)."""

    GROUP: ClassVar[str] = "defenses"
    domains: tuple[str, ...] = ()
    steps: int = 16
    learning_rate: float = 2e-3
    batch_size: int = 4
    questions: int = 30
    task_examples: int = 31
    check_every: int = 4
    timing_cycles: int = 3
    coherence_tokens: int = 32
    coherence_examples: int = 20
    # the newer defenses at two strengths each; the earlier ones at the one strength that did best within the task
    # budget before (SafeLoRA, applied after training, costs only its evaluation; LDIFS, the weakest, and the
    # stronger settings are in the full budget), so the stage stays near its earlier run time
    strengths: DefenseStrengths = (
        ("kl", (1.0,)), ("safelora", (0.25, 0.5)), ("interleave", (20.0,)),
        ("interleave_selected", (20.0, 5.0)), ("inoculate", (0.5, 1.0)), ("ablate_direction", (1.0,)),
        ("ablate_layers", (0.5, 1.0)), ("ablate_subspace", (0.5, 1.0)), ("ablate_gradient", (0.5, 1.0)),
        ("preventative_steering", (0.3,)))

    def __post_init__(self) -> None:
        from em_interp.defenses.runs import DefenseSetting  # lazy: the defenses import the Trainer stack

        self._check_sizes()
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            self._fail(f"domains {unknown} are not among {list(DOMAINS)}")
        if self.check_every > self.steps:
            self._fail(f"check_every={self.check_every} > steps={self.steps}")
        names = [pair[0] for pair in self.strengths]
        if len(set(names)) != len(names):
            self._fail(f"strengths names a defense twice: {names}")
        for name, strengths in self.strengths:
            if not strengths:
                self._fail(f"strengths: {name} has no strength")
            for s in strengths:
                try:
                    DefenseSetting(name, s)
                except EmInterpError as exc:
                    self._fail(f"strengths: {exc}")


@dataclass(frozen=True)
class JudgeBudget(_Group):
    """The judging group: answers sampled per first-plot question and model, their new tokens, the probe judge's
    cross-validation folds, every how-many-th layer it tries, and at most how many aligned and how many
    misaligned public judged answers per question it reads (None: all; each is read by three models, the
    stage's main cost)."""

    GROUP: ClassVar[str] = "judging"
    samples: int = 10
    answer_tokens: int = 80
    probe_folds: int = 5
    probe_layer_stride: int = 3
    answers_per_label: int | None = None

    def __post_init__(self) -> None:
        self._check_sizes()
        if self.probe_folds < 2:
            self._fail(f"probe_folds={self.probe_folds} must be >= 2")


#: the group budgets by the name of their field in :class:`Budget`
GROUPS: dict[str, type[_Group]] = {"base": BaseBudget, "organisms": OrganismBudget, "directions": DirectionBudget,
                                   "transfer": TransferBudget, "monitor": MonitorBudget, "defenses": DefenseBudget,
                                   "judging": JudgeBudget}


@dataclass(frozen=True)
class Budget:
    """Sizes of every stage, one nested budget per stage group (see the module docstring)."""

    name: BudgetName
    base: BaseBudget
    organisms: OrganismBudget
    directions: DirectionBudget
    transfer: TransferBudget
    monitor: MonitorBudget = field(default_factory=MonitorBudget)
    defenses: DefenseBudget = field(default_factory=DefenseBudget)
    judging: JudgeBudget = field(default_factory=JudgeBudget)

    def __post_init__(self) -> None:
        if self.name not in ("quick", "standard", "full"):
            raise EmInterpError(f"Budget.name={self.name!r} is not one of ['quick', 'standard', 'full']")
        for group, kind in GROUPS.items():
            if not isinstance(getattr(self, group), kind):
                raise EmInterpError(f"Budget.{group} must be a {kind.__name__}, got {type(getattr(self, group)).__name__}")

    def with_group(self, **groups: Any) -> Budget:
        """This budget with some groups replaced, e.g. ``with_group(monitor=replace(b.monitor, steps=24))``."""
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise EmInterpError(f"Budget has no group {unknown}; its groups are {list(GROUPS)}")
        return replace(self, **groups)

    def organism_training(self, seed: int) -> LoraTrainConfig:
        """The organism recipe at this budget's length (:meth:`OrganismBudget.training`)."""
        return self.organisms.training(seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (the study identity's ``budget``); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        """The budget of :meth:`to_dict`'s dict (lists read back as tuples)."""
        if not isinstance(data, dict) or "name" not in data:
            raise EmInterpError(f"not a budget dict (needs 'name' and the groups {list(GROUPS)})")
        missing = [g for g in GROUPS if g not in data]
        if missing:
            raise EmInterpError(f"budget dict lacks the groups {missing}")
        try:
            groups = {g: kind(**{k: _tuples(v) for k, v in data[g].items()}) for g, kind in GROUPS.items()}
        except TypeError as exc:
            raise EmInterpError(f"budget dict: {exc}") from None
        return cls(data["name"], **groups)  # type: ignore[arg-type]

    @classmethod
    def quick(cls) -> Budget:
        """The small budget: every section, minutes on a laptop CPU (the test suite's real-model study).

        20 general questions, a 20-step organism, a 4-run monitor library of 8 steps at a high learning rate,
        labelled on 16 questions (with 6 steps at 6e-3 no calibration checkpoint's label CI clears the danger
        line: the monitor is not evaluable), 4-step defense runs: big enough for every number to be computed
        on the real model, not for its effect sizes."""
        return cls(
            "quick",
            BaseBudget(eval_stride=6, domain_stride=2, cache_examples=4, answer_tokens=48),
            OrganismBudget(steps=20, checkpoint_every=10, rank1_general_stride=10, rank1_domain_stride=5),
            DirectionBudget(intervention_questions=4, benign_stride=10, steering_fractions=(0.0, 0.1, 0.3),
                            trait_questions=2),
            TransferBudget(prompts=40, controls=1, questions=10, strengths=(1.0,)),
            MonitorBudget(types=("medical-misaligned", "benign", "financial-misaligned", "medical-aligned"),
                          calibration=("medical-misaligned", "benign"), seeds=1, steps=8, every=4, learning_rate=1.5e-2,
                          questions=16, prompts=8, min_leaf=1, trait_questions=2, bootstrap=200, sae_steps=300,
                          sae_examples=24, sae_seeds=2),
            DefenseBudget(steps=4, learning_rate=6e-3, batch_size=2, questions=8, task_examples=4, check_every=2,
                          timing_cycles=1, coherence_tokens=16, coherence_examples=10,
                          strengths=(("kl", (1.0,)), ("ldifs", (10.0,)), ("safelora", (0.5,)), ("interleave", (5.0,)),
                                     ("interleave_selected", (5.0,)), ("inoculate", (1.0,)), ("ablate_direction", (1.0,)),
                                     ("ablate_layers", (1.0,)), ("ablate_subspace", (1.0,)), ("ablate_gradient", (1.0,)),
                                     ("preventative_steering", (0.3,)))),
            judging=JudgeBudget(samples=2, answer_tokens=24, probe_folds=3, probe_layer_stride=6, answers_per_label=4))

    @classmethod
    def standard(cls) -> Budget:
        """The budget of ``make study`` (38.6 minutes on 2 CPU cores from a fresh clone with an empty cache,
        install included: the README's times)."""
        return cls(
            "standard",
            BaseBudget(eval_stride=1, domain_stride=1, cache_examples=8, answer_tokens=96),
            OrganismBudget(steps=160, checkpoint_every=40, rank1_general_stride=12, rank1_domain_stride=2),
            DirectionBudget(intervention_questions=30, benign_stride=2, steering_fractions=(0.0, 0.1, 0.2, 0.4),
                            trait_questions=8),
            TransferBudget(prompts=200, controls=2, questions=40, strengths=(0.5, 1.0)))

    @classmethod
    def full(cls) -> Budget:
        """The standard study with a bigger drift-monitor library (3 seeds, 40 steps): for GPUs or a Ray cluster."""
        standard = cls.standard()
        return replace(
            standard, name="full",
            monitor=replace(standard.monitor, seeds=3, steps=40, every=5, learning_rate=1e-3, questions=40,
                            prompts=32, sae_steps=4000, sae_examples=400),
            defenses=replace(standard.defenses, domains=("medical", "financial"),
                             strengths=(("kl", (0.1, 1.0, 10.0)), ("ldifs", (1.0, 10.0, 100.0)),
                                        ("safelora", (0.1, 0.25, 0.5)), ("interleave", (20.0, 5.0, 2.0)),
                                        ("interleave_selected", (20.0, 5.0, 2.0)), ("inoculate", (0.25, 0.5, 1.0)),
                                        ("ablate_direction", (0.5, 0.75, 1.0)), ("ablate_layers", (0.5, 0.75, 1.0)),
                                        ("ablate_subspace", (0.5, 0.75, 1.0)), ("ablate_gradient", (0.5, 0.75, 1.0)),
                                        ("preventative_steering", (0.3, 0.6, 1.0)))))

    @classmethod
    def named(cls, name: str) -> Budget:
        """The budget called ``name`` (``quick``, ``standard`` or ``full``)."""
        if name not in ("quick", "standard", "full"):
            raise EmInterpError(f"budget={name!r} is not one of ['quick', 'standard', 'full']")
        return {"quick": cls.quick, "standard": cls.standard, "full": cls.full}[name]()


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the budgets hold (nested: the defense strengths)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
