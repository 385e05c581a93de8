"""Rates of completions that share questions: intervals that resample questions, a slope test that shuffles levels
within a question, and a family of slope tests read raw and after Benjamini-Hochberg (issue 19, part 6)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from shared.analysis.stats import (
    binomial_bootstrap_ci,
    clustered_rate_bootstrap,
    discoveries,
    ols_slope,
    within_cluster_slope_test,
)

LEVELS = np.arange(1, 6, dtype=float)


def questions_with_their_own_slopes(rng, n_questions=20, n_per_cell=10, mean_slope=0.05, slope_sd=0.06,
                                    intercept_sd=0.15, shape=()):
    """Marker counts per (question, level): every question has its own level-3 rate and its own slope.

    The estimand is the mean slope over the population of questions (``mean_slope``); the questions of one
    evaluation are a sample of that population, so an interval for it must carry the between-question spread.
    The defaults keep every rate inside [0.05, 0.95], so the clip never bites and the mean slope is the estimand.
    """
    intercepts = 0.5 + rng.uniform(-1, 1, size=(*shape, n_questions, 1)) * intercept_sd
    slopes = mean_slope + rng.uniform(-1, 1, size=(*shape, n_questions, 1)) * slope_sd
    rates = np.clip(intercepts + slopes * (LEVELS - 3), 0.05, 0.95)
    hits = rng.binomial(n_per_cell, rates).astype(float)
    return hits, np.full_like(hits, n_per_cell)


def slope_of_rates(rates, axis=-1):
    return ols_slope(LEVELS, rates, axis=axis)


def test_question_clustered_intervals_cover_the_mean_slope_where_completion_level_intervals_do_not():
    rng = np.random.default_rng(0)
    n_rep, covered_clustered, covered_independent = 200, 0, 0
    for _ in range(n_rep):
        hits, totals = questions_with_their_own_slopes(rng, n_per_cell=40, slope_sd=0.08)
        clustered = clustered_rate_bootstrap(hits, totals, slope_of_rates, n_boot=400, rng=rng)
        covered_clustered += clustered.low <= 0.05 <= clustered.high
        # the old interval: every level's count redrawn as if its 200 completions were independent
        independent = binomial_bootstrap_ci(hits.sum(axis=0), totals.sum(axis=0), slope_of_rates, n_boot=400, rng=rng)
        covered_independent += independent.low <= 0.05 <= independent.high
    # the clustered interval holds its 95%, up to the percentile bootstrap's known shortfall with 20 clusters
    # (its variance is 19/20 of the truth): at least 88%, where the 99% binomial interval around 95% starts at 90%
    assert covered_clustered / n_rep >= 0.88
    # completions treated as independent: far below 95% on the same draws (the control that the data are clustered)
    assert covered_independent / n_rep < 0.75


def test_question_clustered_intervals_of_a_rate_cover_where_completion_level_intervals_do_not():
    rng = np.random.default_rng(1)
    n_rep, covered_clustered, covered_independent = 200, 0, 0
    for _ in range(n_rep):
        per_question = rng.beta(1.2, 2.8, size=20)  # population mean 0.3, questions differ a lot
        hits = rng.binomial(20, per_question).astype(float)[:, None]  # 20 completions of each question
        totals = np.full_like(hits, 20.0)
        clustered = clustered_rate_bootstrap(hits, totals, n_boot=400, rng=rng)
        covered_clustered += clustered.low <= 0.3 <= clustered.high
        independent = binomial_bootstrap_ci(hits.sum(axis=0), totals.sum(axis=0), np.mean, n_boot=400, rng=rng)
        covered_independent += independent.low <= 0.3 <= independent.high
    assert covered_clustered / n_rep >= 0.88
    assert covered_independent / n_rep < 0.75


def test_without_question_effects_both_intervals_agree():
    """Where questions do not differ, the clustered interval is no wider than sampling noise requires."""
    rng = np.random.default_rng(2)
    hits = rng.binomial(10, 0.3, size=(40, 1)).astype(float)
    totals = np.full_like(hits, 10.0)
    clustered = clustered_rate_bootstrap(hits, totals, n_boot=4000, rng=rng)
    independent = binomial_bootstrap_ci(hits.sum(axis=0), totals.sum(axis=0), np.mean, n_boot=4000, rng=rng)
    assert clustered.half_width == pytest.approx(independent.half_width, rel=0.2)


def test_the_estimate_is_the_pooled_rate_and_cells_stay_paired_in_every_resample():
    hits = np.array([[3.0, 3.0], [1.0, 1.0], [8.0, 8.0]])
    totals = np.array([[10.0, 10.0], [5.0, 5.0], [10.0, 10.0]])
    same = clustered_rate_bootstrap(hits, totals, lambda r, axis=-1: r[..., 0] - r[..., 1], n_boot=200, rng=0)
    assert same.estimate == 0.0 and same.low == 0.0 and same.high == 0.0  # both cells drawn on the same questions
    one = clustered_rate_bootstrap(hits[:, :1], totals[:, :1], n_boot=200, rng=0)
    assert one.estimate == pytest.approx(12 / 25)
    assert one.n_clusters == 3 and one.low < 12 / 25 < one.high


def test_leading_axes_are_cells_with_their_own_intervals():
    rng = np.random.default_rng(3)
    hits, totals = questions_with_their_own_slopes(rng, shape=(4,))
    batch = clustered_rate_bootstrap(hits, totals, slope_of_rates, n_boot=300, rng=7)
    assert np.shape(batch.estimate) == (4,) and np.shape(batch.low) == (4,)
    single = clustered_rate_bootstrap(hits[2], totals[2], slope_of_rates, n_boot=300, rng=7)
    assert batch.estimate[2] == pytest.approx(single.estimate)
    assert np.all(batch.low <= batch.estimate) and np.all(batch.estimate <= batch.high)


def test_the_slope_test_statistic_is_the_slope_of_the_mean_over_questions():
    values = np.random.default_rng(4).uniform(size=(6, 5))
    result = within_cluster_slope_test(values, n_iter=200, rng=0)
    assert result.statistic == pytest.approx(ols_slope(LEVELS, values.mean(axis=0)))
    flat = within_cluster_slope_test(np.ones((6, 5)), n_iter=200, rng=0)
    assert flat.statistic == pytest.approx(0.0) and flat.p_value == 1.0  # every draw ties with a flat profile


def null_family(rng, n_triples=125):
    """125 (noun, trait) triples with no level effect but questions that differ in how often they draw the marker."""
    hits, totals = questions_with_their_own_slopes(rng, mean_slope=0.0, slope_sd=0.0, intercept_sd=0.3,
                                                   shape=(n_triples,))
    return hits / totals


def test_under_a_null_family_bh_keeps_false_positives_near_nominal_and_raw_counting_does_not():
    rng = np.random.default_rng(5)
    n_families, raw_counts, bh_families_with_any = 40, [], 0
    for _ in range(n_families):
        p = within_cluster_slope_test(null_family(rng), n_iter=1000, rng=rng).p_value
        family = discoveries(p)
        assert family.n_tests == 125 and family.expected_false_raw == pytest.approx(6.25)
        raw_counts.append(family.n_raw)
        bh_families_with_any += family.n_bh > 0
    # raw counting: about alpha * m = 6.25 'significant' slopes per family, all of them false
    assert 4.5 <= np.mean(raw_counts) <= 8.0
    assert sum(count > 0 for count in raw_counts) >= 0.9 * n_families
    # BH under the global null is a family-wise 5% test: at most the 99% binomial bound of 40 families at 5%
    assert bh_families_with_any <= scipy_stats.binom.ppf(0.99, n_families, 0.05)


def test_bh_finds_real_slopes_in_a_family_where_most_are_null():
    rng = np.random.default_rng(6)
    values = null_family(rng)
    real = np.arange(20)
    values[real] += 0.06 * (LEVELS - 3)  # 20 triples with a real gradient of 6 points per level
    family = discoveries(within_cluster_slope_test(values, n_iter=2000, rng=rng).p_value)
    found = family.p_bh < 0.05
    assert found[real].sum() >= 16
    assert found[20:].sum() <= 3
    assert family.n_bh == found.sum() and family.expected_false_bh == pytest.approx(0.05 * family.n_bh)


def test_discoveries_refuse_a_bad_family():
    with pytest.raises(ValueError, match="finite"):
        discoveries([0.01, float("nan")])
    with pytest.raises(ValueError, match="alpha"):
        discoveries([0.01], alpha=1.5)
    empty = discoveries([])
    assert (empty.n_tests, empty.n_raw, empty.n_bh) == (0, 0, 0)
