"""Tracking (shared.contract.tracking): one offline W&B run per computing stage, read back from its transaction
log; off by default and then never imported; a failure of W&B is one warning line and never the stage's; no effect
on the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.contract import tracking
from shared.contract.stage import MANIFEST, StageSpec, execute
from shared.core import store
from shared.core.config import StageConfig
from tests.wandb_offline import offline_runs

ROOT = Path(__file__).resolve().parent.parent


class CountConfig(StageConfig):
    numbers_uri: str
    steps: int = 3


def count(cfg: CountConfig, ctx) -> dict:
    """A stand-in training stage: a per-step curve stored as an artifact and sent to the tracker."""
    numbers = store.read_json(cfg.numbers_uri)
    curve = []
    for step in range(1, cfg.steps + 1):
        point = {"step": step, "loss": sum(numbers) / step, "lr": 0.1 * (cfg.steps - step + 1) / cfg.steps}
        curve.append(point)
        ctx.track.log(point, step=step, prefix="train")
    store.write_jsonl(ctx.out("curve.jsonl"), curve)
    return {"final_loss": curve[-1]["loss"], "steps": cfg.steps, "note": "ok", "per_cell": {"a": 1.5}}


SPEC = StageSpec(name="count", config=CountConfig, run=count)


def figure_stage(cfg: CountConfig, ctx) -> dict:
    """A stand-in analysis stage: a figure, a headline with a table, a report."""
    from shared.analysis.figures import new_figure, save

    fig, ax = new_figure(2, 2)
    ax.plot([0, 1], [1, 0])
    save(fig, ctx.out("curve"))
    store.write_json(ctx.out("headline.json"), {"cells": [{"cell": "a", "alpha": 80.5}, {"cell": "b", "alpha": 41.0}],
                                                "verdict": "H1"})
    store.write_text(ctx.out("report.md"), "# report\n")
    return {"n_cells": 2}


ANALYSIS = StageSpec(name="analysis_toy", config=CountConfig, run=figure_stage)


@pytest.fixture
def config(tmp_path):
    root = store.from_path(tmp_path / "store")
    numbers = store.join(root, "inputs", "numbers.json")
    store.write_json(numbers, [1, 2, 3])
    return {"store": root, "run_id": "r1", "cell": "c1", "numbers_uri": numbers}


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """W&B on, offline, everything it writes under tmp: no network, no home directory."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        pytest.fail("wandb is not installed: `pip install -e '.[tracking]'` (make setup installs it)")
    folder = tmp_path / "wandb-dir"
    folder.mkdir()
    for name, value in {"EPS_TRACKING": "wandb", "WANDB_MODE": "offline", "WANDB_DIR": str(folder),
                        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "WANDB_PROJECT": "eps-tests",
                        "EPS_EXPERIMENT": "issue999", "EPS_PROFILE": "tiny", "EPS_GIT_SHA": "0123456789abcdef"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# when it is on


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "off"),
    ({"WANDB_PROJECT": "p"}, "wandb"),
    ({"EPS_TRACKING": "wandb"}, "wandb"),
    ({"EPS_TRACKING": "off", "WANDB_PROJECT": "p"}, "off"),
    ({"EPS_TRACKING": " WandB "}, "wandb"),
    ({"EPS_TRACKING": "wandb", "WANDB_MODE": "disabled"}, "off"),
])
def test_tracking_is_off_unless_asked_for(env, expected):
    assert tracking.backend(env) == expected


def test_an_unknown_backend_is_named_in_the_error():
    with pytest.raises(ValueError, match="EPS_TRACKING='mlflow'"):
        tracking.backend({"EPS_TRACKING": "mlflow"})


