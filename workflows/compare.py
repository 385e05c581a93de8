"""Runs side by side: ``python -m workflows compare RUN...`` (``make compare RUNS="a b c"``).

One table of every headline metric per condition across the runs (from each run's analysis ``headline.json``),
headed by each run's workflow, profile, commit and config hash, as Markdown and CSV; below it, what differs
between their configs: the analysis configs (the experiment parameters among them), field by field, with run ids
in URIs made equal, and the tasks whose cache keys differ (their code, config or inputs changed) or that only one
run has. Everything is read from the store: manifests, ``headline.json`` and the local engine's ``plan.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.contract import stage as stage_contract
from shared.core import store
from shared.core.config import ConfigError, stable_hash

ANALYSIS_PREFIX = "analyze_"
# the field that names a record in a list of records: the condition (or cell, persona ...) a metric belongs to
RECORD_KEYS = ("condition", "cell", "name", "persona", "checkpoint", "label", "source", "judge", "id")
# settings a headline.json repeats (the parameters, judge specs, templates): compared as config below, not as metrics
NOT_METRICS = {"params", "judge", "judges", "templates"}
NOT_A_NUMBER = re.compile(r"^([a-z0-9+.-]+://.*|[0-9a-f]{32,})$")  # URIs and hashes name artifacts: no metric
MAX_LIST = 8  # a list of at most this many scalars is one value ("8, 10, 12"); longer ones (curves) are left out
RUN_FIELDS = ("workflow", "profile", "commit", "config hash", "parameters hash")


@dataclass
class Run:
    """What one run contributes to the comparison, read from the store."""

    run_id: str
    folder: str
    manifests: list[dict]
    analyses: list[dict]
    plan: dict | None = None
    metrics: dict[tuple[str, str], Any] = field(default_factory=dict)  # (metric, condition) -> value

    @property
    def workflow(self) -> str:
        if self.plan:
            return self.plan.get("workflow", "")
        return ", ".join(a["stage"].removeprefix(ANALYSIS_PREFIX) for a in self.analyses)

    @property
    def profile(self) -> str:
        for a in self.analyses:
            if a["config"].get("profile"):
                return a["config"]["profile"]
        return (self.plan or {}).get("profile") or "unknown"

    @property
    def commit(self) -> str:
        marks = sorted({m.get("git_commit", "unknown")[:12] + ("+dirty" if m.get("git_dirty") else "")
                        for m in self.analyses})
        return ", ".join(marks)

    @property
    def config_hash(self) -> str:
        return ", ".join(a["config_hash"][:12] for a in self.analyses)

    @property
    def params(self) -> dict:
        for a in self.analyses:
            if a["config"].get("params"):
                return a["config"]["params"]
        return (self.plan or {}).get("params", {})

    def header(self) -> dict[str, str]:
        return {"workflow": self.workflow, "profile": self.profile, "commit": self.commit,
                "config hash": self.config_hash, "parameters hash": stable_hash(self.params)[:12]}


# ---------------------------------------------------------------------------------------------------------------
# reading runs


def run_folder(root: str, run: str) -> tuple[str, str]:
    """(run id, folder URI) of ``run``: a run id in the store ``root``, or the URI of a run folder (``.../runs/<id>``)."""
    if "://" in run and "/runs/" in run:
        folder = run.rstrip("/")
        return folder.rsplit("/", 1)[1], folder
    return run, store.join(root, "runs", run)


def read_run(root: str, run: str) -> Run:
    run_id, folder = run_folder(root, run)
    uris = [u for u in store.list_uris(folder) if u.endswith("/" + stage_contract.MANIFEST)]
    manifests = []
    for uri in uris:
        rel = uri[len(folder) + 1:]
        if rel.startswith("_") or rel.count("/") != 2:  # <cell>/<stage>/manifest.json only (no _local, _configs)
            continue
        m = store.read_json(uri)
        if m.get("status") == "complete":
            manifests.append(m)
    if not manifests:
        raise ConfigError(f"run {run_id}: no complete stage in {folder} (a run id in this store, or a run folder URI)")
    analyses = sorted((m for m in manifests if m["stage"].startswith(ANALYSIS_PREFIX)), key=lambda m: m["stage"])
    if not analyses:
        raise ConfigError(f"run {run_id}: no complete analysis stage in {folder}; compare needs finished runs")
    result = Run(run_id, folder, manifests, analyses, plan=_read_plan(folder))
    for a in analyses:
        headline = next((u for u in a["outputs"] if u.endswith("/headline.json")), None)
        if headline is None:
            raise ConfigError(f"run {run_id}: the {a['stage']} stage wrote no headline.json")
        prefix = a["stage"].removeprefix(ANALYSIS_PREFIX) + ":" if len(analyses) > 1 else ""
        for (metric, condition), value in headline_metrics(store.read_json(headline)).items():
            result.metrics[(prefix + metric, condition)] = value
    return result


def _read_plan(folder: str) -> dict | None:
    for name in ("_local/plan.json", "_plan.json"):  # the local engine's; the one `make submit` leaves
        uri = store.join(folder, name)
        if store.exists(uri):
            return store.read_json(uri)
    return None


# ---------------------------------------------------------------------------------------------------------------
# headline.json as (metric, condition) -> value


def _record_key(items: list) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    for key in RECORD_KEYS:
        values = [i.get(key) for i in items]
        if all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values) and len(set(values)) == len(values):
            return key
    return None


def headline_metrics(headline: Any) -> dict[tuple[str, str], Any]:
    """Every scalar of ``headline.json`` as ``(metric path, condition)``. A list of records that each name a
    condition (or cell, persona ...) gives that name as the condition of the metrics inside it; a record inside a
    condition's record is named in the metric path (``judges[sonnet].alpha``); metrics outside any record have
    condition ``""``. Short lists of scalars are one value; long lists (curves) and nulls are left out."""
    out: dict[tuple[str, str], Any] = {}

    def walk(value: Any, path: str, condition: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in NOT_METRICS:
                    walk(item, f"{path}.{key}" if path else str(key), condition)
        elif isinstance(value, list):
            key = _record_key(value)
            if key is not None:
                for record in value:
                    rest = {k: v for k, v in record.items() if k != key}
                    if condition:
                        walk(rest, f"{path}[{record[key]}]", condition)
                    else:
                        walk(rest, path, str(record[key]))
            elif len(value) <= MAX_LIST and all(_scalar(v) for v in value):
                out[(path, condition)] = tuple(value)
        elif _scalar(value) and value is not None and not (isinstance(value, str) and NOT_A_NUMBER.match(value)):
            out[(path, condition)] = value

    walk(headline, "", "")
    return out


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _text(value: Any, digits: int | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ", ".join(_text(v, digits) for v in value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if digits else repr(value)
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# what differs


def _normalized(value: Any, run: Run) -> Any:
    """A config with this run's own paths made equal across runs (``runs/<run id>/`` -> ``runs/<run>/``)."""
    text = json.dumps(value, sort_keys=True, default=str)
    text = text.replace(f"/runs/{run.run_id}/", "/runs/<run>/")
    return json.loads(text)


