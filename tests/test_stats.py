"""shared.analysis.stats: permutation p-values agree with scipy, exact tests are exact, corrections and CIs
behave, and held-out LDA cannot silently score 0 the way #205's M3 did."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from shared.analysis import stats

ALTERNATIVES = ["two-sided", "greater", "less"]


def mean_difference(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def monte_carlo_tolerance(p: float, n: int, alternative: str) -> float:
    """Four standard errors of the difference of two independent Monte Carlo p-values, plus the +1.

    A two-sided p is twice a one-sided tail fraction q, so its standard error is 2 sqrt(q (1 - q) / n).
    """
    tail = min(p / 2, 0.5) if alternative == "two-sided" else p
    scale = 2 if alternative == "two-sided" else 1
    return 4 * np.sqrt(2) * scale * np.sqrt(max(tail, 0.01) * (1 - tail) / n) + 2 / n


# ------------------------------------------------------------------------------------------ paired test


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_exhaustive_paired_test_equals_scipy_exactly(alternative):
    rng = np.random.default_rng(1)
    x, y = rng.normal(0.4, 1, 9), rng.normal(0, 1, 9)
    ours = stats.paired_permutation_test(x, y, alternative=alternative, n_iter=10_000)
    theirs = scipy_stats.permutation_test(
        (x, y), mean_difference, permutation_type="samples", alternative=alternative, n_resamples=np.inf
    )
    assert ours.exact and ours.n_iter == 2**9
    assert ours.statistic == pytest.approx(theirs.statistic)
    assert ours.p_value == pytest.approx(theirs.pvalue, abs=1e-12)


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_monte_carlo_paired_test_agrees_with_scipy(alternative):
    rng = np.random.default_rng(2)
    x, y = rng.normal(0.3, 1, 30), rng.normal(0, 1, 30)
    ours = stats.paired_permutation_test(x, y, alternative=alternative, n_iter=10_000, rng=3)
    theirs = scipy_stats.permutation_test(
        (x, y),
        mean_difference,
        permutation_type="samples",
        alternative=alternative,
        n_resamples=9_999,
        random_state=4,
    )
    assert not ours.exact
    assert abs(ours.p_value - theirs.pvalue) < monte_carlo_tolerance(theirs.pvalue, 10_000, alternative)


def test_paired_test_over_many_cells_equals_one_cell_at_a_time():
    rng = np.random.default_rng(5)
    cells = rng.normal(0.1, 1, size=(4, 66))
    batched = stats.paired_permutation_test(cells, n_iter=2_000, rng=7)
    one_by_one = [stats.paired_permutation_test(cell, n_iter=2_000, rng=7).p_value for cell in cells]
    assert batched.p_value.shape == (4,)
    np.testing.assert_allclose(batched.p_value, one_by_one)


def test_monte_carlo_p_value_counts_the_observed_labelling():
    extreme = np.full(40, 1.0)  # every sign flip lowers the mean, so no null draw reaches it
    result = stats.paired_permutation_test(extreme, alternative="greater", n_iter=999, rng=0)
    assert result.p_value == pytest.approx(1 / 1000)


def test_paired_test_finds_a_planted_shift_and_not_a_null():
    rng = np.random.default_rng(6)
    assert stats.paired_permutation_test(rng.normal(0.8, 1, 40), rng=0).p_value < 0.001
    assert stats.paired_permutation_test(rng.normal(0.0, 1, 40), rng=0).p_value > 0.05


def test_unknown_alternative_is_refused():
    with pytest.raises(ValueError, match="alternative"):
        stats.paired_permutation_test(np.ones(5), alternative="bigger")


# ------------------------------------------------------------------------------------------ label tests


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_exhaustive_two_sample_test_equals_scipy_exactly(alternative):
    rng = np.random.default_rng(8)
    x, y = rng.normal(0.5, 1, 6), rng.normal(0, 1, 5)
    ours = stats.two_sample_permutation_test(x, y, alternative=alternative, n_iter=10_000)
    theirs = scipy_stats.permutation_test(
        (x, y), mean_difference, permutation_type="independent", alternative=alternative, n_resamples=np.inf
    )
    assert ours.exact and ours.n_iter == 462  # C(11, 5)
    assert ours.statistic == pytest.approx(theirs.statistic)
    assert ours.p_value == pytest.approx(theirs.pvalue, abs=1e-12)


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_monte_carlo_two_sample_test_agrees_with_scipy(alternative):
    rng = np.random.default_rng(9)
    x, y = rng.normal(0.4, 1, 20), rng.normal(0, 1, 25)
    ours = stats.two_sample_permutation_test(x, y, alternative=alternative, n_iter=10_000, rng=10)
    theirs = scipy_stats.permutation_test(
        (x, y),
        mean_difference,
        permutation_type="independent",
        alternative=alternative,
        n_resamples=9_999,
        random_state=11,
    )
    assert not ours.exact
    assert abs(ours.p_value - theirs.pvalue) < monte_carlo_tolerance(theirs.pvalue, 10_000, alternative)


@pytest.mark.parametrize("alternative", ["greater", "less"])
def test_monte_carlo_range_of_three_group_means_agrees_with_scipy(alternative):
    rng = np.random.default_rng(40)
    groups = [rng.normal(0, 1, 15), rng.normal(0.3, 1, 12), rng.normal(0.6, 1, 18)]
    values, labels = np.concatenate(groups), np.repeat([0, 1, 2], [g.size for g in groups])
    ours = stats.label_permutation_test(values, labels, statistic="range", alternative=alternative, n_iter=10_000, rng=41)

    def spread(*samples, axis=-1):
        means = np.stack([np.mean(s, axis=axis) for s in samples])
        return means.max(axis=0) - means.min(axis=0)

    theirs = scipy_stats.permutation_test(
        groups, spread, permutation_type="independent", alternative=alternative, n_resamples=9_999, random_state=42
    )
    assert ours.statistic == pytest.approx(theirs.statistic)
    assert abs(ours.p_value - theirs.pvalue) < monte_carlo_tolerance(theirs.pvalue, 10_000, alternative)


def test_spread_of_group_means_detects_a_planted_axis_and_not_random_labels():
    """#81's permutation test over axis labels: the spread of the five axis means."""
    rng = np.random.default_rng(12)
    axis_labels = np.repeat(["agr", "con", "ext", "neu", "ope"], 125)
    planted = rng.normal(0, 1, axis_labels.size) + 0.5 * (axis_labels == "agr")
    null = rng.normal(0, 1, axis_labels.size)
    kwargs = {"statistic": "range", "alternative": "greater", "n_iter": 5_000, "rng": 13}
    assert stats.label_permutation_test(planted, axis_labels, **kwargs).p_value < 0.001
    assert stats.label_permutation_test(null, axis_labels, **kwargs).p_value > 0.05


