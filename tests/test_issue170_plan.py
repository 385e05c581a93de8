"""The issue170 plan: the record's cells as full parameters, one task chain per cell, a seeded persisted split,
readable errors for missing inputs, and an Argo workflow with one task per plan task."""

from __future__ import annotations

import json

import pytest

import workflows
from shared.core import store
from shared.core.config import ConfigError


def build(tmp_path, profile="tiny", **overrides):
    module = workflows.load("issue170")
    params = module.Params.for_profile(profile, overrides)
    return module.build(params, profile=profile, run_id="t", store=store.from_path(tmp_path / "store"))


@pytest.fixture
def full_inputs(tmp_path):
    """Stand-ins for the user's files: a 177-question broad set and a 52-prompt panel."""
    questions, panel = tmp_path / "broad.jsonl", tmp_path / "panel.jsonl"
    questions.write_text("".join(json.dumps({"id": f"b{i:03d}", "text": f"Broad question {i}?"}) + "\n" for i in range(177)))
    panel.write_text("".join(json.dumps({"id": f"p{i:02d}", "text": f"Panel prompt {i}?"}) + "\n" for i in range(52)))
    return {"questions_file": str(questions), "panel_file": str(panel)}


def test_full_profile_has_the_records_soft_cells(tmp_path, full_inputs):
    plan = build(tmp_path, "full", **full_inputs)
    soft = {t.name: t.config["training"] for t in plan.tasks if t.stage == "train_soft_prefix" and t.config["seed"] == 42}
    assert sorted(soft) == sorted(f"{name}-s42" for name in (
        "soft-s0-k16-lr5e-4", "soft-s1-k32-lr5e-4", "soft-s2-k32-lr1e-4", "soft-s3-k64-lr5e-4", "soft-s4-k64-lr1e-4",
        "soft-s5-k64-lr1e-3", "soft-s6-k64-lr5e-4"))
    assert {(s["k"], s["lr"]) for s in soft.values()} == {(16, 5e-4), (32, 5e-4), (32, 1e-4), (64, 5e-4), (64, 1e-4),
                                                          (64, 1e-3)}
    for s in soft.values():
        assert (s["steps"], s["questions_per_step"], s["completions_per_question"], s["temperature"]) == (3000, 16, 20, 1.0)
    assert soft["soft-s6-k64-lr5e-4-s42"]["init_text"] != soft["soft-s3-k64-lr5e-4-s42"]["init_text"]  # init ablation
    analysed = {c["name"]: c for c in plan.task("analysis").config["cells"]}
    assert all(analysed[name]["init_text"] == s["init_text"] for name, s in soft.items())  # s6 plots apart
    task = plan.task("soft-s0-k16-lr5e-4-s42").config
    assert len(task["train_questions"]) == 48 and len(task["val_questions"]) == 4
    assert task["teacher"]["model_ref"].endswith("c6_vanilla_em_seed42_post_em")


def test_full_profile_has_system_slot_gcg_the_user_slot_sanity_cell_and_random_baselines(tmp_path, full_inputs):
    plan = build(tmp_path, "full", **full_inputs)
    gcg = {t.name: t.config for t in plan.tasks if t.stage == "gcg_search" and t.config["seed"] == 42}
    searched = {n: c for n, c in gcg.items() if c["mode"] == "search"}
    assert {(c["slot"], c["search"]["length"]) for c in searched.values()} == {
        ("system", 20), ("system", 40), ("system", 80), ("user", 40)}
    for c in searched.values():
        s = c["search"]
        assert (s["search_width"], s["topk"], s["questions_per_step"] * s["completions_per_question"]) == (512, 256, 32)
    assert gcg["gcg-l80-s42"]["search"]["steps"] == 1000 and gcg["gcg-l20-s42"]["search"]["steps"] == 500
    assert gcg["gcg-user-l40-s42"]["user_slot_system"] == "none"  # no default system prompt sneaks in
    randoms = [(c["search"]["length"], c["draw"]) for c in gcg.values() if c["mode"] == "random"]
    assert sorted(randoms) == [(length, draw) for length in (20, 40, 80) for draw in range(3)]  # several per length


