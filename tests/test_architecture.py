"""The package layout stays a pipeline (docs/architecture.md): no import cycles among qcompiler's modules (the passes
included, as `qcompiler.passes`), no private names used across modules, passes importing only the graph layer (and the
runtime's session for `--verify-each`), and nothing in the shipped package importing test-only code.

Imports are read statically (every `import` statement, function-level ones included), so a cycle that only closes
at run time inside a function is found too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

# where each importable module's source lives (passes/ is installed as qcompiler.passes: pyproject's wheel mapping)
ROOTS = {"qcompiler": REPO / "qcompiler", "qcompiler.passes": REPO / "passes"}


def _modules() -> dict[str, Path]:
    mods = {}
    for prefix, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = path
    return mods


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve_import(name: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = name.split(".") if _is_package(name) else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """`(module imported, names taken from it, line)` for every import of a qcompiler module in `name`'s source."""
    out = []
    for node in ast.walk(ast.parse(MODULES[name].read_text(), str(MODULES[name]))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "qcompiler"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_import(name, node)
            if target.split(".")[0] != "qcompiler":
                continue
            names = [a.name for a in node.names]
            # `from pkg import submodule` imports the submodule
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest or not subs:
                out.append((target, rest, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _private_uses(name: str) -> list[str]:
    """`from other import _x`, and `mod._x` where `mod` names another qcompiler module imported in `name`."""
    out = [f"{MODULES[name].relative_to(REPO)}:{line} takes {n} from {t}"
           for t, names, line in _imports(name) for n in names if n.startswith("_") and not n.startswith("__")
           and t != name]
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in MODULES})
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_import(name, node)
            aliases.update({a.asname or a.name: f"{target}.{a.name}" for a in node.names
                            if f"{target}.{a.name}" in MODULES})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases and \
                node.attr.startswith("_") and not node.attr.startswith("__"):
            out.append(f"{MODULES[name].relative_to(REPO)}:{node.lineno} uses {node.attr} of {aliases[node.value.id]}")
    return out


def test_no_private_names_across_modules():
    offenders = [o for m in MODULES for o in _private_uses(m)]
    assert not offenders, offenders


@pytest.mark.parametrize("allowed_prefixes", [("qcompiler.passes", "qcompiler.graph", "qcompiler.runtime.ops")])
def test_passes_import_only_the_graph_layer(allowed_prefixes):
    offenders = [f"{MODULES[m].relative_to(REPO)}:{line} imports {t}"
                 for m in MODULES if m.startswith("qcompiler.passes")
                 for t, _, line in _imports(m)
                 if t != "qcompiler" and not t.startswith(allowed_prefixes)]
    assert not offenders, offenders


def test_package_does_not_import_test_code():
    offenders = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} imports {x}" for x in mods
                          if x.split(".")[0] in ("tests", "bench", "scripts")]
    assert not offenders, offenders


def test_every_method_module_registers_a_method():
    """Adding a method is adding a module to qcompiler/quantize/methods/: the registry imports each one."""
    from qcompiler.quantize.methods import available_methods, get_method, method_modules

    registered = {get_method(name).__module__.rsplit(".", 1)[-1] for name in available_methods()}
    assert method_modules() and set(method_modules()) == registered
