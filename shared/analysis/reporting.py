"""Report building blocks: markdown tables and REPRODUCIBILITY.md, generated from stored artifacts only."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from shared.contract import stage as stage_contract
from shared.core import store


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def producing_manifest(artifact_uri: str) -> dict:
    """The manifest of the stage that wrote ``artifact_uri`` (the manifest beside it)."""
    prefix = artifact_uri.rsplit("/", 1)[0]
    while prefix.count("/") > 3:
        candidate = store.join(prefix, stage_contract.MANIFEST)
        if store.exists(candidate):
            return store.read_json(candidate)
        prefix = prefix.rsplit("/", 1)[0]
    raise store.StoreError(f"no manifest found above {artifact_uri}")


def reproducibility(title: str, params: dict, manifests: list[dict]) -> str:
    """Every parameter, commit, image, package version, seed, hardware and GPU-hours of the stages behind a report."""
    commits = sorted({m.get("git_commit", "unknown") for m in manifests})
    packages: dict[str, set[str]] = {}
    for m in manifests:
        for name, version in m.get("packages", {}).items():
            packages.setdefault(name, set()).add(version)
    gpu_hours = sum(m["wall_time_s"] * m.get("resources", {}).get("gpus", 0) for m in manifests) / 3600
    wall = sum(m["wall_time_s"] for m in manifests)
    gpu = gpu_time(lineage(manifests))
    lines = [f"# Reproducibility: {title}", "", f"- git commits: {', '.join(commits)}",
             f"- stages: {len(manifests)}; summed wall time {wall:.1f} s; GPU-hours {gpu_hours:.3f}",
             gpu_time_line(gpu), "", "## Experiment parameters", "", "```json"]
    import json

    lines += [json.dumps(params, indent=2, sort_keys=True, default=str), "```", "", "## Packages", ""]
    lines += [f"- {name}: {', '.join(sorted(v))}" for name, v in sorted(packages.items())]
    lines += ["", "## Stages", "",
              markdown_table(["cell", "stage", "image", "seed", "hardware", "wall s", "config hash"],
                             [(m["cell"], m["stage"], m.get("image", ""), m.get("seed"),
                               ", ".join(m.get("hardware", {}).get("gpus", [])) or f"{m.get('hardware', {}).get('cpus')} CPUs",
                               m["wall_time_s"], m["config_hash"][:12]) for m in manifests], align="lllrlrl")]
    lines += ["", gpu_time_section(gpu)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# GPU time: the cost model's estimate beside what the run measured


def lineage(manifests: list[dict]) -> list[dict]:
    """The manifests behind a report: those given and, transitively, the manifests of the stages that wrote their
    inputs (files in the store that no stage wrote end the walk)."""
    found: dict[str, dict] = {}
    todo = list(manifests)
    while todo:
        m = todo.pop()
        key = m.get("prefix") or f"{m.get('cell')}/{m.get('stage')}"
        if key in found:
            continue
        found[key] = m
        for uri in m.get("inputs", {}):
            try:
                todo.append(producing_manifest(uri))
            except (store.StoreError, OSError, ValueError):
                continue
    return sorted(found.values(), key=lambda m: (m.get("stage", ""), m.get("cell", "")))


def _on_gpu(m: dict) -> bool:
    return bool(m.get("hardware", {}).get("gpus")) and m.get("resources", {}).get("gpus", 0) > 0


def gpu_time(manifests: list[dict]) -> dict[str, Any]:
    """The results object of the GPU-time section: per stage and in total, the cost model's estimate of each GPU
    task (from its config, as before the run was submitted) and the measured GPU time (wall time x GPUs of the
    tasks that ran on a GPU; a reused task counts the run that computed it)."""
    from shared.contract import cost

    estimates = cost.estimate_tasks(cost.tasks_from_manifests(manifests), read_s3=True)
    by_task = {e.task.prefix: e for e in estimates}
    stages: dict[str, dict[str, Any]] = {}
    for m in manifests:
        e = by_task.get(m.get("prefix", ""))
        if e is None:
            continue  # a CPU stage
        row = stages.setdefault(m["stage"], {"stage": m["stage"], "gpu_class": e.task.gpu_class, "tasks": 0,
                                             "estimated_gpu_hours": 0.0, "at_deadline": 0, "on_gpu": 0,
                                             "measured_gpu_hours": 0.0, "wall_hours_off_gpu": 0.0})
        row["tasks"] += 1
        row["estimated_gpu_hours"] += e.declared_hours
        row["at_deadline"] += e.bounded
        if _on_gpu(m):
            row["on_gpu"] += 1
            row["measured_gpu_hours"] += m["wall_time_s"] * m["resources"]["gpus"] / 3600
        else:
            row["wall_hours_off_gpu"] += m["wall_time_s"] / 3600
    rows = sorted(stages.values(), key=lambda r: -r["estimated_gpu_hours"])
    per_class = cost.totals(estimates)
    return {
        "stages": rows,
        "estimated_gpu_hours": per_class["declared"],
        "estimated_gpu_hours_per_class": {k: v for k, v in per_class.items() if k != "declared"},
        "at_deadline": sum(r["at_deadline"] for r in rows),
        "measured_gpu_hours": sum(r["measured_gpu_hours"] for r in rows),
        "gpu_tasks": sum(r["tasks"] for r in rows),
        "on_gpu": sum(r["on_gpu"] for r in rows),
        "bounded_reasons": cost.bounded_reasons(estimates),
    }


def gpu_time_line(gpu: dict[str, Any]) -> str:
    bound = "at most " if gpu["at_deadline"] else ""
    classes = ", ".join(f"{k}: {v:.3f}" for k, v in gpu["estimated_gpu_hours_per_class"].items())
    return (f"- GPU time: estimated {bound}{gpu['estimated_gpu_hours']:.3f} GPU-hours on the stages' GPU classes "
            f"({classes}); measured {gpu['measured_gpu_hours']:.3f} GPU-hours on GPUs "
            f"({gpu['on_gpu']} of {gpu['gpu_tasks']} GPU-stage tasks ran on a GPU)")


def gpu_time_section(gpu: dict[str, Any]) -> str:
    lines = ["## GPU time: estimate and measurement", "",
             "Estimate: the cost model of `shared/contract/cost.py` (seconds per token of a Qwen2.5-7B-shaped model, measured "
             "in `bench/results/`; a smaller model costs less) applied to each GPU task's config, on its stage's GPU "
             "class, as `make submit` prints it before a run. "
             "Measured: wall time x GPUs of the tasks whose manifest records a GPU; tasks of GPU stages that ran on "
             "a CPU are counted apart (their wall time is no GPU time).", ""]
    lines.append(markdown_table(
        ["stage", "class", "tasks", "estimated GPU-h", "measured GPU-h", "tasks on a GPU", "wall h off GPU"],
        [(r["stage"], r["gpu_class"], r["tasks"], f"{'<= ' if r['at_deadline'] else ''}{r['estimated_gpu_hours']:.3f}",
          f"{r['measured_gpu_hours']:.3f}", r["on_gpu"], f"{r['wall_hours_off_gpu']:.3f}") for r in gpu["stages"]],
        align="llrrrrr"))
    lines += [f"- at deadline: {reason}" for reason in gpu["bounded_reasons"]]
    return "\n".join(lines)
