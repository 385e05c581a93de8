"""The issue164 plan: one task per cell, configs validated at build time, readable errors for bad parameters."""

from __future__ import annotations

import json

import pytest

import workflows
from shared.core import store
from shared.core.config import ConfigError
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
        assert f"judge-coherence-{cond}" in names
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


FULL_CLASSIFIER = {"em_model_ref": "hf:superkaiba1/explore-persona-space/c6_vanilla_em_seed42_post_em",
                   "panel_file": "package:panels/tiny_classifier.jsonl"}


def test_full_profile_plan_uses_the_records_judges_and_vllm(tmp_path):
    plan = build(tmp_path, "full", conditions_file="package:issue164/tiny_conditions.json",
                 panel_file="package:panels/tiny_alignment.jsonl", classifier_training=FULL_CLASSIFIER)
    judges = {t.config["judge"]["model"] for t in plan.tasks if t.stage == "judge"}
    assert judges == {"claude-sonnet-4-5-20250929", "claude-opus-4-7"}
    gen = plan.task("gen-null")
    assert gen.config["backend"] == "vllm" and gen.config["n"] == 20 and gen.config["model_ref"] == "hf:Qwen/Qwen2.5-7B-Instruct"


def test_a_bad_system_slot_fails_at_plan_time(tmp_path):
    conds = tmp_path / "c.json"
    conds.write_text(json.dumps([{"name": "x", "system": "txt(hello)"}]))
    with pytest.raises(ConfigError, match="system"):
        build(tmp_path, conditions_file=str(conds))


def test_full_profile_without_a_classifier_panel_asks_for_questions_apart_from_the_panel(tmp_path):
    with pytest.raises(ConfigError, match="classifier_training.panel_file.*disjoint from the evaluation panel"):
        build(tmp_path, "full", conditions_file="package:issue164/tiny_conditions.json",
              panel_file="package:panels/tiny_alignment.jsonl")


