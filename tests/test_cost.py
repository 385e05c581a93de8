"""The cost model (shared/contract/cost.py): rates from the bench results, the formula against a hand
computation, its prediction of a bench measurement it was not fitted to, the sizes of training sets, the gate,
and the estimate beside the measured GPU time in REPRODUCIBILITY.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.registry import all_stages
from shared.contract import cost
from shared.core import store
from workflows import cost as plan_cost
from workflows.cluster import ClusterError

BENCH = Path(__file__).resolve().parent.parent / "bench" / "results"


def test_the_shipped_rates_are_the_calibration_of_the_bench_results():
    """shared/data/cost/rates.json is what `python -m workflows.cost --calibrate` makes of bench/results today."""
    assert cost.rates() == json.loads(json.dumps(cost.calibrate(BENCH)))


def test_rates_by_hand_from_the_bench_numbers():
    rates = cost.rates()
    h200, h100 = rates["classes"]["h200"], rates["classes"]["h100"]
    # gpu_h200_qwen7b_fast_paths.json: 320 rows x 256 new tokens in 5.168574832999994 s (fast sampler, fixed lengths)
    assert h200["sample_s_per_token"] == pytest.approx(5.168574832999994 / (320 * 256))
    # gpu_h200_qwen7b_student_paths.json: forward/backward of 124,300 student tokens in 7.662054327000007 s
    assert h200["train_s_per_token"] == pytest.approx(7.662054327000007 / 124300)
    # gpu_h{200,100}_qwen7b.json: candidate evaluation, 718,336 tokens in 19.297877783 s / 19.661710456 s
    assert h200["score_s_per_token"] == pytest.approx(19.297877783000004 / 718336)
    assert h100["score_s_per_token"] == pytest.approx(19.66171045600001 / 718336)
    # the H100 has the old sampler's teacher draw (39.07 s vs 31.81 s) and forward/backward (11.68 vs 11.29 s)
    assert h100["sample_s_per_token"] == pytest.approx(h200["sample_s_per_token"] * 39.073732113000005 / 31.81439762400001)
    assert h100["train_s_per_token"] == pytest.approx(h200["train_s_per_token"] * 11.683897595000019 / 11.291844034999997)
    assert h200["startup_s"] == h100["startup_s"] == pytest.approx(14.862594080999997)
    assert rates["prompt_tokens"] == pytest.approx(124300 / 320 - 256, abs=1e-3)


def ref(stage: str, config: dict, *, name: str = "t", prefix: str = "s3://b/runs/r/t/x", gpus: int = 1,
        timeout_s: int = 3600) -> cost.TaskRef:
    return cost.TaskRef(name=name, stage=stage, config=config, prefix=prefix, gpus=gpus, gpu_class="h100",
                        timeout_s=timeout_s)


def test_a_generation_task_by_hand():
    """52 questions x 20 samples x 512 tokens on each class: startup + tokens x seconds per token."""
    questions = [{"id": f"q{i}", "text": "?"} for i in range(52)]
    [e] = cost.estimate_tasks([ref("generate", {"questions": questions, "n": 20, "max_new_tokens": 512})])
    assert e.work.tokens_sampled == 52 * 20 * 512
    h200 = (14.862594080999997 + 532480 * 5.168574832999994 / 81920) / 3600
    assert e.gpu_hours["h200"] == pytest.approx(h200)  # 0.0134 GPU-hours
    h100 = (14.862594080999997 + 532480 * 5.168574832999994 / 81920 * 39.073732113000005 / 31.81439762400001) / 3600
    assert e.gpu_hours["h100"] == pytest.approx(h100)
    assert e.declared_hours == e.gpu_hours["h100"] and not e.bounded
    # two GPUs for the same work: twice the GPU-hours; a CPU task: no estimate at all
    [two] = cost.estimate_tasks([ref("generate", {"questions": questions, "n": 20, "max_new_tokens": 512}, gpus=2)])
    assert two.gpu_hours["h200"] == pytest.approx(2 * h200)
    assert cost.estimate_tasks([ref("judge", {}, gpus=0)]) == []


def gcg_config(steps: int) -> dict:
    search = {"length": 20, "steps": steps, "search_width": 512, "topk": 256, "screen_pairs": 4, "screen_keep": 32,
              "screen_check_every": 10**6, "val_every": 10**6, "questions_per_step": 16, "completions_per_question": 2,
              "max_new_tokens": 256, "val_completions_per_question": 1}
    return {"mode": "search", "search": search, "train_questions": [{"id": str(i), "text": "?"} for i in range(48)],
            "val_questions": [{"id": "v", "text": "?"}]}


def test_the_model_predicts_the_benchs_gcg_step_it_was_not_fitted_to():
    """One GCG step at the record's setting with the screen on (gpu_h200_qwen7b_fast_paths.json gcg_step_screened:
    31.32 s; none of its numbers enter the calibration): the model's step is within 15% of it."""
    calibration = cost.rates()
    klass = calibration["classes"]["h200"]
    one, two = (cost.estimate_tasks([ref("gcg_search", gcg_config(s))])[0].work for s in (1, 2))
    step = cost.Workload(two.tokens_sampled - one.tokens_sampled, two.tokens_trained - one.tokens_trained,
                         two.tokens_scored - one.tokens_scored)
    assert cost.gcg_candidates_per_step(gcg_config(1)["search"], 32) == 512 * 4 + 32 * 28
    predicted = cost.gpu_seconds(step, klass) - klass["startup_s"]
    measured = json.loads((BENCH / "gpu_h200_qwen7b_fast_paths.json").read_text())["gcg_step_screened"]["step_s"]
    assert measured == pytest.approx(31.3, abs=0.1)
    assert predicted == pytest.approx(measured, rel=0.15)


