"""The code fingerprint of a stage: its module (every module of it, where the stage is a package) and every project
module it imports, by content.

Imports are read from the source (``import`` statements anywhere in a file, lazy ones inside functions too) and
followed transitively within the project's packages (``shared`` and ``jobs``); the fingerprint hashes the module
names with their bytes. It does not depend on git, paths or the machine, so a pod running an image built from a
commit and a laptop with the same files agree on it, and an edit to any module a stage runs changes it -- except
the ``OBSERVERS``, which only watch it run.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PROJECT_PACKAGES = ("shared", "jobs")
# Modules that watch a stage but cannot change what it computes (shared.contract.tracking: guarded, and it writes nothing into
# a stage's outputs); left out, so that changing what is tracked recomputes nothing.
OBSERVERS = frozenset({"shared.contract.tracking"})


def _in_project(name: str) -> bool:
    return name.split(".")[0] in PROJECT_PACKAGES


@cache
def _package_dir(top: str) -> Path | None:
    spec = importlib.util.find_spec(top)  # a top-level package: found without importing anything
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def _source(module: str) -> tuple[Path, bool] | None:
    """(file, is_package) of a project module, or None when ``module`` is not one (e.g. a name in a package).

    Found on disk, not imported: fingerprinting must not run the code (nor import torch) to describe it.
    """
    if not _in_project(module):
        return None
    parts = module.split(".")
    root = _package_dir(parts[0])
    if root is None:
        return None
    folder = root.joinpath(*parts[1:])
    if (folder / "__init__.py").is_file():
        return folder / "__init__.py", True
    if len(parts) > 1 and folder.with_suffix(".py").is_file():
        return folder.with_suffix(".py"), False
    return None


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def _tree(module: str) -> ast.Module | None:
    found = _source(module)
    return None if found is None else _parsed(found[0])


def is_project_module(module: str) -> bool:
    return _source(module) is not None


@cache
def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_bytes(), filename=str(path))


@cache
def imported_modules(module: str) -> frozenset[str]:
    """Project modules that ``module``'s source imports directly (parents of dotted names included)."""
    found = _source(module)
    if found is None:
        return frozenset()
    return _imports_in(_tree(module), module, found[1])


def _imports_in(tree: ast.Module, module: str, is_package: bool) -> frozenset[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, is_package, node.level, node.module) if node.level else node.module
            if not base:
                continue
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    out = set()
    for name in names:
        if not _in_project(name):
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            candidate = ".".join(parts[:i])
            if _source(candidate) is not None:
                out.add(candidate)
    return frozenset(out)


def data_folders(module: str) -> set[Path]:
    """Folders of ``shared/data`` that ``module`` names in a string (``"issue164/x.json"``, ``"judges"``).

    Stages read package data at run time (judge templates, reference points); a change to it changes results as
    surely as a code change. Naming the folder is how a module reaches its data, so this finds it without running
    anything (over-including a folder only costs a recompute).
    """
    data = _package_dir("shared")
    data = data / "data" if data else None
    tree = _tree(module)
    if data is None or tree is None:
        return set()
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) < 200:
            first = node.value.removeprefix("package:").strip("/").split("/")[0]
            if first and first not in (".", "..") and (data / first).is_dir():
                out.add(data / first)
    return out


def package_members(module: str) -> list[str]:
    """Every module of ``module`` when it is a package (its ``__main__`` too, which nothing imports), else none.

    A stage may be a package (``jobs/analyze_issue205/``); its fingerprint covers each of its files whether or not
    the package's ``__init__`` imports it.
    """
    found = _source(module)
    if found is None or not found[1]:
        return []
    folder = found[0].parent
    return sorted(".".join([module, *path.relative_to(folder).with_suffix("").parts]).removesuffix(".__init__")
                  for path in folder.rglob("*.py") if "__pycache__" not in path.parts)


def closure(module: str) -> list[str]:
    """``module`` (with every module of it, if it is a package) and every project module it reaches through
    imports, sorted."""
    return _closure([module, *package_members(module)])


def _closure(start: list[str]) -> list[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen or name in OBSERVERS or _source(name) is None:
            continue
        seen.add(name)
        todo.extend(imported_modules(name) - seen)
    return sorted(seen)


def fingerprinted_files(module: str) -> dict[str, Path]:
    """What the fingerprint covers: ``{module name or data path: file}``."""
    files: dict[str, Path] = {}
    folders: set[Path] = set()
    for name in closure(module):
        files[name] = _source(name)[0]
        folders |= data_folders(name)
    data = _package_dir("shared") / "data"
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                files[f"data:{path.relative_to(data).as_posix()}"] = path
    return files


def _digest(files: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    for name, path in sorted(files.items()):
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@cache
def code_fingerprint(module: str) -> str:
    """sha256 over (name, content) of every file in ``fingerprinted_files(module)``."""
    return _digest(fingerprinted_files(module))


@cache
def file_fingerprint(path: str) -> str:
    """The fingerprint of a stage defined outside the project packages (a test's stage): its file and imports."""
    file = Path(path)
    tree = _parsed(file)
    files = {f"file:{file.name}": file}
    for name in _closure(sorted(_imports_in(tree, "", False))):
        files[name] = _source(name)[0]
    return _digest(files)


def modules_fingerprint(modules: Iterable[str]) -> str:
    """sha256 over (name, content) of exactly the named project modules' own files, imports not followed: for a
    cache whose entries depend on a few known modules only (the judge cache: the code that turns a judge model's
    output into a score), where the whole import closure would throw away far more than changed."""
    files = {}
    for name in modules:
        found = _source(name)
        if found is None:
            raise ValueError(f"{name!r} is not a module of this project")
        files[name] = found[0]
    return _digest(files)
