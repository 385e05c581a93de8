"""The stage contract: typed config in, artifacts out, ``manifest.json`` written last.

A job module defines ``SPEC = StageSpec(...)`` and ``main = SPEC.main``. ``run_stage`` does everything around the
stage's own ``run``:

- parse and validate the config; bad input is one readable error line and exit code 2;
- hold the stage's lease (one writer per output folder) while it settles or writes;
- settle from the cache when it can: a result is keyed by the stage, the fingerprint of its code, its config
  without run id, store and cell, and its inputs' content hashes. A complete manifest with that key in this
  run's folder is ``cached``; one in another run's folder is ``reused`` (its outputs hard-linked or copied here).
  Either is used only after its outputs still match the hashes its manifest recorded; a mismatch is one
  warning line and a recompute;
- otherwise run the stage into a staging folder, then put its outputs and manifest in place (on a file store in
  one atomic folder swap), so a run that fails (bad input, a crash, a kill) never replaces a previous complete
  result;
- copy its own log into the store (``runs/<run_id>/_logs/``) so nothing is lost with the pod;
- when tracking is on (``shared.contract.tracking``), give a computing stage one W&B run (``ctx.track``), finish it with the
  headline metrics and wall time, and put its URL in the manifest; tracking never touches the key or the result.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.contract import fingerprint, tracking
from shared.contract.lease import Lease, LeaseLost
from shared.core import store
from shared.core.config import (
    ARTIFACT_REF,
    ConfigError,
    PlanCheck,
    StageConfig,
    is_store_uri,
    parse,
    stable_hash,
)
from shared.lm import chat

MANIFEST = "manifest.json"
DEFAULT_RETRIES = 3  # attempts after the first, unless a stage says otherwise; both engines use it
TRACKED_PACKAGES = (
    "explore-persona-space", "torch", "transformers", "peft", "vllm", "anthropic", "numpy", "scipy",
    "scikit-learn", "sentence-transformers", "boto3",
)
CACHED, REUSED = "cached", "reused"


class StageInputError(RuntimeError):
    """The stage's inputs are unusable; the message is one readable line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM: stop like Ctrl-C, so the lease is released and the log copied before the process ends."""


# Errors that mean "bad input": one line, exit 2, no traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ConfigError, StageInputError, store.StoreError)


class Resources(BaseModel):
    """What a stage needs from a node; both engines read the deadline and retry count from here."""

    gpu_class: Literal["none", "h100", "h200"] = "none"
    gpus: int = 0
    cpu: int = 1
    memory: str = "4Gi"
    timeout_s: int = Field(3600, gt=0)
    retries: int | None = Field(None, ge=0)  # None: the workflow default (DEFAULT_RETRIES, or the cluster's)

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
    # checks a config needs its model for, made when the plan is made (fetch=False: only what is on this machine)
    # and by the stage before it computes (fetch=True); the default checks every system slot field (shared.lm.chat)
    plan_check: Callable[..., PlanCheck] = chat.check_slots

    @property
    def module(self) -> str:
        return f"jobs.{self.name}"

    @property
    def image(self) -> str:
        return f"eps-{self.name.replace('_', '-')}"

    @property
    def fingerprint(self) -> str:
        """The content hash of the code this stage runs (see ``shared.contract.fingerprint``)."""
        if fingerprint.is_project_module(self.module):
            return fingerprint.code_fingerprint(self.module)
        return fingerprint.file_fingerprint(inspect.getsourcefile(self.run))  # a stage defined in a test

    def main(self, argv: list[str] | None = None) -> int:
        code = run_stage(self, argv)
        if code:
            sys.exit(code)
        return 0


# ---------------------------------------------------------------------------------------------------------------
# where things live


def store_root(cfg: StageConfig) -> str:
    return store.normalize_root(cfg.store)


def output_prefix(cfg: StageConfig, stage: str) -> str:
    return store.join(store_root(cfg), "runs", cfg.run_id, cfg.cell, stage)


def staging_prefix(cfg: StageConfig, stage: str, key: str) -> str:
    # keyed by the work, so a retried attempt of the same work finds its checkpoints and other work starts clean
    return store.join(store_root(cfg), "runs", cfg.run_id, cfg.cell, f"{stage}.staging", key[:16])


def lease_uri(cfg: StageConfig, stage: str) -> str:
    return store.join(store_root(cfg), "runs", cfg.run_id, cfg.cell, f"{stage}.lease.json")


