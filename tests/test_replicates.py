"""Training seeds as units: the parameters that fan them out, their task names, and the seed-level contrast."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from shared.analysis.stats import PooledDecision, seed_contrast, two_sample_permutation_test
from shared.core.config import ConfigError, ReplicatedParams, parse
from workflows.plan import replicate


def seeds_of(**values):
    return parse(ReplicatedParams, values).training_seeds()


def test_replicates_count_up_from_the_seed_and_an_explicit_list_wins():
    assert seeds_of() == [42]
    assert seeds_of(replicates=3) == [42, 43, 44]
    assert seeds_of(seed=7, replicates=2) == [7, 8]
    assert seeds_of(seeds=[1, 5]) == [1, 5]
    assert seeds_of(seeds=[1, 5], replicates=2) == [1, 5]


@pytest.mark.parametrize("values, message", [
    ({"seeds": [1, 5], "replicates": 3}, "replicates=3 but 2 seeds are listed"),
    ({"seeds": [3, 3]}, "seeds must be distinct"),
    ({"seeds": []}, "seeds must not be empty"),
    ({"replicates": 0}, "replicates"),
    ({"seed": -1}, "seed"),
])
def test_a_seed_list_that_contradicts_itself_is_one_error_line(values, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse(ReplicatedParams, values)
    assert "\n" not in str(err.value)


def test_one_seed_keeps_its_names_and_several_name_each_seed():
    assert replicate("train-em-e0", 42, [42]) == "train-em-e0"
    assert [replicate("train-em-e0", s, [42, 43]) for s in (42, 43)] == ["train-em-e0-s42", "train-em-e0-s43"]


def draw_recipe(rng, mean, n_seeds, n_questions=40, seed_sd=1.0, question_sd=3.0):
    """Per-seed values of a statistic: each seed's fine-tune shifts it by its own amount, then questions add noise.

    Returns the per-seed means and the per-question values (seeds x questions), so the same draw can be tested
    with the seed as the unit and, wrongly, with the question answers as the unit.
    """
    seed_effects = rng.normal(mean, seed_sd, size=(n_seeds, 1))
    answers = seed_effects + rng.normal(0, question_sd, size=(n_seeds, n_questions))
    return answers.mean(axis=1), answers


def test_two_seeds_of_one_recipe_reject_at_the_nominal_rate_where_answers_as_units_do_not():
    rng = np.random.default_rng(0)
    n_rep, alpha = 400, 0.05
    seed_level = naive = 0
    for _ in range(n_rep):
        em, em_answers = draw_recipe(rng, 0.0, n_seeds=2)
        benign, benign_answers = draw_recipe(rng, 0.0, n_seeds=2)
        seed_level += seed_contrast(em, benign).p_value < alpha
        naive += scipy_stats.ttest_ind(em_answers.ravel(), benign_answers.ravel()).pvalue < alpha
    # the seed-level test holds its size: the rejection count lies in the 99% binomial interval around 5%
    low, high = scipy_stats.binom.interval(0.99, n_rep, alpha)
    assert low <= seed_level <= high
    # treating the answers of one fine-tune as the population is the fault this guards against: it fires far
    # more often than 5% on the same draws (the control that shows the seed-level test is needed at all)
    assert naive > 4 * high


def test_an_effect_present_in_every_seed_is_detected():
    rng = np.random.default_rng(1)
    detected = sum(
        seed_contrast(draw_recipe(rng, 6.0, n_seeds=3)[0], draw_recipe(rng, 0.0, n_seeds=3)[0]).p_value < 0.05
        for _ in range(200)
    )
    assert detected >= 190


def test_the_contrast_reports_the_between_seed_spread_and_an_interval_that_holds_the_difference():
    result = seed_contrast([3.0, 5.0, 4.0], [1.0, 1.5, 0.5])
    assert result.estimate == pytest.approx(3.0)
    assert result.sd_a == pytest.approx(1.0) and result.sd_b == pytest.approx(0.5)
    assert result.df == 4 and result.n_a == 3 and result.n_b == 3
    assert result.low < 3.0 < result.high and result.low > 0
    assert result.p_value == pytest.approx(scipy_stats.ttest_ind([3, 5, 4], [1, 1.5, 0.5]).pvalue)


def test_against_a_fixed_reference_the_interval_is_for_the_difference():
    result = seed_contrast([0.52, 0.58, 0.55], reference=0.40)
    assert result.estimate == pytest.approx(0.15)
    assert result.low < 0.15 < result.high and result.low > 0
    assert result.n_b == 0 and math.isnan(result.sd_b)
    assert "reference" in result.method


def test_one_seed_per_recipe_is_not_testable_and_says_so():
    result = seed_contrast([0.9], [0.1])
    assert not result.testable
    assert math.isnan(result.p_value) and math.isnan(result.low)
    assert result.estimate == pytest.approx(0.8)
    assert "one seed" in result.method


def test_seeds_that_all_gave_the_same_value_get_no_interval_of_zero_width():
    # two seeds at 3 of 10 completions each: chance agreement, not a between-seed spread of zero
    alone = seed_contrast([0.3, 0.3], reference=0.0)
    assert not alone.testable and math.isnan(alone.low) and math.isnan(alone.high)
    assert alone.estimate == pytest.approx(0.3) and alone.sd_a == 0.0 and "same value" in alone.method
    assert not seed_contrast([0.5, 0.5], [0.2, 0.2]).testable
    # spread on one side is enough to test
    assert seed_contrast([0.5, 0.5], [0.1, 0.3]).testable and seed_contrast([0.3, 0.4], reference=0.0).testable


def test_a_permutation_of_seed_labels_cannot_reject_with_two_seeds_each():
    # why the seed-level test is a t-test: the exact permutation null of 2 vs 2 seeds has 6 labellings, so
    # its smallest two-sided p is 1/3 however large the effect
    result = two_sample_permutation_test(np.array([10.0, 11.0]), np.array([0.0, 1.0]))
    assert result.p_value == pytest.approx(1 / 3)
    assert seed_contrast([10.0, 11.0], [0.0, 1.0]).p_value < 0.01


def test_a_pooled_decision_passes_only_when_every_seed_does():
    assert PooledDecision({42: True, 43: True}).passes
    mixed = PooledDecision({42: True, 43: False})
    assert not mixed.passes and mixed.n_pass == 1 and mixed.rule == "all seeds must pass"
    assert not PooledDecision({}).passes


def test_bad_calls_are_refused():
    with pytest.raises(ValueError, match="exactly one"):
        seed_contrast([1.0, 2.0])
    with pytest.raises(ValueError, match="exactly one"):
        seed_contrast([1.0, 2.0], [1.0], reference=0.0)
    with pytest.raises(ValueError, match="at least one"):
        seed_contrast([], [1.0])