def test_blocked_shuffles_stay_inside_their_groups():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 1, 2])
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])  # ragged: the last group has four rows
    draws = stats.grouped_label_shuffles(labels, groups, 500, rng=14)
    for group in np.unique(groups):
        rows = groups == group
        assert all(sorted(draw[rows]) == sorted(labels[rows]) for draw in draws)
    assert len({tuple(draw) for draw in draws}) > 50  # the draws actually vary


def test_equal_sized_group_shuffles_put_every_label_everywhere_uniformly():
    labels = np.tile(np.arange(4), 30)
    groups = np.repeat(np.arange(30), 4)
    draws = stats.grouped_label_shuffles(labels, groups, 4_000, rng=15)
    frequency_of_label_0_at_row_0 = np.mean(draws[:, 0] == 0)
    assert frequency_of_label_0_at_row_0 == pytest.approx(0.25, abs=0.03)


# ------------------------------------------------------------------------------------- exact Spearman


def test_exact_spearman_reproduces_the_records_h3_numbers():
    """#205: rho = -0.90 over the five conditions, exact p = 0.083 (10 of the 120 orderings)."""
    cos_to_assistant = [0.98, 0.9457, 0.9060, 0.8696, 0.7828]
    mean_bystander = [0.457, 0.486, 0.501, 0.537, 0.520]
    result = stats.spearman_exact_test(cos_to_assistant, mean_bystander)
    assert result.rho == pytest.approx(-0.9)
    assert result.n_orderings == 120
    assert result.p_value == pytest.approx(10 / 120)


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_exact_spearman_equals_brute_force_over_all_120_orderings(alternative):
    rng = np.random.default_rng(16)
    x, y = rng.normal(size=5), rng.normal(size=5) + 0.5 * np.arange(5)
    observed = scipy_stats.spearmanr(x, y).statistic
    null = np.array(
        [scipy_stats.spearmanr(x, y[list(order)]).statistic for order in itertools.permutations(range(5))]
    )
    eps = 1e-12
    p_greater, p_less = np.mean(null >= observed - eps), np.mean(null <= observed + eps)
    expected = {"greater": p_greater, "less": p_less, "two-sided": min(1.0, 2 * min(p_greater, p_less))}
    result = stats.spearman_exact_test(x, y, alternative=alternative)
    assert result.rho == pytest.approx(observed)
    assert result.p_value == pytest.approx(expected[alternative])


