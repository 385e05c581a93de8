"""The cost gate: a plan's estimated GPU-hours, printed before it is compiled or submitted, and a stop above a
threshold unless the submitter approves.

``make workflow-yaml`` and ``make submit`` print the estimate per stage and in total, per GPU class (the cost model
and its calibration are ``shared/contract/cost.py``); ``make submit`` stops before anything is sent when the tasks it would
run are estimated above ``--max-gpu-hours`` (default 20) on their stages' GPU classes, until ``--approve`` is given.

``python -m workflows.cost --calibrate`` rewrites ``shared/data/cost/rates.json`` from ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from shared.contract import cost
from workflows.cluster import ClusterError
from workflows.plan import Plan

DEFAULT_MAX_GPU_HOURS = 20.0
ROOT = Path(__file__).resolve().parent.parent
BENCH_RESULTS = ROOT / "bench" / "results"
RATES_PATH = ROOT / "shared" / "data" / cost.RATES_FILE


def estimate(plan: Plan, names: Iterable[str] | None = None, *, read_s3: bool = False) -> list[cost.TaskEstimate]:
    """Estimates of the plan's GPU tasks (or of those named), each sized with the whole plan in view; training
    sets in S3 are read for their size only with ``read_s3`` (submit, which reaches the store anyway)."""
    refs = [cost.TaskRef(name=t.name, stage=t.stage, config=t.parsed_config().model_dump(mode="json"),
                         prefix=t.output_prefix(), gpus=t.spec.resources.gpus, gpu_class=t.spec.resources.gpu_class,
                         timeout_s=t.spec.resources.timeout_s) for t in plan.tasks]
    keep = set(names) if names is not None else None
    return [e for e in cost.estimate_tasks(refs, read_s3=read_s3) if keep is None or e.task.name in keep]


def report(plan: Plan, estimates: list[cost.TaskEstimate], *, left_out: int = 0) -> str:
    """The lines ``workflow-yaml`` and ``submit`` print: the table, the bounds, the total on the declared classes."""
    head = f"estimated GPU time of {plan.workflow} ({plan.profile} profile), run {plan.run_id}"
    if left_out:
        head += f": the {len(estimates)} GPU tasks to run ({left_out} tasks complete in the store are left out)"
    lines = [head, "", cost.table(estimates), ""]
    lines += [f"at deadline: {reason}" for reason in cost.bounded_reasons(estimates)]
    total = cost.totals(estimates)["declared"]
    bound = "at most " if any(e.bounded for e in estimates) else ""
    lines.append(f"total on the stages' GPU classes: {bound}{total:.2f} GPU-hours "
                 "(cost model: shared/contract/cost.py, rates of a Qwen2.5-7B-shaped model in bench/results)")
    return "\n".join(lines)


def gate(estimates: list[cost.TaskEstimate], *, max_gpu_hours: float, approve: bool) -> None:
    """Stop (a ClusterError, before anything is sent) when the estimate is above the threshold and not approved."""
    total = cost.totals(estimates)["declared"]
    if total > max_gpu_hours and not approve:
        raise ClusterError(
            f"estimated {total:.1f} GPU-hours is above the {max_gpu_hours:g} GPU-hour gate: nothing was sent; "
            "check the estimate above and submit again with --approve (make submit ARGS=\"... --approve\"), "
            "or raise --max-gpu-hours"
        )


def write_rates(bench: Path = BENCH_RESULTS, path: Path = RATES_PATH) -> dict:
    rates = cost.calibrate(bench)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rates, indent=2, sort_keys=True) + "\n")
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workflows.cost", description=__doc__.splitlines()[0])
    p.add_argument("--calibrate", action="store_true", help=f"rewrite {RATES_PATH.relative_to(ROOT)} from bench/results")
    args = p.parse_args(argv)
    if args.calibrate:
        write_rates()
        print(f"wrote {RATES_PATH.relative_to(ROOT)}")
        return 0
    print(json.dumps(cost.rates(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
