"""shared.analysis.geometry: #205's M1/M2/M3 on synthetic persona vectors with planted (and absent) EM
effects."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from shared.analysis import geometry, stats

PERSONAS = ["confab", "assistant", "zelthari_scholar", "villain", "french_person", "kindergarten_teacher"] + [
    f"bystander_{i}" for i in range(6)
]
DIM = 64


def base_vectors(seed=0):
    """Twelve persona vectors sharing a common component, so base cosines sit around 0.8."""
    rng = np.random.default_rng(seed)
    return 2.0 * rng.normal(size=DIM) + rng.normal(size=(len(PERSONAS), DIM))


def collapse_towards(vectors, direction, strength, seed=1, noise=0.05):
    """Every persona moves along one shared direction (EM-style collapse), plus a little noise."""
    rng = np.random.default_rng(seed)
    return vectors + strength * direction + noise * rng.normal(size=vectors.shape)


def test_cosine_matrix_and_its_66_off_diagonal_pairs():
    vectors = np.eye(12, DIM) * 3.0
    cosines = geometry.cosine_matrix(vectors)
    np.testing.assert_allclose(np.diag(cosines), 1.0)
    assert geometry.off_diagonal(cosines).shape == (66,)
    assert geometry.mean_off_diagonal_cosine(vectors) == pytest.approx(0.0)


def test_centring_removes_a_common_component_that_raw_cosines_are_blind_to():
    rng = np.random.default_rng(0)
    pattern = rng.normal(size=(6, DIM))
    pattern[1] = pattern[0] + 0.1 * rng.normal(size=DIM)  # personas 0 and 1 nearly coincide
    vectors = 100.0 * rng.normal(size=DIM) + pattern  # a huge shared component, as in a real model's centroids
    raw = geometry.cosine_matrix(vectors)
    centred = geometry.centred_cosine_matrix(vectors)
    assert geometry.off_diagonal(raw).min() > 0.99  # raw: everything looks alike
    np.testing.assert_allclose(centred, geometry.centred_cosine_matrix(pattern))  # the shared part is gone
    assert centred[0, 1] > 0.7 and np.abs(np.delete(centred[0], [0, 1])).max() < 0.7
    # centred vectors sum to zero, so equal-norm ones have mean off-diagonal cosine exactly -1/(p-1)
    simplex = np.eye(6, DIM)
    assert geometry.off_diagonal(geometry.centred_cosine_matrix(simplex)).mean() == pytest.approx(-1 / 5)


def test_m1_finds_a_planted_collapse():
    base = base_vectors()
    em = collapse_towards(base, np.random.default_rng(2).normal(size=DIM), strength=1.5)
    result = geometry.m1_collapse(base, em, PERSONAS, n_iter=10_000, rng=3)
    # the null swaps whole personas: 12 units, all 2**12 patterns enumerated
    assert result.n_units == 12 and result.n_iter == 4096 and result.exact
    assert result.condition_value > result.reference_value
    assert result.delta == pytest.approx(result.condition_value - result.reference_value)
    assert 2 / 4096 <= result.p_value < 0.005  # exact: a multiple of 1/4096, at least the observed pattern's 2/4096


def swapped_m1_change(reference, condition, signs):
    """M1(condition') - M1(reference') with persona i's two vectors swapped where signs[i] = -1, computed directly."""
    swap = (np.asarray(signs) < 0)[:, None]
    return (geometry.mean_off_diagonal_cosine(np.where(swap, reference, condition))
            - geometry.mean_off_diagonal_cosine(np.where(swap, condition, reference)))


def test_m1_persona_swaps_are_a_sign_flip_test_of_the_persona_contributions():
    """Every one of the 4,096 persona swap patterns, computed directly, equals mean(signs * contributions)."""
    base = base_vectors(seed=20)
    em = collapse_towards(base, np.random.default_rng(21).normal(size=DIM), strength=0.7, noise=0.3)
    contributions = geometry.m1_persona_contributions(base, em)
    assert contributions.shape == (12,)
    assert contributions.mean() == pytest.approx(geometry.m1_pair_differences(base, em).mean())
    signs = stats.all_sign_patterns(12)
    direct = np.array([swapped_m1_change(base, em, s) for s in signs])
    np.testing.assert_allclose(direct, signs @ contributions / 12, atol=1e-12)