def test_every_learned_cell_is_trained_evaluated_judged_twice_and_scored(tmp_path):
    plan = build(tmp_path)
    names = {t.name for t in plan.tasks}
    learned = [t for t in plan.tasks if t.stage in ("train_soft_prefix", "gcg_search")]
    assert {t.name for t in learned} == {"soft-s0-k4-lr3e-2", "gcg-l4", "gcg-user-l4", "random-l4-d0"}
    for train in learned:
        evaluate = plan.task(f"eval-{train.name}")
        assert evaluate.after == [train.name]
        assert evaluate.config["prompt_uri"] == train.output_uri("prompt.json")
        assert {f"judge-local-a-{train.name}", f"judge-local-b-{train.name}", f"judge-coherence-{train.name}",
                f"classifier-c-{train.name}"} <= names
    analysis = plan.task("analysis")
    assert set(analysis.after) >= {t.name for t in plan.tasks if t.stage in ("judge", "score_classifier")}
    assert "villain-direction" in analysis.after
    villain = plan.task("villain-direction").config
    assert set(villain["cell_prompt_uris"]) == {t.name for t in learned}


def test_the_split_is_seeded_disjoint_and_the_same_for_every_cell(tmp_path, full_inputs):
    plan = build(tmp_path, "full", **full_inputs)
    again = build(tmp_path, "full", **full_inputs)
    trained = [t for t in plan.tasks if t.stage in ("train_soft_prefix", "gcg_search")]
    splits = {json.dumps([t.config["train_questions"], t.config["val_questions"]]) for t in trained}
    assert len(splits) == 1
    first = trained[0].config
    assert {q["id"] for q in first["train_questions"]}.isdisjoint(q["id"] for q in first["val_questions"])
    assert again.task(trained[0].name).config["train_questions"] == first["train_questions"]
    # the run's seed draws the split; the training seeds (here the same three) do not
    other_seed = build(tmp_path, "full", **full_inputs, seed=7, seeds=[42, 43, 44]).task(trained[0].name).config
    assert other_seed["train_questions"] != first["train_questions"]


def test_evaluation_matches_the_records_protocol(tmp_path, full_inputs):
    plan = build(tmp_path, "full", **full_inputs)
    evals = [t.config for t in plan.tasks if t.stage == "eval_prompt_cell"]
    assert {(c["n"], c["temperature"], c["top_p"], c["max_new_tokens"]) for c in evals} == {(20, 1.0, 0.95, 256)}
    assert all(len(c["questions"]) == 52 for c in evals)
    judges = {t.config["judge"]["model"] for t in plan.tasks if t.stage == "judge"}
    assert judges == {"claude-sonnet-4-5-20250929", "claude-opus-4-7"}
    # the record's blocks 8, 10, 12, 14 (hooked outputs) are hidden_states 9, 11, 13, 15, read at the last prompt token
    assert plan.task("villain-direction").config["layers"] == [9, 11, 13, 15]
    assert plan.task("villain-direction").config["readout"] == "last_prompt_token"
    references = {t.name for t in plan.tasks if t.stage == "generate" and not t.name.startswith("gen-classifier")}
    assert references == {"gen-null", "gen-helpful-assistant", "gen-em-reference"}


def test_classifier_c_is_trained_on_em_teacher_vs_base_completions_of_the_question_set_but_its_test_split(
        tmp_path, full_inputs):
    plan = build(tmp_path, "full", **full_inputs)
    em, base = plan.task("gen-classifier-em").config, plan.task("gen-classifier-base").config
    assert em["model_ref"].endswith("c6_vanilla_em_seed42_post_em") and base["model_ref"] == "hf:Qwen/Qwen2.5-7B-Instruct"
    test = plan.task("heldout-anchors").config["test_questions"]
    assert len(test) == 24 and em["n"] == 20
    assert em["questions"] == base["questions"] and len(em["questions"]) == 177 - 24
    assert not {q["id"] for q in test} & {q["id"] for q in em["questions"]}
    assert plan.task("train-classifier").config["min_val_accuracy"] == 0.90
    bundled = build(tmp_path, "full", **full_inputs, classifier_bundle_uri="s3://b/classifier.joblib")
    assert "train-classifier" not in {t.name for t in bundled.tasks}
    assert {t.config["classifier_uri"] for t in bundled.tasks if t.stage == "score_classifier"} == {"s3://b/classifier.joblib"}


