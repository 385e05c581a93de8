"""Command line: ``python -m workflows run|yaml|submit|status|retry|list|export-inspect``; the Makefile targets call
this."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from shared.contract import tracking
from shared.contract.stage import INPUT_ERRORS, git_commit
from shared.core import store
from shared.core.config import ConfigError, check_run_id, parse_overrides, plan_errors


def default_run_id(workflow: str, profile: str, for_cluster: bool) -> str:
    # locally the same command resumes the same run; on a cluster each commit gets its own run
    if for_cluster:
        return f"{workflow}-{profile}-{git_commit()[:8]}"
    return f"{workflow}-{profile}"


def read_params_file(path_text: str) -> dict:
    path = Path(path_text)
    try:
        found = path.is_file()
    except OSError as err:  # e.g. a name too long for the file system
        raise ConfigError(f"--params {path_text[:80]!r}...: {err.strerror or err}") from None
    if not found:
        raise ConfigError(f"--params {path_text!r} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--params {path_text}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--params {path_text}: cannot be read ({err})") from None
    except RecursionError:
        raise ConfigError(f"--params {path_text}: nested too deeply to be a parameter file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--params {path_text}: expected a JSON object of parameter names to values")
    return data


def pop_tracking(overrides: dict) -> str | None:
    """``tracking=wandb|off`` among the parameters: a run setting (``shared.contract.tracking``), not an experiment's."""
    if "tracking" not in overrides:
        return None
    value = str(overrides.pop("tracking")).strip().lower()
    if value not in tracking.BACKENDS:
        raise ConfigError(f"bad --set tracking={value}: use one of {', '.join(tracking.BACKENDS)}")
    return value


def build_plan(args, *, for_cluster: bool = False):
    """The validated plan: parameters, every file the workflow reads, and every task config, before anything runs."""
    import workflows

    module = workflows.load(args.workflow)
    overrides = parse_overrides(args.set or [])
    if args.params:
        overrides = {**read_params_file(args.params), **overrides}
    chosen_tracking = pop_tracking(overrides)
    from workflows.params import check_known

    check_known(args.workflow, module.Params, overrides)  # a typo: the nearest names, before anything runs
    params = module.Params.for_profile(args.profile, overrides)
    chosen = args.store or os.environ.get("EPS_STORE")
    if for_cluster and not chosen:  # no default bucket: a guessed store would split a run's results in two
        raise ConfigError(f"{args.command} needs the run's store: --store s3://<bucket>/<prefix> or EPS_STORE "
                          "(the chart's eps-store ConfigMap holds it)")
    root = store.normalize_root(chosen or store.from_path("artifacts"))
    run_id = args.run_id or default_run_id(args.workflow, args.profile, for_cluster)
    check_run_id(run_id)
    with plan_errors(args.workflow):
        plan = module.build(params, profile=args.profile, run_id=run_id, store=root)
    plan.tracking = chosen_tracking
    if plan.unchecked_warning():
        print(f"warning: {plan.unchecked_warning()}", file=sys.stderr)
    return plan


def cmd_run(args) -> int:
    from workflows.engines.local import run_folder, run_plan
    from workflows.plan import missing_key_warning

    plan = build_plan(args)
    store.check_writable(plan.store)
    warning = missing_key_warning(plan, dict(os.environ))
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        run_folder(plan).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise store.StoreError(f"cannot create the run folder {run_folder(plan)}: {err.strerror or err}") from None
    result = run_plan(plan, retries=args.retries, cpu_parallel=args.parallel)
    print(f"run folder: {result.folder}")
    for line in result.warnings():
        print(f"warning: {line.replace('warning: ', '', 1)}", file=sys.stderr)
    if not result.ok:
        for state in result.failed():
            where = f" (log: {state.log_path})" if state.log_path else ""
            print(f"error: task {state.task.name} {state.status}: {state.last_line}{where}", file=sys.stderr)
        return 1
    for line in getattr(sys.modules[f"workflows.{args.workflow}"], "summary", lambda p: [])(plan):
        print(line)
    return 0