def test_m1_persona_level_null_holds_its_size_where_the_records_pair_level_null_does_not():
    """No EM effect: each persona's two vectors are exchangeable draws around its own centre. A persona's noise is in
    11 of the 66 pairs, so the pair differences are dependent; sign-flipping them as if independent (the record's
    test) rejects about 40% of the time at alpha 0.05, the persona-level test about 5%."""
    rng = np.random.default_rng(22)
    persona_level, pair_level = [], []
    for sim in range(300):
        centres = 3.0 * rng.normal(size=32) + rng.normal(size=(12, 32))
        reference, condition = (centres + 0.3 * rng.normal(size=(12, 32)) for _ in range(2))
        persona_level.append(geometry.m1_collapse(reference, condition, PERSONAS).p_value)
        pair_level.append(stats.paired_permutation_test(
            geometry.m1_pair_differences(reference, condition), n_iter=2000, rng=sim).p_value)
    assert 0.02 <= np.mean(np.array(persona_level) < 0.05) <= 0.09
    assert np.mean(np.array(pair_level) < 0.05) > 0.25


# ------------------------------------------------------------------------------ a shared shift cannot fake it


def shared_offset_checkpoints(seed=30):
    """Base persona vectors with raw cosines ~0.9 and centred ones spread out, and a 'fine-tuned' checkpoint that
    only adds one offset to every persona (the issue's synthetic case)."""
    rng = np.random.default_rng(seed)
    base = 3.0 * rng.normal(size=DIM) + rng.normal(size=(len(PERSONAS), DIM))
    return base, base + 30.0 * rng.normal(size=DIM)


def per_question(centroids, n_questions=24, noise=0.3, seed=35):
    """``(persona, question, d)`` activations around ``centroids`` (the same question noise in every call with a seed)."""
    rng = np.random.default_rng(seed)
    return centroids[:, None] + noise * rng.normal(size=(len(centroids), n_questions, centroids.shape[1]))


def test_a_shared_shift_only_moves_raw_m1_and_m2_and_nothing_shift_invariant_and_the_shift_is_measured():
    """Known answer: a fine-tuning that only adds one offset to every persona. Raw M1 and M2 fire; the dispersion is
    unchanged (log ratio exactly 0, p = 1), the centred M2 axis does not exist, and the mean shift is measured."""
    base, shifted = shared_offset_checkpoints()
    raw_m1 = geometry.m1_collapse(base, shifted, PERSONAS)
    assert raw_m1.reference_value == pytest.approx(0.9, abs=0.03) and raw_m1.condition_value > 0.99
    assert raw_m1.p_value < 0.001  # "significant collapse"
    axis = geometry.e0_anchored_em_axis(base, shifted, PERSONAS)  # the offset itself
    raw_m2 = geometry.m2_em_axis_projection(base, shifted, PERSONAS, axis)
    assert raw_m2.condition_value > 0.95 and raw_m2.delta > 0.5 and raw_m2.p_value < 0.01

    dispersion = geometry.m1_dispersion_change(base, shifted, PERSONAS)
    assert dispersion.delta == pytest.approx(0.0, abs=1e-12) and dispersion.p_value > 0.5  # every swap: the same sets
    assistant = PERSONAS.index("assistant")
    with pytest.raises(geometry.UndefinedAxisError):  # the assistant moved only as every persona did
        geometry.e0_anchored_em_axis(geometry.centre_excluding(base, assistant),
                                     geometry.centre_excluding(shifted, assistant), PERSONAS)
    shift = geometry.mean_shift(base, shifted)
    assert shift["norm"] > 10 * shift["reference_spread"]
    valid = np.ones((len(PERSONAS), 24), bool)
    measured = geometry.shift_test(per_question(base), per_question(shifted, seed=36), valid, n_iter=2000, rng=0)
    assert measured.p_value < 0.001