def test_with_tracking_off_a_stage_never_imports_wandb(tmp_path):
    module = tmp_path / "offstage.py"
    module.write_text(
        "import json, sys\n"
        "from shared.core import store\n"
        "from shared.core.config import StageConfig\n"
        "from shared.contract.stage import StageSpec, execute\n"
        "class C(StageConfig):\n    pass\n"
        "def run(cfg, ctx):\n"
        "    ctx.track.log({'loss': 1.0}, step=1)\n"
        "    store.write_json(ctx.out('x.json'), 1)\n"
        "    return {}\n"
        "m = execute(StageSpec(name='off', config=C, run=run), {'store': sys.argv[1], 'run_id': 'r', 'cell': 'c'})\n"
        "print(json.dumps({'wandb': 'wandb' in sys.modules, 'tracking': m.get('tracking')}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "EPS_TRACKING"))}
    out = subprocess.run([sys.executable, str(module), store.from_path(tmp_path / "store")], capture_output=True,
                         text=True, env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"wandb": False, "tracking": None}


# ---------------------------------------------------------------------------------------------------------------
# what a run holds


def test_a_computing_stage_leaves_one_offline_run_with_its_config_curve_and_summary(config, offline):
    manifest = execute(SPEC, config)
    (run,) = offline_runs(offline)
    assert (run.name, run.group, run.job_type, run.project) == ("c1", "r1", "count", "eps-tests")
    assert run.tags == ["issue999", "tiny", "01234567"]
    assert run.config == json.loads(json.dumps(manifest["config"]))  # the stage config, as the manifest has it
    assert run.curve("train/loss") == [(1, 6.0), (2, 3.0), (3, 2.0)]
    assert [round(v, 6) for _, v in run.curve("train/lr")] == [0.1, round(0.2 / 3, 6), round(0.1 / 3, 6)]
    assert run.summary["final_loss"] == 2.0 and run.summary["steps"] == 3 and run.summary["note"] == "ok"
    assert run.summary["per_cell/a"] == 1.5
    assert run.summary["status"] == "complete" and run.summary["wall_time_s"] == manifest["wall_time_s"]
    assert run.exit_code == 0
    assert manifest["cache_key"][:12] in run.notes


def test_the_manifest_points_at_the_run(config, offline):
    manifest = execute(SPEC, config)
    (run,) = offline_runs(offline)
    record = manifest["tracking"]
    assert record["backend"] == "wandb" and record["run_id"] == run.run_id and record["mode"] == "offline"
    assert record["url"] is None and Path(record["offline_dir"]) == run.folder  # offline: no URL until synced


def test_the_run_url_is_left_for_the_argo_task_output(config, offline, tmp_path, monkeypatch):
    url_file = tmp_path / "out" / "tracking-url"
    monkeypatch.setenv(tracking.URL_FILE_ENV, str(url_file))
    manifest = execute(SPEC, config)
    assert url_file.read_text() == manifest["tracking"]["offline_dir"]


def test_an_analysis_stage_logs_its_figures_tables_and_report(config, offline):
    execute(ANALYSIS, config)
    (run,) = offline_runs(offline)
    media = run.media()
    assert [p.suffix for p in media if "images" in p.parts] == [".png"]
    (table_file,) = [p for p in media if p.name.endswith(".table.json")]
    table = json.loads(table_file.read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert rows == [{"cell": "a", "alpha": 80.5}, {"cell": "b", "alpha": 41.0}]
    assert (run.folder / "files" / "report.md").read_text() == "# report\n"
    assert run.summary["n_cells"] == 2


def test_a_failing_stage_marks_its_run_failed(config, offline):
    with pytest.raises(RuntimeError):
        execute(StageSpec(name="boom", config=CountConfig, run=crash_after_one_step), config)
    (run,) = offline_runs(offline)
    assert run.summary["status"] == "failed" and run.exit_code == 1
    assert run.curve("train/loss") == [(1, 1.0)]


def crash_after_one_step(cfg, ctx):
    ctx.track.log({"loss": 1.0}, step=1, prefix="train")
    raise RuntimeError("crashed")


# ---------------------------------------------------------------------------------------------------------------
# the cache does not see it


def test_turning_tracking_on_reuses_the_cached_result_and_starts_no_run(config, offline, monkeypatch):
    monkeypatch.setenv("EPS_TRACKING", "off")
    first = execute(SPEC, config)
    monkeypatch.setenv("EPS_TRACKING", "wandb")
    again = execute(SPEC, config)
    other_run = execute(SPEC, {**config, "run_id": "r2"})
    assert again["cache_key"] == other_run["cache_key"] == first["cache_key"]
    assert again["wall_time_s"] == first["wall_time_s"]  # the same result, not a recompute
    assert other_run["reused_from"]["run_id"] == "r1"
    assert offline_runs(offline) == []


def test_what_is_tracked_is_in_no_stage_fingerprint(tmp_path):
    from jobs.registry import all_stages
    from shared.contract import fingerprint
    from tests.fakes.project_tree import fingerprint_in, write_tree

    tracking_module = "shared.contract.tracking"
    assert tracking_module in fingerprint.imported_modules("shared.contract.stage")  # every stage runs it ...
    # ... and is in no stage's fingerprint
    assert not [s for s, spec in all_stages().items() if tracking_module in fingerprint.closure(spec.module)]
    # and editing it leaves a stage's fingerprint as it was, while editing the contract does not
    write_tree(tmp_path, {"jobs/stage.py": "from shared.contract import stage\n",
                          "shared/contract/stage.py": "from shared.contract import tracking\n",
                          "shared/contract/tracking.py": "ON = 1\n"})
    before = fingerprint_in(tmp_path)
    (tmp_path / "shared" / "contract" / "tracking.py").write_text("ON = 2\n")
    assert fingerprint_in(tmp_path) == before
    edited = "from shared.contract import tracking  # edited\n"
    (tmp_path / "shared" / "contract" / "stage.py").write_text(edited)
    assert fingerprint_in(tmp_path) != before


def test_a_tracked_result_is_the_untracked_result(config, offline, monkeypatch):
    tracked = execute(SPEC, config)
    monkeypatch.setenv("EPS_TRACKING", "off")
    store.delete_prefix(store.join(config["store"], "cache"))  # nothing to reuse: compute again
    untracked = execute(SPEC, {**config, "run_id": "r2"})
    assert untracked["cache_key"] == tracked["cache_key"]
    assert list(untracked["outputs"].values()) == list(tracked["outputs"].values())
    assert "tracking" not in untracked


# ---------------------------------------------------------------------------------------------------------------
# never the stage's problem


def test_a_service_that_cannot_be_reached_is_one_warning_and_the_stage_completes(config, offline, monkeypatch, capsys):
    import wandb

    def unreachable(**_kwargs):
        raise wandb.errors.CommError("could not reach api.wandb.ai")

    monkeypatch.setattr(wandb, "init", unreachable)
    manifest = execute(SPEC, config)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "CommError" in warnings[0] and "untracked" in warnings[0]
    assert manifest["status"] == "complete" and "tracking" not in manifest
    assert store.read_jsonl(store.join(manifest["prefix"], "curve.jsonl"))[-1]["loss"] == 2.0


def test_a_tracking_call_failing_mid_stage_is_one_warning_and_the_result_is_intact(config, offline, monkeypatch, capsys):
    from wandb.sdk.wandb_run import Run

    def broken_log(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Run, "log", broken_log)
    manifest = execute(SPEC, config)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "disk full" in warnings[0]
    assert manifest["status"] == "complete" and manifest["metrics"]["final_loss"] == 2.0
    assert store.read_json(store.join(manifest["prefix"], MANIFEST)) == manifest
    assert [p["loss"] for p in store.read_jsonl(store.join(manifest["prefix"], "curve.jsonl"))] == [6.0, 3.0, 2.0]


# ---------------------------------------------------------------------------------------------------------------
# helpers, on inputs with known answers


def test_scalars_flatten_nested_metrics_and_drop_what_cannot_be_plotted():
    values = {"a": 1, "b": {"c": 2.5, "d": [1, 2]}, "e": None, "f": True, "g": "x" * 300, "h": "short"}
    assert tracking.scalars(values, "p/") == {"p/a": 1, "p/b/c": 2.5, "p/f": True, "p/h": "short"}


def test_row_tables_finds_every_list_of_records_by_its_path():
    headline = {"cells": [{"x": 1}, {"x": 2, "y": float("nan")}], "fit": {"rows": [{"k": [1, 2]}]}, "n": 3, "l": [1]}
    assert tracking.row_tables(headline) == {
        "cells": (["x", "y"], [[1, None], [2, None]]),
        "fit/rows": (["k"], [["[1, 2]"]]),
    }


def test_a_tally_logs_running_counts_now_and_then_and_on_flush():
    logged = []

    class Recorder(tracking.Tracker):
        def log(self, metrics, *, step=None, prefix=""):
            logged.append((prefix, dict(metrics)))

    tally = Recorder().tally("judge", every_s=3600)
    for error in (None, "truncated", None):
        tally.add({"judged": 1, "errors": int(error is not None), **({f"errors/{error}": 1} if error else {})})
    assert logged == []  # not yet due
    tally.flush()
    assert logged == [("judge", {"judged": 3, "errors": 1, "errors/truncated": 1})]
    every_time = Recorder().tally("judge", every_s=0)
    every_time.add({"judged": 1})
    every_time.add({"judged": 1})
    assert logged[-2:] == [("judge", {"judged": 1}), ("judge", {"judged": 2})]


# ---------------------------------------------------------------------------------------------------------------
# from the command line to the stage processes


def _plan(tmp_path, *extra: str):
    from workflows.__main__ import build_plan, parser

    args = parser().parse_args(["run", "issue164", "--profile", "tiny", "--store", str(tmp_path / "store"),
                                "--run-id", "t", *extra])
    return build_plan(args)


def test_set_tracking_is_a_run_setting_that_no_task_config_sees(tmp_path):
    plain, tracked = _plan(tmp_path), _plan(tmp_path, "--set", "tracking=wandb")
    assert (plain.tracking, tracked.tracking) == (None, "wandb")
    assert [t.config for t in tracked.tasks] == [t.config for t in plain.tasks]
    assert tracked.params == plain.params


def test_a_bad_tracking_value_is_one_error_line(tmp_path, capsys):
    from workflows.__main__ import main

    code = main(["run", "issue164", "--profile", "tiny", "--store", str(tmp_path / "s"), "--set", "tracking=mlflow"])
    assert code == 2 and capsys.readouterr().err.strip() == "error: bad --set tracking=mlflow: use one of off, wandb"


def test_the_local_engine_tells_each_task_the_run_and_where_offline_runs_go(tmp_path, monkeypatch):
    from workflows.engines.local import LocalEngine

    monkeypatch.delenv("WANDB_DIR", raising=False)
    engine = LocalEngine(_plan(tmp_path, "--set", "tracking=wandb"), live=False)
    env = engine._env(None)
    assert env["EPS_TRACKING"] == "wandb" and env["WANDB_DIR"] == str(engine.folder)
    assert (env["EPS_EXPERIMENT"], env["EPS_PROFILE"], env["EPS_RUN_ID"]) == ("issue164", "tiny", "t")


def test_the_argo_pods_get_the_project_and_the_task_outputs_the_run_url(tmp_path, monkeypatch):
    import yaml

    from workflows.engines import argo

    monkeypatch.setenv("WANDB_API_KEY", "wandb-THIS-MUST-NOT-LEAK")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    settings = argo.ClusterSettings(image_registry="registry.invalid/lab", git_sha="0" * 40)
    text = argo.to_yaml(_plan(tmp_path, "--set", "tracking=wandb"), cluster=settings)
    generate = next(t for t in yaml.safe_load(text)["spec"]["templates"] if t["name"] == "generate")
    env = {e["name"]: e for e in generate["container"]["env"]}
    assert env["EPS_TRACKING"]["value"] == "wandb" and env["WANDB_PROJECT"]["value"] == tracking.DEFAULT_PROJECT
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "WANDB_API_KEY" and "THIS-MUST-NOT" not in text
    (output,) = [p for p in generate["outputs"]["parameters"] if p["name"] == "tracking-url"]
    assert output == {"name": "tracking-url", "valueFrom": {"path": env[tracking.URL_FILE_ENV]["value"], "default": ""}}
    untracked = yaml.safe_load(argo.to_yaml(_plan(tmp_path), cluster=settings))
    generate = next(t for t in untracked["spec"]["templates"] if t["name"] == "generate")
    untracked_outputs = {p["name"] for p in generate.get("outputs", {}).get("parameters", [])}
    assert "tracking-url" not in untracked_outputs and "EPS_TRACKING" not in {e["name"] for e in generate["container"]["env"]}
