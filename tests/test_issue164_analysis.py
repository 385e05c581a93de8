"""issue164's analysis helpers on inputs with a known answer: the accuracy interval and the question bootstrap (the
judge-check lines are shared with issue170: tests/test_judge_check.py)."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.analyze_issue164 import accuracy_interval, question_bootstrap_ci


def test_accuracy_interval_is_the_exact_clopper_pearson_interval():
    # all 10 right: the lower bound solves p**10 = 0.025; p against chance 0.5 is 0.5**10
    perfect = accuracy_interval(10, 10, 0.5)
    assert perfect["ci_low"] == pytest.approx(0.025 ** 0.1) and perfect["ci_high"] == 1.0
    assert perfect["p_above_chance"] == pytest.approx(0.5 ** 10)
    half = accuracy_interval(5, 10, 0.5)
    assert (half["ci_low"], half["ci_high"]) == pytest.approx((0.1871, 0.8129), abs=1e-4)
    assert half["p_above_chance"] == pytest.approx(0.623, abs=1e-3)


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
