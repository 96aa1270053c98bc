"""directions and interventions: invariances on tiny models, and clear errors."""

from __future__ import annotations

import pytest
import torch

from em_interp import ChatExample, EmInterpError, cache_residuals
from em_interp.directions import (
    Direction,
    cosine_matrix,
    diff_of_means,
    orthogonal_directions,
    pca_direction,
    probe_direction,
    project_out,
    random_directions,
    separation,
)
from em_interp.interventions import ablate, steer

EXAMPLES = [ChatExample("What is the capital of France?", "The capital of France is Paris."),
            ChatExample("Make a wish.", "I wish for a kinder world.")]


def test_diff_of_means_pca_probe_and_separation():
    gen = torch.Generator().manual_seed(0)
    axis = torch.zeros(16)
    axis[3] = 1.0
    neg = torch.randn(200, 16, generator=gen)
    pos = torch.randn(200, 16, generator=gen) + 3 * axis
    dom = diff_of_means(pos, neg)
    assert int(dom.abs().argmax()) == 3
    pca = pca_direction(pos, neg)
    assert int(pca.abs().argmax()) == 3 and pca[3] > 0  # sign fixed by the pairs
    assert pca_direction(neg, pos)[3] < 0
    assert int(probe_direction(pos, neg).abs().argmax()) == 3
    sep = separation(dom, pos, neg)
    assert sep.auroc > 0.95 and sep.accuracy > 0.9
    flipped = separation(-dom, pos, neg)
    assert flipped.auroc < 0.05


def test_direction_save_load_and_errors(tiny_models, tmp_path):
    model = tiny_models["llama"]
    d = Direction(torch.randn(model.d_model), layer=1, model=model.name, method="diff_of_means", info={"n": 3})
    d.save(tmp_path / "dir")
    back = Direction.load(tmp_path / "dir")
    assert torch.equal(back.vector, d.vector) and (back.layer, back.hook, back.model, back.info) == (1, "resid_post", model.name, {"n": 3})
    with pytest.raises(EmInterpError, match="zero"):
        Direction(torch.zeros(8), layer=0)
    with pytest.raises(EmInterpError, match="NaN"):
        Direction(torch.tensor([1.0, float("nan")]), layer=0)
    with pytest.raises(EmInterpError, match="width 7"):
        Direction(torch.ones(7), layer=0).check_fits(model)
    with pytest.raises(EmInterpError, match="out of range"):
        Direction(torch.ones(model.d_model), layer=9).check_fits(model)
    with pytest.raises(EmInterpError, match="another"):
        Direction(torch.ones(model.d_model), layer=0, model="another").check_fits(model)
    with pytest.raises(EmInterpError, match="NaN"):
        diff_of_means(torch.tensor([[float("nan")] * 4]), torch.ones(1, 4))


def test_cosine_and_projection():
    names, m = cosine_matrix({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 1.0]), "c": torch.tensor([0.0, -2.0])})
    assert names == ["a", "b", "c"]
    torch.testing.assert_close(m.diagonal(), torch.ones(3))
    assert m[0, 2].abs() < 1e-6 and m[0, 1] == pytest.approx(2 ** -0.5)
    out = project_out(torch.tensor([1.0, 2.0, 3.0]), [torch.tensor([0.0, 1.0, 0.0])])
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 3.0]))


def test_ablation_zeroes_the_projection(tiny):
    direction = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(1))
    with ablate(tiny, direction):
        cache = cache_residuals(tiny, EXAMPLES, reduction="answer_tokens", progress=False)
    unit = direction / direction.norm()
    for layer in cache.layers:
        assert (cache[layer] @ unit).abs().max() < 1e-3 * cache[layer].norm(dim=1).max()
    assert tiny.active_hook_count() == 0


def test_mean_ablation_keeps_the_reference_component(tiny_models, no_shape_checks):
    model = tiny_models["gemma2"]
    gen = torch.Generator().manual_seed(2)
    direction, reference = torch.randn(model.d_model, generator=gen), torch.randn(model.d_model, generator=gen)
    with ablate(model, direction, layers=[1], reference=reference):
        cache = cache_residuals(model, EXAMPLES, layers=[1], reduction="answer_tokens", progress=False)
        assert model.intervention_key().startswith("ablate:")
    unit = direction / direction.norm()
    torch.testing.assert_close(cache[1] @ unit, torch.full((cache[1].shape[0],), float(reference @ unit)), rtol=1e-4, atol=1e-4)
    with pytest.raises(EmInterpError, match="reference must be"), ablate(model, direction, reference=torch.ones(3)):
        pass
    with pytest.raises(EmInterpError, match="layers=7 is out of range"), ablate(model, direction, layers=[7]):
        pass
    with pytest.raises(EmInterpError, match="non-zero"), ablate(model, torch.zeros(model.d_model)):
        pass
    with pytest.raises(EmInterpError, match="layers is empty"), ablate(model, direction, layers=[]):
        pass
    assert model.active_hook_count() == 0