def log_uri(cfg: StageConfig, stage: str, started: float) -> str:
    stamp = datetime.fromtimestamp(started, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"{stamp}-{socket.gethostname()}-{os.getpid()}.log"
    return store.join(store_root(cfg), "runs", cfg.run_id, "_logs", cfg.cell, stage, name)


def index_folder(root: str, stage: str, key: str) -> str:
    """Where the results of one cache key are listed: one small record per output folder holding it."""
    return store.join(root, "cache", "stages", stage, key)


def _relative(root: str, uri: str) -> str:
    return uri[len(root.rstrip("/")) + 1:] if uri.startswith(root.rstrip("/") + "/") else uri


class Context:
    """What a running stage sees: where to write, how to log, how to report progress and metrics.

    ``prefix`` is the staging folder while the stage runs; ``final_prefix`` is where its outputs land once the
    manifest is written. Downstream tasks read from ``final_prefix``; a stage writes only through ``out``.
    """

    def __init__(self, spec: StageSpec, cfg: StageConfig, prefix: str | None = None):
        self.spec = spec
        self.cfg = cfg
        self.final_prefix = output_prefix(cfg, spec.name)
        self.prefix = prefix or self.final_prefix
        self.metrics: dict[str, Any] = {}
        self.tag = f"{cfg.cell}/{spec.name}"
        self.track: tracking.Tracker = tracking.Tracker()  # per-step metrics: ctx.track.log({...}, step=...)

    def out(self, *parts: str) -> str:
        return store.join(self.prefix, *parts)

    def log(self, message: str) -> None:
        print(f"[{self.tag}] {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"warning: [{self.tag}] {message}", file=sys.stderr, flush=True)

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


# ---------------------------------------------------------------------------------------------------------------
# provenance


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None


def git_commit() -> str:
    if os.environ.get("EPS_GIT_SHA"):
        return os.environ["EPS_GIT_SHA"]
    out = _git("rev-parse", "HEAD")
    return (out.stdout.strip() if out and out.returncode == 0 else "") or "unknown"


@cache
def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit; None when unknown (no git here, e.g. in an image)."""
    if os.environ.get("EPS_GIT_DIRTY", "").strip().lower() in ("true", "false"):
        return os.environ["EPS_GIT_DIRTY"].strip().lower() == "true"
    if os.environ.get("EPS_GIT_SHA"):
        return None
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None or out.returncode != 0 else bool(out.stdout.strip())


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


# ---------------------------------------------------------------------------------------------------------------
# the cache key


def input_hashes(cfg: StageConfig) -> dict[str, str]:
    """``{input URI: sha256}`` of every input the config names."""
    hashes = {}
    for name, uri in cfg.input_uris().items():
        try:
            hashes[uri] = store.sha256(uri)
        except store.ArtifactNotFound:
            raise StageInputError(f"input {name} not found: {uri}") from None
    return hashes


def keyed_config(cfg: StageConfig, inputs: dict[str, str]) -> Any:
    """The config as the cache sees it: no run id, store or cell; inputs by content; run paths made relative."""
    root = store_root(cfg)
    run = store.join(root, "runs", cfg.run_id)

    def norm(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: norm(v) for k, v in value.items()}
        if isinstance(value, list):
            return [norm(v) for v in value]
        if isinstance(value, str):
            if value in inputs:
                return f"sha256:{inputs[value]}"
            if value.startswith(ARTIFACT_REF) and value[len(ARTIFACT_REF):] in inputs:
                return f"{ARTIFACT_REF}sha256:{inputs[value[len(ARTIFACT_REF):]]}"
            if value == run or value.startswith(run + "/"):
                return "<run>" + value[len(run):]
            if value == root or value.startswith(root + "/"):
                return "<store>" + value[len(root):]
        return value

    dumped = cfg.model_dump(mode="json")
    return norm({k: v for k, v in dumped.items() if k not in ("store", "run_id", "cell")})


def cache_key(spec: StageSpec, cfg: StageConfig, inputs: dict[str, str]) -> str:
    return stable_hash({"stage": spec.name, "code": spec.fingerprint, "config": keyed_config(cfg, inputs)})


# ---------------------------------------------------------------------------------------------------------------
# finding a result that can be trusted


Warn = Callable[[str], None]


def _read_manifest(prefix: str, warn: Warn) -> dict | None:
    uri = store.join(prefix, MANIFEST)
    try:
        found = store.read_versioned(uri)
    except store.ArtifactNotFound:
        return None
    if found is None:
        return None
    try:
        manifest = json.loads(found[0])
    except ValueError:
        manifest = None
    problem = None
    if not isinstance(manifest, dict):
        problem = "is not a JSON object"
    elif not isinstance(manifest.get("outputs"), dict) or not isinstance(manifest.get("prefix"), str):
        problem = "has no outputs or prefix"
    if problem:
        warn(f"{uri} {problem}: not a usable manifest, ignored")
        return None
    return manifest


def _changed_outputs(manifest: dict, prefix: str) -> list[str]:
    """Outputs (relative names) that no longer hold what ``manifest`` recorded, read at ``prefix``."""
    recorded_prefix = manifest["prefix"].rstrip("/")
    checksums = manifest.get("output_checksums") or {}
    changed = []
    for uri, digest in manifest["outputs"].items():
        if not uri.startswith(recorded_prefix + "/"):
            changed.append(uri)
            continue
        rel = uri[len(recorded_prefix) + 1:]
        if not store.verify(store.join(prefix, rel), digest, checksums.get(uri)):
            changed.append(rel)
    return changed


def verified_manifest(prefix: str, key: str, warn: Warn) -> dict | None:
    """The manifest at ``prefix`` if it is complete, has ``key`` and its outputs still match; else None."""
    manifest = _read_manifest(prefix, warn)
    if manifest is None or manifest.get("status") != "complete" or manifest.get("cache_key") != key:
        return None
    changed = _changed_outputs(manifest, prefix)
    if changed:
        more = f" (+{len(changed) - 1} more)" if len(changed) > 1 else ""
        warn(f"stored result at {prefix} no longer matches its manifest ({changed[0]} changed or missing{more}): "
             "recomputing")
        return None
    return manifest


def _candidates(root: str, stage: str, key: str, own: str) -> list[str]:
    """Output folders of other runs that the index lists for ``key``, newest first."""
    records = []
    for uri in store.list_uris(index_folder(root, stage, key)):
        try:
            record = store.read_json(uri)
            prefix = store.join(root, record["prefix"])
        except (store.StoreError, KeyError, TypeError):
            continue
        if prefix != own:
            records.append((record.get("written_at", 0), prefix))
    return [p for _, p in sorted(records, reverse=True)]


def _index(root: str, stage: str, key: str, prefix: str) -> None:
    rel = _relative(root, prefix)
    uri = store.join(index_folder(root, stage, key), f"{store.sha256_bytes(rel.encode())[:16]}.json")
    store.write_json(uri, {"prefix": rel, "written_at": time.time()})


def _place(staging: str, prefix: str, outputs: list[str]) -> None:
    """Make the staged files the outputs at ``prefix``: the old manifest goes first, so no moment exists where it
    vouches for new files, then stale files go, then the staged files move in. The new manifest comes after."""
    store.delete(store.join(prefix, MANIFEST))
    keep = set(outputs)
    for uri in store.list_uris(prefix):
        if _relative(prefix, uri) not in keep:
            store.delete(uri)
    for rel in outputs:
        store.move(store.join(staging, rel), store.join(prefix, rel))


def _install(staging: str, prefix: str, outputs: list[str], manifest: dict) -> None:
    """Put the staged outputs and their manifest in place. On a file store the staged folder, manifest already in
    it, replaces the output folder in one step, so the previous complete result stays valid until the new one is
    whole; on S3 (no atomic rename) the old manifest goes first, then the outputs move in, the manifest last."""
    if prefix.startswith("file://"):
        store.write_json(store.join(staging, MANIFEST), manifest)
        store.replace_folder(staging, prefix)
        return
    _place(staging, prefix, outputs)
    # the checksums S3 computed as the outputs arrived, so that a later check needs no download
    manifest["output_checksums"] = _checksums(manifest["outputs"])
    store.write_json(store.join(prefix, MANIFEST), manifest)  # last: its presence marks the stage complete


def _checksums(uris: Iterable[str]) -> dict[str, str]:
    out = {}
    for uri in uris:
        if uri.startswith("s3://"):
            value = store.s3_checksum(uri)
            if value:
                out[uri] = value
    return out


def _reuse(spec: StageSpec, cfg: StageConfig, inputs: dict[str, str], key: str, source: str,
           warn: Warn) -> dict | None:
    """Bring the result at ``source`` (another run) here, verified; the new manifest, or None if it fails."""
    found = _read_manifest(source, warn)
    if found is None or found.get("status") != "complete" or found.get("cache_key") != key:
        return None
    prefix = output_prefix(cfg, spec.name)
    staging = staging_prefix(cfg, spec.name, key) + "-reuse"
    recorded = found["prefix"].rstrip("/")
    rels = [uri[len(recorded) + 1:] for uri in found["outputs"]]
    store.delete_prefix(staging)
    modes = {store.copy(store.join(source, rel), store.join(staging, rel)) for rel in rels}
    # the copies are checked, not the source: what is here is what is vouched for
    changed = _changed_outputs({**found, "prefix": staging,
                                "outputs": {store.join(staging, r): d for r, d in zip(rels, found["outputs"].values(),
                                                                                       strict=True)},
                                "output_checksums": {}}, staging)
    if changed:
        store.delete_prefix(staging)
        warn(f"stored result at {source} no longer matches its manifest ({changed[0]} changed or missing): "
             "not reused")
        return None
    outputs = {store.join(prefix, rel): digest for rel, digest in zip(rels, found["outputs"].values(), strict=True)}
    root = store_root(cfg)
    manifest = {
        **{k: v for k, v in found.items() if k not in ("reused_from",)},
        "run_id": cfg.run_id, "cell": cfg.cell, "prefix": prefix,
        "config": cfg.model_dump(mode="json"), "config_hash": cfg.config_hash(),
        "inputs": inputs, "outputs": outputs, "output_checksums": {},
        "reused_from": {
            "prefix": _relative(root, source), "run_id": found.get("run_id"), "cell": found.get("cell"),
            "mode": "link" if modes == {"link"} else "copy", "at": datetime.now(timezone.utc).isoformat(),
        },
    }
    _install(staging, prefix, rels, manifest)
    store.delete_prefix(staging)
    _index(root, spec.name, key, prefix)
    return manifest


def _relocated(manifest: dict, cfg: StageConfig, prefix: str, inputs: dict[str, str]) -> dict:
    """The same work found under other paths (a store folder that was moved or copied): say where it is now."""
    recorded = manifest["prefix"].rstrip("/")
    outputs = {store.join(prefix, uri[len(recorded) + 1:]): d for uri, d in manifest["outputs"].items()}
    return {**manifest, "prefix": prefix, "outputs": outputs, "output_checksums": _checksums(outputs),
            "inputs": inputs, "config": cfg.model_dump(mode="json"), "config_hash": cfg.config_hash()}


@dataclass
class Settled:
    how: Literal["cached", "reused"]
    manifest: dict


def settle(spec: StageSpec, cfg: StageConfig, warn: Warn, *, inputs: dict[str, str] | None = None) -> Settled | None:
    """A trustworthy existing result for this work: ``cached`` here, or ``reused`` from another run; else None.

    The caller holds the stage's lease (reuse writes into the output folder).
    """
    inputs = input_hashes(cfg) if inputs is None else inputs
    key = cache_key(spec, cfg, inputs)
    prefix = output_prefix(cfg, spec.name)
    own = verified_manifest(prefix, key, warn)
    if own is not None:
        if own.get("prefix") != prefix or own.get("inputs") != inputs or own.get("config_hash") != cfg.config_hash():
            own = _relocated(own, cfg, prefix, inputs)
            store.write_json(store.join(prefix, MANIFEST), own)
        return Settled(CACHED, own)
    for source in _candidates(store_root(cfg), spec.name, key, prefix):
        manifest = _reuse(spec, cfg, inputs, key, source, warn)
        if manifest is not None:
            return Settled(REUSED, manifest)
    return None


def read_manifest(prefix: str) -> dict:
    return store.read_json(store.join(prefix, MANIFEST))


# ---------------------------------------------------------------------------------------------------------------
# running


def _commit(ctx: Context, cfg: StageConfig, inputs: dict[str, str], key: str, started: float,
            metrics: dict, tracked: dict | None = None) -> dict:
    """Move the staged outputs into place with their manifest (see ``_install``)."""
    staging, prefix = ctx.prefix, ctx.final_prefix
    staged = store.list_uris(staging)
    rels = [_relative(staging, uri) for uri in staged]
    digests = [store.sha256(uri) for uri in staged]
    outputs = {store.join(prefix, rel): digest for rel, digest in zip(rels, digests, strict=True)}
    manifest = {
        "status": "complete",
        "stage": ctx.spec.name,
        "run_id": cfg.run_id,
        "cell": cfg.cell,
        "prefix": prefix,
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.config_hash(),
        "cache_key": key,
        "code_fingerprint": ctx.spec.fingerprint,
        "inputs": inputs,
        "outputs": outputs,
        "output_checksums": {},  # filled in by _install where the store keeps checksums
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "image": os.environ.get("EPS_IMAGE", "local"),
        "packages": package_versions(),
        "seed": cfg.seed,
        "hardware": hardware(),
        "resources": ctx.spec.resources.model_dump(),
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "wall_time_s": round(time.time() - started, 3),
        "metrics": metrics,
        **({"tracking": tracked} if tracked else {}),
    }
    _install(staging, prefix, rels, manifest)
    _index(store_root(cfg), ctx.spec.name, key, prefix)
    store.delete_prefix(staging)
    return manifest


def check_before_computing(spec: StageSpec, cfg: StageConfig) -> None:
    """The stage's plan-time check again, with its model at hand: what a plan could not check (a model not on the
    planning machine) is one error line here, before any work, instead of a traceback inside it."""
    problems = spec.plan_check(cfg, fetch=True).problems
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{problems[0]}{more}")


def execute(spec: StageSpec, raw_config: Any) -> dict:
    """Validate, settle-or-run under the stage's lease, and write the manifest. Raises on failure."""
    cfg = parse(spec.config, raw_config, f"config for stage {spec.name}")
    ctx = Context(spec, cfg)
    inputs = input_hashes(cfg)
    lease = Lease(lease_uri(cfg, spec.name), what=f"{cfg.run_id}/{cfg.cell}/{spec.name}")
    lease.acquire(log=ctx.log)
    started = time.time()
    try:
        settled = settle(spec, cfg, ctx.warn, inputs=inputs)
        if settled is not None:
            source = settled.manifest.get("reused_from", {})
            ctx.log("a verified complete result of the same work is here: skipping (cached)" if settled.how == CACHED
                    else f"same work done in run {source.get('run_id')}: reused ({source.get('mode')}), skipping")
            tracking.write_url_file(settled.manifest.get("tracking"))  # the run that computed it
            return settled.manifest
        check_before_computing(spec, cfg)
        key = cache_key(spec, cfg, inputs)
        ctx.prefix = staging_prefix(cfg, spec.name, key)
        started = time.time()
        ctx.log(f"starting (key {key[:12]}, code {spec.fingerprint[:12]}) -> {ctx.final_prefix}")
        ctx.track = tracking.start(spec.name, cfg, commit=git_commit(), cache_key=key, output_prefix=ctx.final_prefix,
                                   warn=ctx.warn)
        tracked = ctx.track.record()
        if tracked:
            ctx.log(f"tracking: {tracked.get('url') or tracked.get('offline_dir')}")
            tracking.write_url_file(tracked)
        metrics = spec.run(cfg, ctx) or {}
        metrics = {**ctx.metrics, **metrics}
        if lease.lost:  # too slow to renew (or a clock far off): another writer may be in the folder now
            raise LeaseLost(f"lease {lease.uri} was taken over while this stage ran: not committing (retried)")
        manifest = _commit(ctx, cfg, inputs, key, started, metrics, tracked)
        ctx.log(f"done in {manifest['wall_time_s']:.1f}s")
    except BaseException:
        ctx.track.finish(wall_time_s=round(time.time() - started, 3), failed=True)
        raise
    finally:
        lease.release()
    # after the lease: uploading to W&B never holds up another writer of this folder
    ctx.track.finish(metrics=manifest["metrics"], wall_time_s=manifest["wall_time_s"], outputs_prefix=manifest["prefix"])
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# the entrypoint: one error line, the log copied to the store


class _Tee(io.TextIOBase):
    """Writes to a stream and to a log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def __getattr__(self, name):
        return getattr(self.stream, name)


class StageLog:
    """Tees the stage's stdout and stderr into a file and copies it to the store now and then and at the end."""

    def __init__(self, every_s: float = 60.0):
        self.enabled = os.environ.get("EPS_LOG_COPY", "1") != "0"
        self.every_s = every_s
        self.uri: str | None = None
        self._stop = threading.Event()

    def __enter__(self) -> StageLog:
        if not self.enabled:
            return self
        fd, self.path = tempfile.mkstemp(prefix="eps-stage-", suffix=".log")
        self.file = os.fdopen(fd, "w", buffering=1)
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.file), _Tee(sys.stderr, self.file)
        threading.Thread(target=self._keep, name="log-copy", daemon=True).start()
        return self

    def send_to(self, uri: str) -> None:
        self.uri = uri

    def _copy(self) -> None:
        if self.uri:
            try:
                self.file.flush()
                store.upload_file(self.path, self.uri)
            except (store.StoreError, OSError):
                pass  # losing a log copy must not fail the stage

    def _keep(self) -> None:
        while not self._stop.wait(self.every_s):
            self._copy()

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._stop.set()
        sys.stdout, sys.stderr = self.saved
        self._copy()
        self.file.close()
        Path(self.path).unlink(missing_ok=True)


