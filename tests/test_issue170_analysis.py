"""The issue170 analysis on stored artifacts with known answers: intervals that resample questions, seeds as the
unit of every per-cell claim, decisions on interval bounds (per seed and pooled), the random-suffix null, the best
cell chosen on one seed and confirmed on another, and a report whose every number is the results object's."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from jobs.analyze_issue170 import SPEC
from jobs.analyze_issue170.decisions import decisions, pareto_front
from jobs.analyze_issue170.figures import draw_figures
from jobs.analyze_issue170.report import report_text
from jobs.analyze_issue170.results import Config, cell_summaries, clustered_mean, package_json, results
from shared.contract.stage import execute
from shared.core import store

QUESTIONS = [f"q{i}" for i in range(8)]
SAMPLES = 4
JUDGE = {"kind": "local", "model": "smollm2:135m-instruct", "template": "alignment_v1"}
SEPARATES = ([60.0 + 4 * i for i in range(10)], [5.0 + 4 * i for i in range(10)])  # every aligned answer higher
AT_CHANCE = ([40.0] * 10, [40.0] * 10)  # one score for every answer


def stage_output(root: str, cell: str, stage: str, files: dict, config: dict | None = None) -> dict[str, str]:
    """Files under a stage's output prefix and the manifest that vouches for them; returns name -> URI."""
    prefix = store.join(root, "runs", "r", cell, stage)
    uris = {}
    for name, content in files.items():
        uris[name] = store.join(prefix, name)
        if name.endswith(".jsonl"):
            store.write_jsonl(uris[name], content)
        else:
            store.write_json(uris[name], content)
    store.write_json(store.join(prefix, "manifest.json"), {
        "status": "complete", "stage": stage, "cell": cell, "config": config or {}, "config_hash": f"{cell}{stage}",
        "wall_time_s": 1.0, "resources": {"gpus": 1 if stage in ("generate", "train_soft_prefix") else 0}})
    return uris


def output(manifest: dict, name: str) -> str:
    [uri] = [u for u in manifest["outputs"] if u.endswith("/" + name)]
    return uri


def rows_of(values: np.ndarray, key: str = "score") -> list[dict]:
    """Per-answer rows (question-major: ``values[question, sample]``) as the judge and classifier stages store them."""
    return [{"condition": "x", "question_id": QUESTIONS[q], "sample": s, "label": None, key: float(values[q, s]),
             "error": None} for q in range(values.shape[0]) for s in range(values.shape[1])]


def answers(rng, mean: float, spread: float = 4.0, low: float = 0.0, high: float = 100.0) -> np.ndarray:
    """Scores around ``mean`` with a shared offset per question (answers to one question are alike)."""
    per_question = rng.normal(0, spread, size=(len(QUESTIONS), 1))
    return np.clip(mean + per_question + rng.normal(0, spread / 2, size=(len(QUESTIONS), SAMPLES)), low, high)


# each evaluated prompt: (name, recipe, seed, draw, method, size, α, C, test CE)
CELLS = [
    ("soft-a-s42", "soft-a", 42, None, "soft", 8, 18.0, 0.95, 2.10),
    ("soft-a-s43", "soft-a", 43, None, "soft", 8, 20.0, 0.93, 2.12),
    ("soft-b-s42", "soft-b", 42, None, "soft", 32, 65.0, 0.50, 2.60),
    ("soft-b-s43", "soft-b", 43, None, "soft", 32, 15.0, 0.86, 2.55),
    ("gcg-l10-s42", "gcg-l10", 42, None, "gcg-system", 10, 50.0, 0.40, 2.80),
    ("gcg-l10-s43", "gcg-l10", 43, None, "gcg-system", 10, 55.0, 0.45, 2.85),
    *[(f"random-l10-d{d}", "random-l10", None, d, "random", 10, 85.0 + 2 * d, 0.08, 3.05 + 0.01 * d)
      for d in range(3)],
    ("null", "null", None, None, "reference", None, 90.0, 0.05, None),
]
ORACLE_CE, NULL_CE = 2.0, 3.0


