"""``python -m images.lock`` (``make lock``): write every lock in ``images/locks/`` from pyproject.toml, with hashes.

pyproject.toml's ``[tool.explore-persona-space.locks.<name>]`` tables say what each environment installs (its
Python, platform, extras and torch build); ``uv pip compile`` resolves them. The GPU lock goes first; each other
lock is constrained to the versions of the lock it ``agrees_with``, so ``make setup``, CI and the CPU image run
the transformers (and everything else) that the GPU image's vLLM admits. Each lock's header records a digest of
its inputs: ``--check`` (and the tests) say which lock is stale without resolving anything.

torch's CPU build (``+cpu``) is not on PyPI: it is found in pip's ``find-links`` folders when one holds it (this
project's machines keep it on disk), else on the PyTorch CPU index (``--torch-index``).

    python -m images.lock            # regenerate every lock (keeps the versions already locked where it can)
    python -m images.lock --upgrade  # let every package move to its newest allowed version
    python -m images.lock --check    # exit 1 naming each lock that is not current with pyproject.toml
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
LOCKS = REPO / "images" / "locks"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
DIGEST_LINE = "# inputs sha256: "
# packages that may differ between two locks that agree, and how; every other shared package has one version
ALLOWED_DIFFERENCES = {"torch": "the CPU build (+cpu) of the same release"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


@dataclass(frozen=True)
class LockSpec:
    name: str
    python: str
    platform: str
    extras: tuple[str, ...]
    torch: str  # "cpu" or "cuda"
    agrees_with: str | None = None

    @property
    def path(self) -> Path:
        return LOCKS / f"{self.name}.txt"


def _pyproject(path: Path = PYPROJECT) -> dict:
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def lock_specs(path: Path = PYPROJECT) -> dict[str, LockSpec]:
    """The locks pyproject.toml asks for, in an order where a lock comes after the one it agrees with."""
    tables = _pyproject(path).get("tool", {}).get("explore-persona-space", {}).get("locks", {})
    specs = {name: LockSpec(name=name, python=t["python"], platform=t["platform"], extras=tuple(t.get("extras", [])),
                            torch=t["torch"], agrees_with=t.get("agrees_with")) for name, t in tables.items()}
    ordered: dict[str, LockSpec] = {}

    def visit(name: str, seen: tuple[str, ...] = ()) -> None:
        if name in ordered:
            return
        if name in seen or name not in specs:
            raise SystemExit(f"error: lock {name!r}: agrees_with names {'a cycle' if name in seen else 'no lock'}")
        if specs[name].agrees_with:
            visit(specs[name].agrees_with, (*seen, name))
        ordered[name] = specs[name]

    for name in specs:
        visit(name)
    return ordered


def requirements(spec: LockSpec, path: Path = PYPROJECT) -> list[str]:
    """What ``spec`` installs: the build backend, the dependencies and its extras (torch at its build)."""
    data = _pyproject(path)
    project = data["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in spec.extras if e not in optional]
    if unknown:
        raise SystemExit(f"error: lock {spec.name}: unknown extra(s) {unknown}; pyproject.toml defines {sorted(optional)}")
    out = list(data.get("build-system", {}).get("requires", [])) + list(project.get("dependencies", []))
    for extra in spec.extras:
        out += [r for r in optional[extra] if r not in out]
    if spec.torch == "cpu":
        out = [f"{r}+cpu" if re.fullmatch(r"torch\s*==\s*[0-9.]+", r) else r for r in out]
    return out


def no_deps_requirements(path: Path = PYPROJECT) -> list[str]:
    tool = _pyproject(path).get("tool", {}).get("explore-persona-space", {})
    return list(tool.get("no-deps-requirements", []))


def input_digest(spec: LockSpec, specs: dict[str, LockSpec], path: Path = PYPROJECT) -> str:
    """Everything a lock is made from; a lock whose header holds another digest is stale."""
    described = {"spec": spec.__dict__, "resolved_for": resolving_python(specs), "requirements": requirements(spec, path), "no_deps": no_deps_requirements(path),
                 "agrees_with": input_digest(specs[spec.agrees_with], specs, path) if spec.agrees_with else None}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=list).encode()).hexdigest()


def recorded_digest(lock: Path) -> str | None:
    if not lock.is_file():
        return None
    for line in lock.read_text().splitlines():
        if line.startswith(DIGEST_LINE):
            return line[len(DIGEST_LINE):].strip()
    return None


def stale(path: Path = PYPROJECT) -> list[str]:
    """The locks that are missing or not made from pyproject.toml as it is now."""
    specs = lock_specs(path)
    return [name for name, spec in specs.items() if recorded_digest(spec.path) != input_digest(spec, specs, path)]


def pins(lock: Path) -> dict[str, str]:
    """``{normalised name: version}`` of every package a lock pins."""
    out = {}
    for line in lock.read_text().splitlines():
        found = PIN.match(line)
        if found:
            out[re.sub(r"[-_.]+", "-", found.group(1)).lower()] = found.group(2)
    return out


def disagreements(first: dict[str, str], second: dict[str, str]) -> list[str]:
    """Packages in both pin sets at different versions, beyond ``ALLOWED_DIFFERENCES``."""
    out = []
    for name in sorted(set(first) & set(second)):
        a, b = first[name], second[name]
        if name in ALLOWED_DIFFERENCES:
            a, b = a.split("+")[0], b.split("+")[0]
        if a != b:
            out.append(f"{name}: {first[name]} vs {second[name]}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# resolving


def _pip_find_links() -> list[str]:
    """pip's find-links folders (environment, then config files): where this machine keeps wheels on disk."""
    found = os.environ.get("PIP_FIND_LINKS", "").split()
    parser = configparser.ConfigParser()
    parser.read([p for p in ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", os.path.expanduser("~/.config/pip/pip.conf"),
                              os.path.expanduser("~/.pip/pip.conf")) if os.path.isfile(p)])
    for section in ("global", "install"):
        if parser.has_option(section, "find-links"):
            found += parser.get(section, "find-links").split()
    return [f for f in dict.fromkeys(found) if os.path.isdir(f)]