def cmd_yaml(args) -> int:
    from workflows import cost
    from workflows.engines import argo

    plan = build_plan(args, for_cluster=True)
    uris = argo.upload_configs(plan, plan.tasks) if args.configs_in_store else None
    text = argo.to_yaml(plan, config_uris=uris)
    estimate = cost.report(plan, cost.estimate(plan))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        print(estimate)
        print(f"wrote {args.output}")
    else:
        print(text)
        print(estimate, file=sys.stderr)  # the YAML alone on stdout, so it can be piped
    return 0


def cmd_submit(args) -> int:
    from workflows import cluster
    from workflows.engines import argo

    cluster.connect()  # no ARGO_SERVER / ARGO_TOKEN: say so before building a plan that may ask for files
    plan = build_plan(args, for_cluster=True)
    done = argo.submit(plan, approve=args.approve, max_gpu_hours=args.max_gpu_hours, check_images=check_plan_images)
    if done.left_out:
        kinds = ", ".join(f"{sum(v == k for v in done.left_out.values())} {k}" for k in ("cached", "reused")
                          if k in done.left_out.values())
        print(f"left out {len(done.left_out)} of {len(plan.tasks)} tasks, complete in the store ({kinds})")
    if done.name is None:
        print(f"nothing to submit: every task of run {plan.run_id} is complete in {plan.store}")
        return 0
    print(f"submitted {done.name}")
    print(f"Argo UI: {done.url}")
    return 0


def check_plan_images(plan) -> None:
    """Every image the workflow would pull is in the registry under its tag, before anything is sent."""
    from jobs import registry
    from workflows import cluster
    from workflows.engines import argo

    settings = argo.ClusterSettings.load()
    if settings.image_registry.strip():  # without a registry, submit says so itself
        names = [registry.get(stage).image for stage in plan.stages()] + [argo.EXIT_STATUS_IMAGE]
        cluster.check_images([settings.image(name) for name in names])


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least} (got {value})")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


