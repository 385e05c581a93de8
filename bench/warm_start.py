"""Cold against warm task starts in the local engine, side by side on the same plan.

The plan is ``--tasks`` independent tiny ``generate`` tasks (a real stage: torch, transformers, the tiny model, a few
tokens), each in a fresh run folder so nothing is cached. Each mode runs in its own child process, so the CPU time
of the engine, the warm-start server and every stage process is read from that child's ``RUSAGE_CHILDREN``:

    python -m bench.warm_start --tasks 8 --out bench/results/warm_start.json

writes the measurements and, beside them, the table (``warm_start.md``) generated from them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = [{"id": "q1", "text": "Hello there?"}]


def run_one(tasks: int, store_root: str) -> int:
    from workflows.engines.local import run_plan
    from workflows.plan import PlanBuilder

    builder = PlanBuilder("issue164", "tiny", "warm-start-bench", store_root)
    for i in range(tasks):
        builder.add(f"gen-{i}", "generate", f"c{i}", condition=f"c{i}", model_ref="tiny:qwen2", questions=QUESTIONS,
                    n=1, max_new_tokens=4, backend="hf", seed=i)
    result = run_plan(builder.plan({}), live=False, retries=0)
    return 0 if result.ok else 1


def measure(mode: str, tasks: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "EPS_WARM_START": "1" if mode == "warm" else "0"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.warm_start", "--one", "--tasks", str(tasks),
                        "--store", Path(folder).as_uri()], env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"mode": mode, "tasks": tasks, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "cpu_s_per_task": round(cpu / tasks, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--out", help="write the measurements here (JSON)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return run_one(args.tasks, args.store)
    rows = [measure(mode, args.tasks) for mode in ("cold", "warm")]
    result = {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(), "rows": rows,
              "cpu_saved_s_per_task": round(rows[0]["cpu_s_per_task"] - rows[1]["cpu_s_per_task"], 2)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".md").write_text(table(result))
    return 0


def table(result: dict) -> str:
    """The measurements as the Markdown table the bench README links to."""
    label = {"cold": "cold (a fresh interpreter per task)", "warm": "warm (forked from the server)"}
    lines = [f"# Cold against warm task starts ({result['rows'][0]['tasks']} uncached tiny generate tasks, "
             f"{result['cpus']} CPUs, load average {result['load_average_at_end'][0]:.1f} at the end)", "",
             "| start | wall | CPU (engine, server, stages) | CPU per task |", "| :--- | ---: | ---: | ---: |"]
    lines += [f"| {label[r['mode']]} | {r['wall_s']:.1f} s | {r['cpu_s']:.1f} s | {r['cpu_s_per_task']:.1f} s |"
              for r in result["rows"]]
    return "\n".join([*lines, "", f"CPU saved per task: {result['cpu_saved_s_per_task']:.1f} s", ""])


if __name__ == "__main__":
    sys.exit(main())