def test_the_soft_prefix_step_at_the_benchs_setting():
    """The record's step (K=64, 16 x 20, 256 tokens): the current student path measured 12.68 s; the model, whose
    training rate comes from that path, gives the sampled and trained parts of it."""
    klass = cost.rates()["classes"]["h200"]
    config = {"train_questions": [{"id": str(i), "text": "?"} for i in range(48)],
              "val_questions": [{"id": "v", "text": "?"}],
              "training": {"steps": 1, "questions_per_step": 16, "completions_per_question": 20, "max_new_tokens": 256,
                           "val_completions_per_question": 1, "val_every": 10**6}}
    work = cost.estimate_tasks([ref("train_soft_prefix", config)])[0].work
    assert work.tokens_trained == pytest.approx(320 * (cost.rates()["prompt_tokens"] + 256))
    step = (320 * 256 * klass["sample_s_per_token"] + work.tokens_trained * klass["train_s_per_token"])
    assert step == pytest.approx(12.68, rel=0.05)


def tiny_plan(workflow: str):
    import workflows

    module = workflows.load(workflow)
    return module.build(module.Params.for_profile("tiny"), profile="tiny", run_id="r", store="s3://b/p")


def test_every_gpu_stage_has_a_cost_model_that_reads_its_real_configs():
    gpu_stages = {name for name, spec in all_stages().items() if spec.resources.uses_gpu}
    assert gpu_stages <= set(cost.WORKLOADS), f"GPU stages without a cost model: {sorted(gpu_stages - set(cost.WORKLOADS))}"
    seen = set()
    for workflow in ("issue164", "issue170", "issue81", "issue205"):
        for e in plan_cost.estimate(tiny_plan(workflow)):
            seen.add(e.task.stage)
            assert not e.bounded, f"{workflow} {e.task.name}: {e.work.unknown}"
            assert e.work.tokens_sampled + e.work.tokens_trained + e.work.tokens_scored > 0, e.task.name
    assert seen == gpu_stages  # the four tiny plans run every GPU stage


def test_a_training_set_another_task_writes_is_sized_from_its_config():
    plan = tiny_plan("issue81")
    estimates = {e.task.name: e for e in plan_cost.estimate(plan)}
    train = next(t for t in plan.tasks if t.stage == "train_lora")
    data = plan.task(train.after[0]).parsed_config()
    rows = (1 + data.n_negative_personas) * len(data.questions) * data.n_per_question
    recipe = train.parsed_config().recipe
    row = cost.rates()["prompt_tokens"] + data.max_new_tokens
    expected = (recipe.max_steps * recipe.effective_batch_size if recipe.max_steps else recipe.epochs * rows) * row
    assert estimates[train.name].work.tokens_trained == pytest.approx(expected)


def test_a_training_file_in_the_store_is_sized_by_its_rows_and_characters(tmp_path):
    recipe = {"epochs": 2, "max_steps": None, "per_device_batch_size": 4, "grad_accum": 4, "max_seq_len": 2048}
    rows = [json.dumps({"messages": [{"role": "user", "content": "q" * i}, {"role": "assistant", "content": "a" * 40}]})
            for i in range(30)]
    data = tmp_path / "em.jsonl"
    data.write_text("\n".join(rows) + "\n")
    [e] = cost.estimate_tasks([ref("train_lora", {"data_uri": store.from_path(data), "recipe": recipe})])
    chars = sum(len(r) for r in rows)
    assert e.work.tokens_trained == pytest.approx(2 * 30 * (chars / 30 / 4))  # epochs x rows x tokens per row


def test_a_training_set_whose_size_is_not_read_is_costed_at_the_deadline():
    recipe = {"epochs": 1, "max_steps": None, "per_device_batch_size": 4, "grad_accum": 4, "max_seq_len": 2048}
    tasks = [ref("train_lora", {"data_uri": "s3://b/data/em.jsonl", "recipe": recipe}, timeout_s=6 * 3600)]
    [e] = cost.estimate_tasks(tasks)  # an S3 file is read only by a caller that reaches the store (submit, reports)
    assert e.bounded and "was not read" in e.work.unknown
    assert e.gpu_hours == {"h100": 6.0, "h200": 6.0}
    assert "<= 6.00" in cost.table([e]) and "at its deadline (6 h x 1 GPU)" in cost.bounded_reasons([e])[0]
    # the same set through sft_data with a limit, from a generation in the plan: sized
    gen = ref("generate", {"questions": [{"id": "q", "text": "?"}] * 10, "n": 100, "max_new_tokens": 200},
              name="gen", prefix="s3://b/runs/r/gen/generate")
    sft = ref("sft_data", {"data_uri": "s3://b/runs/r/gen/generate/completions.jsonl", "limit": 600}, gpus=0,
              name="sft", prefix="s3://b/runs/r/sft/sft_data")
    train = ref("train_lora", {"data_uri": "s3://b/runs/r/sft/sft_data/train.jsonl", "recipe": recipe}, name="train")
    by_name = {e.task.name: e for e in cost.estimate_tasks([gen, sft, train])}
    assert by_name["train"].work.tokens_trained == pytest.approx(600 * (cost.rates()["prompt_tokens"] + 200))