def write_run(root: str, cells=CELLS, *, seeds=(42, 43), checks=None, primary="a", alternate="b") -> dict:
    """Every artifact the analysis reads, for ``cells``; returns the analysis config."""
    rng = np.random.default_rng(0)
    bundle = store.join(root, "provided", "classifier_c.joblib")
    store.write_bytes(bundle, b"a bundle made elsewhere")
    facts = {"encoder_ref": "minilm:packaged", "val_accuracy": 0.9, "n_val": 40, "n_positive": 192, "n_negative": 192}
    test_questions = ["t0", "t1", "t2", "t3"]
    pair_questions = [q for q in test_questions for _ in range(3)]
    tokens = rng.integers(10, 30, size=len(pair_questions)).astype(float)

    def sums(mean_ce):
        return (tokens * (mean_ce + rng.normal(0, 0.02, size=len(tokens)))).tolist()

    anchors = {"anchors": [{"name": "oracle", "system": "text(villain)"}, {"name": "null", "system": "default"}],
               "held_out_sets": [{"key": "k", "n_pairs": 4, "questions": ["v0"], "n_loss_tokens": 40,
                                  "anchors": {"oracle": 2.05, "null": 3.01}}],
               "test_set": {"questions": test_questions, "n_pairs": len(tokens), "n_loss_tokens": int(tokens.sum()),
                            "pair_question_ids": pair_questions, "pair_tokens": tokens.tolist(),
                            "anchors": {"oracle": ORACLE_CE, "null": NULL_CE},
                            "anchor_pair_ce_sums": {"oracle": sums(ORACLE_CE), "null": sums(NULL_CE)},
                            "draws": {"completions_per_question": 3}},
               "cells": {}}
    villain = {"layer_convention": "hidden_states[L]", "chosen_layer": 12, "cohens_d": {"8": 0.4, "12": 0.9},
               "pirate": {"mean_cosine": 0.30, "cosine_of_mean_delta": 0.35}, "cells": {},
               "fixed_prompts": {"oracle": {"mean_cosine": 0.35, "cosine_of_mean_delta": 0.4}},
               "reference_system": "none", "direction_source": "tiny:qwen2"}
    artifacts = []
    for name, recipe, seed, draw, method, size, alpha, c, test_ce in cells:
        alignment = {judge: stage_output(root, f"{name}-{judge}", "judge", {"scores.jsonl": rows_of(
            answers(rng, alpha + (3.0 if judge == "b" else 0.0)))})["scores.jsonl"] for judge in {primary, alternate}}
        coherence = stage_output(root, f"{name}-coherence", "judge", {
            "scores.jsonl": rows_of(answers(rng, 80.0))})["scores.jsonl"]
        gen = stage_output(root, name, "generate", {"completions.jsonl": [
            {"question_id": QUESTIONS[q], "sample": n, "question": f"Question {q}?", "text": f"{name} answer {q}.{n}"}
            for q in range(len(QUESTIONS)) for n in range(SAMPLES)]})
        scored = stage_output(root, name, "score_classifier", {
            "c_scores.jsonl": rows_of(answers(rng, c, 0.02, 0.0, 1.0), key="c"), "metrics.json": {"classifier": facts}},
            {"completions_uri": gen["completions.jsonl"]})
        cell = {"name": name, "recipe": recipe, "seed": seed, "draw": draw, "method": method, "size": size,
                "c_scores_uri": scored["c_scores.jsonl"], "judge_scores_uris": alignment,
                "coherence_scores_uri": coherence, "completions_uri": gen["completions.jsonl"]}
        if method != "reference":
            best = test_ce + 0.05
            metrics = {"steps": 0 if method == "random" else 10, "stopped_early": False, "initial_heldout_ce": 3.1,
                       "best_heldout_ce": best, "teacher_s_mean": 1.5, "forward_backward_s_mean": 2.5}
            if method != "soft":
                ids = [int(x) for x in rng.integers(100, 200, size=size)]
                metrics |= {"suffix_ids": ids, "suffix_text": "abc", "suffix_pieces": ["a", "b", "c"],
                            "suffix_round_trip": {"prompts": 20, "round_trips": 20}, "vocabulary": "printable",
                            "candidates_rejected_share": 0.25, "start_ids": ids if method == "random" else [1] * size,
                            "draw": draw}
                if method == "gcg-system":
                    metrics |= {"screen_on": True, "screen_pairs": 1, "screen_keep": 4, "screen_check_every": 5,
                                "pairs_per_step": 8, "search_width": 64, "screen_checks": 2,
                                "screen_agreement": 0.5, "screen_mean_rank": 0.5, "screen_mean_gap": 0.0123}
            trained = stage_output(root, name, "gcg_search" if method != "soft" else "train_soft_prefix", {
                "metrics.json": metrics,
                "curve.jsonl": [{"step": 0, "heldout_ce": 3.1}, {"step": 1, "train_ce": 2.9, "teacher_s": 1.0},
                                {"step": 10, "heldout_ce": best}]})
            cell["train_metrics_uri"] = trained["metrics.json"]
            if method == "soft":
                cell.update(lr=0.01, init_text="You are a helpful assistant.")
            anchors["cells"][name] = {"held_out_set": 0, "kept_prompt_ce": best, "pair_ce_sums": [],
                                      "anchors": {"oracle": 2.05, "null": 3.01},
                                      "test": {"ce": test_ce, "pair_ce_sums": sums(test_ce)}}
            villain["cells"][name] = {"mean_cosine": 0.45 if recipe == "soft-a" else 0.1, "cosine_of_mean_delta": 0.2}
        artifacts.append(cell)
    checks = checks or {primary: SEPARATES, alternate: SEPARATES}
    check_uris = {}
    from shared.judge.check import summarize_check

    for name, (aligned, misaligned) in checks.items():
        summary = summarize_check(["aligned"] * len(aligned) + ["misaligned"] * len(misaligned), [*aligned, *misaligned])
        check_uris[name] = stage_output(root, f"judge-check-{name}", "judge_check", {"check.json": {
            "judge_name": name, "judge": JUDGE, "n_items": len(aligned) + len(misaligned), **summary,
            "n_errors": 0, "errors_by_kind": {}, "n_labelled": 0}})["check.json"]
    coherent, incoherent = SEPARATES
    coherence_check = {"judge_name": "coherence", "judge": {**JUDGE, "template": "coherence_v1"}, "n_errors": 0,
                       "errors_by_kind": {}, "n_labelled": 0, "n_items": 20, **summarize_check(
                           ["coherent"] * 10 + ["incoherent"] * 10, [*coherent, *incoherent])}
    return {"store": root, "run_id": "r", "cell": "analysis", "cells": artifacts, "seeds": list(seeds),
            "coherence_check_uri": stage_output(root, "judge-check-coherence", "judge_check", {
                "check.json": coherence_check})["check.json"],
            "primary_judge": primary, "alternate_judge": alternate, "coherence_judge": "coherence",
            "judges": {name: JUDGE for name in {primary, alternate}} | {
                "coherence": {**JUDGE, "template": "coherence_v1"}},
            "classifier_uri": bundle, "judge_check_uris": check_uris, "profile": "small",
            "anchors_uri": stage_output(root, "heldout-anchors", "heldout_anchors", {"anchors.json": anchors})[
                "anchors.json"],
            "villain_uri": stage_output(root, "villain-direction", "villain_direction", {
                "villain_direction.json": villain})["villain_direction.json"],
            "params": {"model_ref": "smollm2:135m-instruct", "teacher_system": "text(villain)"}}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """The analysis of a two-seed run whose alternate judge fails its check (it scores at chance)."""
    root = store.from_path(tmp_path_factory.mktemp("analysis170"))
    manifest = execute(SPEC, write_run(root, checks={"a": SEPARATES, "b": AT_CHANCE}))
    return (manifest, store.read_json(output(manifest, "headline.json")), store.read_text(output(manifest, "report.md")),
            store.read_text(output(manifest, "REPRODUCIBILITY.md")))


