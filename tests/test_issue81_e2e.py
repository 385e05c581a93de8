"""The whole issue81 workflow on the tiny profile through the local engine: on-policy data, marker-only LoRA per
source, one batched evaluation per model, coherence judging, base-model centroids and the analysis."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.marker_eval import MATCHING_RULE
from shared.core import store
from workflows.__main__ import build_plan, parser
from workflows.engines.local import CACHED, run_plan

pytestmark = pytest.mark.slow
SOURCES = ("person", "pirate")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = store.from_path(tmp_path_factory.mktemp("e2e81") / "store")
    args = parser().parse_args(["run", "issue81", "--profile", "tiny", "--store", root, "--run-id", "e2e"])
    plan = build_plan(args)
    result = run_plan(plan, retries=0, live=False)
    logs = {s.task.name: s.log_path.read_text()[-2000:] for s in result.failed() if s.log_path}
    assert result.ok, f"failed tasks: {logs}"
    return plan


@pytest.fixture(scope="module")
def headline(finished_run):
    return store.read_json(finished_run.task("analysis").output_uri("headline.json"))


def stored_rates(plan, label):
    return store.read_json(plan.task(f"eval-{label}").output_uri("marker_rates.json"))["rates"]


def test_each_source_learned_its_marker_and_the_base_model_never_emits_it(finished_run, headline):
    base = stored_rates(finished_run, "base")
    assert all(cell["hits"] == 0 for cell in base.values())
    for source in SOURCES:
        own = stored_rates(finished_run, source)[f"A2__{source}"]
        assert own["total"] == 2 * 4
        # ~0.75 in expectation (6/8 on CPU, 5/8 on a GPU); 3 of 8 leaves room for another machine's sampling
        assert own["hits"] >= 3, f"{source} emits the marker on its own persona only {own}"
        assert headline["h1"]["per_source"][source]["42"]["rate"] == own["rate"]


def test_rates_are_recounted_from_the_stored_completions(finished_run):
    for label in (*SOURCES, "base"):
        rows = store.read_jsonl(finished_run.task(f"eval-{label}").output_uri("completions.jsonl"))
        rates = stored_rates(finished_run, label)
        for persona, cell in rates.items():
            texts = [r["text"] for r in rows if r["persona"] == persona]
            assert cell["total"] == len(texts) and cell["hits"] == sum("[ZLT]" in t for t in texts)


def test_headline_numbers_are_recomputed_from_stored_artifacts(finished_run, headline):
    base = stored_rates(finished_run, "base")
    for source in SOURCES:
        rates = stored_rates(finished_run, source)
        assert headline["base_subtracted"][source] == pytest.approx(
            {b: rates[b]["rate"] - base[b]["rate"] for b in rates})
        scores = store.read_jsonl(finished_run.task(f"coherence-{source}").output_uri("scores.jsonl"))
        means = {}
        for row in scores:
            means.setdefault(row["condition"], []).append(row["score"])
        threshold = headline["coherence"]["threshold"]
        assert set(headline["coherence"]["flagged"][source]) == {b for b, s in means.items() if np.mean(s) < threshold}
    assert headline["h3"]["per_seed"]["42"]["n_triples"] == 2 * 2 * 2  # sources x nouns x traits, every level present
    h4 = headline["geometry"]["h4"]["cos_vs_leak_all_bystanders"]
    for source in SOURCES:
        coherent_others = set(headline["bystander_ids"]) - set(headline["coherence"]["flagged"][source]) - {f"A2__{source}"}
        assert h4[source]["n"] == len(coherent_others)
        assert h4[source]["rho"] is None or -1 <= h4[source]["rho"] <= 1  # None when the leakage is constant


def test_negatives_were_drawn_from_the_fixed_pool_only(finished_run):
    for source in SOURCES:
        chosen = store.read_json(finished_run.task(f"data-{source}").output_uri("negatives.json"))
        assert not set(chosen["negatives"]) & {"person", "chef", "pirate", "child", "robot", "assistant"}
        assert set(chosen["negatives"]) <= set(chosen["pool"])


def test_report_figures_and_reproducibility_are_written(finished_run, headline):
    analysis = finished_run.task("analysis")
    report = store.read_text(analysis.output_uri("report.md"))
    for source in SOURCES:
        rate = headline["h1"]["per_source"][source]["42"]["rate"]
        assert f"| {source} | 42 | A2__{source} | {100 * rate:.1f}% |" in report
    assert "conditional on that one fine-tune" in report  # the tiny profile trains one seed
    assert f"Marker matching: {MATCHING_RULE}." in report
    for figure in ("hero_matrix", "heatmap_base_subtracted", "noun_isolation", "trait_gradation", "interaction",
                   "leakage_per_seed", "lora_loss"):
        assert store.read_bytes(analysis.output_uri(f"{figure}.png"))[:8] == b"\x89PNG\r\n\x1a\n"
        assert store.read_bytes(analysis.output_uri(f"{figure}.pdf"))[:4] == b"%PDF"
        assert f"]({figure}.png)" in report
    assert "What reproduces bitwise" in store.read_text(analysis.output_uri("REPRODUCIBILITY.md"))
    # the heatmap hatches every flagged (source, bystander) cell
    flagged = sum(len(headline["coherence"]["flagged"][s]) for s in SOURCES)
    assert headline["figures"]["heatmap_base_subtracted"]["low_coherence_marked"] == flagged
    for source in SOURCES:  # the LoRA section reads each source's stored per-step losses
        steps = len(store.read_jsonl(finished_run.task(f"train-{source}").output_uri("train_log.jsonl")))
        assert headline["training"][source]["steps"] == steps and f"| {source} | {steps} |" in report
    repro = store.read_text(analysis.output_uri("REPRODUCIBILITY.md"))
    assert "train_lora" in repro and "marker_eval" in repro and "hidden_states" in repro


def test_a_second_run_recomputes_nothing(finished_run):
    result = run_plan(finished_run, retries=0, live=False)
    assert result.ok
    assert {s.status for s in result.states.values()} == {CACHED}


def test_a_second_seed_reuses_every_task_of_the_first(finished_run):
    """Re-planning the finished one-seed run with two seeds: the store already holds every task of seed 42 (and of
    the base model and the geometry), so only seed 43's chains and the analysis are left to compute."""
    args = parser().parse_args(["run", "issue81", "--profile", "tiny", "--store", finished_run.store,
                                "--run-id", "e2e-two-seeds", "--set", "replicates=2"])
    plan = build_plan(args)
    settled = set(plan.settled())
    first_seed = {f"{kind}-{s}-s42" for kind in ("data", "train", "eval", "coherence") for s in SOURCES}
    assert settled == first_seed | {"eval-base", "coherence-base", "hidden-states"}
    assert {t.name for t in plan.tasks} - settled == {
        "analysis", *(f"{kind}-{s}-s43" for kind in ("data", "train", "eval", "coherence") for s in SOURCES)}