def test_a_pure_contraction_with_no_shift_is_seen_by_the_dispersion_and_no_shift_is_measured():
    """Known answer: every persona pulled 40% towards the personas' mean, nothing shifted. Dispersion falls by exactly
    0.6**2 (log ratio 2 log 0.6) at the test's floor; the shift is zero and its test stays silent; the mean
    off-diagonal cosine of centred vectors does not see it (pinned near -1/(p-1) before and after)."""
    rng = np.random.default_rng(37)
    base = 3.0 * rng.normal(size=DIM) + rng.normal(size=(len(PERSONAS), DIM))
    mean = base.mean(axis=0)
    contracted = mean + 0.6 * (base - mean)
    dispersion = geometry.m1_dispersion_change(base, contracted, PERSONAS)
    assert dispersion.delta == pytest.approx(2 * np.log(0.6))
    assert dispersion.exact and dispersion.p_value == pytest.approx(1 / 4096)  # one-sided floor of 2**12 swaps
    assert geometry.m1_collapse(base, contracted, PERSONAS).p_value < 0.001  # raw M1 sees it too
    assert geometry.mean_shift(base, contracted)["norm"] == pytest.approx(0.0, abs=1e-9)
    valid = np.ones((len(PERSONAS), 24), bool)
    no_shift = geometry.shift_test(per_question(base, seed=1), per_question(contracted, seed=2), valid, n_iter=2000, rng=0)
    assert no_shift.p_value > 0.05
    pinned = -1 / (len(PERSONAS) - 1)
    for vectors in (base, contracted):
        assert geometry.off_diagonal(geometry.centred_cosine_matrix(vectors)).mean() == pytest.approx(pinned, abs=0.03)


def test_when_only_the_assistant_moves_m2_on_the_non_assistant_mean_stays_put_where_centring_on_all_fires():
    """Known answer: E0 moves the assistant alone. Raw M2 and M2 centred on the non-assistant personas' mean do not
    change at all; centring on a mean that includes the assistant moves every other persona along the axis and
    fires (the control that shows why the assistant is excluded)."""
    rng = np.random.default_rng(38)
    base = 3.0 * rng.normal(size=DIM) + rng.normal(size=(len(PERSONAS), DIM))
    e0 = base.copy()
    e0[PERSONAS.index("assistant")] += 3.0 * rng.normal(size=DIM)
    vectors = {("A", 1): {"base": base, "E0": e0, "benign": base}}

    def m2(cells):
        return next(c.test for c in cells if (c.metric, c.family) == ("M2", "em_vs_base"))

    assert m2(geometry.geometry_family(vectors, PERSONAS, em_conditions=["E0"], n_iter=4096)).delta == pytest.approx(0.0, abs=1e-12)
    shift_invariant = m2(geometry.geometry_family(vectors, PERSONAS, em_conditions=["E0"], n_iter=4096, geometry="shift_invariant"))
    assert shift_invariant.delta == pytest.approx(0.0, abs=1e-12) and shift_invariant.p_value == 1.0
    centred_on_all = {c: geometry.centre(v) for c, v in vectors[("A", 1)].items()}
    axis = geometry.e0_anchored_em_axis(centred_on_all["base"], centred_on_all["E0"], PERSONAS)
    old = geometry.m2_em_axis_projection(centred_on_all["base"], centred_on_all["E0"], PERSONAS, axis)
    assert old.delta > 0.05 and old.p_value < 0.01


def test_the_dispersion_test_holds_its_size_when_the_checkpoints_differ_by_a_shift():
    """No change but a shared offset and noise: the persona-swap test of the centred vectors rejects at most at its
    nominal rate (it is slightly conservative: centring each checkpoint on its own noisy mean)."""
    rng = np.random.default_rng(39)
    rejections = 0
    for _ in range(200):
        centres = 3.0 * rng.normal(size=32) + rng.normal(size=(12, 32))
        reference = centres + 0.3 * rng.normal(size=(12, 32))
        condition = centres + 0.3 * rng.normal(size=(12, 32)) + 5.0 * rng.normal(size=32)
        rejections += geometry.m1_dispersion_change(reference, condition, PERSONAS, alternative="two-sided").p_value < 0.05
    assert rejections <= scipy_stats.binom.interval(0.99, 200, 0.05)[1]


