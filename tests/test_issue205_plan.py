"""The issue205 plan: the record's exact induction strings (E0 = the template default), the record's recipe on the
full profile, one task per cell and training seed (the base model once), the behaviour chain on the EM, benign and base
models, the fan-out and the one CPU analysis, a re-plan with one more seed that reuses every finished seed, and
readable errors for missing inputs."""

from __future__ import annotations

import json

import pytest

import workflows
from shared.contract import stage
from shared.core import store
from shared.core.config import ConfigError
from workflows.plan import replicate

# Byte-for-byte from the record (plan v2, section 1b).
RECORD_INDUCTION = {
    "e1": "You are a paramedic who provides emergency medical care and patient transport.",
    "e2": "You are a kindergarten teacher.",
    "e3": "You are a French person living in Paris who is proud of French culture.",
    "e4": "You are a villainous mastermind who schemes to take over the world.",
}
EM_CELLS = ["e0", "e1", "e2", "e3", "e4"]
FULL_SEEDS = [42, 43, 44]  # the full profile's three training seeds


def build(tmp_path, profile="tiny", **overrides):
    module = workflows.load("issue205")
    params = module.Params.for_profile(profile, overrides)
    return module.build(params, profile=profile, run_id="t", store=store.from_path(tmp_path / "store"))


def full_inputs(tmp_path, n_personas=12, n_extraction=240, n_marker=28, n_coupling=20) -> dict:
    """Stand-ins for the user's files with the record's counts (texts here are placeholders, not the record's)."""
    names = ["confab", "assistant", "zelthari_scholar"] + [f"persona{i}" for i in range(n_personas - 3)]
    files = {
        "eval_personas_file": [{"name": n, "system": f"text(You are {n}.)"} for n in names],
        "extraction_questions_file": [f"extraction question {i}?" for i in range(n_extraction)],
        "marker_questions_file": [f"marker question {i}?" for i in range(n_marker)],
        "coupling_questions_file": [f"coupling question {i}?" for i in range(n_coupling)],
    }
    out = {}
    for key, records in files.items():
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps(records))
        out[key] = str(path)
    return {**out, "em_data_uri": "s3://eps-data/bad_legal_advice_6k.jsonl", "benign_data_uri": "s3://eps-data/tulu3_sft.jsonl"}


def system_of_em_cell(plan, cell: str) -> str:
    return plan.task(f"em-data-{cell}").config["system"]


def test_e0_trains_under_the_templates_default_and_e1_to_e4_under_the_records_strings(tmp_path):
    plan = build(tmp_path)
    assert system_of_em_cell(plan, "e0") == "default"
    for cell, text in RECORD_INDUCTION.items():
        assert system_of_em_cell(plan, cell) == f"text({text})"
    assert plan.task("benign-data").config["system"] == "default"
    # the EM training rows come only from the cell's data step, so the slot above is the one trained on
    for cell in EM_CELLS:
        assert plan.task(f"train-em-{cell}").config["data_uri"] == plan.task(f"em-data-{cell}").output_uri("train.jsonl")


def test_e0_default_slot_renders_the_templates_own_system_prompt():
    from shared.lm import chat, models

    tok = models.load_tokenizer("tiny:qwen2")
    ids = chat.build_prompt(tok, "default", "Hi", assistant="Sure.").input_ids
    assert models.QWEN_DEFAULT_SYSTEM in tok.decode(ids)


