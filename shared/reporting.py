"""Report building blocks: markdown tables and REPRODUCIBILITY.md, generated from stored artifacts only."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from shared import stage as stage_contract
from shared import store


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
    lines = [f"# Reproducibility: {title}", "", f"- git commits: {', '.join(commits)}",
             f"- stages: {len(manifests)}; summed wall time {wall:.1f} s; GPU-hours {gpu_hours:.3f}", "",
             "## Experiment parameters", "", "```json"]
    import json

    lines += [json.dumps(params, indent=2, sort_keys=True, default=str), "```", "", "## Packages", ""]
    lines += [f"- {name}: {', '.join(sorted(v))}" for name, v in sorted(packages.items())]
    lines += ["", "## Stages", "",
              markdown_table(["cell", "stage", "image", "seed", "hardware", "wall s", "config hash"],
                             [(m["cell"], m["stage"], m.get("image", ""), m.get("seed"),
                               ", ".join(m.get("hardware", {}).get("gpus", [])) or f"{m.get('hardware', {}).get('cpus')} CPUs",
                               m["wall_time_s"], m["config_hash"][:12]) for m in manifests], align="lllrlrl")]
    return "\n".join(lines) + "\n"