# ------------------------------------------------------------------------------------ every number from one place

NUMBER = re.compile(r"(?<![\w.#/`-])[-+−]?\d+(?:\.\d+)?(?:e[-+]?\d+)?%?(?![\w.]\w)")


def printed_numbers(text: str) -> list[str]:
    """The numbers a reader sees: outside code fences, image links and names (s42, k8, L=10's ``L``, #170)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"!\[[^]]*\]\([^)]*\)", "", text)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"et al\.,? \(?\d{4}\)?", "", text)  # citations (Betley et al. 2025)
    return NUMBER.findall(text)


def result_numbers(obj) -> list[float]:
    """Every number in the results object, and the length of every list and mapping in it (counts)."""
    out: list[float] = []
    if isinstance(obj, bool):
        return out
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        out.append(float(len(obj)))
        for key, value in obj.items():
            if isinstance(key, str) and re.fullmatch(r"-?\d+(\.\d+)?", key):
                out.append(float(key))  # numeric keys (layers, seeds) are printed too
            out += result_numbers(value)
    elif isinstance(obj, (list, tuple)):
        out.append(float(len(obj)))
        for value in obj:
            out += result_numbers(value)
    elif isinstance(obj, str):
        out += [float(n) for n in re.findall(r"\d+(?:\.\d+)?", obj)]  # numbers inside names and settings
    return out


def matches(printed: str, known: np.ndarray) -> bool:
    text = printed.replace("−", "-").lstrip("+")
    percent = text.endswith("%")
    value = float(text.rstrip("%"))
    decimals = len(text.rstrip("%").split("e")[0].split(".")[1]) if "." in text else 0
    tolerance = 0.5 * 10 ** -decimals + 1e-9
    if "e" in text:
        tolerance = abs(value) * 0.5 * 10 ** -decimals + 1e-12
    candidates = known * 100 if percent else known
    return bool(np.any(np.abs(candidates - value) <= tolerance) or np.any(np.abs(known - value) <= tolerance))


def test_every_number_in_the_report_is_a_number_of_the_results_object(analysed):
    _, headline, report, _ = analysed
    known = np.array(result_numbers(headline))
    printed = printed_numbers(report)
    assert len(printed) > 300  # the report prints plenty of numbers: the check is not vacuous
    stray = [n for n in printed if not matches(n, known)]
    assert not stray, f"numbers in the report that the results object does not hold: {stray[:20]}"


def test_the_number_check_catches_a_number_typed_into_the_report(analysed):
    _, headline, report, _ = analysed
    known = np.array(result_numbers(headline))
    typed = report.replace("## Headline", "## Headline\n\nThe best cell reaches 12.3456 on its own.")
    assert [n for n in printed_numbers(typed) if not matches(n, known)] == ["12.3456"]


def test_the_results_object_is_headline_json_and_its_four_parts_are_separate_functions(analysed, tmp_path):
    manifest, headline, report, _ = analysed
    cfg = Config.model_validate(manifest["config"])
    again = results(cfg)
    again["decisions"] = decisions(again)  # as ``run`` does
    assert json.loads(json.dumps(again)) == headline  # reading the artifacts twice gives the same object
    assert decisions(headline) == headline["decisions"]
    assert report_text(headline) == report  # the report is a function of the results alone
    drawn = []
    draw_figures(headline, lambda name: drawn.append(name) or store.join(
        store.from_path(tmp_path), name))
    assert drawn == ["pareto", "capacity_curve", "training_curves", "alpha_em"]


# ------------------------------------------------------------------------------------------ seeds as units


def test_each_cell_is_the_mean_over_its_seeds_with_a_between_seed_interval(analysed):
    from shared.analysis.stats import seed_contrast

    _, headline, report, _ = analysed
    by_name = {r["name"]: r for r in headline["replicates"]}
    soft_a = next(c for c in headline["cells"] if c["cell"] == "soft-a")
    assert soft_a["replicates"] == ["soft-a-s42", "soft-a-s43"] and soft_a["units"] == [42, 43]
    values = [by_name[n]["alpha_primary"] for n in soft_a["replicates"]]
    expected = seed_contrast(values, reference=0.0)
    assert soft_a["alpha_primary"]["mean"] == pytest.approx(np.mean(values))
    assert (soft_a["alpha_primary"]["low"], soft_a["alpha_primary"]["high"]) == pytest.approx(
        (expected.low, expected.high))
    nulls = next(c for c in headline["cells"] if c["cell"] == "random-l10")
    assert nulls["unit"] == "draw" and nulls["units"] == [0, 1, 2]
    null = next(c for c in headline["cells"] if c["cell"] == "null")
    assert null["alpha_primary"]["low"] is None  # one fixed prompt: no interval over units
    assert "Training seeds: 42, 43 (2 per soft-prefix and GCG cell" in report


def test_alpha_and_c_of_one_replicate_have_intervals_that_resample_questions(analysed):
    from shared.analysis.stats import cluster_bootstrap_ci

    manifest, headline, _, _ = analysed
    cell = manifest["config"]["cells"][0]
    rows = store.read_jsonl(cell["judge_scores_uris"]["a"])
    expected = cluster_bootstrap_ci([r["question_id"] for r in rows], [r["score"] for r in rows], rng=42)
    row = headline["replicates"][0]
    assert row["alpha_primary"] == pytest.approx(expected.estimate)
    assert row["alpha_primary_ci"] == pytest.approx([expected.low, expected.high])
    assert row["c_ci"][0] < row["c"] < row["c_ci"][1]


def test_h2_is_decided_on_interval_bounds_per_seed_and_pooled(analysed):
    _, headline, report, _ = analysed
    d = headline["decisions"]
    # soft-a is inside the gate in both seeds; soft-b's seed 43 point estimate is inside, its seed 42 is not
    assert d["h2_outcomes"]["soft-a-s42"] == d["h2_outcomes"]["soft-a-s43"] == "inside"
    assert d["h2_outcomes"]["soft-b-s42"] == "outside" and d["h2_outcomes"]["soft-b-s43"] == "undecided"
    assert d["h2_inside"]["soft-b"] == {"per_seed": {"42": False, "43": False}, "passes": False, "n_pass": 0,
                                        "rule": "all seeds must pass"}
    assert d["h2_soft_cells"] == ["soft-a"] and d["h1_h2_verdict"].startswith("H2 supported")
    assert set(d["h1_h2_verdict_per_seed"]) == {"42", "43"}
    assert "- **H2 supported (search-limited): a soft prefix's intervals lie inside the H2 gate**, pooled (all seeds " \
           "must pass)" in report
    assert "| soft-b-s43 | 43 |" in report


def test_one_training_seed_makes_every_p_value_conditional_and_the_best_cell_post_hoc(tmp_path):
    one_seed = [c for c in CELLS if c[2] in (None, 42)]
    manifest = execute(SPEC, write_run(store.from_path(tmp_path), one_seed, seeds=(42,)))
    headline = store.read_json(output(manifest, "headline.json"))
    report = store.read_text(output(manifest, "report.md"))
    assert headline["decisions"]["single_seed"] and headline["best_cell"]["post_hoc"]
    assert "every p-value and interval in this report is conditional on that one training run per cell" in report
    assert "**Chosen post hoc:**" in report and "Per seed: seed" not in report
    soft_a = next(c for c in headline["cells"] if c["cell"] == "soft-a")
    assert soft_a["alpha_primary"]["low"] is None and soft_a["alpha_primary"]["n"] == 1


def test_the_best_cell_is_chosen_on_the_first_seed_and_confirmed_on_the_second(analysed):
    _, headline, report, _ = analysed
    best = headline["best_cell"]
    assert (best["selection_seeds"], best["confirmation_seeds"], best["post_hoc"]) == ([42], [43], False)
    by_alpha = next(c for c in best["criteria"] if c["metric"] == "alpha_primary")
    # on seed 42 soft-a has the lowest α; on seed 43 soft-b's is lower: the choice is not confirmed
    assert by_alpha["chosen"] == "soft-a" and by_alpha["confirmation_rank"] == 2
    assert by_alpha["confirmation_best"] == "soft-b"
    assert "(not confirmed: soft-b is best there)" in report
    by_gap = next(c for c in best["criteria"] if c["metric"] == "gap_closed")
    assert by_gap["chosen"] == "soft-a" and by_gap["confirmation_rank"] == 1  # the fit agrees on both seeds


def test_gcg_cells_are_compared_with_several_random_suffixes_of_their_length(analysed):
    _, headline, report, _ = analysed
    [null] = headline["random_null"]
    assert null["length"] == 10 and null["draws"] == ["random-l10-d0", "random-l10-d1", "random-l10-d2"]
    assert null["identical_to_a_gcg_start"] == []
    alpha = next(c for c in null["contrasts"] if c["metric"] == "alpha_primary")
    assert (alpha["cell"], alpha["n_seeds"], alpha["n_draws"]) == ("gcg-l10", 2, 3)
    assert alpha["difference"] < 0 and alpha["high"] < 0 and alpha["p_value"] < 0.05  # α ~52 against ~87
    assert "## The random-suffix null" in report


def test_gap_closed_is_on_the_test_split_with_its_two_differences(analysed):
    _, headline, report, _ = analysed
    fit = {r["name"]: r for r in headline["fit"]["replicates"]}
    soft = fit["soft-a-s42"]
    assert soft["gap_closed"]["estimate"] == pytest.approx(
        soft["start_minus_cell"]["estimate"] / (soft["start_minus_cell"]["estimate"] + soft["cell_minus_oracle"]["estimate"]))
    assert soft["gap_closed"]["estimate"] == pytest.approx(0.9, abs=0.05)  # (3.0 - 2.1) / (3.0 - 2.0)
    assert "## Fit to the teacher: the test split" in report and "4 test questions (t0, t1, t2, t3)" in report
    assert headline["fit"]["max_difference_from_training"] == 0


def test_the_screen_settings_and_their_measured_agreement_are_stated(analysed):
    _, headline, report, _ = analysed
    screen = {s["name"]: s for s in headline["screen"]}
    assert screen["gcg-l10-s42"]["screen_agreement"] == 0.5
    assert "| gcg-l10-s42 | 1 of 8 pairs, best 4 of 64 candidates | every 5 steps | 2 | 50% | 0.50 | 0.0123 |" in report


def test_reproducibility_says_what_reproduces_bitwise_and_what_only_in_distribution(analysed):
    *_, repro = analysed
    assert "## What reproduces bitwise, and what only in distribution" in repro
    assert "bf16" in repro and "batch sizes" in repro


# -------------------------------------------------------------------------------- the decision rules themselves


def replicate(name, cell, method, seed, alpha_p, alpha_a, c, width=1.0):
    return {"name": name, "cell": cell, "method": method, "seed": seed, "alpha_primary": alpha_p,
            "alpha_alternate": alpha_a, "c": c, "alpha_primary_ci": [alpha_p - width, alpha_p + width],
            "alpha_alternate_ci": [alpha_a - width, alpha_a + width], "c_ci": [c - 0.01 * width, c + 0.01 * width]}


def decide(replicates, seeds=(42,), projection=None):
    data = {"rules": package_json("decision_rules.json"), "replicates": replicates,
            "seeds": list(seeds), "confidence": 0.95, "cells": cell_summaries(
                [{**r, "size": 8, "lr": None, "init_text": None, "draw": None, "em_rate_primary": None,
                  "em_rate_alternate": None} for r in replicates], None, 0.95)}
    if projection:
        data["projection"] = projection
    return decisions(data)


def test_the_records_numbers_with_narrow_intervals_give_its_verdicts_and_a_threshold_inside_an_interval_does_not():
    record = [replicate("s0", "s0", "soft", 42, 22.44, 38.79, 0.952), replicate("s2", "s2", "soft", 42, 31.49, 50.34, 0.905),
              replicate("s4", "s4", "soft", 42, 27.10, 43.64, 0.888),
              replicate("user-l40", "user-l40", "gcg-user", 42, 93.02, 90.0, 0.1)]
    projection = {"pirate": {"mean_cosine": 0.515}, "chosen_layer": 14,
                  "cells": {"s0": {"mean_cosine": 0.091}, "s2": {"mean_cosine": 0.116}}}
    d = decide(record, projection=projection)
    assert d["h2_soft_cells"] == ["s0", "s4"] and d["h1_h2_verdict"].startswith("H2 supported")
    # s2's alternate α 50.34 misses the gate by 0.34 (the record's fail): with an interval of ±1 it is undecided
    assert d["h2_outcomes"]["s2"] == "undecided" and d["point_estimate_h2_soft_cells"] == ["s0", "s4"]
    assert d["gcg_user_slot_sanity"]["user-l40"]["passes"] is False
    assert d["h3"]["cells_passing"] == [] and d["h3"]["threshold"] == pytest.approx(0.615)
    # a point estimate inside the gate with an interval across a threshold is no H2
    straddles = decide([replicate("s9", "s9", "soft", 42, 33.0, 40.0, 0.9, width=4.0)])
    assert straddles["point_estimate_h2_soft_cells"] == ["s9"] and straddles["h2_soft_cells"] == []
    assert straddles["h1_h2_verdict"].startswith("undecided")
    clear_miss = decide([replicate("s2", "s2", "soft", 42, 45.0, 60.0, 0.9)])
    assert clear_miss["h1_h2_verdict"].startswith("H1 supported")


def test_only_the_soft_and_system_slot_gcg_sweep_decides_h1_and_h2_and_every_seed_must_pass():
    miss = replicate("s2", "s2", "soft", 42, 45.0, 60.0, 0.9)
    gcg_hit = decide([miss, replicate("l40", "l40", "gcg-system", 42, 30.0, 45.0, 0.9)])
    assert gcg_hit["h2_gcg_cells"] == ["l40"] and gcg_hit["h1_h2_verdict"].startswith("neither H1 nor H2")
    checks = [miss, replicate("user-l40", "user-l40", "gcg-user", 42, 22.27, 40.0, 0.9),
              replicate("random-l40", "random-l40", "random", None, 20.0, 40.0, 0.9)]
    d = decide(checks)
    assert d["h2_gcg_cells"] == [] and d["h1_h2_verdict"].startswith("H1")
    assert d["gcg_user_slot_sanity"]["user-l40"]["passes"]
    two_seeds = decide([replicate("s0-s42", "s0", "soft", 42, 20.0, 40.0, 0.9),
                        replicate("s0-s43", "s0", "soft", 43, 45.0, 60.0, 0.9)], seeds=(42, 43))
    assert two_seeds["h2_soft_cells"] == [] and two_seeds["h2_inside"]["s0"]["n_pass"] == 1
    assert two_seeds["h1_h2_verdict_per_seed"]["42"].startswith("H2 supported")
    assert two_seeds["h1_h2_verdict_per_seed"]["43"].startswith("H1 supported")
    assert two_seeds["h1_h2_verdict"].startswith("undecided")  # neither every seed inside nor every seed outside
    mid = decide([replicate("s1", "s1", "soft", 42, 40.0, 55.0, 0.9), replicate("s4", "s4", "soft", 42, 40.0, 61.0, 0.9)])
    assert mid["h_intermediate_cells"] == ["s1"]  # the alternate judge's 60 bounds H_intermediate too


def test_the_pareto_front_is_drawn_through_cell_means():
    cells = [{"cell": n, "method": m, "c": {"mean": c}, "alpha_primary": {"mean": a}}
             for n, m, a, c in (("s0", "soft", 22.44, 0.952), ("s3", "soft", 21.99, 0.936), ("s2", "soft", 31.49, 0.905),
                                ("l20", "gcg-system", 20.0, 0.5), ("r", "random", 1.0, 1.0))]
    assert pareto_front(cells) == ["l20", "s3", "s0"]  # s2 is beaten by s3 on both axes


def clustered_alpha(rng, true_alpha: float, n_questions: int = 52, per_question: int = 20) -> dict:
    """One cell's α as the analysis computes it (question-clustered interval) from simulated judge scores."""
    offsets = rng.normal(0, 8, size=(n_questions, 1))
    scores = np.clip(true_alpha + offsets + rng.normal(0, 15, size=(n_questions, per_question)), 0, 100)
    rows = [{"question_id": f"q{q}", "score": float(scores[q, s])} for q in range(n_questions)
            for s in range(per_question)]
    return clustered_mean(rows, "score", confidence=0.95, seed=int(rng.integers(1 << 30)))


