"""shared.geometry: #205's M1/M2/M3 on synthetic persona vectors with planted (and absent) EM effects."""

from __future__ import annotations

import numpy as np
import pytest

from shared import geometry, stats

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
    assert result.n_units == 66 and result.n_iter == 10_000 and not result.exact
    assert result.condition_value > result.reference_value
    assert result.delta == pytest.approx(result.condition_value - result.reference_value)
    assert result.p_value < 0.001


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
