"""Pinned installs: write, check and compare the constraints file (standard library only).

``constraints.txt`` holds the exact version of every distribution in the environment the tests
last passed in, with a header naming the interpreter and platform it was made on. ``make`` installs
through it (``pip install -c constraints.txt``), so a fresh machine gets the tested versions, not
whatever is newest.

    python tools/constraints.py check-platform constraints.txt   # before installing
    python tools/constraints.py check constraints.txt            # after installing: installed == pinned
    python tools/constraints.py write constraints.txt --python .venv-canary/bin/python
    python tools/constraints.py diff constraints.txt other.txt    # what a refresh changes

Exit status 1 with one line per problem, each naming the package (or interpreter) and both versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HEADER_PYTHON = re.compile(r"^#\s*python:\s*(\S+)\s*\|\s*platform:\s*(\S+)")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")
#: Distributions of the project itself or of the venv tooling: never pinned.
UNPINNED = {"em-interp", "pip", "setuptools", "wheel"}


def normalise(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def this_interpreter() -> tuple[str, str]:
    """(``major.minor`` Python version, ``system-machine``) of the running interpreter."""
    return f"{sys.version_info.major}.{sys.version_info.minor}", f"{platform.system().lower()}-{platform.machine()}"


def read(path: Path) -> tuple[tuple[str, str] | None, dict[str, str]]:
    """The (python, platform) header and the ``{name: version}`` pins of a constraints file."""
    if not path.is_file():
        raise SystemExit(f"constraints: {path} does not exist")
    header, pins = None, {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if m := HEADER_PYTHON.match(line):
            header = (m.group(1), m.group(2))
            continue
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        m = PIN.match(text)
        if m is None:
            raise SystemExit(f"constraints: {path}:{number}: not an exact pin 'name==version': {text!r}")
        pins[normalise(m.group(1))] = m.group(2)
    return header, pins


def check_platform(path: Path) -> list[str]:
    """Problems if ``path`` was made for another Python version or platform than this interpreter."""
    header, _ = read(path)
    if header is None:
        return [f"{path}: no '# python: X.Y | platform: OS-ARCH' header line; rewrite it with 'make constraints'"]
    python, plat = this_interpreter()
    problems = []
    if header[0] != python:
        problems.append(f"{path} pins versions tested on Python {header[0]}, but this interpreter is Python {python} "
                        f"({sys.executable}); use Python {header[0]} (make PYTHON=python{header[0]}) or refresh the pins "
                        "with 'make constraints'")
    if header[1] != plat:
        problems.append(f"{path} pins versions tested on {header[1]}, but this machine is {plat}; "
                        "refresh the pins with 'make constraints'")
    return problems


def check_installed(path: Path) -> list[str]:
    """Problems where an installed distribution's version differs from its pin."""
    _, pins = read(path)
    problems = []
    for name, pinned in sorted(pins.items()):
        try:
            installed = version(name)
        except PackageNotFoundError:
            problems.append(f"{name}: pinned {pinned} in {path}, not installed")
            continue
        if installed.split("+")[0] != pinned.split("+")[0]:
            problems.append(f"{name}: pinned {pinned} in {path}, installed {installed}")
    return problems


def write(path: Path, python: str) -> None:
    """Pin every distribution installed for interpreter ``python`` into ``path`` (atomically)."""
    listing = subprocess.run([python, "-m", "pip", "list", "--format=json", "--exclude-editable"],
                             check=True, capture_output=True, text=True).stdout
    probe = subprocess.run([python, "-c", "import sys, platform; print(f'{sys.version_info.major}.{sys.version_info.minor}'"
                            " + ' ' + platform.system().lower() + '-' + platform.machine())"],
                           check=True, capture_output=True, text=True).stdout.split()
    pins = sorted((normalise(p["name"]), p["version"].split("+")[0]) for p in json.loads(listing)
                  if normalise(p["name"]) not in UNPINNED)
    lines = [
        "# em_interp constraints: the exact versions `make test` last passed with. `make` installs through this file.",
        f"# python: {probe[0]} | platform: {probe[1]}",
        "# Refresh: `make constraints` (installs the newest versions pyproject allows in a throwaway venv, runs the",
        "# tests there, and rewrites this file only if they pass).",
        *(f"{name}=={ver}" for name, ver in pins),
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def diff(old: Path, new: Path) -> list[str]:
    """Lines describing what changes between two constraints files."""
    _, a = read(old)
    _, b = read(new)
    out = []
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            out.append(f"{name}: {a.get(name, '(absent)')} -> {b.get(name, '(absent)')}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="constraints", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("check-platform", "check"):
        sub.add_parser(name).add_argument("file", type=Path)
    w = sub.add_parser("write")
    w.add_argument("file", type=Path)
    w.add_argument("--python", default=sys.executable, help="interpreter of the environment to pin")
    d = sub.add_parser("diff")
    d.add_argument("old", type=Path)
    d.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    if args.command == "write":
        write(args.file, args.python)
        return 0
    if args.command == "diff":
        for line in diff(args.old, args.new) or ["no changes"]:
            print(line)
        return 0
    problems = check_platform(args.file) if args.command == "check-platform" else check_installed(args.file)
    for problem in problems:
        print(f"constraints: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