def test_exact_spearman_matches_scipy_pairings_test():
    rng = np.random.default_rng(17)
    x, y = rng.normal(size=6), rng.normal(size=6)
    theirs = scipy_stats.permutation_test(
        (y,),
        lambda y_: scipy_stats.spearmanr(x, y_).statistic,
        permutation_type="pairings",
        n_resamples=np.inf,
    )
    assert stats.spearman_exact_test(x, y).p_value == pytest.approx(theirs.pvalue)


def test_exact_spearman_refuses_more_than_eight_points():
    with pytest.raises(ValueError, match="n!"):
        stats.spearman_exact_test(np.arange(9), np.arange(9))


# --------------------------------------------------------------------------------- multiple testing


def test_bh_on_a_hand_checked_family():
    # sorted p: 0.005 0.01 0.03 0.04 -> p*m/rank: 0.02 0.02 0.04 0.04 (already monotone)
    np.testing.assert_allclose(stats.bh_fdr([0.01, 0.04, 0.03, 0.005]), [0.02, 0.04, 0.04, 0.02])


def test_holm_on_a_hand_checked_family():
    # sorted p: 0.005 0.01 0.03 0.04 -> (m-j+1)p: 0.02 0.03 0.06 0.04 -> running max: 0.02 0.03 0.06 0.06
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])


def test_holm_is_capped_at_one_and_sits_between_raw_and_bonferroni():
    p = np.random.default_rng(18).uniform(0, 0.5, 150)
    adjusted = stats.holm(p)
    assert np.all(adjusted >= p) and np.all(adjusted <= np.minimum(1, p * p.size)) and adjusted.max() <= 1


def test_family_adjustment_reports_both_corrections_in_input_order():
    family = stats.adjust_family([0.2, 0.001, 0.04])
    np.testing.assert_allclose(family.p_bh, scipy_stats.false_discovery_control([0.2, 0.001, 0.04]))
    np.testing.assert_allclose(family.p_holm, [0.2, 0.003, 0.08])


def test_corrections_refuse_invalid_p_values():
    with pytest.raises(ValueError):
        stats.bh_fdr([0.1, np.nan])


# --------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(19)
    covered = [
        interval.low <= 1.0 <= interval.high
        for interval in (stats.bootstrap_ci(rng.exponential(1.0, 60), rng=rng) for _ in range(300))
    ]
    assert 0.89 <= np.mean(covered) <= 0.99


def test_percentile_interval_of_replicates_per_cell_ignores_undefined_replicates():
    replicates = np.stack([np.arange(101.0), 10 * np.arange(101.0), np.full(101, np.nan)], axis=1)
    replicates[:50, 1] = np.nan  # half the resamples left this cell undefined: the rest still give its interval
    low, high = stats.percentile_interval(replicates, 0.95)
    np.testing.assert_allclose(low[:2], [2.5, 10 * (50 + 0.025 * 50)])
    np.testing.assert_allclose(high[:2], [97.5, 10 * (50 + 0.975 * 50)])
    assert np.isnan(low[2]) and np.isnan(high[2])
    assert stats.percentile_interval(np.arange(11.0), 0.8) == pytest.approx((1.0, 9.0))


