"""The issue164 plan: one task per cell, configs validated at build time, readable errors for bad parameters."""

from __future__ import annotations

import json

import pytest

import workflows
from shared import store
from shared.config import ConfigError
from workflows.__main__ import main as cli


def build(tmp_path, profile="tiny", **overrides):
    module = workflows.load("issue164")
    params = module.Params.for_profile(profile, overrides)
    return module.build(params, profile=profile, run_id="t", store=store.from_path(tmp_path / "store"))


def test_tiny_plan_has_a_task_per_cell_and_analysis_waits_for_all(tmp_path):
    plan = build(tmp_path)
    names = [t.name for t in plan.tasks]
    for cond in ("null", "policy-voice", "directive-voice"):
        assert f"gen-{cond}" in names
        assert f"classifier-c-{cond}" in names
        assert f"judge-local-a-{cond}" in names and f"judge-local-b-{cond}" in names
    assert {"gen-classifier-em", "gen-classifier-base", "train-classifier"} <= set(names)
    analysis = plan.task("analysis")
    assert set(analysis.after) == set(names) - {"analysis", "gen-classifier-em", "gen-classifier-base"}


def test_every_generation_of_one_run_uses_the_same_panel_and_sampling(tmp_path):
    plan = build(tmp_path)
    gens = [t for t in plan.tasks if t.stage == "generate" and not t.name.startswith("gen-classifier")]
    assert len({json.dumps(t.config["questions"]) for t in gens}) == 1
    assert {t.config["n"] for t in gens} == {3}
    assert {t.config["temperature"] for t in gens} == {1.0}
    assert plan.task("gen-null").config["system"] == "default"


def test_full_profile_without_conditions_file_says_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="conditions_file"):
        build(tmp_path, "full", panel_file="package:panels/tiny_alignment.jsonl")


def test_full_profile_without_panel_says_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="panel_file"):
        build(tmp_path, "full", conditions_file="package:issue164/tiny_conditions.json")


def test_full_profile_plan_uses_the_records_judges_and_vllm(tmp_path):
    plan = build(tmp_path, "full", conditions_file="package:issue164/tiny_conditions.json",
                 panel_file="package:panels/tiny_alignment.jsonl")
    judges = {t.config["judge"]["model"] for t in plan.tasks if t.stage == "judge"}
    assert judges == {"claude-sonnet-4-5-20250929", "claude-opus-4-7"}
    gen = plan.task("gen-null")
    assert gen.config["backend"] == "vllm" and gen.config["n"] == 20 and gen.config["model_ref"] == "hf:Qwen/Qwen2.5-7B-Instruct"


def test_a_bad_system_slot_fails_at_plan_time(tmp_path):
    conds = tmp_path / "c.json"
    conds.write_text(json.dumps([{"name": "x", "system": "txt(hello)"}]))
    with pytest.raises(ConfigError, match="system"):
        build(tmp_path, conditions_file=str(conds))


@pytest.mark.parametrize("argv, message", [
    (["run", "issue999"], "unknown workflow"),
    (["run", "issue164", "--profile", "huge"], "unknown profile"),
    (["run", "issue164", "--set", "n_completions=many"], "n_completions"),
    (["run", "issue164", "--set", "n_completion=3"], "unknown parameter"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    code = cli([*argv, "--store", str(tmp_path / "s")] if argv[0] == "run" else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and err.count("\n") == 0
    assert not (tmp_path / "s").exists()