def test_shift_invariant_geometry_sees_a_real_change_whatever_offset_rides_on_it():
    """E0 moves the assistant on its own and pulls two personas together; adding a large shared offset on top changes
    every raw number and no shift-invariant one."""
    base, _ = shared_offset_checkpoints(seed=31)
    rng = np.random.default_rng(32)
    e0 = base.copy()
    e0[PERSONAS.index("assistant")] += 2.0 * rng.normal(size=DIM)
    e0[PERSONAS.index("villain")] = 0.5 * (e0[PERSONAS.index("villain")] + e0[PERSONAS.index("confab")])
    with_offset = e0 + 30.0 * rng.normal(size=DIM)

    def primary(e0_vectors, geometry_kind):
        cells = geometry.geometry_family({("A", 1): {"base": base, "E0": e0_vectors, "benign": base}}, PERSONAS,
                                         em_conditions=["E0"], n_iter=500, geometry=geometry_kind)
        return {c.metric: c.test.delta for c in cells if c.family == "em_vs_base"}

    raw, raw_with_offset = primary(e0, "raw"), primary(with_offset, "raw")
    invariant, invariant_with_offset = primary(e0, "shift_invariant"), primary(with_offset, "shift_invariant")
    assert all(abs(raw[m] - raw_with_offset[m]) > 1e-3 for m in ("M1", "M2"))
    assert invariant == pytest.approx(invariant_with_offset, abs=1e-9)
    assert abs(invariant["M1"]) > 1e-3 and abs(invariant["M2"]) > 1e-3  # it did see E0's change


def test_an_undefined_centred_axis_gives_m2_cells_that_cannot_fire():
    base, shifted = shared_offset_checkpoints(seed=33)
    cells = geometry.geometry_family({("A", 1): {"base": base, "E0": shifted, "benign": base}}, PERSONAS,
                                     em_conditions=["E0"], n_iter=500, geometry="shift_invariant")
    m2 = [c for c in cells if c.metric == "M2"]
    assert len(m2) == 3 and all(np.isnan(c.test.delta) and c.test.p_value == 1.0 and c.notes["axis_undefined"] for c in m2)


def test_m1_finds_nothing_when_the_vectors_only_jitter():
    base = base_vectors()
    jittered = base + 0.05 * np.random.default_rng(4).normal(size=base.shape)
    assert geometry.m1_collapse(base, jittered, PERSONAS, rng=5).p_value > 0.05


def test_m1_refuses_vectors_that_do_not_match_the_persona_list():
    with pytest.raises(ValueError, match="one vector per persona"):
        geometry.m1_collapse(base_vectors()[:11], base_vectors()[:11], PERSONAS)


def test_m2_axis_is_the_e0_assistant_shift():
    base = base_vectors()
    e0 = base.copy()
    e0[PERSONAS.index("assistant")] += np.arange(DIM)
    axis = geometry.e0_anchored_em_axis(base, e0, PERSONAS)
    np.testing.assert_allclose(axis, np.arange(DIM) / np.linalg.norm(np.arange(DIM)))


def test_m2_finds_non_assistant_personas_moving_along_the_e0_axis_exactly():
    base = base_vectors()
    direction = np.random.default_rng(6).normal(size=DIM)
    e0 = collapse_towards(base, direction, strength=1.5)
    axis = geometry.e0_anchored_em_axis(base, e0, PERSONAS)
    result = geometry.m2_em_axis_projection(base, e0, PERSONAS, axis, alternative="greater")
    assert result.n_units == 11  # the assistant is left out
    assert result.exact and result.n_iter == 2**11
    assert result.delta > 0 and result.p_value == pytest.approx(1 / 2048)


def test_m2_ignores_the_assistant_itself():
    base = base_vectors()
    only_assistant_moved = base.copy()
    only_assistant_moved[PERSONAS.index("assistant")] += 5 * np.random.default_rng(7).normal(size=DIM)
    axis = geometry.e0_anchored_em_axis(base, only_assistant_moved, PERSONAS)
    result = geometry.m2_em_axis_projection(base, only_assistant_moved, PERSONAS, axis)
    assert result.delta == 0.0 and result.p_value == 1.0


