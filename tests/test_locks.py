"""The locks in images/locks/: current with pyproject.toml, in agreement, hashed, and what this environment runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from images import lock

ROOT = Path(__file__).resolve().parents[1]
SPECS = lock.lock_specs()


def test_every_lock_is_current_with_pyproject():
    assert lock.stale() == [], "run `make lock`"


def test_a_changed_requirement_makes_every_lock_that_installs_it_stale(tmp_path):
    changed = tmp_path / "pyproject.toml"
    changed.write_text((ROOT / "pyproject.toml").read_text().replace('"scipy>=', '"scipy>=0.1,!=0.2,>='))
    assert set(lock.stale(changed)) == set(SPECS)
    extra_only = tmp_path / "extra.toml"
    extra_only.write_text((ROOT / "pyproject.toml").read_text().replace('"pytest>=', '"pytest!=0.1,>='))
    # the lock with the dev extra, and the one constrained to its versions; not the GPU lock
    assert lock.stale(extra_only) == ["cpu-dev", "cpu"]


def test_the_check_command_names_a_stale_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "LOCKS", tmp_path)  # no lock files there: every lock is stale
    monkeypatch.setattr(lock.LockSpec, "path", property(lambda s: tmp_path / f"{s.name}.txt"))
    assert lock.main(["--check"]) == 1


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.agrees_with])
def test_locks_agree_on_every_package_both_hold(name):
    spec = SPECS[name]
    assert lock.disagreements(lock.pins(spec.path), lock.pins(SPECS[spec.agrees_with].path)) == []


def test_the_agreement_check_fires_on_a_version_difference_and_allows_only_the_listed_ones():
    gpu = {"torch": "2.13.0", "transformers": "5.19.0", "vllm": "0.32.0"}
    assert lock.disagreements({"torch": "2.13.0+cpu", "transformers": "5.19.0"}, gpu) == []
    assert lock.disagreements({"torch": "2.13.0+cpu", "transformers": "5.25.0"}, gpu) == [
        "transformers: 5.25.0 vs 5.19.0"]
    assert lock.disagreements({"torch": "2.14.0+cpu"}, gpu) == ["torch: 2.14.0+cpu vs 2.13.0"]
    assert lock.disagreements({"numpy": "2.3.5+local"}, {"numpy": "2.3.5"}) != []  # a label only torch may carry


def test_the_gpu_lock_pins_vllm_and_every_lock_runs_the_transformers_it_admits():
    vllm_pin = next(r for r in lock._pyproject()["project"]["optional-dependencies"]["vllm"] if r.startswith("vllm"))
    gpu = lock.pins(SPECS["gpu"].path)
    assert f"vllm=={gpu['vllm']}" == vllm_pin
    for spec in SPECS.values():
        pinned = lock.pins(spec.path)
        assert pinned["transformers"] == gpu["transformers"], spec.name
        assert pinned["torch"].split("+")[0] == gpu["torch"], spec.name


def test_cpu_locks_hold_the_cpu_build_of_torch_and_no_cuda_library():
    for spec in SPECS.values():
        pinned = lock.pins(spec.path)
        cuda = sorted(n for n in pinned if n.startswith("nvidia-") or n == "triton")
        if spec.torch == "cpu":
            assert pinned["torch"].endswith("+cpu") and cuda == [], (spec.name, cuda)
        else:
            assert "+" not in pinned["torch"] and cuda, spec.name


@pytest.mark.parametrize("name", list(SPECS))
def test_every_locked_package_has_a_hash(name):
    entries = re.split(r"\n(?=[A-Za-z0-9])", SPECS[name].path.read_text())
    pinned = [e for e in entries if lock.PIN.match(e)]
    assert len(pinned) == len(lock.pins(SPECS[name].path)) > 10
    assert [e.split()[0] for e in pinned if "--hash=sha256:" not in e] == []


def test_floors_are_the_minor_releases_the_locks_hold():
    project = lock._pyproject()["project"]
    every = {**lock.pins(SPECS["gpu"].path), **lock.pins(SPECS["cpu-dev"].path)}
    requirements = project["dependencies"] + [r for rs in project["optional-dependencies"].values() for r in rs]
    behind = []
    for text in requirements:
        req = Requirement(text)
        floors = [s.version for s in req.specifier if s.operator == ">="]
        exact = [s.version for s in req.specifier if s.operator == "=="]
        locked = every[re.sub(r"[-_.]+", "-", req.name).lower()].split("+")[0]
        assert floors or exact, f"{text}: no floor"
        if floors and locked.split(".")[: len(floors[0].split("."))] != floors[0].split("."):
            behind.append(f"{text} (locked {locked})")
    assert behind == [], "raise these floors to the locked minor release"


def test_this_environment_runs_the_dev_lock():
    """The tests run what the lock says (make setup installs it): the GPU image's transformers among it."""
    differ = []
    for name, version in lock.pins(SPECS["cpu-dev"].path).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            differ.append(f"{name} missing")
            continue
        if installed != version:
            differ.append(f"{name} {installed} (locked {version})")
    assert differ == [], "rebuild the venv: make clean setup"


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_setup_installs_torch_alone_first_then_the_lock_by_hash(tmp_path):
    dry = subprocess.run(["make", "-n", "-B", "setup", f"VENV={tmp_path}/venv", "PYTHON=python3"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    installs = [ln for ln in dry.splitlines() if "pip install" in ln]
    assert len(installs) == 3 and all("--require-hashes" in ln for ln in installs[:2])
    assert "torch-lock.txt" in installs[0] and "-r images/locks/cpu-dev.txt" in installs[1]
    assert "--no-build-isolation -e ." in installs[2] and "--no-deps" in installs[2]
    assert "make setup: torch" in dry  # it says which torch it installed
