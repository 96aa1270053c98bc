"""One vocabulary across the API: exported verbs, one error family, checked option strings, one parser."""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

import pytest
import torch

import em_interp
from em_interp import EmInterpError, options
from em_interp.lora.adapters import parse_module_name

PACKAGE = Path(em_interp.__file__).parent


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_core_verbs_are_importable_from_the_package():
    for name in ("load_model", "cache_residuals", "diff_of_means", "em_score", "paired_shift", "train_organism",
                 "train_lora", "ablate", "ablate_weights", "steer", "adapter_scalars", "trait_vectors", "run_study",
                 "random_directions", "orthogonal_directions", "shuffled_label_directions", "benign_loglik"):
        assert callable(getattr(em_interp, name)), name
    assert set(em_interp.__all__) <= set(dir(em_interp))


def test_the_top_level_is_curated_lazy_and_typed():
    """About 30 names, each resolving to its module's object; the TYPE_CHECKING imports list the same names;
    ``import em_interp`` imports neither torch nor the Trainer stack; names moved off the top level warn."""
    import subprocess
    import sys

    names = set(em_interp.__all__) - {"__version__", "EmInterpError"}
    assert 25 <= len(em_interp.__all__) <= 40
    for name in names:
        module = __import__(em_interp._PUBLIC[name], fromlist=["_"])
        assert getattr(em_interp, name) is getattr(module, name), name
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    typed = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.If)
             for stmt in node.body if isinstance(stmt, ast.ImportFrom) for a in stmt.names}
    assert typed == names
    code = ("import sys, em_interp; heavy = [m for m in ('torch', 'transformers', 'peft', 'transformer_lens') "
            "if m in sys.modules]; print(heavy)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    for name in em_interp._MOVED:
        with pytest.warns(DeprecationWarning, match=f"import it from {em_interp._MOVED[name]}"):
            getattr(em_interp, name)
    assert em_interp.defenses.KLDefense.__name__ == "KLDefense"  # subpackages load on attribute access
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        em_interp.nope  # noqa: B018


def test_every_exception_class_is_an_eminterp_error():
    for path in _modules():
        tree = ast.parse(path.read_text())
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception")) for b in node.bases):
                cls = getattr(__import__(module, fromlist=["_"]), node.name)
                assert issubclass(cls, EmInterpError), f"{module}.{node.name}"
            if isinstance(node, ast.ClassDef) and node.name in ("JudgeUnavailable", "MalformedReply"):
                cls = getattr(__import__(module, fromlist=["_"]), node.name)
                assert issubclass(cls, EmInterpError), f"{module}.{node.name}"


def test_no_assert_for_control_flow():
    found = [f"{p.relative_to(PACKAGE)}:{n.lineno}" for p in _modules() for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Assert)]
    assert found == []


def test_raised_builtin_errors_are_only_internal():
    """``raise ValueError(...)`` etc. may only appear where the same function turns it into an EmInterpError."""
    allowed = {("io.py", "TypeError"), ("judges.py", "ValueError")}  # json's default() contract; re-raised as MalformedReply
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                name = node.exc.func.id
                if name in ("ValueError", "TypeError", "KeyError", "RuntimeError", "FileExistsError", "IndexError"):
                    assert (path.name, name) in allowed, f"{path.relative_to(PACKAGE)}:{node.lineno} raises {name}"


@pytest.mark.parametrize(("call", "argument"), [
    (lambda m: em_interp.cache_residuals(m, [em_interp.ChatExample("q", "a")], reduction="mean"), "reduction='mean'"),
    (lambda m: em_interp.cache_residuals(m, [em_interp.ChatExample("q", "a")], hook="resid"), "hook='resid'"),
    (lambda m: m.hook_name(0, "resid"), "hook='resid'"),
    (lambda m: em_interp.steer(m, em_interp.Direction(torch.ones(m.d_model), 0), 1.0, where="everywhere").__enter__(),
     "where='everywhere'"),
])
def test_option_strings_are_checked_once_and_named(tiny_models, call, argument):
    with pytest.raises(EmInterpError, match=argument.replace("(", r"\(")):
        call(tiny_models["llama"])


def test_option_parameters_are_literal_types():
    hints = typing.get_type_hints(em_interp.cache_residuals)
    assert typing.get_args(hints["reduction"]) == options.REDUCTIONS
    assert typing.get_args(hints["hook"]) == options.HOOKS
    steer_hints = typing.get_type_hints(inspect.unwrap(em_interp.steer))
    assert typing.get_args(steer_hints["where"]) == options.WHERE


@pytest.mark.parametrize(("name", "expected"), [
    ("base_model.model.model.layers.9.mlp.down_proj.lora_B.weight", (9, "mlp", "down_proj", "lora_B")),
    ("model.layers.12.self_attn.o_proj.lora_A.default.weight", (12, "self_attn", "o_proj", "lora_A")),
    ("model.layers.3.mlp.down_proj.base_layer.weight", (3, "mlp", "down_proj", "base_layer")),
    ("model.layers.3.mlp.down_proj.weight", (3, "mlp", "down_proj", None)),
    ("base_model.model.model.layers.30.mlp.down_proj", (30, "mlp", "down_proj", None)),
    ("model.embed_tokens.weight", None),
    ("model.layers.3.input_layernorm.weight", None),
])
def test_one_parser_of_lora_module_names(name, expected):
    parsed = parse_module_name(name)
    assert (None if parsed is None else (parsed.layer, parsed.block, parsed.module, parsed.part)) == expected