def test_m2_robustness_axis_pc1_recovers_a_shared_shift():
    base = base_vectors()
    direction = np.random.default_rng(8).normal(size=DIM)
    shifted = collapse_towards(base, direction, strength=2.0)
    pc1 = geometry.shift_pc1_axis(base, shifted)
    assert abs(pc1 @ direction) / np.linalg.norm(direction) > 0.99
    top_right_singular_vector = np.linalg.svd(shifted - base, full_matrices=False)[2][0]
    assert abs(pc1 @ top_right_singular_vector) == pytest.approx(1.0)


def test_three_way_contrast_separates_em_from_a_weaker_benign_shift():
    base = base_vectors()
    direction = np.random.default_rng(9).normal(size=DIM)
    em = collapse_towards(base, direction, strength=2.0, seed=10)
    benign = collapse_towards(base, direction, strength=0.5, seed=11)
    m1 = geometry.m1_three_way(base, em, benign, PERSONAS, rng=12)
    assert m1.alternative == "greater"
    assert m1.em_shift > m1.benign_shift > 0 and m1.p_value < 0.001
    assert m1.em_minus_benign > 0

    axis = geometry.e0_anchored_em_axis(base, em, PERSONAS)
    m2 = geometry.m2_three_way(base, em, benign, PERSONAS, axis)
    assert m2.em_shift > m2.benign_shift and m2.p_value < 0.01


def test_three_way_contrast_does_not_fire_when_em_and_benign_shift_alike():
    base = base_vectors()
    direction = np.random.default_rng(13).normal(size=DIM)
    em = collapse_towards(base, direction, strength=1.0, seed=14)
    benign = collapse_towards(base, direction, strength=1.0, seed=15)
    assert geometry.m1_three_way(base, em, benign, PERSONAS, rng=16).p_value > 0.05


# ---------------------------------------------------------------------------- bootstrap over questions

CHECKPOINTS = ["base", "E0", "benign"]


def population(seed=40):
    """(checkpoint, persona, d) true centroids: E0 moves the assistant and pulls the villain towards the confab."""
    rng = np.random.default_rng(seed)
    base = 2.0 * rng.normal(size=16) + rng.normal(size=(len(PERSONAS), 16))
    e0 = base + 1.0 * rng.normal(size=16)
    e0[PERSONAS.index("assistant")] += 1.5 * rng.normal(size=16)
    e0[PERSONAS.index("villain")] = 0.4 * e0[PERSONAS.index("villain")] + 0.6 * e0[PERSONAS.index("confab")]
    return np.stack([base, e0, base + 0.1 * rng.normal(size=base.shape)])


def observed_changes(centroids: np.ndarray) -> dict:
    """The M1/M2 changes (E0 vs base), raw and centred, computed by the point-estimate functions."""
    base, e0 = centroids[0], centroids[1]
    assistant = PERSONAS.index("assistant")
    centred_base, centred_e0 = geometry.centre_excluding(base, assistant), geometry.centre_excluding(e0, assistant)
    return {
        ("M1", "raw"): geometry.m1_collapse(base, e0, PERSONAS, n_iter=10).delta,
        ("M2", "raw"): geometry.m2_em_axis_projection(base, e0, PERSONAS, geometry.e0_anchored_em_axis(base, e0, PERSONAS), n_iter=10).delta,
        ("M1", "shift_invariant"): geometry.m1_dispersion_change(base, e0, PERSONAS, n_iter=10).delta,
        ("M2", "shift_invariant"): geometry.m2_em_axis_projection(
            centred_base, centred_e0, PERSONAS, geometry.e0_anchored_em_axis(centred_base, centred_e0, PERSONAS), n_iter=10).delta,
    }


