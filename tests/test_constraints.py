"""The tested package set (constraints.txt, written by scripts/refresh_constraints.sh): the venv running the tests
holds exactly those versions, so a package installed or upgraded by hand shows up here instead of hiding in a green
run; and the writer keeps what pip needs."""

from __future__ import annotations

import os
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from scripts.write_constraints import constraints
from tests.helpers import REPO


def _pins(path):
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


@pytest.mark.skipif(os.environ.get("QCOMPILER_UNPINNED") == "1", reason="unpinned install (refresh_constraints.sh)")
def test_installed_versions_are_the_constraints():
    pins = _pins(REPO / "constraints.txt")
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop("qcompiler", None)
    wrong = {n: (installed.get(n), v) for n, v in pins.items() if installed.get(n, "").split("+")[0] != v}
    extra = sorted(set(installed) - set(pins) - {"wheel"})
    assert not wrong, f"installed vs constraints.txt: {wrong} (run bash scripts/setup.sh)"
    assert not extra, f"installed but not in constraints.txt: {extra}"


def test_every_dependency_is_pinned():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {canonicalize_name(Requirement(d).name) for d in deps}
    assert names - set(_pins(REPO / "constraints.txt")) == set()
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    build_names = {canonicalize_name(Requirement(d).name) for d in build}
    assert build_names <= set(_pins(REPO / "build-constraints.txt"))


def test_writer_drops_the_project_and_local_labels():
    freeze = "torch==2.13.0+cpu\n-e /work/main\nqcompiler==0.1.0\nNumPy==2.4.6\n# comment\nfoo @ file:///x\n"
    assert constraints(freeze) == ["NumPy==2.4.6", "torch==2.13.0"]
    with pytest.raises(SystemExit, match="not a pinned requirement"):
        constraints("numpy>=2\n")