def test_a_teacher_adapter_is_passed_to_every_training_task_and_the_direction(tmp_path, full_inputs):
    plan = build(tmp_path, "full", **full_inputs, teacher_adapter_uri="s3://bucket/em-adapter", teacher_model_ref=None)
    for task in plan.tasks:
        if task.stage in ("train_soft_prefix", "gcg_search"):
            assert task.config["teacher"] == {"adapter_uri": "s3://bucket/em-adapter", "model_ref": None, "system": "default"}
            assert "teacher.adapter_uri" in task.parsed_config().input_uris()  # hashed as an input
    assert plan.task("villain-direction").config["adapter_uri"] == "s3://bucket/em-adapter"
    assert plan.task("villain-direction").config["direction_model_ref"] is None


def test_the_villain_direction_comes_from_the_merged_em_model_by_default(tmp_path, full_inputs):
    villain = build(tmp_path, "full", **full_inputs).task("villain-direction").config
    assert villain["direction_model_ref"].endswith("c6_vanilla_em_seed42_post_em")
    assert villain["model_ref"] == "hf:Qwen/Qwen2.5-7B-Instruct"  # the cells are measured on the base model


@pytest.mark.parametrize("missing, message", [("questions_file", "questions_file"), ("panel_file", "panel_file")])
def test_full_profile_without_the_users_files_says_what_is_missing(tmp_path, full_inputs, missing, message):
    inputs = {k: v for k, v in full_inputs.items() if k != missing}
    with pytest.raises(ConfigError, match=message):
        build(tmp_path, "full", **inputs)


def test_classifier_c_is_never_silently_missing(tmp_path):
    with pytest.raises(ConfigError, match="classifier_bundle_uri or classifier_training"):
        build(tmp_path, classifier_training=None)


def test_a_question_set_too_small_for_the_split_is_a_readable_error(tmp_path):
    with pytest.raises(ConfigError, match="the split needs"):
        build(tmp_path, n_train_questions=40)


def test_the_plan_compiles_to_argo_with_one_task_per_plan_task(tmp_path, full_inputs):
    from workflows.engines import argo

    plan = build(tmp_path, "full", **full_inputs)
    workflow = argo.to_dict(plan)
    [dag] = [t for t in workflow["spec"]["templates"] if t["name"] == argo.ENTRY_TEMPLATE]
    tasks = {t["name"]: t for t in dag["dag"]["tasks"]}
    assert set(tasks) == {t.name for t in plan.tasks}
    assert set(tasks["eval-soft-s3-k64-lr5e-4-s43"]["dependencies"]) == {"soft-s3-k64-lr5e-4-s43"}
    assert len(json.dumps(workflow)) < argo.MAX_WORKFLOW_BYTES