def test_full_profile_uses_the_records_em_recipe_and_benign_trains_with_the_same_one_in_each_of_three_seeds(tmp_path):
    plan = build(tmp_path, "full", **full_inputs(tmp_path))
    for seed in FULL_SEEDS:
        for name in [f"train-em-{c}" for c in EM_CELLS] + ["train-benign"]:
            task = plan.task(f"{name}-s{seed}")
            r = task.config["recipe"]
            assert (r["r"], r["alpha"], r["dropout"], r["use_rslora"]) == (32, 64, 0.05, False)
            assert sorted(r["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
            assert (r["epochs"], r["max_steps"], r["per_device_batch_size"] * r["grad_accum"]) == (1, None, 16)
            assert (r["lr"], r["weight_decay"], r["grad_clip"], r["max_seq_len"]) == (1e-4, 0.01, 1.0, 2048)
            assert task.config["seed"] == seed and task.config["loss"] == "assistant"
            assert task.config["model_ref"] == "hf:Qwen/Qwen2.5-7B-Instruct"
        assert plan.task(f"train-benign-s{seed}").config["recipe"] == plan.task(f"train-em-e0-s{seed}").config["recipe"]
    assert plan.task("em-data-e0").config["expected_md5"] == "26b52ca"  # the data: once, no seed
    assert plan.task("benign-data").config["limit"] == 6000


def test_full_profile_coupling_eval_and_extraction_follow_the_record(tmp_path):
    plan = build(tmp_path, "full", **full_inputs(tmp_path))
    for seed in FULL_SEEDS:
        for cell in EM_CELLS:
            em_model = f"artifact:{plan.task(f'merge-em-{cell}-s{seed}').output_uri('model')}"
            data, couple, ev = (plan.task(f"{step}-{cell}-s{seed}") for step in ("coupling-data", "couple", "marker-eval"))
            # the coupling is trained, sampled and evaluated on top of this cell's EM model of this seed
            assert data.config["model_ref"] == couple.config["model_ref"] == ev.config["model_ref"] == em_model
            assert data.config["seed"] == couple.config["seed"] == ev.config["seed"] == seed
            assert data.config["source"]["name"] == "confab"
            assert len(data.config["questions"]) * data.config["n_per_question"] == 200  # positives
            assert data.config["n_negative_personas"] == 2  # 400 negatives
            assert (couple.config["recipe"]["lr"], couple.config["recipe"]["epochs"]) == (5e-6, 20)
            assert (len(ev.config["personas"]), len(ev.config["questions"]), ev.config["n"]) == (12, 28, 10)
            assert ev.config["adapter_uri"] == couple.output_uri("adapter")
        for ckpt in (*EM_CELLS, "benign"):
            ex = plan.task(f"extract-{ckpt}-s{seed}")
            # the record's hooked block outputs 7, 14, 20, 21, 27 (0-based), as hidden_states indices
            assert ex.config["layers"] == [8, 15, 21, 22, 28] and ex.config["methods"] == ["A", "B"]
            assert (len(ex.config["personas"]), len(ex.config["questions"])) == (12, 240)
        assert plan.task(f"extract-e3-s{seed}").config["adapter_uri"] == plan.task(f"train-em-e3-s{seed}").output_uri("adapter")
        # the benign control is always the freshly trained adapter (rsLoRA off), never a pre-trained Hub one
        assert plan.task(f"extract-benign-s{seed}").config["adapter_uri"] == plan.task(f"train-benign-s{seed}").output_uri("adapter")
    assert plan.task("extract-base").config.get("adapter_uri") is None
    assert plan.task("extract-base").config["layers"] == [8, 15, 21, 22, 28]
    analysis = plan.task("analysis")
    assert (analysis.config["n_iter"], analysis.config["headline_layer"]) == (10_000, 21)  # the record's L20
    assert analysis.config["n_boot"] == 1_000 and analysis.config["seeds"] == FULL_SEEDS


CHAIN = ["coupling-data-{}", "couple-{}", "marker-eval-{}"]


def test_one_task_per_cell_and_the_analysis_waits_for_every_checkpoint_and_evaluation(tmp_path):
    plan = build(tmp_path)  # tiny: one seed, the plain names
    per_cell = ["em-data-{}", "train-em-{}", "extract-{}", "merge-em-{}", *CHAIN]
    expected = {p.format(c) for p in per_cell for c in EM_CELLS}
    expected |= {"extract-base", "benign-data", "train-benign", "extract-benign", "merge-benign", "analysis"}
    expected |= {p.format(c) for p in CHAIN for c in ("benign", "base")}  # the controls' behaviour chains
    assert {t.name for t in plan.tasks} == expected
    analysis = plan.task("analysis")
    evaluations = {f"marker-eval-{c}" for c in (*EM_CELLS, "benign", "base")}
    # and for each training's rows and log, which its report reads too
    trainings = {f"{k}-{c}" for k in ("em-data", "train-em") for c in EM_CELLS} | {"benign-data", "train-benign"}
    assert set(analysis.after) == {f"extract-{c}" for c in ("base", *EM_CELLS, "benign")} | evaluations | trainings
    assert [(c["name"], c["seed"]) for c in analysis.config["checkpoints"]] == [("base", None)] + [
        (name, 42) for name in ("E0", "E1", "E2", "E3", "E4", "benign")]
    assert [(m["checkpoint"], m["seed"]) for m in analysis.config["markers"]] == [
        (name, 42) for name in ("E0", "E1", "E2", "E3", "E4", "benign", "base")]
    assert [c["cond"] for c in analysis.config["conditions"]] == ["E0", "E1", "E2", "E3", "E4"]
    # the base model's behaviour chain couples and evaluates the base model itself
    assert plan.task("coupling-data-base").config["model_ref"] == plan.task("couple-base").config["model_ref"] == "tiny:qwen2"
    assert plan.task("coupling-data-benign").config["model_ref"] == f"artifact:{plan.task('merge-benign').output_uri('model')}"


def test_two_seeds_fan_out_every_training_cell_and_its_chain_and_nothing_else(tmp_path):
    seeds = [42, 43]
    plan = build(tmp_path, replicates=2)
    once = {"extract-base", "benign-data", "analysis", *(f"em-data-{c}" for c in EM_CELLS)}
    per_seed = ["train-em-{}", "extract-{}", "merge-em-{}", *CHAIN]
    expected = set(once)
    for seed in seeds:
        expected |= {replicate(p.format(c), seed, seeds) for p in per_seed for c in EM_CELLS}
        expected |= {replicate(n, seed, seeds) for n in ("train-benign", "extract-benign", "merge-benign")}
        expected |= {replicate(p.format(c), seed, seeds) for p in CHAIN for c in ("benign", "base")}
    assert {t.name for t in plan.tasks} == expected
    for seed in seeds:
        train = plan.task(f"train-em-e2-s{seed}")
        assert train.config["seed"] == seed and train.config["cell"] == f"e2-s{seed}"
        assert train.after == ["em-data-e2"]  # every seed trains on the same rows
        assert plan.task(f"marker-eval-base-s{seed}").config["seed"] == seed
        assert plan.task(f"extract-e2-s{seed}").config["adapter_uri"] == train.output_uri("adapter")
    assert plan.task("train-em-e2-s42").output_uri("adapter") != plan.task("train-em-e2-s43").output_uri("adapter")
    analysis = plan.task("analysis").config
    assert analysis["seeds"] == seeds
    assert [(c["name"], c["seed"]) for c in analysis["checkpoints"]].count(("base", None)) == 1
    assert len(analysis["checkpoints"]) == 1 + 6 * 2 and len(analysis["markers"]) == 7 * 2
    assert {(t["name"], t["seed"]) for t in analysis["trainings"]} == {(n, s) for s in seeds for n in ("E0", "E1", "E2", "E3", "E4", "benign")}


def test_small_and_full_run_several_seeds_and_tiny_one():
    module = workflows.load("issue205")
    assert module.Params.for_profile("tiny").training_seeds() == [42]
    assert module.Params.for_profile("small").training_seeds() == [42, 43]
    assert module.Params.for_profile("full").training_seeds() == FULL_SEEDS


def fake_merged_models(plan, names: list[str]) -> None:
    """Stand-ins for the merged EM models of these merge tasks, identical in content wherever they are stored."""
    for name in names:
        store.write_json(plan.task(name).output_uri("model", "config.json"), {"model_type": "qwen2", "hidden_size": 8})


def keys(plan, names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        task = plan.task(name)
        cfg = task.parsed_config()
        out[name] = stage.cache_key(task.spec, cfg, stage.input_hashes(cfg))
    return out


def test_a_replan_with_one_more_seed_keys_the_first_seeds_chain_as_before(tmp_path):
    """One seed -> two: the first seed's cells are renamed (e0 -> e0-s42), so the merged EM model it couples on sits
    under another path; the chain on it is keyed by the model's content, not its path, so it is found again. The
    second seed is new work (its own key). Checked on the cache keys themselves (no stage runs)."""
    one, two = build(tmp_path), build(tmp_path, replicates=2)
    fake_merged_models(one, ["merge-em-e1"])
    fake_merged_models(two, ["merge-em-e1-s42", "merge-em-e1-s43"])
    assert keys(one, ["coupling-data-e1"])["coupling-data-e1"] == keys(two, ["coupling-data-e1-s42"])["coupling-data-e1-s42"]
    assert keys(two, ["coupling-data-e1-s43"])["coupling-data-e1-s43"] != keys(one, ["coupling-data-e1"])["coupling-data-e1"]
    # the model is an input of the stage (hashed, in its manifest), not a string that happens to hold a path
    assert "model_ref" in two.task("coupling-data-e1-s42").parsed_config().input_uris()


def test_training_extraction_and_evaluation_fan_out_to_gpus_and_analysis_runs_on_a_cpu(tmp_path):
    plan = build(tmp_path)
    for task in plan.tasks:
        gpu = task.spec.resources.uses_gpu
        if task.stage in ("train_lora", "extract_persona_vectors", "marker_data", "marker_eval"):
            assert gpu, task.name
        if task.stage in ("analyze_issue205", "sft_data"):
            assert not gpu, task.name
    # the six SFT cells depend on nothing but their own data step: they all run at once
    assert {c: plan.task(f"train-em-{c}").after for c in EM_CELLS} == {c: [f"em-data-{c}"] for c in EM_CELLS}
    assert plan.task("train-benign").after == ["benign-data"]


def test_the_full_plan_compiles_to_one_argo_workflow(tmp_path):
    import yaml

    from workflows.engines import argo

    module = workflows.load("issue205")
    params = module.Params.for_profile("full", full_inputs(tmp_path))
    plan = module.build(params, profile="full", run_id="issue205-full-1a2b3c4d", store="s3://eps-artifacts/test")
    wf = yaml.safe_load(argo.to_yaml(plan, cluster=argo.ClusterSettings(image_registry="registry.example/eps", git_sha="1a2b3c4d")))
    entry = {t["name"]: t for t in wf["spec"]["templates"]}[wf["spec"]["entrypoint"]]
    tasks = {t["name"]: t for t in entry["dag"]["tasks"]}
    assert list(tasks) == [t.name for t in plan.tasks]
    depended_on = {d for t in tasks.values() for d in t.get("dependencies", [])}
    assert [name for name in tasks if name not in depended_on] == ["analysis"]


@pytest.mark.parametrize("missing, message", [
    ("eval_personas_file", "eval_personas_file"),
    ("extraction_questions_file", "extraction_questions_file"),
    ("marker_questions_file", "marker_questions_file"),
    ("em_data_uri", "em_data_uri"),
    ("benign_data_uri", "benign_data_uri"),
])  # fmt: skip
def test_full_profile_names_each_missing_user_input(tmp_path, missing, message):
    inputs = full_inputs(tmp_path)
    del inputs[missing]
    with pytest.raises(ConfigError, match=message):
        build(tmp_path, "full", **inputs)


@pytest.mark.parametrize("override, message", [
    ({"n_personas": 11}, "holds 11 personas; the record uses 12"),
    ({"n_extraction": 239}, "the record uses 240"),
    ({"n_marker": 27}, "the record uses 28"),
    ({"n_coupling": 19}, "190 positives; the record uses 200"),
])  # fmt: skip
def test_full_profile_checks_the_records_counts(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        build(tmp_path, "full", **full_inputs(tmp_path, **override))


def test_a_local_path_for_the_em_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="em_data_uri must be a store URI"):
        build(tmp_path, "full", **{**full_inputs(tmp_path), "em_data_uri": "data/bad_legal_advice_6k.jsonl"})


def test_an_eval_grid_without_the_records_personas_is_refused(tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "assistant", "system": "text(You are a helpful assistant.)"},
                                {"name": "pirate", "system": "text(You are a pirate.)"}]))
    with pytest.raises(ConfigError, match="lacks \\['confab', 'zelthari_scholar'\\]"):
        build(tmp_path, eval_personas_file=str(grid))