def test_the_gate_stops_above_its_threshold_unless_approved():
    recipe = {"epochs": 1, "max_steps": None, "per_device_batch_size": 4, "grad_accum": 4, "max_seq_len": 2048}
    estimates = cost.estimate_tasks([ref("train_lora", {"data_uri": "s3://b/x.jsonl", "recipe": recipe}, timeout_s=30 * 3600)])
    with pytest.raises(ClusterError, match="estimated 30.0 GPU-hours is above the 20 GPU-hour gate: nothing was sent"):
        plan_cost.gate(estimates, max_gpu_hours=20, approve=False)
    plan_cost.gate(estimates, max_gpu_hours=20, approve=True)
    plan_cost.gate(estimates, max_gpu_hours=31, approve=False)


def test_the_full_profiles_estimates(capsys):
    """issue81 full needs no files: its estimate is printed per stage, and every GPU task is sized."""
    import workflows

    module = workflows.load("issue81")
    plan = module.build(module.Params.for_profile("full"), profile="full", run_id="r", store="s3://b/p")
    estimates = plan_cost.estimate(plan)
    assert estimates and not any(e.bounded for e in estimates)
    text = plan_cost.report(plan, estimates)
    total = cost.totals(estimates)["declared"]
    assert text.splitlines()[-1].startswith(f"total on the stages' GPU classes: {total:.2f} GPU-hours")
    assert sum(r["tasks"] for r in cost.by_stage(estimates)) == len(estimates)


# ---------------------------------------------------------------------------------------------------------------
# REPRODUCIBILITY.md: the estimate beside the measurement


def committed(root: str, cell: str, stage: str, config: dict, outputs: dict[str, str], *, wall_s: float,
              gpus: int, on_gpu: bool, inputs: dict | None = None) -> dict:
    prefix = store.join(root, "runs", "r", cell, stage)
    uris = {}
    for name, text in outputs.items():
        store.write_text(store.join(prefix, name), text)
        uris[store.join(prefix, name)] = store.sha256(store.join(prefix, name))
    manifest = {"status": "complete", "stage": stage, "run_id": "r", "cell": cell, "prefix": prefix,
                "config": config, "config_hash": "c" * 64, "inputs": inputs or {}, "outputs": uris,
                "git_commit": "abc", "image": "local", "seed": 42, "wall_time_s": wall_s,
                "hardware": {"cpus": 2, **({"gpus": ["NVIDIA H100 80GB HBM3"]} if on_gpu else {})},
                "resources": {"gpu_class": "h100" if gpus else "none", "gpus": gpus, "timeout_s": 4 * 3600}}
    store.write_json(store.join(prefix, "manifest.json"), manifest)
    return manifest


def test_reproducibility_puts_the_estimate_beside_the_measured_gpu_time(tmp_path):
    """A judge task (CPU) reads two generations, one of which ran on a GPU for an hour and one on a CPU: the report,
    given only the judge's manifest, finds both through its inputs; it estimates each from its config and counts
    only the GPU-run one as measured GPU time."""
    from shared.analysis.reporting import reproducibility

    root = store.from_path(tmp_path)
    questions = [{"id": f"q{i}", "text": "?"} for i in range(52)]
    config = {"questions": questions, "n": 20, "max_new_tokens": 512}
    gpu_gen = committed(root, "a", "generate", config, {"completions.jsonl": "{}\n"}, wall_s=3600, gpus=1, on_gpu=True)
    cpu_gen = committed(root, "b", "generate", config, {"completions.jsonl": "{}\n"}, wall_s=900, gpus=1, on_gpu=False)
    inputs = {uri: digest for m in (gpu_gen, cpu_gen) for uri, digest in m["outputs"].items()}
    judge = committed(root, "a-judge", "judge", {}, {"scores.jsonl": "{}\n"}, wall_s=60, gpus=0, on_gpu=False,
                      inputs=inputs)
    text = reproducibility("#test", {}, [judge])
    one = (14.862594080999997 + 532480 * 5.168574832999994 / 81920 * 39.073732113000005 / 31.81439762400001) / 3600
    assert (f"- GPU time: estimated {2 * one:.3f} GPU-hours on the stages' GPU classes (h100: {2 * one:.3f}"
            in text)
    assert "measured 1.000 GPU-hours on GPUs (1 of 2 GPU-stage tasks ran on a GPU)" in text
    assert f"| generate | h100 | 2 | {2 * one:.3f} | 1.000 | 1 | 0.250 |" in text
