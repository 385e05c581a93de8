"""Wall time of finished workflow runs, read from their stored manifests (the ``small`` profile's budget table).

    python -m bench.small_runs --store file://artifacts small-issue164 small-issue170 ... [--out FILE.md]

For each run: its tasks, how many were computed here (not reused from the cache), the span from the first task's
start to the last task's end (the wall time a user waits, less the engine's start-up), and the sum of the tasks'
own wall times (what the run would take on one core-set with no overlap). Reused tasks count zero time: a budget
table is only meaningful for a run that computed everything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from shared.core import store


def run_summary(root: str, run_id: str) -> dict:
    plan = store.read_json(store.join(root, "runs", run_id, "_local", "plan.json"))
    spans, computed, reused, per_stage, commits = [], 0, 0, {}, set()
    for task in plan["tasks"]:
        uri = store.join(root, "runs", run_id, task["config"]["cell"], task["stage"], "manifest.json")
        manifest = store.read_json(uri)
        if manifest.get("reused_from"):
            reused += 1
            continue
        computed += 1
        commits.add(manifest.get("git_commit", "")[:7] + ("+dirty" if manifest.get("git_dirty") else ""))
        start = dt.datetime.fromisoformat(manifest["started_at"])
        seconds = float(manifest["wall_time_s"])
        spans.append((start, start + dt.timedelta(seconds=seconds)))
        per_stage[task["stage"]] = per_stage.get(task["stage"], 0.0) + seconds
    span = (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds() if spans else 0.0
    return {"run_id": run_id, "workflow": plan["workflow"], "profile": plan["profile"], "tasks": len(plan["tasks"]),
            "computed": computed, "reused": reused, "span_s": span,
            "task_seconds": sum(per_stage.values()), "per_stage_s": per_stage, "commits": sorted(commits)}


def markdown(rows: list[dict]) -> str:
    lines = ["| workflow | profile | commit | tasks (computed / reused) | wall time, first start to last end | "
             "sum of task times | slowest stages |", "| :--- | :--- | :--- | ---: | ---: | ---: | :--- |"]
    for r in rows:
        slow = sorted(r["per_stage_s"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"| {r['workflow']} | {r['profile']} | {', '.join(r['commits']) or '-'} | {r['tasks']} ({r['computed']} / {r['reused']}) | "
                     f"{r['span_s'] / 60:.1f} min | {r['task_seconds'] / 60:.1f} min | "
                     + ", ".join(f"{name} {sec / 60:.1f} min" for name, sec in slow) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.small_runs", description=__doc__.splitlines()[0])
    parser.add_argument("run_ids", nargs="+")
    parser.add_argument("--store", required=True, help="the runs' store root (file://... or s3://...)")
    parser.add_argument("--out", help="write the table here as well")
    args = parser.parse_args(argv)
    try:
        table = markdown([run_summary(args.store, run_id) for run_id in args.run_ids])
    except store.ArtifactNotFound as err:
        print(f"error: {err} (is the run finished, and the store right?)", file=sys.stderr)
        return 2
    print(table, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
