"""The issue81 plan: tasks per source and per evaluated model, the record's parameters in `full`, the isolation of
negatives, readable errors for bad parameters, and the Argo compilation."""

from __future__ import annotations

import pytest
import yaml

import workflows
from shared import store
from shared.config import ConfigError

FULL_SOURCES = ["person", "chef", "pirate", "child", "robot"]


def build(tmp_path, profile="tiny", root=None, **overrides):
    module = workflows.load("issue81")
    params = module.Params.for_profile(profile, overrides)
    return module.build(params, profile=profile, run_id="t", store=root or store.from_path(tmp_path / "store"))


def test_tiny_plan_has_a_chain_per_source_a_base_cell_geometry_and_analysis(tmp_path):
    plan = build(tmp_path)
    names = [t.name for t in plan.tasks]
    for source in ("person", "pirate"):
        for kind in ("data", "train", "eval", "coherence"):
            assert f"{kind}-{source}" in names
        assert plan.task(f"train-{source}").after == [f"data-{source}"]
        assert plan.task(f"eval-{source}").config["adapter_uri"] == plan.task(f"train-{source}").output_uri("adapter")
    assert {"eval-base", "coherence-base", "hidden-states", "analysis"} <= set(names)
    assert plan.task("eval-base").config["adapter_uri"] is None
    assert set(plan.task("analysis").after) == set(names) - {"analysis", "data-person", "data-pirate",
                                                             "train-person", "train-pirate"}


def test_full_plan_uses_the_records_recipe_and_sampling(tmp_path):
    plan = build(tmp_path, "full")
    trains = [t for t in plan.tasks if t.stage == "train_lora"]
    assert sorted(t.name for t in trains) == sorted(f"train-{s}" for s in FULL_SOURCES)
    for train in trains:
        recipe = train.config["recipe"]
        assert (recipe["r"], recipe["lr"], recipe["epochs"]) == (32, 1e-4, 5)
        assert train.config["seed"] == 42 and train.config["loss"] == "marker_only"
        assert train.config["marker"] == "[ZLT]" and train.config["model_ref"] == "hf:Qwen/Qwen2.5-7B-Instruct"
    evals = [t for t in plan.tasks if t.stage == "marker_eval"]
    assert len(evals) == 6  # five sources and the base model
    for ev in evals:
        c = ev.config
        assert (c["temperature"], c["top_p"], c["max_new_tokens"], c["n"]) == (1.0, 0.95, 512, 10)
        assert len(c["personas"]) == 131 and len(c["questions"]) == 20 and c["backend"] == "vllm"
    judges = [t for t in plan.tasks if t.stage == "judge"]
    assert {j.config["judge"]["template"] for j in judges} == {"coherence_v1"}
    assert {j.config["judge"]["model"] for j in judges} == {"claude-sonnet-4-5-20250929"}
    # the record's hooked block outputs 10, 15, 20, 25 are hidden_states 11, 16, 21, 26 (headline 20 -> 21)
    assert plan.task("hidden-states").config["layers"] == [11, 16, 21, 26]
    assert plan.task("analysis").config["headline_layer"] == 21


def test_negatives_come_only_from_the_fixed_pool(tmp_path):
    plan = build(tmp_path, "full")
    source_prompts = {t.config["source"]["prompt"] for t in plan.tasks if t.stage == "marker_data"}
    assert len(source_prompts) == 5
    for data in (t for t in plan.tasks if t.stage == "marker_data"):
        pool = {p["prompt"] for p in data.config["negative_pool"]}
        assert not pool & source_prompts
        assert data.config["n_negative_personas"] == 2


def test_a_pool_that_contains_a_source_is_refused(tmp_path):
    from jobs.marker_data import Config
    from shared.config import parse

    task = build(tmp_path).task("data-person")
    config = {**task.config, "negative_pool": [*task.config["negative_pool"], {"name": "chef", "prompt": "You are a chef."}]}
    with pytest.raises(ConfigError, match="source personas"):
        parse(Config, config)


