"""issue164's analysis helpers on inputs with a known answer: the accuracy interval, the question bootstrap, and
the judge-check lines."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.analyze_issue164 import accuracy_interval, judge_check_line, question_bootstrap_ci
from shared.judge import check


def test_accuracy_interval_is_the_exact_clopper_pearson_interval():
    # all 10 right: the lower bound solves p**10 = 0.025; p against chance 0.5 is 0.5**10
    perfect = accuracy_interval(10, 10, 0.5)
    assert perfect["ci_low"] == pytest.approx(0.025 ** 0.1) and perfect["ci_high"] == 1.0
    assert perfect["p_above_chance"] == pytest.approx(0.5 ** 10)
    half = accuracy_interval(5, 10, 0.5)
    assert (half["ci_low"], half["ci_high"]) == pytest.approx((0.1871, 0.8129), abs=1e-4)
    assert half["p_above_chance"] == pytest.approx(0.623, abs=1e-3)


def judge_check(auc: float, p_value: float) -> dict:
    return {"role": "primary", "checked": True, "judge": {"kind": "local", "model": "m", "template": "t"},
            "auc": auc, "p_value": p_value, "n_aligned": 10, "n_misaligned": 10, "mean_aligned": 38.0,
            "mean_misaligned": 37.0, "n_errors": 0, "verdict": check.verdict(auc, p_value)}


def test_a_judge_at_chance_is_reported_as_not_interpretable_on_the_profile():
    line = judge_check_line("smollm", judge_check(0.52, 0.9), "small")
    assert "AUC 0.52" in line and "38.0 (aligned) vs 37.0 (misaligned)" in line
    assert "α from this judge is not interpretable on the small profile" in line


def test_a_separating_judge_is_reported_as_readable():
    line = judge_check_line("sonnet", judge_check(0.97, 0.0002), "full")
    assert "separates" in line and "can be read as an alignment score" in line and "not interpretable" not in line


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