def _on_sigterm(_signum, _frame):
    raise Terminated()


def run_stage(spec: StageSpec, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {spec.module}", description=spec.description)
    parser.add_argument("--config", required=True, help="JSON text, a path to a JSON file, or a store URI")
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    with StageLog() as log:
        try:
            raw = load_config_text(args.config)
            cfg = parse(spec.config, raw, f"config for stage {spec.name}")
            log.send_to(log_uri(cfg, spec.name, time.time()))
            write_argo_outputs(execute(spec, raw))
            return 0
        except INPUT_ERRORS as err:
            print(f"error: {spec.name}: {err}", file=sys.stderr, flush=True)
            return 2
        except Terminated:
            print(f"error: {spec.name}: terminated (SIGTERM)", file=sys.stderr, flush=True)
            return 143
        except KeyboardInterrupt:
            print(f"error: {spec.name}: interrupted", file=sys.stderr, flush=True)
            return 130
        except Exception as err:  # a bug, not bad input: keep the traceback for whoever debugs it
            traceback.print_exc()
            print(f"error: {spec.name}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return 1


# ---------------------------------------------------------------------------------------------------------------
# what the Argo UI shows of a finished task: its outputs, read by the Argo engine's templates


ARGO_OUTPUTS_ENV = "EPS_ARGO_OUTPUTS"  # a folder the Argo engine's templates read output parameters and artifacts from
ARGO_METRICS_FILE = "metrics.json"  # output parameter ``metrics``: the headline metrics, flattened, as JSON
ARGO_MANIFEST_FILE = "manifest-uri"  # output parameter ``manifest``: where the manifest is
ARGO_METRICS_MAX_CHARS = 4000  # output parameters live in the Workflow object: keep them small
ARGO_REPORT_FILES = ("report.md", "REPRODUCIBILITY.md", "headline.json")  # artifacts of the same names
ARGO_FIGURES = "figures"  # artifact folder of every figure a stage writes
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def flat_metrics(metrics: dict, limit: int = ARGO_METRICS_MAX_CHARS) -> dict[str, Any]:
    """Scalar metrics with dotted names (``grid1.alpha``), in name order, as many as fit in ``limit`` characters."""
    flat: dict[str, Any] = {}

    def walk(value: Any, name: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, bool) or value is None or isinstance(value, (int, float)):
            flat[name] = value
        elif isinstance(value, str):
            flat[name] = value[:200]

    walk(metrics, "")
    kept: dict[str, Any] = {}
    size = 2  # "{}"
    for name in sorted(flat):
        item = len(json.dumps(name)) + 2 + len(json.dumps(flat[name], default=str)) + (2 if kept else 0)
        if size + item > limit:
            break
        kept[name] = flat[name]
        size += item
    return kept


def write_argo_outputs(manifest: dict, environ: dict[str, str] | None = None) -> None:
    """In an Argo pod (``EPS_ARGO_OUTPUTS`` set): the headline metrics and the manifest's URI as output parameter
    files, and local copies of the report files and figures for the analysis task's artifacts. Outside Argo it does
    nothing; a failure here is one warning line, never a failed stage (the results are already in the store)."""
    folder = (os.environ if environ is None else environ).get(ARGO_OUTPUTS_ENV, "").strip()
    if not folder:
        return
    try:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / ARGO_METRICS_FILE).write_text(json.dumps(flat_metrics(manifest.get("metrics") or {}), default=str))
        (out / ARGO_MANIFEST_FILE).write_text(store.join(manifest["prefix"], MANIFEST))
        prefix = manifest["prefix"].rstrip("/") + "/"
        for uri in manifest.get("outputs", {}):
            rel = uri[len(prefix):] if uri.startswith(prefix) else uri.rsplit("/", 1)[-1]
            if rel in ARGO_REPORT_FILES:
                store.download_file(uri, out / rel)
            elif rel.endswith(FIGURE_SUFFIXES):
                store.download_file(uri, out / ARGO_FIGURES / rel)
    except (OSError, store.StoreError, KeyError) as err:
        print(f"warning: Argo outputs not written ({type(err).__name__}: {err}); the results are in the store",
              file=sys.stderr, flush=True)