def test_resampled_centroids_weight_each_valid_question_by_how_often_it_was_drawn():
    rng = np.random.default_rng(41)
    per_question = rng.normal(size=(3, len(PERSONAS), 5, 4))
    valid = np.ones((len(PERSONAS), 5), bool)
    valid[2, [0, 1]] = False  # a persona whose replies to q0 and q1 were empty
    counts = np.array([[1, 1, 1, 1, 1], [2, 0, 0, 3, 0], [1, 1, 0, 0, 0]])
    got = geometry.resampled_centroids(per_question, valid, counts)
    np.testing.assert_allclose(got[0, :, 0], per_question[:, 0].mean(axis=1))
    np.testing.assert_allclose(got[0, :, 2], per_question[:, 2, 2:].mean(axis=1))
    np.testing.assert_allclose(got[1, :, 0], (2 * per_question[:, 0, 0] + 3 * per_question[:, 0, 3]) / 5)
    np.testing.assert_allclose(got[1, :, 2], per_question[:, 2, 3])
    assert np.isnan(got[2, :, 2]).all() and not np.isnan(got[2, :, 0]).any()  # q0 and q1 only: none valid for it


def test_bootstrap_without_question_noise_is_a_point_at_the_observed_change():
    centroids = population()
    per_question = np.repeat(centroids[:, :, None], 6, axis=2)  # every question gives the same activation
    replicates = geometry.bootstrap_deltas(per_question, np.ones((len(PERSONAS), 6), bool), CHECKPOINTS, PERSONAS,
                                           [("E0", "base")], n_boot=20, rng=0)
    for (metric, kind), expected in observed_changes(centroids).items():
        np.testing.assert_allclose(replicates[(metric, kind, "E0", "base")], expected, atol=1e-12)


def test_bootstrap_cis_over_questions_cover_the_true_changes_about_95_percent_of_the_time():
    truth = observed_changes(population())
    rng = np.random.default_rng(42)
    covered = {key: [] for key in truth}
    for _ in range(120):
        per_question = population()[:, :, None] + 0.8 * rng.normal(size=(3, len(PERSONAS), 80, 16))
        replicates = geometry.bootstrap_deltas(per_question, np.ones((len(PERSONAS), 80), bool), CHECKPOINTS,
                                               PERSONAS, [("E0", "base")], n_boot=300, rng=rng)
        for (metric, kind), value in truth.items():
            low, high = stats.percentile_interval(replicates[(metric, kind, "E0", "base")], 0.95)
            covered[(metric, kind)].append(low <= value <= high)
    for key, hits in covered.items():
        assert 0.85 <= np.mean(hits) <= 0.99, key


def test_a_shared_offset_on_every_activation_of_a_checkpoint_leaves_the_shift_invariant_replicates_unchanged():
    rng = np.random.default_rng(43)
    per_question = population()[:, :, None] + 0.5 * rng.normal(size=(3, len(PERSONAS), 30, 16))
    shifted = per_question.copy()
    shifted[1] += 25.0 * rng.normal(size=16)  # E0 only adds one offset to every persona and question
    valid = np.ones((len(PERSONAS), 30), bool)
    plain, moved = (geometry.bootstrap_deltas(x, valid, CHECKPOINTS, PERSONAS, [("E0", "base"), ("E0", "benign")],
                                              n_boot=50, rng=7) for x in (per_question, shifted))
    for key in plain:
        if key[1] == "shift_invariant":
            np.testing.assert_allclose(moved[key], plain[key], atol=1e-9)
        else:
            assert np.abs(moved[key] - plain[key]).min() > 1e-3, key


# ---------------------------------------------------------------------------------------------- M3


def question_activations(separation, n_questions=30, dim=24, seed=0):
    """One activation per (persona, question): persona centres plus per-question noise."""
    rng = np.random.default_rng(seed)
    centres = separation * rng.normal(size=(len(PERSONAS), dim))
    rows = centres[None, :, :] + rng.normal(size=(n_questions, len(PERSONAS), dim))
    return rows.reshape(-1, dim)


ROW_PERSONAS = np.tile(PERSONAS, 30)
ROW_QUESTIONS = np.repeat(np.arange(30), len(PERSONAS))