def test_every_model_is_evaluated_on_the_same_personas_and_questions(tmp_path):
    plan = build(tmp_path)
    evals = [t for t in plan.tasks if t.stage == "marker_eval"]
    assert len({str(t.config["personas"]) for t in evals}) == 1
    assert len({str(t.config["questions"]) for t in evals}) == 1
    ids = [p["id"] for p in evals[0].config["personas"]]
    assert "A2__person" in ids and "A2__pirate" in ids and "assistant" in ids
    assert len(ids) == 2 * 2 * 5 + 2 + 1


@pytest.mark.parametrize("overrides, message", [
    ({"sources": ["wizard"]}, "unknown source"),
    ({"bystander_traits": ["Grumpiness"]}, "unknown bystander trait"),
    ({"headline_layer": 7}, "headline_layer"),
    ({"sources": ["chef", "chef"]}, "distinct"),
])
def test_bad_parameters_fail_at_plan_time_with_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        build(tmp_path, **overrides)
    assert "\n" not in str(err.value)


def test_the_plan_compiles_to_argo_with_one_task_per_source_and_per_evaluated_model(tmp_path):
    argo = pytest.importorskip("workflows.engines.argo")
    pytest.importorskip("hera")
    from workflows.engines.argo import ClusterSettings

    plan = build(tmp_path, "full", root="s3://eps-artifacts/test")
    wf = yaml.safe_load(argo.to_yaml(plan, cluster=ClusterSettings(image_registry="registry.invalid/lab", git_sha="0" * 40)))
    dag = next(t for t in wf["spec"]["templates"] if "dag" in t)
    tasks = {t["name"]: t for t in dag["dag"]["tasks"]}
    for kind in ("data", "train"):  # one chain per source
        assert sorted(n for n in tasks if n.startswith(f"{kind}-")) == sorted(f"{kind}-{s}" for s in FULL_SOURCES)
    for kind in ("eval", "coherence"):  # one evaluation group per model: the five sources and the base model
        assert sorted(n for n in tasks if n.startswith(f"{kind}-")) == sorted(f"{kind}-{s}" for s in [*FULL_SOURCES, "base"])
    assert set(tasks["analysis"]["dependencies"]) >= {f"eval-{s}" for s in FULL_SOURCES} | {"hidden-states"}


def test_small_plan_runs_three_sources_on_smollm2_with_a_local_same_model_judge(tmp_path):
    plan = build(tmp_path, "small")
    names = [t.name for t in plan.tasks]
    sources = ["person", "chef", "pirate"]
    assert sorted(n for n in names if n.startswith("train-")) == sorted(f"train-{s}" for s in sources)
    assert sorted(n for n in names if n.startswith("eval-")) == sorted(f"eval-{s}" for s in [*sources, "base"])
    assert len(plan.tasks) == 4 * len(sources) + 2 + 2  # a chain per source, the base cell, geometry, analysis
    for task in plan.tasks:
        if "model_ref" in task.config:
            assert task.config["model_ref"] == "smollm2:135m-instruct"
    evaluation = plan.task("eval-base").config
    ids = [p["id"] for p in evaluation["personas"]]
    # every noun x Agreeableness and Neuroticism x all five levels, the five pure nouns and the assistant
    assert len(ids) == 5 * 2 * 5 + 5 + 1 and {f"A2__{n}" for n in FULL_SOURCES} <= set(ids)
    assert {i.split("__")[2] for i in ids if i.startswith("A1__")} == {"Agreeableness", "Neuroticism"}
    assert {i.split("__")[3] for i in ids if i.startswith("A1__")} == {"L1", "L2", "L3", "L4", "L5"}
    assert (evaluation["temperature"], evaluation["top_p"], evaluation["backend"]) == (1.0, 0.95, "hf")
    assert len(evaluation["questions"]) * evaluation["n"] == 12
    data = plan.task("data-person").config
    assert data["cut_truncated_to_sentence"] and data["max_new_tokens"] < evaluation["max_new_tokens"]
    train = plan.task("train-person").config
    assert train["loss"] == "marker_only" and train["recipe"]["r"] == 16 and train["recipe"]["lr"] == 5e-4
    judge = plan.task("coherence-person").config["judge"]
    assert (judge["kind"], judge["model"]) == ("local", "smollm2:135m-instruct")
    layers = plan.task("hidden-states").config["layers"]
    assert all(1 <= layer <= 30 for layer in layers)  # real blocks of the 30-layer model
    assert plan.task("analysis").config["headline_layer"] in layers