class _Parser(argparse.ArgumentParser):
    """A bad argument is one error line and exit 2, like every other bad input (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def _run_name(args) -> str:
    from workflows import cluster

    if not (args.run or "").strip():
        raise cluster.ClusterError(
            f"no run given: make {args.command} RUN=<the workflow name `make submit` printed, or the run id>"
        )
    return args.run.strip()


def cmd_status(args) -> int:
    from workflows import cluster

    print(cluster.status(_run_name(args)))
    return 0


def cmd_retry(args) -> int:
    from workflows import cluster

    print(cluster.retry(_run_name(args)))
    return 0


def cmd_compare(args) -> int:
    from workflows import compare

    root = store.normalize_root(args.store or os.environ.get("EPS_STORE") or store.from_path("artifacts"))
    result = compare.compare(root, args.runs)
    md, table = compare.write(result, args.out or compare.default_out_dir(args.runs))
    print(compare.to_markdown(result))
    print(f"wrote {md} and {table}")
    return 0


def cmd_params(args) -> int:
    import workflows
    from workflows import params

    module = workflows.load(args.workflow)
    rows = params.parameters(module.Params, args.profile)
    print(params.as_json(rows) if args.json else params.listing(args.workflow, args.profile, rows))
    return 0


def cmd_list(_args) -> int:
    import workflows

    for name in workflows.WORKFLOWS:
        print(name)
    return 0


def cmd_export_inspect(args) -> int:
    from workflows.inspect_export import ExportError, export

    root = store.normalize_root(args.store or os.environ.get("EPS_STORE") or store.from_path("artifacts"))
    if args.out is None and not root.startswith("file://"):
        raise ConfigError("export-inspect: the store is not a local folder; name where the logs go with --out DIR")
    out = Path(args.out) if args.out else Path(store.join(root, "runs", args.run, "_inspect").removeprefix("file://"))
    try:
        written = export(root, args.run, out)
    except ExportError as err:
        raise ConfigError(str(err)) from None
    print(f"wrote {len(written)} inspect logs (one per condition and judge) to {out}")
    print(f"open them with: inspect view --log-dir {out}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m workflows")
    sub = p.add_subparsers(dest="command", required=True)

    def plan_args(sp):
        sp.add_argument("workflow")
        sp.add_argument("--profile", default="small")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override one experiment parameter; tracking=wandb|off turns W&B tracking on or off")
        sp.add_argument("--params", help="JSON file of experiment parameters")
        sp.add_argument("--store", help="artifact store root (file://..., s3://...); default $EPS_STORE, "
                        "else ./artifacts for run (yaml and submit need one)")
        sp.add_argument("--run-id")

    sp = sub.add_parser("run", help="run a workflow here, resuming what is done")
    plan_args(sp)
    sp.add_argument("--retries", type=non_negative_int, default=None,
                    help="retries per task (default: each stage's own count, as on the cluster)")
    sp.add_argument("--parallel", type=positive_int, default=None, help="CPU tasks at once (at least 1)")
    sp.set_defaults(fn=cmd_run)
    sp = sub.add_parser("yaml", help="compile to an Argo Workflow")
    plan_args(sp)
    sp.add_argument("-o", "--output")
    sp.add_argument("--configs-in-store", action="store_true",
                    help="put task configs in the store and pass URIs, as submit does (default: inline)")
    sp.set_defaults(fn=cmd_yaml)
    sp = sub.add_parser("submit", help="submit to the Argo Server at $ARGO_SERVER")
    plan_args(sp)
    sp.add_argument("--approve", action="store_true",
                    help="submit even when the estimated GPU time is above --max-gpu-hours")
    sp.add_argument("--max-gpu-hours", type=float, default=None,
                    help="the cost gate: above this estimate (default 20) submit stops unless --approve")
    sp.set_defaults(fn=cmd_submit)
    for name, fn in (("status", cmd_status), ("retry", cmd_retry)):
        sp = sub.add_parser(name)
        sp.add_argument("run", nargs="?", default="", help="the Argo workflow name printed by submit, or the run id")
        sp.set_defaults(fn=fn)
    sub.add_parser("list").set_defaults(fn=cmd_list)
    sp = sub.add_parser("compare", help="runs side by side: every headline metric per condition, what differs")
    sp.add_argument("runs", nargs="*", metavar="RUN", help="run ids in the store, or run folder URIs (.../runs/<id>)")
    sp.add_argument("--store", help="artifact store root of the run ids; default $EPS_STORE, else artifacts/")
    sp.add_argument("--out", help="folder for compare.md and compare.csv (default artifacts/compare/<runs>)")
    sp.set_defaults(fn=cmd_compare)
    sp = sub.add_parser("params", help="every parameter of a workflow: its value in a profile, what it means")
    sp.add_argument("workflow")
    sp.add_argument("--profile", default="small")
    sp.add_argument("--json", action="store_true", help="the whole values, as JSON")
    sp.set_defaults(fn=cmd_params)
    sp = sub.add_parser("export-inspect", help="every judged sample of a run as inspect_ai eval logs")
    sp.add_argument("run", help="the run id")
    sp.add_argument("--store", help="artifact store root; default $EPS_STORE, else ./artifacts")
    sp.add_argument("--out", help="folder for the logs (default: <store>/runs/<run>/_inspect)")
    sp.set_defaults(fn=cmd_export_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except INPUT_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        from workflows.engines.local import Terminated

        how = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"error: {how}; every task was stopped; run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except RecursionError:
        print("error: a parameter or file is nested too deeply to be read", file=sys.stderr)
        return 2
    except OSError as err:  # the machine, not the code: a full disk, a folder that cannot be written, a long name
        where = f" ({str(err.filename)[:120]})" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 1 if err.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT) else 2
    except Exception as err:
        name = type(err).__name__
        if name in ("ClusterError",):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
