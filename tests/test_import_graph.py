"""The project's floors, read from its import statements: workflows -> jobs -> shared, nothing runs back up a floor,
and no module reaches itself through others (imports inside functions count: a lazy import hides a circle, it does
not cut it)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "jobs", "workflows", "bench", "images")
# a module may import its own floor and the floors below it
FLOOR = {"shared": 0, "jobs": 1, "workflows": 2, "images": 2, "bench": 3}


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """Each project module -> the project modules it imports (at any depth of its code)."""
    known = modules(root, packages)

    def owner(name: str) -> str | None:  # the module a dotted name lives in (``shared.chat.build`` -> shared.chat)
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {owner(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {owner(f"{node.module}.{alias.name}") for alias in node.names}
        graph[name] = targets - {None, name}
    return graph


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as err:
        return err.args[1]
    return None


def upward(graph: dict[str, set[str]]) -> list[str]:
    def floor(module: str) -> int:
        return FLOOR[module.split(".")[0]]

    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if floor(b) > floor(a))


def test_no_module_imports_itself_through_others():
    assert circle(import_graph(ROOT)) is None


def test_no_import_runs_back_up_a_floor():
    assert upward(import_graph(ROOT)) == []


def test_the_checks_find_a_lazy_circle_and_an_upward_import(tmp_path):
    for package in ("shared", "jobs"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "shared" / "a.py").write_text("def f():\n    from shared.b import g\n")  # lazy, still a circle
    (tmp_path / "shared" / "b.py").write_text("from shared import a\n")
    (tmp_path / "shared" / "c.py").write_text("import jobs.stage\n")
    (tmp_path / "jobs" / "stage.py").write_text("from shared.a import f\n")
    graph = import_graph(tmp_path, ("shared", "jobs"))
    assert set(circle(graph)) >= {"shared.a", "shared.b"}
    assert upward(graph) == ["shared.c -> jobs.stage"]
    graph["shared.b"].clear()
    assert circle(graph) is None