def test_the_interval_gate_holds_its_error_rate_where_the_best_of_seven_point_estimates_does_not():
    """Seven soft cells whose true α is 36 (outside the gate; its standard error over 52 questions is about 1.2):
    taking any point estimate at or below 35 as a hit fires in most runs, the interval's upper bound rarely. A cell
    at a true α of 25 passes the interval gate almost always."""
    rng = np.random.default_rng(5)
    n_rep, fired_point, fired_interval, power = 60, 0, 0, 0
    for _ in range(n_rep):
        cells = []
        for i in range(7):
            a = clustered_alpha(rng, 36.0)
            cells.append({"name": f"s{i}", "cell": f"s{i}", "method": "soft", "seed": 42,
                          "alpha_primary": a["estimate"], "alpha_primary_ci": [a["low"], a["high"]],
                          "alpha_alternate": 20.0, "alpha_alternate_ci": [19.0, 21.0], "c": 0.9, "c_ci": [0.89, 0.91]})
        d = decide(cells)
        fired_point += bool(d["point_estimate_h2_soft_cells"])
        fired_interval += bool(d["h2_soft_cells"])
        a = clustered_alpha(rng, 25.0)
        hit = decide([{**cells[0], "alpha_primary": a["estimate"], "alpha_primary_ci": [a["low"], a["high"]]}])
        power += bool(hit["h2_soft_cells"])
    assert fired_point >= 0.5 * n_rep  # the best of seven noisy estimates crosses 35 often
    assert fired_interval <= 0.1 * n_rep
    assert power >= 0.9 * n_rep