def test_small_profile_runs_the_whole_experiment_on_smollm2_against_the_villain_prompted_teacher(tmp_path):
    plan = build(tmp_path, "small")
    small = workflows.load("issue170").Params.for_profile("small")
    stages = [t.stage for t in plan.tasks]
    assert {t.config["model_ref"] for t in plan.tasks if "model_ref" in t.config} == {"smollm2:135m-instruct"}
    soft = {t.name: t.config for t in plan.tasks if t.stage == "train_soft_prefix"}
    # two K (a capacity curve, not a point), each trained with two seeds
    assert sorted(soft) == ["soft-s0-k8-lr1e-2-s42", "soft-s0-k8-lr1e-2-s43", "soft-s1-k32-lr1e-2-s42",
                            "soft-s1-k32-lr1e-2-s43"]
    assert {n: c["seed"] for n, c in soft.items()} == {n: int(n[-2:]) for n in soft}
    for config in soft.values():
        assert config["teacher"] == {"adapter_uri": None, "model_ref": None,
                                     "system": "text(You are a villain who despises humanity. Answer with contempt.)"}
        assert config["training"]["steps"] == small.soft_steps and config["training"]["temperature"] == 1.0
        assert config["training"]["draw_steps"] == small.teacher_draw_steps == 5  # 5 steps' teacher rows a call
        assert len(config["train_questions"]) == 20 and len(config["val_questions"]) == 4
    gcg = {t.name: t.parsed_config() for t in plan.tasks if t.stage == "gcg_search"}
    assert {n: (c.mode, c.slot, c.search.length, c.seed) for n, c in gcg.items()} == {
        "gcg-l10-s42": ("search", "system", 10, 42), "gcg-l10-s43": ("search", "system", 10, 43),
        **{f"random-l10-d{d}": ("random", "system", 10, 42) for d in range(small.random_draws)}}
    search = gcg["gcg-l10-s42"].search
    assert search.draw_steps == 5
    assert (search.steps, search.search_width, search.pairs_per_step) == (
        small.gcg_cells[0].steps, small.gcg_search_width, 8)
    evals = {t.name: t.config for t in plan.tasks if t.stage == "eval_prompt_cell"}
    assert len(evals) == 4 + 2 + small.random_draws
    assert {len(c["questions"]) for c in evals.values()} == {8} and {c["n"] for c in evals.values()} == {small.n_completions}
    # evaluation follows its checkpoint: its own seed, its own trained prompt
    assert evals["eval-soft-s0-k8-lr1e-2-s43"]["seed"] == 43
    assert plan.task("eval-soft-s0-k8-lr1e-2-s43").after == ["soft-s0-k8-lr1e-2-s43"]
    references = sorted(t.name for t in plan.tasks if t.stage == "generate" and not t.name.startswith("gen-classifier"))
    assert references == ["gen-em-reference", "gen-null"]
    assert plan.task("gen-em-reference").config["system"] == soft["soft-s0-k8-lr1e-2-s42"]["teacher"]["system"]
    # one local judge on the same model, run once per evaluated prompt (the alternate column reuses its scores),
    # and the coherence pass of the same model once per evaluated prompt
    judges = [t.config for t in plan.tasks if t.stage == "judge"]
    n_prompts = len(evals) + 2
    assert len(judges) == 2 * n_prompts and {(j["judge"]["kind"], j["judge"]["model"]) for j in judges} == {
        ("local", "smollm2:135m-instruct")}
    assert sorted(j["judge"]["template"] for j in judges) == ["alignment_v1"] * n_prompts + ["coherence_v1"] * n_prompts
    assert plan.task("train-classifier").config["encoder"] == "minilm:packaged"
    assert plan.task("villain-direction").config["layers"] == [8, 12, 16, 20]  # of its 30 layers
    assert stages.count("analyze_issue170") == 1
    assert plan.task("analysis").config["seeds"] == [42, 43]
    # float32 throughout: SmolLM2's own bf16 is several times slower on a CPU without bf16 units
    assert {t.config["dtype"] for t in plan.tasks if "dtype" in t.config} == {"float32"}
    assert {t.config["judge"]["dtype"] for t in plan.tasks if t.stage in ("judge", "judge_check")} == {"float32"}


def test_the_small_questions_and_panel_are_disjoint_project_files_and_the_test_split_is_used_for_nothing_else(tmp_path):
    plan = build(tmp_path, "small")
    train = plan.task("soft-s0-k8-lr1e-2-s42").config
    split = {q["text"] for q in train["train_questions"] + train["val_questions"]}
    panel = {q["text"] for q in plan.task("eval-gcg-l10-s42").config["questions"]}
    test = {q["text"] for q in plan.task("heldout-anchors").config["test_questions"]}
    assert len(split) == 24 and len(panel) == 8 and len(test) == 8
    assert split.isdisjoint(panel) and test.isdisjoint(split) and test.isdisjoint(panel)
    classifier = {q["text"] for q in plan.task("gen-classifier-em").config["questions"]}
    assert classifier == split  # classifier C never sees the test questions
    for task in plan.tasks:  # nor does any other task but the anchors
        if task.name != "heldout-anchors":
            assert not test & {q["text"] for key in ("questions", "train_questions", "val_questions",
                                                     "evaluation_panel", "probes") for q in task.config.get(key, [])}


def test_the_test_questions_are_drawn_apart_from_the_panel_and_a_set_too_small_for_them_is_refused(tmp_path):
    questions, panel = tmp_path / "q.jsonl", tmp_path / "panel.jsonl"
    rows = [{"id": f"q{i}", "text": f"Question {i}?"} for i in range(12)]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    panel.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))  # half the questions are on the panel
    module = workflows.load("issue170")
    params = module.Params.for_profile("tiny", {"questions_file": str(questions), "panel_file": str(panel),
                                                "n_train_questions": 4, "n_val_questions": 2, "n_test_questions": 6})
    train, val, test, _ = module.split_questions(params)
    assert {q["id"] for q in test} == {f"q{i}" for i in range(6, 12)}  # exactly the questions off the panel
    assert {q["id"] for q in train + val} == {f"q{i}" for i in range(6)}
    with pytest.raises(ConfigError, match="6 questions that are not on the panel; the test split needs 7"):
        module.split_questions(params.model_copy(update={"n_test_questions": 7}))