def test_bootstrap_ci_of_a_slope_resamples_pairs_together():
    rng = np.random.default_rng(20)
    x = np.linspace(0, 1, 80)
    y = 2 * x + rng.normal(0, 0.2, x.size)
    interval = stats.bootstrap_ci((x, y), stats.ols_slope, n_boot=1_000, rng=21)
    assert interval.n_boot == 1_000
    assert interval.low < 2 < interval.high and interval.half_width < 0.3


def test_binomial_bootstrap_ci_of_a_leakage_slope_over_five_levels():
    """#81's H3: slope of leakage over five gradation levels, binomial resampling, B = 1000."""
    levels = np.arange(1, 6)
    trials = np.full(5, 200)
    flat = stats.binomial_bootstrap_ci(
        np.full(5, 60), trials, lambda rates, axis: stats.ols_slope(levels, rates, axis), rng=22
    )
    steep = stats.binomial_bootstrap_ci(
        np.array([20, 50, 80, 110, 140]),
        trials,
        lambda rates, axis: stats.ols_slope(levels, rates, axis),
        rng=22,
    )
    assert abs(flat.estimate) <= flat.half_width  # no gradient: |slope| within the CI half-width
    assert steep.estimate == pytest.approx(0.15) and abs(steep.estimate) > steep.half_width


# --------------------------------------------------------------------------------------- Cohen's d


def test_cohens_d_pooled_and_paired():
    x = np.array([2.0, 4.0, 6.0, 8.0])
    y = np.array([1.0, 2.0, 3.0, 6.0])
    pooled_sd = np.sqrt((3 * np.var(x, ddof=1) + 3 * np.var(y, ddof=1)) / 6)
    assert stats.cohens_d(x, y) == pytest.approx((5 - 3) / pooled_sd)
    differences = x - y  # 1 2 3 2
    assert stats.cohens_d_paired(x, y) == pytest.approx(2 / np.std(differences, ddof=1))


# ------------------------------------------------------------------------------------ held-out LDA


def persona_clouds(n_personas=6, n_questions=30, dim=20, separation=4.0, seed=0):
    """Rows are (persona, question); each persona is a Gaussian cloud around its own centre."""
    rng = np.random.default_rng(seed)
    personas = np.tile(np.arange(n_personas), n_questions)
    questions = np.repeat(np.arange(n_questions), n_personas)
    centres = rng.normal(0, 1, (n_personas, dim)) * separation
    return centres[personas] + rng.normal(0, 1, (personas.size, dim)), personas, questions


@pytest.mark.parametrize("centred", [False, True])
def test_vectorised_lda_equals_sklearn_refits_under_the_observed_and_shuffled_labels(centred):
    activations, personas, questions = persona_clouds(separation=0.5, seed=1)
    draws = stats.grouped_label_shuffles(personas, questions, 3, rng=2)
    options = {"n_components": 8, "center_within_groups": centred}
    result = stats.lda_joint_shuffle_test(
        activations, personas, questions, label_draws=draws, n_threads=2, **options
    )
    assert result.accuracy[0] == stats.lda_heldout_accuracy(activations, personas, questions, **options)

    projected = stats.label_free_projection(activations, 8, groups=questions if centred else None)
    folds = stats.grouped_folds(personas, questions)
    for draw, null_accuracy in zip(draws, result.null_accuracy[:, 0], strict=True):
        correct = sum(
            np.sum(
                LinearDiscriminantAnalysis(solver="lsqr")
                .fit(projected[train], draw[train])
                .predict(projected[test])
                == draw[test]
            )
            for train, test in folds
        )
        assert null_accuracy == correct / draw.size