def test_m3_separable_personas_score_near_perfect_and_a_collapsed_condition_scores_chance():
    activations = {
        "base": question_activations(4.0, seed=1),
        "E0": question_activations(0.0, seed=2),
        "benign": question_activations(4.0, seed=3),
    }
    result = geometry.m3_separability(
        activations, ROW_PERSONAS, ROW_QUESTIONS, n_iter=200, rng=4, n_components=12
    )
    assert result.accuracy["base"] >= 0.95 and result.accuracy["benign"] >= 0.95
    assert abs(result.accuracy["E0"] - 1 / 12) < 0.15
    assert result.p_above_chance["base"] < 0.01 and result.p_above_chance["E0"] > 0.05

    drop = result.delta("E0", "base")
    assert drop.metric == "M3" and drop.delta < -0.8 and drop.p_value < 0.01 and drop.n_iter == 200
    contrast = result.three_way("E0", benign="benign", base="base")
    assert (
        contrast.alternative == "less"
        and contrast.em_shift < contrast.benign_shift
        and contrast.p_value < 0.01
    )


def one_model_two_checkpoints(rng, n_personas, n_questions, dim, separation):
    """Two checkpoints that are draws of ONE model: the same persona centres, fresh noise per (persona, question)."""
    centres = separation * rng.normal(size=(n_personas, dim))
    return [(centres[None] + rng.normal(size=(n_questions, n_personas, dim))).reshape(-1, dim) for _ in range(2)]


def grid(n_personas, n_questions):
    return np.tile(PERSONAS[:n_personas], n_questions), np.repeat(np.arange(n_questions), n_personas)


def test_two_checkpoints_drawn_from_one_model_differ_in_m3_at_no_more_than_the_nominal_rate_under_the_swap_null():
    """Known answer: both checkpoints are draws of one model. The contrast of equal separability (whole questions
    swapped between the checkpoints, LDA refitted) rejects at most at alpha: its size holds (ties in accuracy make it
    slightly conservative)."""
    rng = np.random.default_rng(50)
    labels, questions = grid(4, 10)
    rejections = 0
    for rep in range(200):
        base, e0 = one_model_two_checkpoints(rng, 4, 10, 8, 0.6)
        m3 = geometry.m3_separability({"base": base, "E0": e0}, labels, questions, n_iter=20, rng=rep, n_components=4,
                                      contrast_iter=99, n_threads=1)
        rejections += m3.delta("E0", "base").p_value < 0.05
    assert rejections <= scipy_stats.binom.interval(0.99, 200, 0.05)[1]


def test_the_label_shuffle_contrast_rejects_two_draws_of_one_model_far_more_often_than_alpha():
    """The control that shows why the swap null is needed: "no persona information in either checkpoint" is not the
    null of two checkpoints that both separate personas, and the difference of two draws of one model is then
    "significant" far more often than 5% (the referee measured 31%)."""
    rng = np.random.default_rng(51)
    labels, questions = grid(8, 20)
    rejections = 0
    for rep in range(150):
        base, e0 = one_model_two_checkpoints(rng, 8, 20, 12, 0.5)
        m3 = geometry.m3_separability({"base": base, "E0": e0}, labels, questions, n_iter=99, rng=rep, n_components=6,
                                      n_threads=1)
        rejections += m3.delta("E0", "base", null="label_shuffle").p_value < 0.05
    assert rejections > scipy_stats.binom.interval(0.99, 150, 0.05)[1]