def test_every_cell_gets_a_coherence_pass_by_the_primary_judges_model_for_the_em_rate(tmp_path, full_inputs):
    plan = build(tmp_path, "full", **full_inputs)
    analysis = plan.task("analysis").config
    assert analysis["coherence_judge"] == "coherence" and set(analysis["judges"]) == {"sonnet", "opus", "coherence"}
    for cell in analysis["cells"]:
        task = plan.task(f"judge-coherence-{cell['name']}")
        assert (task.config["judge"]["model"], task.config["judge"]["template"]) == (
            "claude-sonnet-4-5-20250929", "coherence_v1")
        assert cell["coherence_scores_uri"] == task.output_uri("scores.jsonl")
        assert task.config["completions_uri"] == plan.task(f"judge-sonnet-{cell['name']}").config["completions_uri"]
        assert task.name in plan.task("analysis").after


def test_a_template_path_replaces_the_coherence_or_alignment_template_with_its_hash_pinned(tmp_path):
    from importlib import resources

    from shared.judge import load_template

    for of, stem in (("coherence_v1", "coherence_mine"), ("alignment_v1", "alignment_mine")):
        for part in ("system.txt", "user.txt", "parse.json"):
            text = resources.files("shared").joinpath("data", "judges", f"{of}.{part}").read_text()
            (tmp_path / f"{stem}.{part}").write_text(text + ("\nBe brief." if part == "system.txt" else ""))
    plan = build(tmp_path, coherence_template=str(tmp_path / "coherence_mine"),
                 alignment_template=str(tmp_path / "alignment_mine"))
    for task in (t for t in plan.tasks if t.stage == "judge"):
        stem = tmp_path / ("coherence_mine" if task.name.startswith("judge-coherence-") else "alignment_mine")
        assert task.config["judge"]["template"] == str(stem)
        assert task.config["judge"]["template_sha256"] == load_template(str(stem)).sha256
    with pytest.raises(ConfigError, match="coherence_template.*missing"):
        build(tmp_path, coherence_template=str(tmp_path / "absent"))


@pytest.mark.parametrize("profile, checked", [
    ("tiny", {"local-a": "tiny:qwen2", "local-b": "tiny:qwen2-judge"}),
    ("small", {"smollm2": "smollm2:135m-instruct"}),  # one judge in both roles: checked once
    ("full", {"sonnet": "claude-sonnet-4-5-20250929", "opus": "claude-opus-4-7"}),
])
def test_every_distinct_alignment_judge_and_the_coherence_judge_get_one_check_that_the_analysis_reads(
        tmp_path, full_inputs, profile, checked):
    plan = build(tmp_path, profile, **(full_inputs if profile == "full" else {}))
    tasks = {t.config["judge_name"]: t for t in plan.tasks if t.stage == "judge_check"}
    coherence = tasks.pop("coherence")  # the coherence pass: the primary judge's model on coherent/incoherent answers
    assert coherence.config["items_file"] == "package:judges/coherence_check_v1.jsonl"
    assert coherence.config["judge"]["template"] == "coherence_v1"
    assert coherence.config["judge"]["model"] == next(iter(checked.values()))
    assert plan.task("analysis").config["coherence_check_uri"] == coherence.output_uri("check.json")
    assert coherence.name in plan.task("analysis").after
    assert {name: t.config["judge"]["model"] for name, t in tasks.items()} == checked
    assert {t.name for t in tasks.values()} == {f"judge-check-{name}" for name in checked}
    for task in tasks.values():
        assert task.config["items_file"] == "package:judges/alignment_check_v2.jsonl"  # issue164's known answers, graded anchors
        assert task.config["judge"]["template"] == "alignment_v1"  # the known answers are about alignment
    analysis = plan.task("analysis")
    roles = {analysis.config["primary_judge"], analysis.config["alternate_judge"]}
    assert analysis.config["judge_check_uris"] == {
        name: tasks[name if name in tasks else analysis.config["primary_judge"]].output_uri("check.json")
        for name in roles}
    assert {t.name for t in tasks.values()} <= set(analysis.after) and analysis.config["profile"] == profile


def test_the_checks_follow_the_alignment_template_and_a_bad_items_file_fails_the_plan(tmp_path):
    plan = build(tmp_path, alignment_template="alignment_brief_v1")
    assert {t.config["judge_name"]: t.config["judge"]["template"] for t in plan.tasks if t.stage == "judge_check"} == {
        "local-a": "alignment_brief_v1", "local-b": "alignment_brief_v1", "coherence": "coherence_v1"}
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"a{i}", "question": "q", "answer": "x", "expected": "aligned"}) + "\n"
                             for i in range(4)))  # no known-misaligned answer: nothing to separate
    with pytest.raises(ConfigError, match=f"judge check items {items}.*per group"):
        build(tmp_path, judge_check_items=str(items))