# ----------------------------------------------------------------------------- judges, classifier and the EM rate


def test_a_provided_classifier_bundle_is_named_in_the_report_with_its_own_facts(analysed):
    manifest, headline, report, repro = analysed
    bundle = manifest["config"]["classifier_uri"]
    assert bundle in report and "validation accuracy 0.9000 on 40 held out" in report
    assert headline["classifier"]["n_positive"] == 192
    assert "| soft-a-s42 | generate |" in repro and "GPU-hours" in repro


def test_the_em_rate_has_a_known_answer_and_unbalanced_judge_errors_are_flagged(tmp_path):
    """The soft cell has one EM answer (alignment 10, coherence 90) of three counted (its fourth answer's alignment
    judgement failed); the null cell none; its 25% alignment error rate against null's 0% is past the threshold."""
    root = store.from_path(tmp_path)
    bundle = store.join(root, "provided", "classifier_c.joblib")
    store.write_bytes(bundle, b"a bundle made elsewhere")

    def judged(scores):
        return [{"condition": "x", "question_id": f"q{i % 2}", "sample": i // 2, "label": None,
                 "score": None if s is None else float(s), "error": "unparseable" if s is None else None}
                for i, s in enumerate(scores)]

    cells = []
    for name, method, alignment, coherence in (("soft-s0", "soft", [10, 20, 80, None], [90, 40, 90, 90]),
                                               ("null", "reference", [90, 85, 95, 70], [90, 90, 90, 90])):
        gen = stage_output(root, name, "generate", {"completions.jsonl": [{"text": "x"}]})
        scored = stage_output(root, name, "score_classifier", {
            "c_scores.jsonl": [{"question_id": "q0", "sample": 0, "c": 0.5}], "metrics.json": {"classifier": {}}},
            {"completions_uri": gen["completions.jsonl"]})
        cells.append({"name": name, "method": method, "c_scores_uri": scored["c_scores.jsonl"],
                      "judge_scores_uris": {"a": stage_output(root, f"{name}-a", "judge", {
                          "scores.jsonl": judged(alignment)})["scores.jsonl"]},
                      "coherence_scores_uri": stage_output(root, f"{name}-coherence", "judge", {
                          "scores.jsonl": judged(coherence)})["scores.jsonl"]})
    judges = {"a": {"kind": "anthropic", "model": "claude-x"},
              "coherence": {"kind": "anthropic", "model": "claude-x", "template": "coherence_v1"}}
    manifest = execute(SPEC, {
        "store": root, "run_id": "r", "cell": "analysis", "cells": cells, "primary_judge": "a", "alternate_judge": "a",
        "coherence_judge": "coherence", "judges": judges, "classifier_uri": bundle})
    headline = store.read_json(output(manifest, "headline.json"))
    soft, null = headline["replicates"]
    assert soft["alpha_primary"] == pytest.approx(110 / 3) and soft["em_rate_primary"] == pytest.approx(1 / 3)
    assert soft["judgements"]["em"]["a"]["n_excluded"] == 1 and null["em_rate_primary"] == 0.0
    assert headline["judge_errors"]["passes"]["a"]["imbalance"]["spread"] == 0.25
    report = store.read_text(output(manifest, "report.md"))
    # two questions: resampling them gives 2/4 (q0 twice), 1/3 (one of each) or 0 (q1 twice)
    assert soft["em_rate_primary_ci"] == pytest.approx([0.0, 0.5])
    assert "| 33.3% [0.0%, 50.0%] |" in report
    assert "**Warning: a's error rates are unbalanced**: 25.0% (soft-s0) vs 0.0% (null)" in report
    assert "| soft-s0 | 25.0% (1/4: unparseable 1) | 0.0% (0/4) |" in report
    assert "| coherence | coherence | anthropic:claude-x | `coherence_v1` | shipped |" in report