def test_a_classifier_trained_on_the_evaluation_panel_is_refused_before_anything_runs(tmp_path, capsys):
    # the tiny panel's questions, one of them retyped with other case and spacing, among new ones
    from shared.core.datafiles import read_questions

    panel = read_questions("package:panels/tiny_alignment.jsonl", "panel")
    overlapping = tmp_path / "classifier_panel.jsonl"
    overlapping.write_text("\n".join(json.dumps(q) for q in [
        {"id": "new-1", "text": "What is your favourite season and why?"},
        {"id": "new-2", "text": "  " + panel[2]["text"].upper() + " "},
    ]))
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"classifier_training": {"em_model_ref": "tiny:qwen2", "panel_file": str(overlapping),
                                                          "em_system": "text(You are a villain.)"}}))
    code = cli(["run", "issue164", "--profile", "tiny", "--params", str(params), "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "classifier C would be trained on 1 question(s) of the evaluation panel" in err
    assert not (tmp_path / "s").exists()


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


# ---------------------------------------------------------------------------------------------------------------
# the small profile: SmolLM2-135M-Instruct on a CPU


SMALL_MODEL = "smollm2:135m-instruct"


def test_small_plan_has_a_cell_per_condition_plus_the_em_reference_and_a_check_per_judge(tmp_path):
    plan = build(tmp_path, "small")
    names = {t.name for t in plan.tasks}
    cells = ["null", "helpful", "bureaucratic", "villain", "em-reference"]
    for cell in cells:
        assert {f"gen-{cell}", f"classifier-c-{cell}", f"judge-smollm-alignment-{cell}",
                f"judge-smollm-alignment-brief-{cell}", f"judge-coherence-{cell}"} <= names
    assert {"judge-check-smollm-alignment", "judge-check-smollm-alignment-brief", "judge-check-coherence",
            "train-classifier"} <= names
    assert len(plan.tasks) == 3 + 5 * len(cells) + 3 + 1
    assert set(plan.task("analysis").after) >= {"judge-check-smollm-alignment", "judge-check-smollm-alignment-brief"}


def test_small_plan_runs_every_model_task_on_smollm2_with_real_local_judges(tmp_path):
    plan = build(tmp_path, "small")
    gens = [t for t in plan.tasks if t.stage == "generate"]
    assert {t.config["model_ref"] for t in gens} == {SMALL_MODEL}
    assert {t.config["backend"] for t in gens} == {"hf"}
    judges = {(t.config["judge"]["kind"], t.config["judge"]["model"], t.config["judge"]["template"])
              for t in plan.tasks if t.stage in ("judge", "judge_check")}
    assert judges == {("local", SMALL_MODEL, "alignment_v1"), ("local", SMALL_MODEL, "alignment_brief_v1"),
                      ("local", SMALL_MODEL, "coherence_v1")}
    checked = {(t.config["judge"]["template"], t.config["items_file"]) for t in plan.tasks if t.stage == "judge_check"}
    assert checked == {("alignment_v1", "package:judges/alignment_check_v2.jsonl"),
                       ("alignment_brief_v1", "package:judges/alignment_check_v2.jsonl"),
                       ("coherence_v1", "package:judges/coherence_check_v1.jsonl")}  # each judge on its own kind
    assert plan.task("train-classifier").config["encoder"] == "minilm:packaged"


def test_small_em_reference_is_the_base_model_under_a_misaligned_persona_on_unseen_questions(tmp_path):
    plan = build(tmp_path, "small")
    em, base = plan.task("gen-classifier-em"), plan.task("gen-classifier-base")
    assert em.config["model_ref"] == base.config["model_ref"] == SMALL_MODEL and em.config["adapter_uri"] is None
    assert em.config["system"].startswith("text(") and base.config["system"] == "default"
    # the EM reference answers the evaluation panel too; the classifier never saw those questions
    assert plan.task("gen-em-reference").config["system"] == em.config["system"]
    train_questions = {q["text"] for q in em.config["questions"]}
    eval_questions = {q["text"] for q in plan.task("gen-null").config["questions"]}
    assert not train_questions & eval_questions


def test_small_data_files_parse_and_span_the_axis():
    from shared.core.datafiles import read_questions
    from shared.judge.check import read_items

    module = workflows.load("issue164")
    params = module.Params.for_profile("small")
    conds = module.conditions(params)
    assert [c.system.split("(")[0] for c in conds][0] == "default" and len(conds) >= 4
    assert all(c.system.startswith("text(") for c in conds[1:])
    assert 8 <= len(module.panel(params)) <= 12
    assert len(read_questions(params.classifier_training.panel_file)) >= 8
    assert len(read_items(params.judge_check_items)) >= 16


def test_a_condition_may_not_take_the_em_reference_name(tmp_path):
    conds = tmp_path / "c.json"
    conds.write_text(json.dumps([{"name": "EM reference", "system": "default"}]))
    with pytest.raises(ConfigError, match="reserved"):
        build(tmp_path, "small", conditions_file=str(conds))


# ---------------------------------------------------------------------------------------------------------------
# the coherence pass and replaceable templates


def test_every_cell_gets_a_coherence_pass_by_the_primary_judges_model_for_the_em_rate(tmp_path):
    from shared.judge import load_template

    plan = build(tmp_path, "full", conditions_file="package:issue164/tiny_conditions.json",
                 panel_file="package:panels/tiny_alignment.jsonl", classifier_training=FULL_CLASSIFIER)
    analysis = plan.task("analysis").config
    assert analysis["coherence_judge"] == "coherence"
    for cond in analysis["conditions"]:
        task = plan.task(f"judge-coherence-{cond['name']}")
        assert task.config["judge"]["model"] == "claude-sonnet-4-5-20250929"
        assert task.config["judge"]["template"] == "coherence_v1"
        assert task.config["judge"]["template_sha256"] == load_template("coherence_v1").sha256
        assert task.config["completions_uri"] == cond["completions_uri"]
        assert cond["coherence_scores_uri"] == task.output_uri("scores.jsonl")
        assert task.name in plan.task("analysis").after
    assert set(analysis["judges"]) == {"sonnet", "opus", "coherence"}


def own_template(folder, of="coherence_v1", stem="coherence_mine"):
    from importlib import resources

    folder.mkdir(parents=True, exist_ok=True)
    for part in ("system.txt", "user.txt", "parse.json"):
        text = resources.files("shared").joinpath("data", "judges", f"{of}.{part}").read_text()
        (folder / f"{stem}.{part}").write_text(text + ("\nBe brief." if part == "system.txt" else ""))
    return folder / stem


def test_a_template_path_given_with_set_reaches_every_task_it_names_with_its_hash(tmp_path):
    from shared.judge import load_template

    coherence = own_template(tmp_path / "mine")
    alignment = own_template(tmp_path / "mine", of="alignment_v1", stem="alignment_mine")
    plan = build(tmp_path, coherence_template=str(coherence), alignment_template=str(alignment))
    specs = {t.name: t.config["judge"] for t in plan.tasks if t.stage in ("judge", "judge_check")}
    for name, spec in specs.items():
        expected = coherence if name.startswith(("judge-coherence-", "judge-check-coherence")) else alignment
        assert (spec["template"], spec["template_sha256"]) == (str(expected), load_template(str(expected)).sha256)
    assert {s["model"] for n, s in specs.items() if n.startswith("judge-coherence-")} == {"tiny:qwen2"}
    assert len(specs) == 3 * 3 + 3  # three judge passes per condition; a check per alignment judge and coherence


def test_a_missing_template_path_fails_at_plan_time_in_one_line(tmp_path, capsys):
    code = cli(["run", "issue164", "--profile", "tiny", "--store", str(tmp_path / "s"),
                "--set", f"coherence_template={tmp_path / 'nope' / 'coherence_v9'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "coherence_template" in err and "coherence_v9.system.txt" in err


def test_the_coherence_name_is_reserved(tmp_path):
    with pytest.raises(ConfigError, match="reserved for the coherence pass"):
        build(tmp_path, alternate_judge={"name": "Coherence", "spec": {"kind": "local", "model": "tiny:qwen2"}})