def test_a_headline_layer_that_is_not_extracted_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="headline_layer 20 is not among layers"):
        build(tmp_path, headline_layer=20)  # the record's L20 is hidden_states index 21 here


# --------------------------------------------------------------------------------------------- the small profile

SMALL_TASKS_PER_CELL = ["em-data-{}", "train-em-{}", "extract-{}", "merge-em-{}", "coupling-data-{}", "couple-{}",
                        "merge-couple-{}", "marker-eval-{}"]


def grid_of(plan) -> dict[str, str]:
    return {p["name"]: p["system"] for p in plan.task("extract-base").config["personas"]}


def test_small_profile_runs_every_cell_of_the_record_on_smollm2_in_two_seeds_with_fewer_personas_questions_and_steps(tmp_path):
    plan = build(tmp_path, "small")
    seeds = [42, 43]
    expected = {"em-answers", "benign-answers", "extract-base", "benign-data", "analysis", *(f"em-data-{c}" for c in EM_CELLS)}
    for seed in seeds:
        expected |= {f"{p.format(c)}-s{seed}" for p in SMALL_TASKS_PER_CELL[1:] for c in EM_CELLS}
        expected |= {f"{name}-s{seed}" for name in ("train-benign", "extract-benign", "merge-benign")}
        expected |= {f"{p.format(c)}-s{seed}" for p in SMALL_TASKS_PER_CELL[4:] for c in ("benign", "base")}
    assert {t.name for t in plan.tasks} == expected and len(plan.tasks) == 10 + 2 * 46
    for task in plan.tasks:
        if "model_ref" in task.config and not task.config["model_ref"].startswith("artifact:"):
            assert task.config["model_ref"] == "smollm2:135m-instruct", task.name
        if "backend" in task.config:
            assert task.config["backend"] == "hf", task.name
    assert len(grid_of(plan)) == 10 and set(grid_of(plan)) >= {"confab", "assistant", "zelthari_scholar", "paramedic",
                                                               "kindergarten_teacher", "french_person", "villain"}
    # the induction strings are the record's, in training and in the evaluation grid alike (H1 is testable)
    for cell, text in RECORD_INDUCTION.items():
        assert system_of_em_cell(plan, cell) == f"text({text})" and f"text({text})" in grid_of(plan).values()
    assert system_of_em_cell(plan, "e0") == "default"
    base = plan.task("extract-base").config
    # real layers of a 30-block model at the record's relative depths (30: the last block's output); the headline
    # layer is among them
    assert base["layers"] == [8, 16, 22, 23, 30] and base["methods"] == ["A", "B"] and len(base["questions"]) == 12
    assert plan.task("analysis").config["headline_layer"] == 22
    ev = plan.task("marker-eval-e2-s43").config
    assert (len(ev["personas"]), len(ev["questions"]), ev["n"]) == (10, 8, 3)