def _flat(value: Any, path: str = "") -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{path}.{key}" if path else str(key)))
        return out
    return {path: json.dumps(value, sort_keys=True, default=str)}


def config_differences(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """(field, value in each run) for every analysis-config field that is not the same in all runs."""
    flats = []
    for r in runs:
        config = {}
        for a in r.analyses:
            cfg = {k: v for k, v in a["config"].items() if k not in ("run_id", "store", "cell")}
            config[a["stage"]] = _normalized(cfg, r)
        flats.append(_flat(config if len(config) > 1 else next(iter(config.values()))))
    keys = sorted(set().union(*flats))
    missing = "(absent)"
    return [(k, [f.get(k, missing) for f in flats]) for k in keys if len({f.get(k, missing) for f in flats}) > 1]


def task_differences(runs: list[Run]) -> dict[str, list[str]]:
    """Tasks (``cell/stage``) not in every run, and those in all whose result was computed differently: by other
    code (the stage's code fingerprint differs), or by the same code from another config or other inputs (the
    cache key differs)."""
    by_run = [{f"{m['cell']}/{m['stage']}": m for m in r.manifests} for r in runs]
    every = set().union(*by_run)
    in_all = set.intersection(*(set(k) for k in by_run))

    def differ(task: str, field_name: str) -> bool:
        return len({tasks[task].get(field_name) for tasks in by_run}) > 1

    code = sorted(t for t in in_all if differ(t, "code_fingerprint"))
    return {
        "code": code,
        "config_or_inputs": sorted(t for t in in_all if t not in code and differ(t, "cache_key")),
        "not_in_all": sorted(every - in_all),
    }


# ---------------------------------------------------------------------------------------------------------------
# the table


@dataclass
class Comparison:
    """The results object of a comparison: every number the Markdown and the CSV print."""

    runs: list[Run]
    rows: list[tuple[str, str, list[Any]]]  # (metric, condition, value per run)
    config_differences: list[tuple[str, list[str]]]
    task_differences: dict[str, list[str]]


def compare(root: str, run_names: list[str]) -> Comparison:
    if len(run_names) < 2:
        raise ConfigError("compare needs at least two runs: make compare RUNS=\"<run id> <run id> ...\"")
    if len(set(run_names)) != len(run_names):
        raise ConfigError(f"compare: a run is named twice in {run_names}")
    runs = [read_run(root, name) for name in run_names]
    headers = [r.header() for r in runs]
    rows: list[tuple[str, str, list[Any]]] = [(f, "", [h[f] for h in headers]) for f in RUN_FIELDS]
    # per condition first, metric by metric with the conditions in the order the runs list them; then the rest
    seen: dict[tuple[str, str], None] = {}
    for r in runs:
        seen.update(dict.fromkeys(r.metrics))
    conditions = list(dict.fromkeys(c for _, c in seen if c))
    keys = sorted(seen, key=lambda k: (k[1] == "", k[0], conditions.index(k[1]) if k[1] else 0))
    rows += [(metric, condition, [r.metrics.get((metric, condition)) for r in runs]) for metric, condition in keys]
    return Comparison(runs, rows, config_differences(runs), task_differences(runs))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(c: Comparison) -> str:
    ids = [r.run_id for r in c.runs]
    lines = [f"# Runs compared: {', '.join(ids)}", "",
             "| metric | condition | " + " | ".join(_cell(i) for i in ids) + " |",
             "| :--- | :--- | " + " | ".join("---:" for _ in ids) + " |"]
    for metric, condition, values in c.rows:
        marks = "" if len({_text(v) for v in values}) == 1 else " *"
        lines.append(f"| {_cell(metric)}{marks} | {_cell(condition)} | "
                     + " | ".join(_cell(_text(v, digits=4)) for v in values) + " |")
    lines += ["", "`*`: not the same in every run; an empty cell: the run has no such metric.", "",
              "## What differs between their configs", ""]
    if c.config_differences:
        lines += ["Analysis config (experiment parameters under `params`), run ids in paths made equal:", "",
                  "| field | " + " | ".join(_cell(i) for i in ids) + " |",
                  "| :--- | " + " | ".join(":---" for _ in ids) + " |"]
        lines += [f"| {_cell(k)} | " + " | ".join(_cell(v[:120]) for v in values) + " |"
                  for k, values in c.config_differences]
    else:
        lines.append("Analysis configs: the same (run ids in paths made equal).")
    t = c.task_differences
    lines += ["",
              _task_line("tasks computed by other code (the stage's code fingerprint differs)", t["code"]),
              _task_line("tasks computed from another config or other inputs, same code", t["config_or_inputs"]),
              _task_line("tasks not in every run", t["not_in_all"])]
    return "\n".join(lines) + "\n"


def _task_line(what: str, tasks: list[str], shown: int = 30) -> str:
    if not tasks:
        return f"- {what}: none"
    return f"- {what}: {len(tasks)}: {', '.join(tasks[:shown])}" + (" ..." if len(tasks) > shown else "")


def to_csv(c: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["metric", "condition", *(r.run_id for r in c.runs)])
    for metric, condition, values in c.rows:
        writer.writerow([metric, condition, *(_text(v) for v in values)])
    return buffer.getvalue()


def write(c: Comparison, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, table = out / "compare.md", out / "compare.csv"
    md.write_text(to_markdown(c))
    table.write_text(to_csv(c))
    return md, table


def default_out_dir(run_names: list[str]) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", "-vs-".join(n.rstrip("/").rsplit("/", 1)[-1] for n in run_names))
    return Path("artifacts") / "compare" / name[:150]
