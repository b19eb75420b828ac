"""The package's shape: imports only go one way (no cycles), and the public names import."""

from __future__ import annotations

import ast
from pathlib import Path

import nferd

PKG = Path(nferd.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """nferd modules that ``path`` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "nferd"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "nferd":
                continue
            for a in node.names:  # ``from . import train`` imports the module nferd.engine.train
                found.add(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target)
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def import_graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(f) for f in files}
    # a package's own __init__ is where its children are collected, not a dependency of them
    return {module_name(f): {m for m in imports_of(f, modules) if not module_name(f).startswith(m + ".")}
            for f in files}


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 30
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_import_downwards() -> None:
    """models and data know nothing of running, deploying or the command line."""
    order = {"version": 0, "errors": 0, "text": 0, "metrics": 0, "models": 1, "data": 1, "engine": 2, "deploy": 3,
             "cli": 4}
    for m, deps in import_graph().items():
        parts = m.split(".")
        if len(parts) < 2 or parts[1] not in order:
            continue
        for d in deps:
            layer = d.split(".")[1] if d.count(".") else None
            if layer in order and layer != parts[1]:
                assert order[layer] < order[parts[1]], f"{m} imports {d}"


def test_public_names() -> None:
    for name in nferd.__all__:
        assert getattr(nferd, name) is not None
