"""Benchmark and test-support code imports under names the project owns: `bench.*`, `tests.*`, `scripts.*`, never a
top-level module that an installed package can shadow (transformers 5.25 installs the PyPI package `kernels`, and
`from kernels import ...` in bench/ picked it up), and no `sys.path` edits in the tree."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys

import pytest

from tests.helpers import REPO

BENCH = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "__init__")
OWN_TOP_LEVEL = {"bench", "tests", "scripts", "qcompiler", "passes"}


def _python_files():
    for folder in ("bench", "tests", "scripts", "examples"):
        yield from sorted((REPO / folder).rglob("*.py"))


def test_no_sys_path_edits():
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr in ("insert", "append", "extend") and \
                    isinstance(node.value, ast.Attribute) and node.value.attr == "path" and \
                    isinstance(node.value.value, ast.Name) and node.value.value.id == "sys":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"sys.path edited in {offenders}"


def test_project_imports_name_their_package():
    """Every import of a module that lives in bench/, tests/ or scripts/ goes through its package name."""
    local = {p.stem for folder in ("bench", "tests", "scripts") for p in (REPO / folder).glob("*.py")}
    local |= {"conftest"}
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names
                          if n in local and n not in OWN_TOP_LEVEL]
    assert not offenders, offenders


@pytest.mark.parametrize("name", BENCH)
def test_bench_modules_import_after_transformers(name):
    """In a fresh interpreter that has imported transformers (and so the PyPI `kernels` package), each benchmark
    imports as `bench.NAME` from the repository root, and its own imports resolve to this tree."""
    code = ("import sys, transformers, importlib; m = importlib.import_module('bench.%s'); "
            "bad = [n for n, mod in sys.modules.items() if n.split('.')[0] in ('bench', 'tests') "
            "and not str(getattr(mod, '__file__', '') or '').startswith(%r)]; "
            "print(m.__file__); assert not bad, bad" % (name, str(REPO)))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(REPO / "bench" / f"{name}.py")


def test_bench_help_runs_as_module():
    r = subprocess.run([sys.executable, "-m", "bench.kernels", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "usage: python -m bench.kernels" in r.stdout, r.stderr[-2000:]


def test_bench_package_is_this_tree():
    assert importlib.import_module("bench").__file__ == str(REPO / "bench" / "__init__.py")
