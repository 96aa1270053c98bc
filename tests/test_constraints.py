"""The constraints tool: wrong interpreter/platform and version drift are clear errors naming both sides."""

from __future__ import annotations

import importlib.util
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("constraints_tool", ROOT / "tools" / "constraints.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def test_repository_constraints_match_this_interpreter_and_pin_the_core():
    header, pins = tool.read(ROOT / "constraints.txt")
    assert header is not None
    for name in ("torch", "transformers", "transformer-lens", "peft", "sae-lens", "numpy"):
        assert name in pins


def test_other_interpreter_or_platform_is_named(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("# python: 3.9 | platform: windows-AMD64\nnumpy==1.0\n")
    problems = tool.check_platform(path)
    python, plat = tool.this_interpreter()
    assert any("Python 3.9" in p and f"Python {python}" in p for p in problems)
    assert any("windows-AMD64" in p and plat in p for p in problems)
    assert tool.main(["check-platform", str(path)]) == 1
    path.write_text("numpy==1.0\n")
    assert "no '# python" in tool.check_platform(path)[0]


def test_version_drift_names_package_and_versions(tmp_path):
    path = tmp_path / "c.txt"
    python, plat = tool.this_interpreter()
    installed = version("numpy")
    path.write_text(f"# python: {python} | platform: {plat}\nnumpy==0.0.1\nno-such-dist-xyz==1.0\npytest=={version('pytest')}\n")
    problems = tool.check_installed(path)
    assert any(p.startswith("numpy:") and "0.0.1" in p and installed in p for p in problems)
    assert any(p.startswith("no-such-dist-xyz:") and "not installed" in p for p in problems)
    assert not any(p.startswith("pytest") for p in problems)
    path.write_text("numpy>=1\n")
    with pytest.raises(SystemExit, match=r"c.txt:1: not an exact pin"):
        tool.read(path)


def test_write_then_check_round_trips(tmp_path):
    path = tmp_path / "c.txt"
    tool.write(path, sys.executable)
    assert tool.check_platform(path) == [] and tool.check_installed(path) == []
    assert tool.diff(path, path) == []
