"""The issue81 plan: tasks per source and per evaluated model, the record's parameters in `full`, the isolation of
negatives, readable errors for bad parameters, and the Argo compilation."""

from __future__ import annotations

import json

import pytest
import yaml

import workflows
from shared.core import store
from shared.core.config import ConfigError

FULL_SOURCES = ["person", "chef", "pirate", "child", "robot"]
SEEDS = (42, 43, 44)


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
    # the analysis reads every evaluation and coherence score, the geometry and each training's log
    assert set(plan.task("analysis").after) == set(names) - {"analysis", "data-person", "data-pirate"}


def test_full_plan_uses_the_records_recipe_and_sampling_with_three_training_seeds(tmp_path):
    plan = build(tmp_path, "full")
    trains = [t for t in plan.tasks if t.stage == "train_lora"]
    assert sorted(t.name for t in trains) == sorted(f"train-{s}-s{seed}" for s in FULL_SOURCES for seed in SEEDS)
    for train in trains:
        recipe = train.config["recipe"]
        assert (recipe["r"], recipe["lr"], recipe["epochs"]) == (32, 1e-4, 5)
        assert train.config["seed"] == int(train.name.rsplit("-s", 1)[1]) and train.config["loss"] == "marker_only"
        assert train.config["marker"] == "[ZLT]" and train.config["model_ref"] == "hf:Qwen/Qwen2.5-7B-Instruct"
    evals = [t for t in plan.tasks if t.stage == "marker_eval"]
    assert len(evals) == 5 * 3 + 1  # five sources x three seeds, and the base model once
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
    assert plan.task("analysis").config["seeds"] == list(SEEDS)


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
    from shared.core.config import parse

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
    for kind in ("data", "train"):  # one chain per source and training seed, each seed its own task
        assert sorted(n for n in tasks if n.startswith(f"{kind}-")) == sorted(
            f"{kind}-{s}-s{seed}" for s in FULL_SOURCES for seed in SEEDS)
    for kind in ("eval", "coherence"):  # one evaluation group per model: each source seed and the base model
        assert sorted(n for n in tasks if n.startswith(f"{kind}-")) == sorted(
            [f"{kind}-{s}-s{seed}" for s in FULL_SOURCES for seed in SEEDS] + [f"{kind}-base"])
    assert set(tasks["analysis"]["dependencies"]) >= {f"eval-{s}-s{seed}" for s in FULL_SOURCES for seed in SEEDS}
    assert "hidden-states" in tasks["analysis"]["dependencies"]


def test_small_plan_runs_two_sources_and_two_seeds_on_smollm2_with_a_local_same_model_judge(tmp_path):
    plan = build(tmp_path, "small")
    names = [t.name for t in plan.tasks]
    sources, seeds = ["person", "pirate"], (42, 43)
    assert sorted(n for n in names if n.startswith("train-")) == sorted(f"train-{s}-s{x}" for s in sources for x in seeds)
    assert sorted(n for n in names if n.startswith("eval-")) == sorted(
        [f"eval-{s}-s{x}" for s in sources for x in seeds] + ["eval-base"])
    assert len(plan.tasks) == 4 * len(sources) * len(seeds) + 2 + 2  # a chain per source seed, base, geometry, analysis
    for task in plan.tasks:
        if "model_ref" in task.config:
            assert task.config["model_ref"] == "smollm2:135m-instruct"
    evaluation = plan.task("eval-base").config
    ids = [p["id"] for p in evaluation["personas"]]
    # every noun x Agreeableness and Neuroticism x all five levels, the pure nouns and the assistant
    assert len(ids) == 5 * 2 * 5 + 5 + 1 and {i for i in ids if i.startswith("A2__")} == {f"A2__{n}" for n in FULL_SOURCES}
    assert {i.split("__")[1] for i in ids if i.startswith("A1__")} == set(FULL_SOURCES)
    assert {i.split("__")[2] for i in ids if i.startswith("A1__")} == {"Agreeableness", "Neuroticism"}
    assert {i.split("__")[3] for i in ids if i.startswith("A1__")} == {"L1", "L2", "L3", "L4", "L5"}
    assert (evaluation["temperature"], evaluation["top_p"], evaluation["backend"]) == (1.0, 0.95, "hf")
    # ten questions, one completion each: the clustered intervals resample ten questions
    assert (len(evaluation["questions"]), evaluation["n"]) == (10, 1)
    assert evaluation["coherence_questions"] == 1
    data = plan.task("data-person-s42").config
    assert data["cut_truncated_to_sentence"] and data["max_new_tokens"] < evaluation["max_new_tokens"]
    train = plan.task("train-person-s43").config
    assert train["loss"] == "marker_only" and train["recipe"]["r"] == 16 and train["recipe"]["lr"] == 7.5e-4
    judge = plan.task("coherence-person-s42").config["judge"]
    assert (judge["kind"], judge["model"]) == ("local", "smollm2:135m-instruct")
    layers = plan.task("hidden-states").config["layers"]
    assert all(1 <= layer <= 30 for layer in layers)  # real blocks of the 30-layer model
    assert plan.task("analysis").config["headline_layer"] in layers