def test_separable_persona_clouds_score_near_perfect_and_beat_the_null():
    activations, personas, questions = persona_clouds(separation=4.0)
    result = stats.lda_joint_shuffle_test(activations, personas, questions, n_iter=300, rng=3, n_components=8)
    assert result.accuracy[0] >= 0.95
    assert result.p_above_chance[0] == pytest.approx(1 / 301)


def test_identical_persona_clouds_score_chance():
    activations, personas, questions = persona_clouds(separation=0.0)
    result = stats.lda_joint_shuffle_test(activations, personas, questions, n_iter=300, rng=4, n_components=8)
    assert result.chance_level == pytest.approx(1 / 6)
    assert abs(result.accuracy[0] - 1 / 6) < 0.15
    assert result.p_above_chance[0] > 0.05


def test_joint_null_is_shared_across_checkpoints_so_contrasts_are_paired():
    separable, personas, questions = persona_clouds(separation=4.0, seed=5)
    collapsed, _, _ = persona_clouds(separation=0.0, seed=6)
    result = stats.lda_joint_shuffle_test(
        [separable, collapsed], personas, questions, n_iter=300, rng=7, n_components=8
    )
    drop = result.contrast(reference=0, condition=1, alternative="less")
    assert drop.statistic < -0.6 and drop.p_value == pytest.approx(1 / 301)
    assert result.contrast(reference=0, condition=0).statistic == 0


def test_randomized_projection_matches_exact_pca_and_centres_within_groups():
    rng = np.random.default_rng(9)
    groups = np.repeat(np.arange(40), 12)
    loadings = rng.normal(size=(6, 300)) * np.linspace(8, 3, 6)[:, None]
    activations = (
        rng.normal(size=(480, 6)) @ loadings
        + rng.normal(size=(480, 300))
        + 5 * rng.normal(size=(40, 300))[groups]
    )
    for centring in (None, groups):
        offsets = stats._group_means(activations, np.zeros(480, int) if centring is None else groups)
        centred = activations - offsets[np.zeros(480, int) if centring is None else groups]
        exact_axes = np.linalg.svd(centred, full_matrices=False)[2][:6]
        projected = stats.label_free_projection(activations, 6, groups=centring)
        recovered_axes = np.linalg.lstsq(centred, projected, rcond=None)[0].T
        alignment = np.linalg.svd(
            recovered_axes / np.linalg.norm(recovered_axes, axis=1, keepdims=True) @ exact_axes.T
        )[1]
        assert alignment.min() > 0.999


def test_group_means_of_ragged_shuffled_groups_are_each_groups_own_mean():
    rng = np.random.default_rng(23)
    groups = rng.permutation(np.repeat(np.arange(5), [3, 4, 3, 2, 4]))  # unequal sizes, rows not in group order
    matrix = rng.normal(size=(groups.size, 7)).astype(np.float32)
    expected = np.stack([matrix[groups == g].astype(float).mean(axis=0) for g in range(5)])
    np.testing.assert_allclose(stats._group_means(matrix, groups), expected, rtol=1e-12)


def test_grouping_by_persona_raises_instead_of_scoring_zero():
    """#205's M3 held out one persona vector at a time: the held-out class never appeared in training."""
    activations, personas, questions = persona_clouds()
    with pytest.raises(stats.GroupedCVError, match="no training rows of class"):
        stats.grouped_folds(personas, groups=personas, n_splits=5)
    with pytest.raises(stats.GroupedCVError, match="0 by construction"):
        stats.lda_heldout_accuracy(activations, personas, groups=personas)


def test_label_draws_that_break_fold_class_counts_are_refused():
    activations, personas, questions = persona_clouds()
    unrestricted = np.random.default_rng(8).permuted(np.tile(personas, (20, 1)), axis=1)
    with pytest.raises(ValueError, match="class counts"):
        stats.lda_joint_shuffle_test(
            activations, personas, questions, label_draws=unrestricted, n_components=8
        )


# ------------------------------------------------------------------------- #205 behavioural tests