def test_no_other_module_parses_layer_names():
    for path in _modules():
        if path.name == "adapters.py":
            continue
        assert r"layers\.(\d+)" not in path.read_text(), path


def test_negative_layers_mean_the_same_everywhere(tiny_models):
    model = tiny_models["llama"]
    examples = [em_interp.ChatExample("What is the capital of France?", "Paris.")]
    cache = em_interp.cache_residuals(model, examples, layers=[-1])
    assert cache.layers == [model.n_layers - 1]
    assert em_interp.__name__ and cache[-1] is cache[model.n_layers - 1]
    assert model.hook_name(-1) == model.hook_name(model.n_layers - 1)
    d = em_interp.Direction(cache[-1][0], -1, model=model.name)
    with em_interp.steer(model, d, 1.0):
        last = model.forward(model.tokenize(examples[0]).input_ids[None])
    with em_interp.steer(model, d, 1.0, layer=model.n_layers - 1):
        same = model.forward(model.tokenize(examples[0]).input_ids[None])
    assert (last == same).all()


OLD_PATHS = {"adapters": "lora.adapters", "training": "lora.training", "hf_trainer": "lora.hf_trainer",
             "organisms": "lora.organisms", "rank1": "lora.rank1", "generation": "evaluation.generation",
             "judges": "evaluation.judges", "drift": "monitor.drift", "perturbations": "monitor.perturbations",
             "detection": "monitor.detection", "monitor_evaluation": "monitor.scoring", "sae": "monitor.sae",
             "sweep": "monitor.sweep", "defense_runs": "defenses.runs"}


def test_old_module_paths_still_import_with_a_deprecation_warning():
    import importlib
    import sys
    import warnings

    for old, new in OLD_PATHS.items():
        sys.modules.pop(f"em_interp.{old}", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shim = importlib.import_module(f"em_interp.{old}")
        assert any(issubclass(w.category, DeprecationWarning) and f"em_interp.{new}" in str(w.message) for w in caught), old
        target = importlib.import_module(f"em_interp.{new}")
        public = [n for n in vars(target) if not n.startswith("_") and getattr(target, n).__class__.__module__ != "module"]
        assert all(getattr(shim, n) is getattr(target, n) for n in public if hasattr(shim, n)), old
    # the packages that replaced modules keep their public names importable without a warning
    from em_interp.defenses import AblateDirection, KLDefense, safelora  # noqa: F401
    from em_interp.evaluation import em_score, score_questions  # noqa: F401
    from em_interp.monitor import DriftMonitor, MonitorCallback  # noqa: F401


def test_feature_subpackages_import_first_in_a_fresh_interpreter_without_deprecated_paths():
    import subprocess
    import sys

    # imported first, each pulls in the others it needs: no circular import, no internal use of an old path
    # (the three interpreters run at once: each spends its seconds importing torch)
    names = ("em_interp.lora", "em_interp.monitor", "em_interp.defenses.runs")
    procs = [subprocess.Popen([sys.executable, "-W", "error::DeprecationWarning", "-c", f"import {name}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
    for name, proc in zip(names, procs):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-2000:])


def test_the_runner_and_the_stages_share_a_contract_and_do_not_import_each_other():
    import ast
    from pathlib import Path

    study = Path(__file__).resolve().parents[1] / "em_interp" / "study"

    def imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        return {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert not {m for m in imports(study / "runner.py") if m.startswith("em_interp.study.stages")}
    assert not {m for m in imports(study / "contract.py") if m.startswith(("em_interp.study.stages", "em_interp.study.runner"))}
    for stage_module in (study / "stages").glob("*.py"):
        assert "em_interp.study.runner" not in imports(stage_module), stage_module.name


def test_unit_tests_check_array_shapes_at_run_time(pytestconfig):
    """`make test` and `make test-unit` run the tiny-model tests under jaxtyping's import hook (tests/shapes.py):
    a width that disagrees between two arguments fails in the call; without the option this test skips."""
    makefile = (PACKAGE.parent / "Makefile").read_text()
    assert "SHAPES := --jaxtyping-packages=em_interp,tests.shapes.shape_checked" in makefile
    assert makefile.count("$(SHAPES)") == 2  # make test's tiny-model run and make test-unit
    if not pytestconfig.getoption("jaxtyping_packages", None):
        pytest.skip("run without --jaxtyping-packages")
    import jaxtyping

    from em_interp.directions import diff_of_means, separation

    with pytest.raises(jaxtyping.TypeCheckError, match="negative"):
        diff_of_means(torch.randn(3, 4), torch.randn(2, 5))
    with pytest.raises(jaxtyping.TypeCheckError, match="direction"):
        separation(torch.randn(5), torch.randn(3, 4), torch.randn(2, 4))
    assert diff_of_means(torch.randn(3, 4), torch.randn(2, 4)).shape == (4,)  # rows may differ, widths may not