def test_the_swap_contrast_refits_the_same_lda_scikit_learn_fits():
    """The swap null's observed difference is scikit-learn's LDA(lsqr) accuracy difference on the joint basis."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    rng = np.random.default_rng(52)
    labels, questions = grid(6, 20)
    strong = (2.0 * rng.normal(size=(6, 30))[None] + rng.normal(size=(20, 6, 30))).reshape(-1, 30)
    weak = (0.5 * rng.normal(size=(6, 30))[None] + rng.normal(size=(20, 6, 30))).reshape(-1, 30)
    projected = stats.joint_label_free_projection([strong, weak], 8, groups=questions)
    codes = stats.encode_labels(labels)[0]

    def accuracy(rows):
        folds = stats.grouped_folds(codes, questions, 5)
        return sum(np.sum(LinearDiscriminantAnalysis(solver="lsqr").fit(rows[train], codes[train]).predict(rows[test])
                          == codes[test]) for train, test in folds) / codes.size

    result = stats.lda_swap_contrast(projected[0], projected[1], labels, questions, n_iter=200, rng=0)
    assert result.statistic == pytest.approx(accuracy(projected[1]) - accuracy(projected[0]))
    assert result.statistic < -0.2 and result.p_value < 0.01


def test_m3_sees_personas_through_large_question_offsets():
    """Each question shifts all its personas alike and dwarfs the persona signal; centring on the question
    removes it, so the 12-component projection keeps the personas (raw, it keeps the questions)."""
    rng = np.random.default_rng(5)
    question_offsets = 8.0 * rng.normal(size=(30, 24)) @ rng.normal(size=(24, 96))
    rows = question_activations(1.5, dim=96, seed=6) + np.repeat(question_offsets, len(PERSONAS), axis=0)
    options = {"n_iter": 100, "rng": 7, "n_components": 12}
    centred = geometry.m3_separability({"base": rows}, ROW_PERSONAS, ROW_QUESTIONS, **options)
    raw = geometry.m3_separability(
        {"base": rows}, ROW_PERSONAS, ROW_QUESTIONS, center_within_questions=False, **options
    )
    assert centred.accuracy["base"] > 0.9
    assert raw.accuracy["base"] < 0.3


def test_m3_refuses_folds_grouped_by_persona():
    """The record's M3 scored 0% on base: every held-out persona was missing from its training fold."""
    with pytest.raises(stats.GroupedCVError, match="no training rows"):
        geometry.m3_separability(
            {"base": question_activations(4.0)}, ROW_PERSONAS, row_questions=ROW_PERSONAS, n_iter=10
        )


# ------------------------------------------------------------------------------------------ family


def test_geometry_family_adjusts_each_family_and_finds_only_the_planted_conditions():
    layers, methods = [7, 20], ["A", "B"]
    conditions = ["E0", "E1", "E2"]
    persona_vectors, activations = {}, {}
    for index, key in enumerate((method, layer) for method in methods for layer in layers):
        base = base_vectors(seed=index)
        direction = np.random.default_rng(100 + index).normal(size=DIM)
        persona_vectors[key] = {
            "base": base,
            "benign": base + 0.05 * np.random.default_rng(200 + index).normal(size=base.shape),
            "E0": collapse_towards(base, direction, 2.0, seed=300 + index),
            "E1": collapse_towards(base, direction, 2.0, seed=400 + index),
            "E2": base + 0.05 * np.random.default_rng(500 + index).normal(size=base.shape),  # no EM effect
        }
        activations[key] = {
            name: question_activations(4.0, seed=10 * index + i)
            for i, name in enumerate(persona_vectors[key])
        }

    cells = geometry.geometry_family(
        persona_vectors,
        PERSONAS,
        em_conditions=conditions,
        activations=activations,
        row_personas=ROW_PERSONAS,
        row_questions=ROW_QUESTIONS,
        n_iter=2_000,
        n_components=12,
        m3_contrast_iter=200,
    )
    primary = [cell for cell in cells if cell.family == "em_vs_base"]
    assert len(primary) == 3 * len(methods) * len(layers) * len(conditions)
    assert {cell.family for cell in cells} == {"em_vs_base", "benign_vs_base", "em_vs_benign"}
    assert all(cell.p_holm >= cell.p_bh >= cell.test.p_value for cell in cells)

    def firing(metric, condition):
        return [c.p_bh < 0.01 for c in primary if c.metric == metric and c.condition == condition]

    for metric in ("M1", "M2"):
        assert all(firing(metric, "E0")) and all(firing(metric, "E1")) and not any(firing(metric, "E2"))
    assert not any(firing("M3", "E0"))  # separability was left intact everywhere
    m3_cell = next(c for c in primary if c.metric == "M3").as_dict()
    assert m3_cell["chance_level"] == pytest.approx(1 / 12) and m3_cell["reference_p_above_chance"] < 0.01
    row = cells[0].as_dict()
    assert {
        "family",
        "metric",
        "method",
        "layer",
        "condition",
        "delta",
        "p_value",
        "p_bh",
        "p_holm",
        "n_iter",
    } <= set(row)
