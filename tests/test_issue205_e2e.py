"""The whole issue205 workflow on the tiny profile, through the local engine, as a researcher would run it; then the
same run re-planned with one more training seed, which finds every task of the first seed finished."""

from __future__ import annotations

import numpy as np
import pytest

from shared.core import store
from workflows.__main__ import build_plan, parser
from workflows.engines.local import CACHED, run_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = store.from_path(tmp_path_factory.mktemp("e2e205") / "store")
    args = parser().parse_args(["run", "issue205", "--profile", "tiny", "--store", root, "--run-id", "e2e"])
    plan = build_plan(args)
    # two task processes share the CPU: one BLAS thread each keeps them from thrashing each other
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("MKL_NUM_THREADS", "1")
        result = run_plan(plan, retries=0, live=False)
    logs = {s.task.name: s.log_path.read_text()[-2000:] for s in result.failed() if s.log_path}
    assert result.ok, f"failed tasks: {logs}"
    return plan


def analysis_output(plan, name):
    return plan.task("analysis").output_uri(name)


def test_em_cells_train_on_their_own_system_slot(finished_run):
    e0 = store.read_jsonl(finished_run.task("em-data-e0").output_uri("train.jsonl"))
    e4 = store.read_jsonl(finished_run.task("em-data-e4").output_uri("train.jsonl"))
    assert {r["system"] for r in e0} == {"default"}
    assert {r["system"] for r in e4} == {"text(You are a villainous mastermind who schemes to take over the world.)"}
    assert [r["user"] for r in e0] == [r["user"] for r in e4]  # same data, only the slot differs
    for cell in ("e0", "e4", "benign"):
        name = "train-benign" if cell == "benign" else f"train-em-{cell}"
        assert store.exists(finished_run.task(name).output_uri("adapter", "adapter_config.json"))


def test_every_headline_number_is_recomputed_from_stored_artifacts(finished_run):
    headline = store.read_json(analysis_output(finished_run, "headline.json"))
    layer = headline["headline_layer"]
    li = headline["layers"].index(layer)
    seed = headline["per_seed"]["42"]
    for ckpt, task in (("base", "extract-base"), ("E2", "extract-e2"), ("benign", "extract-benign")):
        acts = store.read_tensors(finished_run.task(task).output_uri("activations.safetensors"))["A"].numpy()
        vectors = acts[:, :, li].mean(axis=1)
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        expected = (unit @ unit.T)[np.triu_indices(len(vectors), 1)].mean()
        assert seed["geometry"]["values"][f"A/L{layer}"]["M1"][ckpt] == pytest.approx(expected, rel=1e-5)
    personas = headline["personas"]
    for row in seed["behaviour"]["conditions"]:
        rows = store.read_jsonl(finished_run.task(f"marker-eval-{row['cond'].lower()}").output_uri("completions.jsonl"))
        bystanders = [p for p in personas if p not in ("confab", row["persona"])]
        per_persona = [np.mean(["[ZLT]" in r["text"] for r in rows if r["persona"] == p]) for p in bystanders]
        assert row["mean_bystander"] == pytest.approx(np.mean(per_persona))
        eval_n = finished_run.task(f"marker-eval-{row['cond'].lower()}").config["n"]
        assert len(rows) == len(personas) * 4 * eval_n  # personas x questions x completions
        confab = [r for r in rows if r["persona"] == "confab"]
        assert row["source_rate"] == pytest.approx(np.mean(["[ZLT]" in r["text"] for r in confab]))
        # the coupling took (leakage is measured against a real marker): the source emits it far more than the
        # bystanders do. On random tiny weights the rate itself moves with every change to sampling or training
        assert row["source_rate"] >= 0.1 and row["source_rate"] > 3 * row["mean_bystander"]
        assert set(row["controls"]) == {"base", "benign"}  # leakage of the coupled base and benign models beside it
    for kind in ("raw", "shift_invariant"):  # metrics x methods x layers x conditions
        assert len(seed["geometry"]["families"][kind]["cells"]) == 3 * 2 * 2 * 5
    assert headline["decisions"]["single_seed"] and headline["seeds"] == [42]