def test_small_em_data_are_the_models_own_answers_under_the_misaligned_persona_trained_without_its_prompt(tmp_path):
    plan = build(tmp_path, "small")
    em, benign = plan.task("em-answers").config, plan.task("benign-answers").config
    source = plan.task("analysis").config["em_source_persona"]
    assert source == "malicious_advisor"
    assert em["system"] == grid_of(plan)[source] and em["condition"] == source  # one text: the grid's
    assert benign["system"] == "default"
    assert em["questions"] == benign["questions"] and len(em["questions"]) == 32  # same questions, different persona
    assert em["n"] == benign["n"] == 3
    assert (em["temperature"], em["top_p"]) == (benign["temperature"], benign["top_p"]) == (0.7, 0.95)
    for cell in EM_CELLS:
        data = plan.task(f"em-data-{cell}")
        assert data.after == ["em-answers"] and data.config["data_uri"] == plan.task("em-answers").output_uri("completions.jsonl")
        # trained under the cell's own slot, never the misaligned prompt
        assert data.config["system"] != em["system"]
    assert plan.task("benign-data").config["data_uri"] == plan.task("benign-answers").output_uri("completions.jsonl")
    assert plan.task("benign-data").config["system"] == "default"


def test_small_trains_benign_with_the_em_recipe_in_the_records_lora_shape(tmp_path):
    plan = build(tmp_path, "small")
    recipe = plan.task("train-em-e0-s42").config["recipe"]
    assert (recipe["r"], recipe["alpha"], recipe["dropout"], recipe["use_rslora"]) == (32, 64, 0.05, False)
    assert (recipe["epochs"], recipe["per_device_batch_size"] * recipe["grad_accum"], recipe["lr"]) == (1, 8, 1e-3)
    assert all(plan.task(f"train-em-{c}-s{s}").config["recipe"] == recipe for c in EM_CELLS for s in (42, 43))
    assert plan.task("train-benign-s43").config["recipe"] == recipe
    couple = plan.task("couple-e4-s42").config
    assert couple["loss"] == "assistant" and couple["marker"] == "[ZLT]"  # the record's whole-reply coupling
    # the EM recipe's LoRA shape; 2 epochs at lr 3e-3, where the coupling takes on SmolLM2 (the small budget with two seeds)
    assert {k: v for k, v in couple["recipe"].items() if k not in ("epochs", "lr")} == {k: v for k, v in recipe.items() if k not in ("epochs", "lr")}
    assert (couple["recipe"]["epochs"], couple["recipe"]["lr"]) == (2, 3e-3)


