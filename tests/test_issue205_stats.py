"""The statistics issue205's referee points asked for, on synthetic data with known answers: what a permutation test
can reach (its floor, BH and Holm over a family, the exact Spearman test at n = 5), a mean-shift test that fires on a
shift and holds its size without one, and H2 as an equivalence test (TOST) that holds its size at the margin."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from shared.analysis import stats


def test_a_tests_floor_is_one_or_two_over_its_null_and_the_sign_flip_test_reaches_it():
    assert stats.smallest_p(1024, "greater", exhaustive=True) == pytest.approx(1 / 1024)
    assert stats.smallest_p(1024, exhaustive=True) == pytest.approx(2 / 1024)
    assert stats.smallest_p(1000) == pytest.approx(2 / 1001)
    assert stats.sign_flip_null_size(10, 10_000) == (1024, True)
    assert stats.sign_flip_null_size(12, 1_000) == (1_000, False)
    # ten clearly positive differences: the observed pattern and its mirror are the extremes of 1,024
    result = stats.paired_permutation_test(np.linspace(1, 2, 10), n_iter=10_000)
    assert result.exact and result.p_value == pytest.approx(stats.smallest_p(result.n_iter, exhaustive=True))


def test_what_bh_and_holm_can_reach_over_a_family_of_floors():
    """150 cells: 50 at 2/4096 (M1), 50 at 2/2048 (M2), 50 at 2/1001 (M3). Holm's best, 150 x 2/4096 = 0.073, cannot
    reach 0.01; BH's best for an M1 cell is 150 x (2/4096) / 50 = 0.0015."""
    floors = [2 / 4096] * 50 + [2 / 2048] * 50 + [2 / 1001] * 50
    reach = stats.correction_reach(floors, 0.01)
    assert not reach["holm_reachable"] and min(reach["holm_best"]) == pytest.approx(150 * 2 / 4096)
    assert reach["bh_reachable"] and min(reach["bh_best"][:50]) == pytest.approx(150 * (2 / 4096) / 50)
    np.testing.assert_allclose(reach["bh_best"], stats.bh_fdr(floors))  # the best case is every cell at its floor
    assert not stats.correction_reach([0.02] * 10, 0.01)["bh_reachable"]


def test_the_exact_spearman_test_at_five_conditions_fires_only_at_rho_one():
    floor = stats.spearman_exact_floor(5, 0.05)
    assert floor["n_orderings"] == 120 and floor["smallest_p"] == pytest.approx(2 / 120)
    assert floor["min_abs_rho_below_alpha"] == pytest.approx(1.0)
    assert floor["p_at"][0.9] == pytest.approx(10 / 120)  # the record's rho = -0.90, p = 0.083
    assert stats.spearman_exact_test([1, 2, 3, 4, 5], [5, 4, 3, 1, 2]).p_value == pytest.approx(10 / 120)
    assert stats.spearman_exact_floor(7, 0.05)["min_abs_rho_below_alpha"] < 0.8  # more conditions, a reachable bar


def test_the_mean_shift_test_fires_on_a_shift_and_holds_its_size_without_one():
    rng = np.random.default_rng(0)
    shifted = stats.vector_sign_flip_test(0.5 + rng.normal(size=(24, 16)), n_iter=2000, rng=1)
    assert shifted.p_value < 0.001 and shifted.statistic == pytest.approx(0.5 * np.sqrt(16), rel=0.5)
    rejections = sum(stats.vector_sign_flip_test(rng.normal(size=(12, 16)), n_iter=500, rng=i).p_value < 0.05 for i in range(200))
    assert rejections <= scipy_stats.binom.interval(0.99, 200, 0.05)[1]


def leakage_with(differences, n_questions=28, rng=None):
    """(conditions, personas, questions) rates whose bystander means differ by ``differences`` (per condition)."""
    rng = rng or np.random.default_rng(0)
    base = np.clip(0.4 + 0.1 * rng.normal(size=(1, 6, n_questions)), 0, 1)
    return np.concatenate([base + d + 0.05 * rng.normal(size=(1, 6, n_questions)) for d in differences])


PERSONAS = ["confab", "a", "b", "c", "d", "e"]


def test_h2_equivalence_holds_its_size_at_the_margin_and_shows_equivalence_well_inside_it():
    """TOST's size: with two conditions exactly 15 points apart (the margin), it claims equivalence at most 5% of the
    time; with the conditions alike it shows equivalence almost always."""
    rng = np.random.default_rng(1)
    at_margin = sum(stats.h2_equivalence_test(leakage_with([0.0, 0.15], rng=rng), PERSONAS, ["a", "b"]).fires for _ in range(300))
    assert at_margin <= scipy_stats.binom.interval(0.99, 300, 0.05)[1]
    alike = sum(stats.h2_equivalence_test(leakage_with([0.0, 0.0, 0.0], rng=rng), PERSONAS, ["a", "b", "c"]).fires for _ in range(100))
    assert alike >= 95


def test_h2_names_the_least_equivalent_pair_and_the_records_rule_is_no_equivalence_test():
    rng = np.random.default_rng(2)
    result = stats.h2_equivalence_test(leakage_with([0.0, 0.02, 0.3], rng=rng), PERSONAS, ["a", "b", "c"])
    assert not result.fires and result.details["worst_pair"] in ((0, 2), (1, 2))
    # three questions whose per-question differences swing +-0.15: the mean difference (0.05) is small and the
    # record's rule "range <= 15 pp and p > 0.10" holds, but the data cannot exclude a 15-point difference
    questions = np.array([[0.30, 0.50, 0.40], [0.45, 0.35, 0.55]])
    rates = np.repeat(questions[:, None, :], len(PERSONAS), axis=1)
    record = stats.h2_invariance_test(rates, PERSONAS, ["a", "b"], n_iter=500, rng=0)
    assert record.statistic == pytest.approx(0.05) and record.fires
    tost = stats.h2_equivalence_test(rates, PERSONAS, ["a", "b"])
    assert not tost.fires and tost.p_value > 0.05