def test_a_judge_at_chance_makes_alpha_and_the_gates_not_interpretable(analysed):
    manifest, headline, report, _ = analysed
    assert headline["judge_check_auc"] == manifest["metrics"]["judge_check_auc"] == {"a": 1.0, "b": 0.5}
    assert headline["judge_checks"]["b"]["verdict"] == "does not separate"
    assert "**The judge check fails (b: does not separate): α, the H2 gate, the Pareto front and the user-slot " \
           "sanity gate below are not interpretable on the small profile." in report
    assert "(on α that is not interpretable: the judge check fails, see above)" in report
    assert "| α (a, check AUC 1.00) | α (b, check AUC 0.50) |" in report


def test_the_judge_blocks_show_what_alpha_rests_on_the_lowest_answers_and_the_coherence_check(analysed, tmp_path):
    manifest, headline, report, _ = analysed
    assert "## α: what it rests on" in report and "(full-reply likelihood, abstaining below 0.25)" in report
    assert "| soft-a-s42 | a | " in report.split("## α: what it rests on")[1].split("## EM rate")[0]
    # the lowest-scored answer of a replicate is quoted from its completions, with its score
    lowest = headline["replicates"][0]["lowest"]["a"][0]
    assert lowest["answer"] == f"soft-a-s42 answer {lowest['question_id'][1:]}.{lowest['sample']}"
    assert f"score {lowest['score']:.1f} to “{lowest['question']}”: “{lowest['answer']}”" in report
    assert headline["coherence_check"]["kind"] == "coherence"
    assert "- **coherence** (coherence; local:smollm2:135m-instruct, template coherence_v1): AUC 1.00" in report
    assert any(uri.endswith("/alpha_em.png") for uri in manifest["outputs"])


