"""The Argo exit handler: record how a cluster run ended in ``<store>/runs/<run_id>/_status.json``.

The Argo engine runs this in a small CPU pod after every workflow, whatever its outcome::

    python -m workflows.exit_status --store s3://bucket/eps --run-id issue164-full-ab12cd34 --experiment issue164 \
        --workflow {{workflow.name}} --status {{workflow.status}} --failures {{workflow.failures}} \
        --duration {{workflow.duration}}

``--failures`` is Argo's JSON list of failed nodes (displayName, message, templateName, phase, podName,
finishedAt). The record lets a person (or a later run) see from the store alone whether the run finished and which
tasks failed with what message, without the Argo UI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from typing import Any

STATUS_FILE = "_status.json"


def parse_failures(text: str | None) -> list[dict[str, Any]]:
    """Argo's ``{{workflow.failures}}``: JSON list, ``null``/empty when nothing failed, unresolved when unknown."""
    if text is None:
        return []
    text = text.strip()
    if not text or text == "null" or text.startswith("{{"):
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return [{"message": text[:2000]}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return [{"message": str(value)[:2000]}]
    out = []
    for item in value:
        if isinstance(item, dict):
            out.append({k: item[k] for k in ("displayName", "message", "templateName", "phase", "podName", "finishedAt")
                        if k in item})
        else:
            out.append({"message": str(item)[:2000]})
    return out


def status_record(args: argparse.Namespace) -> dict[str, Any]:
    failures = parse_failures(args.failures)
    status = (args.status or "").strip()
    if status.startswith("{{"):
        status = "Unknown"
    try:
        duration = round(float(args.duration), 3) if args.duration else None
    except ValueError:
        duration = None
    return {
        "run_id": args.run_id,
        "experiment": args.experiment,
        "workflow": args.workflow,
        "status": status or "Unknown",
        "succeeded": status == "Succeeded",
        "failed_tasks": sorted({f["displayName"] for f in failures if f.get("displayName")}),
        "failures": failures,
        "duration_s": duration,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "git_commit": os.environ.get("EPS_GIT_SHA", "unknown"),
        "engine": "argo",
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workflows.exit_status", description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="the run's store root (s3://... or file://...)")
    p.add_argument("--run-id", required=True)
    p.add_argument("--experiment", default="")
    p.add_argument("--workflow", default="", help="the Argo workflow name")
    p.add_argument("--status", default="", help="{{workflow.status}}: Succeeded, Failed or Error")
    p.add_argument("--failures", default="", help="{{workflow.failures}}: JSON list of failed nodes")
    p.add_argument("--duration", default="", help="{{workflow.duration}} in seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    from shared.core import store

    args = parser().parse_args(argv)
    record = status_record(args)
    try:
        uri = store.join(store.normalize_root(args.store), "runs", args.run_id, STATUS_FILE)
        store.write_json(uri, record)
    except store.StoreError as err:
        print(f"error: exit_status: {err}", file=sys.stderr, flush=True)
        return 1
    failed = f"; failed: {', '.join(record['failed_tasks'])}" if record["failed_tasks"] else ""
    print(f"run {args.run_id}: {record['status']}{failed} -> {uri}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