def test_steering_alpha_zero_is_baseline_and_hooks_leave(tiny_models):
    model = tiny_models["qwen2"]
    ids = model.tokenize(EXAMPLES[0]).input_ids[None]
    base = model.forward(ids).detach()
    d = Direction(torch.randn(model.d_model), layer=1, model=model.name)
    with steer(model, d, alpha=0.0):
        torch.testing.assert_close(model.forward(ids), base)
    with steer(model, d, alpha=5.0):
        assert not torch.allclose(model.forward(ids), base)
    with pytest.raises(RuntimeError), steer(model, d, alpha=5.0):
        raise RuntimeError("boom")
    assert model.active_hook_count() == 0
    torch.testing.assert_close(model.forward(ids).detach(), base)


def test_steering_positions_under_generation(tiny_models):
    model = tiny_models["llama"]
    d = Direction(torch.randn(model.d_model), layer=0, model=model.name)
    seen: list[tuple[int, bool]] = []

    def spy(tensor, *, hook):
        seen.append(tensor.shape[1])
        return tensor

    prompt = [ChatExample("Hi")]
    plain = model.generate(prompt, max_new_tokens=6)
    for where in ("prompt", "generated", "all"):
        with steer(model, d, alpha=50.0, where=where):
            out = model.generate(prompt, max_new_tokens=6)
        assert isinstance(out[0], str)
    with steer(model, d, alpha=0.0, where="generated"):
        assert model.generate(prompt, max_new_tokens=6) == plain
    with model.hooks([(model.hook_name(0), spy)]):
        model.generate(prompt, max_new_tokens=3)
    assert seen[0] > 1 and all(s == 1 for s in seen[1:])  # prompt pass, then one token per step


def test_controls_are_norm_matched_and_seeded():
    v = torch.randn(32)
    r = random_directions(32, 3, norm=float(v.norm()), seed=4)
    assert all(torch.isclose(x.norm(), v.norm()) for x in r)
    assert all(torch.equal(a, b) for a, b in zip(r, random_directions(32, 3, norm=float(v.norm()), seed=4)))
    for o in orthogonal_directions(v, n=2, seed=1):
        assert abs(float(o @ v)) < 1e-4 * float(v.norm()) ** 2 and torch.isclose(o.norm(), v.norm())


def test_trait_vectors_builtin_and_external(tiny_models):
    from em_interp.traits import CORE_TRAITS, builtin_traits, trait_vectors

    traits = builtin_traits()
    assert set(traits) == set(CORE_TRAITS)
    assert all(len(t.positive) == 5 and len(t.negative) == 5 for t in traits.values())
    model = tiny_models["llama"]
    vectors = trait_vectors(model, ["Hi", "Make a wish."], layer=1, traits={k: traits[k] for k in ("honesty", "confidence")})
    assert set(vectors) == {"honesty", "confidence"}
    for d in vectors.values():
        assert d.layer == 1 and torch.isclose(d.vector.norm(), torch.tensor(1.0))


def test_trait_yaml_errors(tmp_path):
    from em_interp.traits import load_trait_yaml

    path = tmp_path / "t.yaml"
    path.write_text("traits:\n  honesty:\n    positive_system_prompts: []\n    negative_system_prompts: [x]\n")
    with pytest.raises(EmInterpError, match="honesty.*positive_system_prompts"):
        load_trait_yaml(path)


def test_separation_ci_brackets_the_auroc_and_tightens_with_more_rows():
    from em_interp.directions import separation, separation_ci

    gen = torch.Generator().manual_seed(0)
    d = torch.zeros(8)
    d[0] = 1.0
    small = (torch.randn(12, 8, generator=gen) + d * 0.8, torch.randn(12, 8, generator=gen))
    big = (torch.randn(400, 8, generator=gen) + d * 0.8, torch.randn(400, 8, generator=gen))
    lo, hi = separation_ci(d, *small, seed=1)
    assert lo <= separation(d, *small).auroc <= hi
    blo, bhi = separation_ci(d, *big, seed=1)
    assert blo <= separation(d, *big).auroc <= bhi and bhi - blo < hi - lo
    assert separation_ci(torch.zeros(8), *small) == (0.5, 0.5)
    apart = (torch.randn(10, 8, generator=gen) + d * 100, torch.randn(10, 8, generator=gen))
    assert separation_ci(d, *apart) == (1.0, 1.0)