PERSONAS = ["confab", "assistant", "zelthari_scholar", "villain", "french_person", "kindergarten_teacher"] + [
    f"bystander_{i}" for i in range(6)
]


def leakage_grid(rng, base_rate=0.45, boosts=None, n_questions=28, completions=10):
    """Per-(persona, question) marker rates from ``completions`` binomial draws each."""
    rates = np.full((len(PERSONAS), n_questions), base_rate)
    for persona, boost in (boosts or {}).items():
        rates[PERSONAS.index(persona)] += boost
    return rng.binomial(completions, rates) / completions


def test_h1_fires_when_the_induction_persona_leaks_more_and_not_otherwise():
    rng = np.random.default_rng(30)
    planted = stats.h1_self_leakage_test(
        leakage_grid(rng, boosts={"villain": 0.2}), PERSONAS, "villain", rng=31
    )
    null = stats.h1_self_leakage_test(leakage_grid(rng), PERSONAS, "villain", rng=31)
    assert planted.fires and planted.statistic > 0.1 and planted.p_value < 0.01
    assert not null.fires


def test_h1_refuses_an_induction_persona_outside_the_grid():
    with pytest.raises(ValueError, match="untestable"):
        stats.h1_self_leakage_test(leakage_grid(np.random.default_rng(0)), PERSONAS, "paramedic")


INDUCTIONS = ["assistant", "kindergarten_teacher", "french_person", "villain"]


def test_h2_fires_for_identical_conditions_and_not_for_a_planted_gap():
    rng = np.random.default_rng(32)
    identical = np.stack([leakage_grid(np.random.default_rng(0)) for _ in INDUCTIONS])
    shifted = np.stack([leakage_grid(rng, base_rate=0.4 + 0.05 * i) for i, _ in enumerate(INDUCTIONS)])
    invariant = stats.h2_invariance_test(identical, PERSONAS, INDUCTIONS, rng=33)
    assert invariant.fires and invariant.p_value > 0.5
    gap = stats.h2_invariance_test(shifted, PERSONAS, INDUCTIONS, rng=33)
    assert not gap.fires and gap.p_value < 0.001 and gap.statistic == pytest.approx(0.15, abs=0.03)


def test_h2_null_is_calibrated_when_conditions_only_differ_by_sampling_noise():
    rng = np.random.default_rng(34)
    p_values = [
        stats.h2_invariance_test(
            np.stack([leakage_grid(rng) for _ in INDUCTIONS]), PERSONAS, INDUCTIONS, n_iter=200, rng=i
        ).p_value
        for i in range(200)
    ]
    assert 0.05 <= np.mean(np.array(p_values) <= 0.10) <= 0.17


def test_h3_needs_a_perfect_ordering_at_five_conditions():
    assert stats.h3_cos_monotone_test([5, 4, 3, 2, 1], [1, 2, 3, 4, 5]).fires  # rho = -1, p = 2/120
    record = stats.h3_cos_monotone_test([0.98, 0.9457, 0.906, 0.8696, 0.7828], [45.7, 48.6, 50.1, 53.7, 52.0])
    assert not record.fires and record.p_value == pytest.approx(0.0833, abs=1e-4)


def test_the_binomial_lower_bound_covers_the_true_rate_at_its_level_and_is_exact():
    rng = np.random.default_rng(11)
    for rate, trials in ((0.3, 24), (0.15, 280), (0.8, 50)):
        draws = rng.binomial(trials, rate, size=2000)
        bounds = np.array([stats.binomial_lower_bound(int(k), trials) for k in draws])
        # Clopper-Pearson is conservative: the bound exceeds the true rate in at most alpha of the draws
        assert (bounds > rate).mean() <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 2000)
    assert stats.binomial_lower_bound(0, 24) == 0.0
    # the exact one-sided bound: P(X >= k | p = bound) = alpha
    bound = stats.binomial_lower_bound(12, 24)
    assert scipy_stats.binom.sf(11, 24, bound) == pytest.approx(0.05, rel=1e-6)
    with pytest.raises(ValueError, match="successes <= trials"):
        stats.binomial_lower_bound(25, 24)
