"""The stage contract: typed config in, artifacts out, ``manifest.json`` written last.

A job module defines ``SPEC = StageSpec(...)`` and ``main = SPEC.main``. ``run_stage`` does everything around the
stage's own ``run``: parse and validate the config, skip when a complete manifest with the same config and input
hashes exists, time the work, record every output's sha256, and turn bad input into one readable error line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from shared import store
from shared.config import ConfigError, StageConfig, is_store_uri, parse

MANIFEST = "manifest.json"
TRACKED_PACKAGES = (
    "explore-persona-space", "torch", "transformers", "peft", "vllm", "anthropic", "numpy", "scipy",
    "scikit-learn", "sentence-transformers", "boto3",
)


class StageInputError(RuntimeError):
    """The stage's inputs are unusable; the message is one readable line."""


# Errors that mean "bad input": one line, exit 2, no traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ConfigError, StageInputError, store.StoreError)


class Resources(BaseModel):
    """What a stage needs from a node; the Argo engine turns this into requests, node pools and deadlines."""

    gpu_class: Literal["none", "h100", "h200"] = "none"
    gpus: int = 0
    cpu: int = 1
    memory: str = "4Gi"
    timeout_s: int = 3600

    @property
    def uses_gpu(self) -> bool:
        return self.gpus > 0


@dataclass
class StageSpec:
    name: str
    config: type[StageConfig]
    run: Callable[[Any, Context], dict | None]
    resources: Resources = field(default_factory=Resources)
    image_kind: Literal["gpu", "cpu"] = "cpu"
    description: str = ""

    @property
    def module(self) -> str:
        return f"jobs.{self.name}"

    @property
    def image(self) -> str:
        return f"eps-{self.name.replace('_', '-')}"

    def main(self, argv: list[str] | None = None) -> int:
        code = run_stage(self, argv)
        if code:
            sys.exit(code)
        return 0


def output_prefix(cfg: StageConfig, stage: str) -> str:
    return store.join(store.normalize_root(cfg.store), "runs", cfg.run_id, cfg.cell, stage)


class Context:
    """What a running stage sees: where to write, how to log, how to report progress and metrics."""

    def __init__(self, spec: StageSpec, cfg: StageConfig):
        self.spec = spec
        self.cfg = cfg
        self.prefix = output_prefix(cfg, spec.name)
        self.metrics: dict[str, Any] = {}
        self.tag = f"{cfg.cell}/{spec.name}"

    def out(self, *parts: str) -> str:
        return store.join(self.prefix, *parts)

    def log(self, message: str) -> None:
        print(f"[{self.tag}] {message}", file=sys.stderr, flush=True)

    def progress(self, iterable: Iterable, *, total: int | None = None, desc: str = "") -> Iterable:
        from tqdm.auto import tqdm

        # in a pod (no terminal) print a plain line now and then instead of a redrawn bar
        interactive = sys.stderr.isatty()
        return tqdm(
            iterable, total=total, desc=f"[{self.tag}] {desc}".strip(), file=sys.stderr,
            mininterval=0.2 if interactive else 30.0, dynamic_ncols=interactive, ascii=not interactive,
        )


def load_config_text(source: str) -> Any:
    """``--config`` may be JSON text, a local path, or a store URI."""
    source = source.strip()
    if source.startswith("{"):
        try:
            return json.loads(source)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--config is not valid JSON: {err.msg} at column {err.colno}") from None
    if is_store_uri(source):
        return store.read_json(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"--config {source!r} is neither JSON text, a file nor a store URI")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source} is not valid JSON: {err.msg} at line {err.lineno}") from None


def git_commit() -> str:
    if os.environ.get("EPS_GIT_SHA"):
        return os.environ["EPS_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def input_hashes(cfg: StageConfig) -> dict[str, str]:
    hashes = {}
    for name, uri in cfg.input_uris().items():
        try:
            hashes[uri] = store.sha256(uri)
        except store.ArtifactNotFound:
            raise StageInputError(f"input {name} not found: {uri}") from None
    return hashes


def complete_manifest(prefix: str, cfg: StageConfig, inputs: dict[str, str]) -> dict | None:
    """The existing manifest if it proves this exact work is already done, else None."""
    uri = store.join(prefix, MANIFEST)
    if not store.exists(uri):
        return None
    try:
        manifest = store.read_json(uri)
    except store.StoreError:
        return None
    if manifest.get("status") != "complete" or manifest.get("config_hash") != cfg.config_hash():
        return None
    if manifest.get("inputs") != inputs:
        return None
    if not all(store.exists(out) for out in manifest.get("outputs", {})):
        return None
    return manifest


def read_manifest(prefix: str) -> dict:
    return store.read_json(store.join(prefix, MANIFEST))


def _write_manifest(ctx: Context, cfg: StageConfig, inputs: dict[str, str], started: float, metrics: dict) -> dict:
    manifest_uri = ctx.out(MANIFEST)
    outputs = {uri: store.sha256(uri) for uri in store.list_uris(ctx.prefix) if uri != manifest_uri}
    manifest = {
        "status": "complete",
        "stage": ctx.spec.name,
        "run_id": cfg.run_id,
        "cell": cfg.cell,
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.config_hash(),
        "inputs": inputs,
        "outputs": outputs,
        "git_commit": git_commit(),
        "image": os.environ.get("EPS_IMAGE", "local"),
        "packages": package_versions(),
        "seed": cfg.seed,
        "hardware": hardware(),
        "resources": ctx.spec.resources.model_dump(),
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "wall_time_s": round(time.time() - started, 3),
        "metrics": metrics,
    }
    store.write_json(manifest_uri, manifest)  # last: its presence marks the stage complete
    return manifest


def execute(spec: StageSpec, raw_config: Any) -> dict:
    """Validate, skip-or-run, and write the manifest. Raises on failure; returns the manifest."""
    cfg = parse(spec.config, raw_config, f"config for stage {spec.name}")
    prefix = output_prefix(cfg, spec.name)
    inputs = input_hashes(cfg)
    done = complete_manifest(prefix, cfg, inputs)
    ctx = Context(spec, cfg)
    if done is not None:
        ctx.log("complete manifest with the same config and inputs found: skipping")
        return done
    stale = store.join(prefix, MANIFEST)
    if store.exists(stale):
        store.delete(stale)  # a changed config or input: the old manifest no longer vouches for the outputs
    started = time.time()
    ctx.log(f"starting (config {cfg.config_hash()[:12]}) -> {prefix}")
    metrics = spec.run(cfg, ctx) or {}
    metrics = {**ctx.metrics, **metrics}
    manifest = _write_manifest(ctx, cfg, inputs, started, metrics)
    ctx.log(f"done in {manifest['wall_time_s']:.1f}s")
    return manifest


def run_stage(spec: StageSpec, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {spec.module}", description=spec.description)
    parser.add_argument("--config", required=True, help="JSON text, a path to a JSON file, or a store URI")
    args = parser.parse_args(argv)
    try:
        execute(spec, load_config_text(args.config))
        return 0
    except INPUT_ERRORS as err:
        print(f"error: {spec.name}: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"error: {spec.name}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as err:  # a bug, not bad input: keep the traceback for whoever debugs it
        traceback.print_exc()
        print(f"error: {spec.name}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
