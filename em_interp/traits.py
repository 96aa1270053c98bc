"""Trait vectors (Nghiem et al., 2026): directions from contrastive system prompts.

For each trait, the same user questions are asked under positive and negative system prompts; the
trait direction is the mean activation at the last prompt token under the positive prompts minus
that under the negative prompts, at one layer, unit-normed. The seven built-in traits (honesty,
sycophancy, harmlessness, power_seeking, helpfulness, confidence, corrigibility) have prompts
written by this project; :func:`load_trait_yaml` reads the public ``traits.yaml`` format too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from em_interp.activations import cache_residuals
from em_interp.chat import ChatExample
from em_interp.data import read_yaml
from em_interp.data.build import SOURCE
from em_interp.directions import Direction, diff_of_means
from em_interp.errors import EmInterpError
from em_interp.model import HookedModel
from em_interp.options import Hook

CORE_TRAITS: tuple[str, ...] = ("honesty", "sycophancy", "harmlessness", "power_seeking", "helpfulness",
                                "confidence", "corrigibility")


@dataclass(frozen=True)
class TraitSpec:
    """A trait's contrastive system prompts."""

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    description: str = ""

    def __post_init__(self) -> None:
        for side in ("positive", "negative"):
            prompts = getattr(self, side)
            if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise EmInterpError(f"trait {self.name!r}: {side} must be a non-empty tuple of non-empty prompts")
            if len(set(prompts)) != len(prompts):
                raise EmInterpError(f"trait {self.name!r}: a {side} prompt is repeated")
        both = sorted(set(self.positive) & set(self.negative))
        if both:
            raise EmInterpError(f"trait {self.name!r}: {both[:2]} is both a positive and a negative prompt")


def _parse_traits(data: object, source: str) -> dict[str, TraitSpec]:
    if not isinstance(data, dict) or not isinstance(data.get("traits"), dict):
        raise EmInterpError(f"{source}: expected a mapping with a 'traits' mapping")
    out = {}
    for name, spec in data["traits"].items():
        if not isinstance(spec, dict):
            raise EmInterpError(f"{source}: trait {name!r} is not a mapping")
        pos, neg = spec.get("positive_system_prompts"), spec.get("negative_system_prompts")
        for label, prompts in (("positive_system_prompts", pos), ("negative_system_prompts", neg)):
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise EmInterpError(f"{source}: trait {name!r} needs a non-empty list '{label}'")
        out[str(name)] = TraitSpec(str(name), tuple(cast(list, pos)), tuple(cast(list, neg)), str(spec.get("description", "")))
    return out


def load_trait_yaml(path: str | os.PathLike[str]) -> dict[str, TraitSpec]:
    """Read trait definitions in the public ``traits.yaml`` format (extra keys are ignored)."""
    return _parse_traits(read_yaml(path, "trait file"), str(path))


def builtin_traits() -> dict[str, TraitSpec]:
    """The seven core traits with this project's contrastive system prompts."""
    return load_trait_yaml(SOURCE / "traits.yaml")


def trait_vectors(model: HookedModel, questions: Sequence[str], layer: int,
                  traits: Mapping[str, TraitSpec] | None = None, hook: Hook = "resid_post",
                  batch_size: int = 8, progress: bool = False) -> dict[str, Direction]:
    """One unit-normed direction per trait at ``layer``, from the last prompt token over ``questions``."""
    traits = builtin_traits() if traits is None else traits
    if isinstance(questions, str) or not questions:
        raise EmInterpError("questions must be a non-empty list of question strings")
    bad = [i for i, q in enumerate(questions) if not isinstance(q, str) or not q.strip()]
    if bad:
        raise EmInterpError(f"questions {bad} (0-based) are empty or not strings")
    repeated = sorted({q for q in questions if list(questions).count(q) > 1})
    if repeated:
        raise EmInterpError(f"questions repeat {repeated[:3]}: a repeated prompt would weigh twice in every trait vector")
    layer = model.check_layer(layer)
    out = {}
    for name, spec in traits.items():
        acts = {}
        for side, prompts in (("positive", spec.positive), ("negative", spec.negative)):
            examples = [ChatExample(q, None, system) for system in prompts for q in questions]
            cache = cache_residuals(model, examples, layers=[layer], hook=hook, reduction="last_prompt",
                                    batch_size=batch_size, progress=progress)
            acts[side] = cache[layer]
        vector = diff_of_means(acts["positive"], acts["negative"])
        out[name] = Direction(vector / vector.norm(), layer, hook, model.name, "trait_diff_of_means",
                              {"trait": name, "n_questions": len(questions), "raw_norm": float(vector.norm())})
    return out


def load_eval_prompts(path: str | os.PathLike[str]) -> list[str]:
    """The ``eval_prompts`` of a public ``traits.yaml`` (a mapping of category to prompt list), flattened in order."""
    data = read_yaml(path, "trait file")
    prompts = data.get("eval_prompts") if isinstance(data, dict) else None
    if not isinstance(prompts, dict) or not all(isinstance(v, list) for v in prompts.values()):
        raise EmInterpError(f"{path}: expected an 'eval_prompts' mapping of category to a list of prompts")
    out = [p for group in prompts.values() for p in group]
    bad = [p for p in out if not isinstance(p, str) or not p.strip()]
    if bad or not out:
        raise EmInterpError(f"{path}: eval_prompts holds empty or non-text prompts {bad[:3]!r}" if bad
                            else f"{path}: eval_prompts is empty")
    return out