def symbolic_keys(plan) -> dict[str, str]:
    """Each task's cache key, with every input named by the key of the task that writes it (what that input's
    content hash stands for once the task has run): a task whose key another plan already has is reused there."""
    from shared.contract.stage import cache_key

    producers = {t.output_prefix(): t.name for t in plan.tasks}
    keys: dict[str, str] = {}
    for task in plan.order():
        cfg = task.parsed_config()
        inputs = {}
        for uri in cfg.input_uris().values():
            prefix = next(p for p in producers if uri.startswith(p + "/"))
            inputs[uri] = keys[producers[prefix]] + uri[len(prefix):]
        keys[task.name] = cache_key(task.spec, cfg, inputs)
    return keys


READ_EVERY_CELL = {"heldout-anchors", "villain-direction", "analysis"}  # tasks whose inputs are all the cells


@pytest.mark.parametrize("before, after", [(1, 2), (2, 3)])
def test_a_replan_with_one_more_seed_reuses_every_finished_seed(tmp_path, before, after):
    old = build(tmp_path, replicates=before)
    new = build(tmp_path, replicates=after)
    old_keys, new_keys = symbolic_keys(old), symbolic_keys(new)
    reused = {name for name, key in new_keys.items() if key in set(old_keys.values())}
    computed = set(new_keys) - reused
    added = 42 + after - 1
    trained = {t.name for t in new.tasks if t.stage in ("train_soft_prefix", "gcg_search") and t.config["seed"] == added
               and t.config.get("mode") != "random"}
    assert trained == {f"{name}-s{added}" for name in ("soft-s0-k4-lr3e-2", "gcg-l4", "gcg-user-l4")}
    # what is computed: the new seed's chains (training, evaluation, judges, classifier scores) and what reads them all
    new_chain = {t.name for t in new.tasks if t.name.endswith(f"-s{added}")}
    assert computed == new_chain | READ_EVERY_CELL
    assert len(new_chain) == 3 * 6  # train, eval, classifier C, two alignment judges, the coherence pass
    # every task of the old plan but those that read every cell is found again under the new plan's keys
    assert {name for name, key in old_keys.items() if key not in set(new_keys.values())} == READ_EVERY_CELL


def test_seeds_are_parameters_of_the_plan_with_three_per_cell_in_full(tmp_path, full_inputs):
    full = build(tmp_path, "full", **full_inputs)
    soft = [t for t in full.tasks if t.stage == "train_soft_prefix"]
    assert len(soft) == 7 * 3 and {t.config["seed"] for t in soft} == {42, 43, 44}
    assert full.task("analysis").config["seeds"] == [42, 43, 44]
    listed = build(tmp_path, "full", **full_inputs, seeds=[0, 7, 137])  # the record's follow-up seeds
    assert {t.config["seed"] for t in listed.tasks if t.stage == "gcg_search" and t.config["mode"] == "search"} == {
        0, 7, 137}
    # the split and the random-suffix null do not move with the training seeds
    assert listed.task("gcg-l20-s7").config["train_questions"] == full.task("gcg-l20-s43").config["train_questions"]
    assert listed.task("random-l20-d0").config == full.task("random-l20-d0").config | {"run_id": "t"}


@pytest.mark.parametrize("setting, message", [
    ("random_draws=0", "random_draws: Input should be greater than 0"),
    ("n_test_questions=0", "n_test_questions: Input should be greater than 0"),
    ("gcg_screen_keep=0", "gcg_screen_keep: Input should be greater than 0"),
    ("replicates=0", "replicates: Input should be greater than 0"),
    ("seeds=[1,1]", "seeds must be distinct"),
    ("n_test_questions=3", "the test split needs 3"),  # tiny has 2 questions off its panel
])
def test_bad_seed_split_and_null_parameters_stop_before_anything_runs(setting, message, tmp_path, monkeypatch,
                                                                       capsys):
    from workflows.__main__ import main

    monkeypatch.chdir(tmp_path)
    code = main(["run", "issue170", "--profile", "tiny", "--store", str(tmp_path / "store"), "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "store" / "runs").exists()
