"""Print the project's requirements (``[project] dependencies`` plus chosen extras) from pyproject.toml.

The base images install these, so they hold every dependency but not the project's code; stage images add the
code on top with ``pip install --no-deps``. Standard library only: it runs in a bare image before anything else.

    python requirements.py pyproject.toml --extras vllm,tracking
    python requirements.py pyproject.toml --no-deps     # what is installed with `pip install --no-deps`
"""

from __future__ import annotations

import argparse
import sys

import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"error: unknown extra(s) {unknown}; pyproject.toml defines {sorted(optional)}")
    out = list(project.get("dependencies", []))
    for extra in extras:
        out += [r for r in optional[extra] if r not in out]
    return out


def no_deps_requirements(pyproject: str) -> list[str]:
    """``[tool.explore-persona-space] no-deps-requirements``: packages installed without their dependencies."""
    with open(pyproject, "rb") as fh:
        tool = tomllib.load(fh).get("tool", {}).get("explore-persona-space", {})
    return list(tool.get("no-deps-requirements", []))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pyproject")
    p.add_argument("--extras", default="", help="comma-separated extras to include")
    p.add_argument("--no-deps", action="store_true", help="print the packages installed with pip --no-deps")
    args = p.parse_args(argv)
    if args.no_deps:
        print("\n".join(no_deps_requirements(args.pyproject)))
        return 0
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    print("\n".join(requirements(args.pyproject, extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
