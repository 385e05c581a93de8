"""Experiment tracking: one Weights & Biases run per stage task, optional and off unless configured.

On when ``EPS_TRACKING=wandb`` (the engines set it from ``--set tracking=wandb`` or the chart's ``tracking.backend``)
or, with ``EPS_TRACKING`` unset, when ``WANDB_PROJECT`` is set; ``EPS_TRACKING=off`` or ``WANDB_MODE=disabled``
turns it off. The rest is the W&B SDK's own environment: ``WANDB_API_KEY`` (read by the SDK, never by this module,
so never logged or written), ``WANDB_ENTITY``, ``WANDB_MODE=offline``, ``WANDB_DIR``, ``WANDB_BASE_URL``.

The stage contract (``shared.contract.stage.execute``) starts the run when a stage computes -- a cached or reused result
starts none; its manifest keeps the link to the run that computed it -- and finishes it with the headline metrics,
the wall time, the figures and the headline tables the stage wrote. A stage adds its own per-step metrics with
``ctx.track.log({...}, step=...)``. Grouped by the workflow run id, ``job_type`` the stage, named after the cell,
tagged with workflow, profile and commit, the stage config as the W&B config.

No dependency on the service: with tracking off ``wandb`` is never imported, and the first failure of any W&B call
is one warning line, after which the stage goes on untracked. Tracking reads nothing into and writes nothing into a
stage's config or outputs, so the cache key and the stored result are the same with it on or off (the manifest
only gains a ``tracking`` block naming the run).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

TRACKING_ENV = "EPS_TRACKING"
BACKENDS = ("off", "wandb")
DEFAULT_PROJECT = "explore-persona-space"
URL_FILE_ENV = "EPS_TRACKING_URL_FILE"  # the Argo engine reads the run's URL back from here (a task output)
MAX_FIGURES = 40  # figures an analysis stage logs; its report holds all of them anyway
MAX_TABLE_ROWS = 2000
FINISH_TIMEOUT_S = 300.0  # a slow or unreachable server delays a finished stage at most this long

Warn = Callable[[str], None]


def backend(environ: Mapping[str, str] | None = None) -> str:
    """``wandb`` or ``off``, from the environment (see the module docstring)."""
    env = os.environ if environ is None else environ
    chosen = env.get(TRACKING_ENV, "").strip().lower()
    if env.get("WANDB_MODE", "").strip().lower() == "disabled":  # the SDK's own off switch
        return "off"
    if chosen:
        if chosen not in BACKENDS:
            raise ValueError(f"{TRACKING_ENV}={chosen!r}: use one of {', '.join(BACKENDS)}")
        return chosen
    return "wandb" if env.get("WANDB_PROJECT", "").strip() else "off"


def scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float | int | bool | str]:
    """The loggable leaves of ``values``: numbers, booleans and short strings; nested mappings as ``a/b`` keys."""
    out: dict[str, float | int | bool | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= scalars(value, f"{name}/")
        elif isinstance(value, (bool, int, float)):
            out[name] = value
        elif isinstance(value, str) and len(value) <= 200:
            out[name] = value
    return out


def row_tables(headline: Mapping[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The headline's tables: every list of flat records (at any depth) as (columns, rows), named by its path."""
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {}

    def cell(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        return json.dumps(value, default=str)[:200]

    def walk(value: Any, path: str) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{path}/{key}" if path else str(key))
        elif isinstance(value, list) and value and all(isinstance(r, Mapping) for r in value):
            columns = list(dict.fromkeys(k for r in value for k in r))
            tables[path or "rows"] = (columns, [[cell(r.get(c)) for c in columns] for r in value[:MAX_TABLE_ROWS]])

    walk(headline, "")
    return tables


class Tally:
    """Running counts, logged now and then rather than on every event (a judge may record 100,000 verdicts).

    Thread-safe: judges record verdicts from worker threads.
    """

    def __init__(self, tracker: Tracker, prefix: str, every_s: float = 15.0):
        self.tracker, self.prefix, self.every_s = tracker, prefix, every_s
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._last = time.monotonic()

    def add(self, counts: Mapping[str, int]) -> None:
        with self._lock:  # held while logging too: the logged totals only ever grow
            self.counts.update(counts)
            if time.monotonic() - self._last >= self.every_s:
                self._last = time.monotonic()
                self.tracker.log(dict(self.counts), prefix=self.prefix)

    def flush(self) -> None:
        with self._lock:
            self.tracker.log(dict(self.counts), prefix=self.prefix)


class Tracker:
    """Tracking off: every call is accepted and does nothing, so stages call ``ctx.track`` unconditionally."""

    def log(self, metrics: Mapping[str, Any], *, step: int | None = None, prefix: str = "") -> None:
        """Per-step metrics under ``prefix/``; ``step`` is the stage's own step counter (increasing), so a curve
        point such as ``{"step": 3, "loss": 0.4}`` can be passed as it is stored (its ``step`` is not a metric)."""

    def log_curve(self, points: Sequence[Mapping[str, Any]], *, since: int = 0) -> int:
        """Log the curve points from index ``since`` on, each at its own ``step``; returns how many are logged
        (call it after every step with the stage's growing curve, as stored in ``curve.jsonl``)."""
        for point in points[since:]:
            self.log(point, step=point.get("step"))
        return len(points)

    def summary(self, values: Mapping[str, Any]) -> None:
        """Values that describe the whole stage (the run's summary; nested mappings as ``a/b`` keys)."""

    def tally(self, prefix: str, every_s: float = 15.0) -> Tally:
        return Tally(self, prefix, every_s)

    def record(self) -> dict[str, Any] | None:
        """What the manifest keeps about the run (its URL); None when there is no run."""
        return None

    def finish(self, *, metrics: Mapping[str, Any] | None = None, wall_time_s: float | None = None,
               outputs_prefix: str | None = None, failed: bool = False) -> None:
        """End the run: headline metrics and wall time into the summary, figures and tables from the outputs."""


class WandbTracker(Tracker):
    """One W&B run. The first exception from any W&B call is one warning line; after it, nothing is tracked."""

    def __init__(self, run, warn: Warn):
        self.run, self.warn = run, warn
        self._lock = threading.Lock()  # judges log from worker threads

    def _guard(self, what: str, call: Callable[[Any], Any]) -> Any:
        run = self.run
        if run is None:
            return None
        try:
            return call(run)
        except Exception as err:  # the service, the disk, the SDK: never the stage's problem
            with self._lock:
                first, self.run = self.run is not None, None
            if first:
                self.warn(f"tracking: {what} failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); the stage goes on untracked")
                try:
                    run.finish(exit_code=1)
                except Exception:
                    pass
            return None

    def log(self, metrics: Mapping[str, Any], *, step: int | None = None, prefix: str = "") -> None:
        values = scalars({k: v for k, v in metrics.items() if k != "step"}, f"{prefix}/" if prefix else "")
        if values:
            self._guard("log", lambda run: run.log(values, step=step))

    def summary(self, values: Mapping[str, Any]) -> None:
        flat = scalars(values)
        if flat:
            self._guard("summary", lambda run: run.summary.update(flat))

    def record(self) -> dict[str, Any] | None:
        def read(run) -> dict[str, Any]:
            offline = run.settings.mode in ("offline", "dryrun")
            return {"backend": "wandb", "project": run.project, "entity": run.entity or None, "run_id": run.id,
                    "group": run.group, "url": None if offline else run.url, "mode": "offline" if offline else "online",
                    **({"offline_dir": str(run.settings.sync_dir)} if offline else {})}

        return self._guard("reading the run's URL", read)

    def finish(self, *, metrics: Mapping[str, Any] | None = None, wall_time_s: float | None = None,
               outputs_prefix: str | None = None, failed: bool = False) -> None:
        if self.run is None:
            return
        summary: dict[str, Any] = {"status": "failed" if failed else "complete"}
        if wall_time_s is not None:
            summary["wall_time_s"] = wall_time_s
        self.summary({**(metrics or {}), **summary})
        if outputs_prefix and not failed:
            self._guard("logging the stage's figures and tables", lambda run: self._log_outputs(run, outputs_prefix))
        self._guard("finishing", lambda run: run.finish(exit_code=1 if failed else 0))
        self.run = None

    def _log_outputs(self, run, prefix: str) -> None:
        """The figures (PNG) and the tables of ``headline.json`` an analysis stage wrote; the report as a file."""
        import wandb

        from shared.core import store

        uris = store.list_uris(prefix)
        name = lambda uri: uri[len(prefix.rstrip("/")) + 1:]  # noqa: E731
        figures = [u for u in uris if u.endswith(".png")][:MAX_FIGURES]
        headline = next((u for u in uris if name(u) == "headline.json"), None)
        report = next((u for u in uris if name(u) == "report.md"), None)
        with tempfile.TemporaryDirectory() as tmp:
            media: dict[str, Any] = {}
            for uri in figures:
                path = os.path.join(tmp, name(uri).replace("/", "__"))
                store.download_file(uri, path)
                media[f"figures/{name(uri)[:-4]}"] = wandb.Image(path, caption=name(uri))
            if headline:
                for path, (columns, rows) in row_tables(store.read_json(headline)).items():
                    media[f"tables/{path}"] = wandb.Table(columns=columns, data=rows)
            if media:
                run.log(media)
            if report:
                local = os.path.join(run.dir, "report.md")
                store.download_file(report, local)
                run.save(local, base_path=run.dir, policy="now")


def _tags(environ: Mapping[str, str], commit: str) -> list[str]:
    tags = [environ.get("EPS_EXPERIMENT", ""), environ.get("EPS_PROFILE", ""),
            commit[:8] if commit and commit != "unknown" else ""]
    return [t for t in dict.fromkeys(tags) if t][:8]


def start(stage: str, cfg, *, commit: str, cache_key: str, output_prefix: str, warn: Warn,
          environ: Mapping[str, str] | None = None) -> Tracker:
    """The tracker for one computing stage task: a W&B run when tracking is on, else the no-op ``Tracker``."""
    env = os.environ if environ is None else environ
    try:
        chosen = backend(env)
    except ValueError as err:
        warn(f"tracking: {err}; the stage goes on untracked")
        return Tracker()
    if chosen == "off":
        return Tracker()
    try:
        import wandb

        settings: dict[str, Any] = {"quiet": True}
        if "WANDB_CONSOLE" not in env:
            settings["console"] = "off"  # the stage's log goes to the store already; keep its streams as they are
        if "WANDB_FINISH_TIMEOUT" not in env:
            settings["finish_timeout"] = FINISH_TIMEOUT_S
        run = wandb.init(
            project=env.get("WANDB_PROJECT", "").strip() or DEFAULT_PROJECT,
            group=cfg.run_id, job_type=stage, name=cfg.cell,
            config=cfg.model_dump(mode="json"),
            tags=_tags(env, commit),
            notes=f"{stage} of cell {cfg.cell} in run {cfg.run_id}: {output_prefix} (cache key {cache_key[:12]})",
            dir=env.get("WANDB_DIR") or None,
            settings=wandb.Settings(**settings),
        )
    except Exception as err:
        warn(f"tracking: starting a W&B run failed ({type(err).__name__}: "
             f"{str(err).splitlines()[0] if str(err) else ''}); the stage goes on untracked")
        return Tracker()
    return WandbTracker(run, warn)


def write_url_file(record: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> None:
    """Leave the run's URL where the Argo engine collects it as the task's ``tracking-url`` output."""
    env = os.environ if environ is None else environ
    path = env.get(URL_FILE_ENV, "").strip()
    if not path or not record:
        return
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as fh:
            fh.write(record.get("url") or record.get("offline_dir") or "")
    except OSError:
        pass  # an output the UI shows, not a result