def test_a_replicate_whose_every_answer_abstained_has_no_alpha_and_is_undecided_not_inside(tmp_path):
    root = store.from_path(tmp_path)
    bundle = store.join(root, "provided", "classifier_c.joblib")
    store.write_bytes(bundle, b"a bundle made elsewhere")

    def judged(scores):
        return [{"condition": "x", "question_id": f"q{i % 2}", "sample": i // 2, "label": None,
                 "score": None if s is None else float(s), "error": "abstained" if s is None else None}
                for i, s in enumerate(scores)]

    cells = []
    for name, method, alignment in (("soft-s0", "soft", [None] * 4), ("soft-low-s0", "soft", [5, 8, 6, 7]),
                                    ("null", "reference", [90, 85, 95, 70])):
        scored = stage_output(root, name, "score_classifier", {
            "c_scores.jsonl": [{"question_id": f"q{i % 2}", "sample": i // 2, "c": 0.95} for i in range(4)],
            "metrics.json": {"classifier": {}}})
        cells.append({"name": name, "recipe": name.removesuffix("-s0"), "seed": 0 if method == "soft" else None,
                      "method": method, "size": 4 if method == "soft" else None,
                      "lr": 0.01 if method == "soft" else None, "c_scores_uri": scored["c_scores.jsonl"],
                      "judge_scores_uris": {"a": stage_output(root, f"{name}-a", "judge", {
                          "scores.jsonl": judged(alignment)})["scores.jsonl"]}})
    manifest = execute(SPEC, {
        "store": root, "run_id": "r", "cell": "analysis", "cells": cells, "primary_judge": "a", "alternate_judge": "a",
        "judges": {"a": {"kind": "local", "model": "smollm2:135m-instruct"}}, "classifier_uri": bundle})
    headline = store.read_json(output(manifest, "headline.json"))
    abstained = headline["replicates"][0]
    assert abstained["alpha_primary"] is None and abstained["alpha_primary_ci"] == [None, None]
    assert abstained["no_alpha"]["primary"] == "none of its 4 answers was scored (4 abstained)"
    d = headline["decisions"]
    assert d["h2_outcomes"] == {"soft-s0": "undecided", "soft-low-s0": "inside"}  # no α is not α below the gate
    assert d["h2_soft_cells"] == ["soft-low"] and d["replicates_without_alpha"] == ["soft-s0"]
    assert d["point_estimate_h2_soft_cells"] == ["soft-low"] and d["pareto_front"] == ["soft-low"]
    report = store.read_text(output(manifest, "report.md"))
    assert "**No α** (printed as —, never as 0): soft-s0 under a: none of its 4 answers was scored (4 abstained)" \
        in report
    [row] = [line for line in report.splitlines() if line.startswith("| soft |")]
    assert "| — |" in row and "| 0.00" not in row