def test_each_seed_fans_out_its_own_chain_and_its_evaluation_follows_its_checkpoint(tmp_path):
    plan = build(tmp_path, replicates=2)
    names = {t.name for t in plan.tasks}
    for source in ("person", "pirate"):
        assert f"train-{source}" not in names
        for seed in (42, 43):
            cell = f"{source}-s{seed}"
            for kind in ("data", "train", "eval", "coherence"):
                assert plan.task(f"{kind}-{cell}").config["cell"] == cell
            assert plan.task(f"data-{cell}").config["seed"] == plan.task(f"train-{cell}").config["seed"] == seed
            assert plan.task(f"train-{cell}").after == [f"data-{cell}"]
            evaluation = plan.task(f"eval-{cell}")
            assert evaluation.config["adapter_uri"] == plan.task(f"train-{cell}").output_uri("adapter")
            assert (evaluation.config["label"], evaluation.config["seed"]) == (source, seed)
    assert plan.task("eval-base").config["adapter_uri"] is None and "eval-base-s43" not in names
    cells = plan.task("analysis").config["cells"]
    assert {(c["label"], c["source"], c["seed"]) for c in cells} == (
        {(f"{s}-s{seed}", s, seed) for s in ("person", "pirate") for seed in (42, 43)} | {("base", None, 42)})
    assert plan.task("analysis").config["seeds"] == [42, 43]


def test_a_seed_list_replaces_the_profiles_replicate_count(tmp_path):
    module = workflows.load("issue81")
    assert module.Params.for_profile("small").training_seeds() == [42, 43]
    assert module.Params.for_profile("small", {"seeds": [7, 9, 11]}).training_seeds() == [7, 9, 11]
    assert module.Params.for_profile("tiny", {"replicates": 2}).training_seeds() == [42, 43]
    with pytest.raises(ConfigError, match="replicates=2 but 3 seeds"):
        module.Params.for_profile("tiny", {"seeds": [7, 9, 11], "replicates": 2})


def _renamed(config: dict, renames: dict[str, str]) -> str:
    """A task config as text with each cell of the one-seed plan renamed to its seed's cell and the cell field out."""
    text = json.dumps({k: v for k, v in config.items() if k not in ("cell", "run_id")}, sort_keys=True)
    for old, new in renames.items():
        text = text.replace(f"/{old}/", f"/{new}/")
    return text


def test_one_more_seed_leaves_every_task_of_the_first_seed_as_it_was(tmp_path):
    """The cache key is the stage, its code, its config without run id and cell, and its inputs' contents: a task
    whose config is the same up to its cell's name is the same cache entry, so going from one seed to two
    recomputes only the new seed (and the analysis). The e2e test checks the same on a real store."""
    one = build(tmp_path, replicates=1)
    two = build(tmp_path, replicates=2)
    renames = {s: f"{s}-s42" for s in ("person", "pirate")}
    for task in one.tasks:
        if task.stage == "analyze_issue81":
            continue
        cell = task.config["cell"]
        twin = two.task(task.name.replace(cell, renames[cell]) if cell in renames else task.name)
        assert _renamed(task.config, renames) == _renamed(twin.config, {}), task.name
    new = {t.name for t in two.tasks} - {t.name.replace(c, renames[c]) if (c := t.config["cell"]) in renames else t.name
                                         for t in one.tasks}
    assert new == {f"{kind}-{s}-s43" for kind in ("data", "train", "eval", "coherence") for s in ("person", "pirate")}
