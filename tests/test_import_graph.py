"""The project's floors, read from its import statements: workflows -> jobs -> shared, nothing runs back up a floor,
and no module reaches itself through others (imports inside functions count: a lazy import hides a circle, it does
not cut it). Within shared, each package says in its ``__init__`` docstring which other shared packages it may
import (a line ``May import: shared.core, shared.lm``, or ``May import: nothing``), and its modules import no
other."""

from __future__ import annotations

import ast
import re
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

    def owner(name: str) -> str | None:  # the module a dotted name lives in (``shared.lm.chat.build`` -> shared.lm.chat)
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


MAY_IMPORT = re.compile(r"^May import:(.*)$", re.M)


def shared_packages(root: Path) -> dict[str, set[str] | None]:
    """Each package of shared that holds code -> the shared packages its docstring lets it import (None: no
    ``May import:`` line). ``shared/data`` holds package data, not code, and has no rule."""
    rules = {}
    for init in sorted((root / "shared").glob("*/__init__.py")):
        if not [p for p in init.parent.rglob("*.py") if p != init]:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        line = MAY_IMPORT.search(doc)
        names = None if line is None else {n.strip() for n in line[1].split(",")} - {"", "nothing"}
        rules[f"shared.{init.parent.name}"] = names
    return rules


def shared_package(module: str) -> str | None:
    """``shared.lm.chat`` -> shared.lm; None for a module outside shared and for ``shared`` itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "shared" and len(parts) > 1 else None


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each shared package -> the other shared packages its modules import."""
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if (package := shared_package(module)) is not None:
            packages.setdefault(package, set()).update(
                t for t in map(shared_package, targets) if t is not None and t != package)
    return packages


def forbidden(graph: dict[str, set[str]], rules: dict[str, set[str] | None]) -> list[str]:
    """Imports of a shared package that the importing module's package does not list under ``May import:``."""
    found = []
    for module, targets in graph.items():
        package = shared_package(module)
        if package is None:
            continue
        for target in targets:
            other = shared_package(target)
            if other is not None and other != package and other not in (rules.get(package) or set()):
                found.append(f"{module} -> {target}")
    return sorted(found)


def upward(graph: dict[str, set[str]]) -> list[str]:
    def floor(module: str) -> int:
        return FLOOR[module.split(".")[0]]

    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if floor(b) > floor(a))


def test_no_module_imports_itself_through_others():
    assert circle(import_graph(ROOT)) is None


def test_no_import_runs_back_up_a_floor():
    assert upward(import_graph(ROOT)) == []


def test_every_shared_module_is_in_a_package_that_says_what_it_may_import():
    flat = sorted(p.name for p in (ROOT / "shared").glob("*.py") if p.name != "__init__.py")
    assert flat == []
    rules = shared_packages(ROOT)
    assert {"shared.core", "shared.contract", "shared.lm", "shared.search", "shared.analysis",
            "shared.judge"} <= set(rules)
    assert [package for package, names in rules.items() if names is None] == []
    assert all(names <= set(rules) for names in rules.values())


def test_no_shared_package_imports_one_it_does_not_list():
    assert forbidden(import_graph(ROOT), shared_packages(ROOT)) == []


def test_no_circle_between_the_shared_packages():
    assert circle(package_graph(import_graph(ROOT))) is None


def test_the_package_check_finds_an_import_its_package_does_not_list(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "__init__.py").write_text("")
    for package, may in (("core", "nothing"), ("lm", "shared.core"), ("search", "shared.core, shared.lm")):
        (tmp_path / "shared" / package).mkdir()
        init = f'"""The {package}.\n\nMay import: {may}\n"""\n'
        (tmp_path / "shared" / package / "__init__.py").write_text(init)
    (tmp_path / "shared" / "core" / "store.py").write_text("X = 1\n")
    (tmp_path / "shared" / "lm" / "chat.py").write_text("from shared.core import store\n")  # listed
    (tmp_path / "shared" / "search" / "gcg.py").write_text(
        "from shared.lm.chat import build\nfrom shared.core import store\n")
    rules = shared_packages(tmp_path)
    assert rules == {"shared.core": set(), "shared.lm": {"shared.core"},
                     "shared.search": {"shared.core", "shared.lm"}}
    assert forbidden(import_graph(tmp_path, ("shared",)), rules) == []  # each import is one its package lists
    # a lazy import of a package that is not listed is found, and so is a package without the line
    (tmp_path / "shared" / "core" / "store.py").write_text("def f():\n    from shared.search import gcg\n")
    graph = import_graph(tmp_path, ("shared",))
    assert forbidden(graph, rules) == ["shared.core.store -> shared.search.gcg"]
    assert set(circle(package_graph(graph))) >= {"shared.core", "shared.search"}
    (tmp_path / "shared" / "lm" / "__init__.py").write_text('"""The lm."""\n')
    assert shared_packages(tmp_path)["shared.lm"] is None


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


# an experiment's analysis stage is a package of one shape; its parts import each other only downward (a part may
# import any part before it in this order, none after it), and its __init__ only the stage it exports
ANALYSIS_PARTS = ["results", "decisions", "figures", "report", "stage", "__main__"]


def test_every_analysis_package_has_one_shape_and_imports_its_parts_only_downward():
    packages = sorted(p.parent.name for p in (ROOT / "jobs").glob("analyze_issue*/__init__.py"))
    assert packages == ["analyze_issue164", "analyze_issue170", "analyze_issue205", "analyze_issue81"]
    assert not list((ROOT / "jobs").glob("analyze_issue*.py"))
    graph = import_graph(ROOT)
    for package in packages:
        assert sorted(p.stem for p in (ROOT / "jobs" / package).glob("*.py")) == sorted(["__init__", *ANALYSIS_PARTS])
        rank = {f"jobs.{package}.{part}": i for i, part in enumerate(ANALYSIS_PARTS)}
        for module, i in rank.items():
            inside = {t for t in graph[module] if t.startswith(f"jobs.{package}")}
            assert all(rank.get(t, len(rank)) < i for t in inside), (module, sorted(inside))
        assert {t for t in graph[f"jobs.{package}"] if t.startswith(f"jobs.{package}")} == {f"jobs.{package}.stage"}