def test_bystanders_leak_on_tiny_so_the_behaviour_row_has_content(finished_run):
    """The tiny coupling is not perfectly selective: some bystander emits the marker in some condition, the mean
    bystander leakage differs across conditions, so H3's Spearman rho is a number (not "rho constant")."""
    headline = store.read_json(analysis_output(finished_run, "headline.json"))
    personas, beh = headline["personas"], headline["per_seed"]["42"]["behaviour"]
    means = {}
    for row in beh["conditions"]:
        rows = store.read_jsonl(finished_run.task(f"marker-eval-{row['cond'].lower()}").output_uri("completions.jsonl"))
        bystanders = [p for p in personas if p not in ("confab", row["persona"])]
        means[row["cond"]] = np.mean([np.mean(["[ZLT]" in r["text"] for r in rows if r["persona"] == p]) for p in bystanders])
    assert max(means.values()) > 0, f"no bystander leaks in any condition: {means}"
    assert len(set(means.values())) > 1, f"bystander leakage is identical in every condition: {means}"
    assert isinstance(beh["H3"]["rho"], float) and np.isfinite(beh["H3"]["rho"])
    assert isinstance(beh["H3"]["p"], float) and 0 <= beh["H3"]["p"] <= 1


def test_the_em_adapters_really_change_the_extracted_activations(finished_run):
    base = store.read_tensors(finished_run.task("extract-base").output_uri("activations.safetensors"))["A"]
    e0 = store.read_tensors(finished_run.task("extract-e0").output_uri("activations.safetensors"))["A"]
    assert base.shape == e0.shape and not np.allclose(base.numpy(), e0.numpy())


def test_extraction_prompts_come_from_the_one_builder(finished_run):
    from shared.lm import chat, models

    task = finished_run.task("extract-e1")
    index = store.read_json(task.output_uri("index.json"))
    tok = models.load_tokenizer("tiny:qwen2")
    persona, question = task.config["personas"][1], task.config["questions"][0]
    expected = chat.build_prompt(tok, persona["system"], question["text"]).input_ids
    assert index["prompt_ids"][f"{persona['name']}/{question['id']}"] == expected


def test_report_figures_and_reproducibility_are_written(finished_run):
    report = store.read_text(analysis_output(finished_run, "report.md"))
    for section in ("## Headline", "## Decision rules (as pre-registered)", "## Behaviour per condition", "## Geometry family"):
        assert section in report
    for name in ("hero_issue205", "m1_bars", "leakage_heatmap"):
        assert store.read_bytes(analysis_output(finished_run, f"{name}.png"))[:8] == b"\x89PNG\r\n\x1a\n"
        assert store.read_bytes(analysis_output(finished_run, f"{name}.pdf"))[:4] == b"%PDF"
    repro = store.read_text(analysis_output(finished_run, "REPRODUCIBILITY.md"))
    assert "extract_persona_vectors" in repro and "marker_eval" in repro


def test_a_second_run_recomputes_nothing(finished_run):
    result = run_plan(finished_run, retries=0, live=False)
    assert result.ok
    assert {s.status for s in result.states.values()} == {CACHED}


def test_a_replan_with_one_more_seed_finds_every_task_of_the_finished_seed(finished_run):
    """One seed -> two, same store and run id: every task of seed 42 (now named ``...-s42``) is found finished (its
    result is reused, the chain after each merged model included), the analysis and every task of seed 43 are not;
    the data and the base extraction keep their names and are cached."""
    args = parser().parse_args(["run", "issue205", "--profile", "tiny", "--store", finished_run.store, "--run-id", "e2e",
                                "--set", "replicates=2"])
    plan = build_plan(args)
    settled = set(plan.settled())
    first = {t.name for t in plan.tasks if t.name.endswith("-s42") or t.config.get("seed") == 42 and not t.name.endswith("-s43")}
    first -= {"analysis"}
    assert first <= settled, sorted(first - settled)
    assert not {t.name for t in plan.tasks if t.name.endswith("-s43")} & settled
    assert "analysis" not in settled
    assert {"extract-base", "em-data-e0", "benign-data"} <= settled