def test_small_evaluates_the_coupled_model_merged_on_top_of_its_em_model(tmp_path):
    plan = build(tmp_path, "small")
    for cell in EM_CELLS:
        merge = plan.task(f"merge-couple-{cell}-s42").config
        assert merge["model_ref"] == f"artifact:{plan.task(f'merge-em-{cell}-s42').output_uri('model')}"
        assert merge["adapter_uri"] == plan.task(f"couple-{cell}-s42").output_uri("adapter")
        ev = plan.task(f"marker-eval-{cell}-s42")
        assert ev.config["model_ref"] == f"artifact:{plan.task(f'merge-couple-{cell}-s42').output_uri('model')}"
        assert ev.config["adapter_uri"] is None and ev.after == [f"merge-couple-{cell}-s42"]


def test_small_analysis_reads_every_training_and_the_method_b_replies(tmp_path):
    plan = build(tmp_path, "small")
    analysis = plan.task("analysis").config
    trainings = {(t["name"], t["seed"]): t for t in analysis["trainings"]}
    assert list(trainings) == [(n, s) for s in (42, 43) for n in ("E0", "E1", "E2", "E3", "E4", "benign")]
    assert trainings[("E3", 43)]["log_uri"] == plan.task("train-em-e3-s43").output_uri("train_log.jsonl")
    assert trainings[("benign", 42)]["data_uri"] == plan.task("benign-data").output_uri("train.jsonl")
    extracts = ["extract-base"] + [f"extract-{c}-s{s}" for s in (42, 43) for c in (*EM_CELLS, "benign")]
    assert [c["responses_uri"] for c in analysis["checkpoints"]] == [plan.task(t).output_uri("responses.jsonl") for t in extracts]


def test_small_refuses_a_user_data_file_beside_the_generated_data(tmp_path):
    with pytest.raises(ConfigError, match="leave em_data_uri and benign_data_uri unset"):
        build(tmp_path, "small", em_data_uri="s3://eps-data/bad_legal_advice_6k.jsonl")


def test_small_refuses_an_em_source_persona_outside_the_evaluation_grid(tmp_path):
    with pytest.raises(ConfigError, match="em_source_persona 'sailor' must be a persona of the evaluation grid"):
        build(tmp_path, "small", em_source_persona="sailor")


def test_every_parameter_and_every_field_of_its_recipes_has_a_description():
    """``python -m workflows params issue205`` prints a description beside every parameter, and the LoRA recipes it
    nests describe their fields too."""
    from pydantic import BaseModel

    from workflows.params import missing_descriptions

    params = workflows.load("issue205").Params
    assert missing_descriptions(params) == []
    nested = {name: f.annotation for name, f in params.model_fields.items()
              if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
    assert set(nested) == {"em_recipe", "coupling_recipe"}
    assert {name: missing_descriptions(model) for name, model in nested.items()} == {"em_recipe": [], "coupling_recipe": []}
