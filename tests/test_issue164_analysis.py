"""issue164's analysis helpers on inputs with a known answer: the question bootstrap and the record's decision rules
(the classifier's question-clustered interval: tests/test_classifier.py; the judge-check lines are shared with
issue170: tests/test_judge_check.py)."""

from __future__ import annotations

import numpy as np

from jobs.analyze_issue164.decisions import decisions
from jobs.analyze_issue164.results import question_bootstrap_ci


def test_question_bootstrap_keeps_the_plain_mean_and_collapses_when_questions_agree():
    ids = ["a", "a", "b", "b", "b", "c"]
    values = [1.0, 3.0, 2.0, 2.0, 2.0, 2.0]
    low, high = question_bootstrap_ci(ids, values, seed=0)
    assert low <= np.mean(values) <= high
    assert question_bootstrap_ci(["a", "b", "c"], [5.0, 5.0, 5.0], seed=0) == [5.0, 5.0]


def test_question_bootstrap_covers_the_true_mean_of_clustered_data_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    ids = [f"q{q}" for q in range(30) for _ in range(4)]
    covered = 0
    for seed in range(200):
        # each question shifts all of its answers: the clustering a per-answer bootstrap would ignore
        values = np.repeat(rng.normal(0, 1, 30), 4) + rng.normal(0, 1, 120)
        low, high = question_bootstrap_ci(ids, list(values), seed=seed, n_boot=1000)
        covered += low <= 0.0 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_the_records_rules_read_the_results_object_and_a_condition_without_alpha_gets_no_verdict():
    rows = [{"condition": "a", "role": "condition", "alpha_primary": 45.0, "gap": -16.0},
            {"condition": "b", "role": "condition", "alpha_primary": 12.0, "gap": 3.0},
            {"condition": "abstained", "role": "condition", "alpha_primary": None, "gap": None},
            {"condition": "em", "role": "em_reference", "alpha_primary": 20.0, "gap": 0.0}]
    rules = {"em_target_alpha": 28.21, "h2_falsification_alpha": 15, "judge_gap_gate": 10}
    d = decisions({"conditions": rows, "record_rules": rules})
    assert d["conditions_above_em_target"] == ["a"] and d["conditions_at_or_below_falsification"] == ["b"]
    assert d["conditions_over_judge_gap_gate"] == ["a"] and d["conditions_without_alpha"] == ["abstained"]
    assert d["measured_em_reference_alpha"] == 20.0