def _torch_source(spec: LockSpec, torch_index: str) -> list[str]:
    if spec.torch != "cpu":
        return []
    folders = [f for f in _pip_find_links() if any(Path(f).glob("torch-*+cpu-*.whl"))]
    if folders:
        return [arg for f in folders for arg in ("--find-links", f)]
    return ["--extra-index-url", torch_index, "--index-strategy", "unsafe-best-match"]


def _uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not found:
        raise SystemExit("error: uv is not installed: it comes with the dev extra (make setup)")
    return found


def resolving_python(specs: dict[str, LockSpec]) -> str:
    """Every lock is resolved for the oldest Python any lock runs, so that each version it picks exists for all."""
    return min((s.python for s in specs.values()), key=lambda v: tuple(int(x) for x in v.split(".")))


def _compile(spec: LockSpec, lines: list[str], work: Path, *, python: str, previous: str | None,
             constraints: Path | None, no_deps: bool, upgrade: bool, torch_index: str) -> str:
    name = f"{spec.name}{'-no-deps' if no_deps else ''}"
    source, output = work / f"{name}.in", work / f"{name}.txt"
    source.write_text("\n".join(lines) + "\n")
    if previous and not upgrade:
        output.write_text(previous)  # uv keeps the versions already locked where they still fit
    cmd = [_uv(), "pip", "compile", source.name, "-o", output.name, "--generate-hashes", "--no-header", "--quiet",
           "--python-version", python, "--python-platform", spec.platform, *_torch_source(spec, torch_index)]
    if constraints:
        cmd += ["--constraint", constraints.name]
    if no_deps:
        cmd.append("--no-deps")
    if upgrade:
        cmd.append("--upgrade")
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: resolving lock {spec.name} failed:\n{done.stderr.strip()}")
    return output.read_text()


def write_lock(spec: LockSpec, specs: dict[str, LockSpec], *, upgrade: bool = False,
               torch_index: str = TORCH_CPU_INDEX) -> Path:
    previous = spec.path.read_text() if spec.path.is_file() else None
    with tempfile.TemporaryDirectory(prefix="eps-lock-") as tmp:
        work = Path(tmp)
        constraints = None
        if spec.agrees_with:
            constraints = work / "agrees-with.txt"
            agreed = pins(specs[spec.agrees_with].path)
            constraints.write_text("".join(f"{n}=={v.split('+')[0] if spec.torch != specs[spec.agrees_with].torch else v}\n"
                                           for n, v in sorted(agreed.items())))
        python = resolving_python(specs)
        body = _compile(spec, requirements(spec), work, python=python, previous=previous, constraints=constraints, no_deps=False,
                        upgrade=upgrade, torch_index=torch_index)
        extra = no_deps_requirements()
        if extra:
            body += "# installed without their dependencies ([tool.explore-persona-space] no-deps-requirements)\n"
            body += _compile(spec, extra, work, python=python, previous=None, constraints=None, no_deps=True, upgrade=upgrade,
                             torch_index=torch_index)
    header = (
        f"# GENERATED by `make lock` (python -m images.lock) from pyproject.toml: do not edit by hand.\n"
        f"# lock {spec.name}: Python {spec.python} (resolved for {resolving_python(specs)}), {spec.platform}, extras {', '.join(spec.extras) or 'none'}, "
        f"torch {spec.torch}" + (f", versions agree with {spec.agrees_with}" if spec.agrees_with else "") + "\n"
        f"# install: pip install --no-deps --require-hashes -r {spec.path.relative_to(REPO)}\n"
        f"{DIGEST_LINE}{input_digest(spec, specs)}\n"
    )
    spec.path.parent.mkdir(parents=True, exist_ok=True)
    spec.path.write_text(header + body)
    return spec.path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m images.lock", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only say which locks are stale (exit 1 if any)")
    p.add_argument("--upgrade", action="store_true", help="newest allowed versions, not the ones already locked")
    p.add_argument("--torch-index", default=TORCH_CPU_INDEX, help="where torch's CPU build is, when no folder has it")
    args = p.parse_args(argv)
    if args.check:
        names = stale()
        for name in names:
            print(f"error: images/locks/{name}.txt is not current with pyproject.toml: run `make lock`", file=sys.stderr)
        return 1 if names else 0
    specs = lock_specs()
    for spec in specs.values():
        path = write_lock(spec, specs, upgrade=args.upgrade, torch_index=args.torch_index)
        print(f"wrote {path.relative_to(REPO)} ({len(pins(path))} packages)")
    for spec in specs.values():
        if spec.agrees_with:
            differ = disagreements(pins(spec.path), pins(specs[spec.agrees_with].path))
            if differ:
                raise SystemExit(f"error: {spec.name} and {spec.agrees_with} disagree: {'; '.join(differ)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
