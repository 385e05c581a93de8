"""Persona-vector geometry of #205: cosine matrices and the pre-registered metrics M1, M2 and M3.

For each (extraction method, layer, checkpoint) the experiment has one vector per eval persona (12 personas;
the persona's mean activation) and, for M3, one activation per (persona, question). The metrics compare a
checkpoint against a reference (base Qwen, or benign-SFT for the three-way contrast):

* M1, cos-sim collapse: mean off-diagonal ``cos(persona_i, persona_j)`` over the 66 pairs of 12 personas;
  paired permutation test of condition vs reference that swaps whole personas between the two checkpoints
  (each persona is in 11 of the 66 pairs, so the pairs are not exchangeable units; the record permuted pairs).
  The swap statistic is linear in the swap signs (``m1_persona_contributions``), so all 2**12 = 4,096 swap
  patterns are enumerated at n_iter = 10,000 and the test is exact.
* M2, EM-axis projection: axis = ``assistant_post_E0 - assistant_base`` (anchored on E0, the canonical EM,
  and used unchanged for E1-E4); statistic = mean over the 11 non-assistant personas of
  ``|cos(persona, axis)|``; paired permutation test over those 11 personas (2**11 = 2,048 sign patterns, so
  the test is exact). Robustness axes: each condition's own assistant delta, and PC-1 of its persona shifts.
* M3, linear separability: held-out LDA accuracy with a shared GroupKFold (by question); every checkpoint's rows,
  centred within their question, are projected on ONE label-free basis of 16 principal components of all of them
  (``m3_separability``). A checkpoint is above chance against the joint-shuffle null (``lda_joint_shuffle_test``);
  the change between two checkpoints is tested against a null of equal separability, whole questions' rows swapped
  between the two and the LDA refitted per draw (``stats.lda_swap_contrast``): the label-shuffle null, "no persona
  information in either", made two draws of one model differ "significantly" far more often than alpha.

Multiple testing (``geometry_family``): BH-FDR is primary across the 150 EM-vs-base cells (3 metrics x 2
methods x 5 layers x 5 EM conditions) with Holm alongside; benign-SFT vs base and EM vs benign-SFT (the
three-way contrast) are families of their own.

Shift-invariant geometry (``geometry="shift_invariant"``): a fine-tuning that adds one offset to every persona's
vector raises raw M1 and M2 towards 1 (a real model's persona centroids share a large common component: raw cosines
of SmolLM2-135M's sit near 0.998) without changing how the personas relate. The shift-invariant family replaces
them by statistics such an offset cannot move and that are not pinned:

* M1: the change in the between-persona dispersion, ``log(D_condition / D_reference)`` with ``D`` the mean squared
  distance of a checkpoint's persona vectors from their mean (``dispersion``); negative = the personas contracted
  towards each other. Persona-swap test of the checkpoints' centred vectors (``m1_dispersion_change``). (The mean
  off-diagonal cosine of centred vectors is pinned near -1/(p-1) whatever the data and is no test.)
* M2: vectors centred on the mean of the NON-assistant personas of their own checkpoint (``centre_excluding``), so
  an assistant that moves on its own leaves every other centred vector where it was; the axis is the assistant's
  centred E0 shift.
* M3 is the same cells in both families (centred within each question).

Beside them, the mean shift itself (``mean_shift``, and ``shift_test``: a sign-flip test over questions of the
persona-mean difference), so a report says "may be a shared shift" only where a shift is measured.
``bootstrap_deltas`` gives CIs over questions for the M1/M2 differences of both families.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np

from shared.analysis import stats

ASSISTANT = "assistant"

# The direction in which each metric moves when EM collapses persona geometry (pre-registered):
# cosines rise (M1), personas align with the EM axis (M2), separability drops (M3).
PREREGISTERED_DIRECTION: dict[str, stats.Alternative] = {"M1": "greater", "M2": "greater", "M3": "less"}
# ... and on shift-invariant geometry, where M1 is the change in dispersion: a collapse makes it smaller
DIRECTIONS: dict[str, dict[str, stats.Alternative]] = {
    "raw": PREREGISTERED_DIRECTION,
    "shift_invariant": {"M1": "less", "M2": "greater", "M3": "less"},
}
STATISTICS: dict[str, dict[str, str]] = {
    "raw": {"M1": "mean off-diagonal cosine of the persona vectors",
            "M2": "mean |cos| of the non-assistant personas to the E0 axis",
            "M3": "held-out LDA accuracy"},
    "shift_invariant": {"M1": "log ratio of the between-persona dispersion (mean squared distance from the persona mean)",
                        "M2": "mean |cos| to the E0 axis, vectors centred on the non-assistant personas' mean",
                        "M3": "held-out LDA accuracy (rows centred within each question)"},
}


# ------------------------------------------------------------------------------------------ cosine geometry


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row is an extraction failure and raises)."""
    vectors = np.asarray(vectors, dtype=float)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a persona vector is all zeros; its cosine is undefined")
    return vectors / norms


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """``(..., p, p)`` cosine similarities between the rows of ``vectors`` (``(..., p, d)``, one row per persona)."""
    unit = unit_rows(vectors)
    return unit @ np.swapaxes(unit, -1, -2)


def centred_cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """Cosines after subtracting the mean persona vector of the same checkpoint.

    A real model's persona centroids share a large common component (raw cosines of SmolLM2-135M's centroids sit
    near 0.998), which hides the pattern between personas; centring removes it. The centred vectors sum to zero,
    so their mean off-diagonal cosine is pinned near -1/(p-1) whatever the geometry: read the pattern, not the mean.
    """
    vectors = np.asarray(vectors, dtype=float)
    return cosine_matrix(centre(vectors))


def centre(vectors: np.ndarray) -> np.ndarray:
    """Each persona vector minus the mean persona vector of the same checkpoint (rows are personas)."""
    vectors = np.asarray(vectors, dtype=float)
    return vectors - vectors.mean(axis=-2, keepdims=True)


def centre_excluding(vectors: np.ndarray, excluded: int) -> np.ndarray:
    """Each persona vector minus the mean of the OTHER personas' vectors of the same checkpoint (all but row
    ``excluded``). Centred M2 uses it with the assistant excluded: where only the assistant moves, the mean does not,
    and no other centred vector moves along the assistant's shift."""
    vectors = np.asarray(vectors, dtype=float)
    keep = np.arange(vectors.shape[-2]) != excluded
    return vectors - vectors[..., keep, :].mean(axis=-2, keepdims=True)


def dispersion(vectors: np.ndarray) -> np.ndarray:
    """Between-persona dispersion of ``(..., p, d)`` persona vectors: the mean squared distance from their mean.

    A shared offset leaves it unchanged; a contraction of every persona towards the mean by a factor f multiplies it
    by f**2. It is in the activations' units, so a fine-tuning that rescales every activation changes it too.
    """
    return np.square(centre(vectors)).sum(axis=-1).mean(axis=-1)


def mean_shift(reference_vectors: np.ndarray, condition_vectors: np.ndarray) -> dict[str, float]:
    """How far the personas' mean moved, beside how spread they were: ``norm`` of the mean shift, the reference's
    dispersion as a distance (``reference_spread`` = sqrt of ``dispersion``) and their ratio."""
    shift = np.asarray(condition_vectors, dtype=float).mean(axis=0) - np.asarray(reference_vectors, dtype=float).mean(axis=0)
    spread = float(np.sqrt(dispersion(reference_vectors)))
    norm = float(np.linalg.norm(shift))
    return {"norm": norm, "reference_spread": spread, "ratio": norm / spread if spread > 0 else float("nan")}


def shift_test(
    reference_rows: np.ndarray, condition_rows: np.ndarray, valid: np.ndarray, *, n_iter: int = 10_000,
    rng: stats.RngLike = None,
) -> stats.PermutationResult:
    """Is there a shared shift at all? ``*_rows`` are ``(persona, question, d)`` activations of the same prompts,
    ``valid`` ``(persona, question)``. Per question, the mean over its valid personas of condition minus reference;
    sign-flip test over the questions of the norm of their mean (``stats.vector_sign_flip_test``)."""
    valid = np.asarray(valid, bool)
    keep = valid.any(axis=0)
    weights = valid[:, keep] / valid[:, keep].sum(axis=0, keepdims=True)
    differences = np.einsum("pq,pqd->qd", weights, np.asarray(condition_rows, float)[:, keep] - np.asarray(reference_rows, float)[:, keep])
    return stats.vector_sign_flip_test(differences, n_iter=n_iter, rng=rng)


def off_diagonal(matrix: np.ndarray) -> np.ndarray:
    """The strictly upper-triangular entries (pair i < j, row-major) of the last two axes: 66 values for 12 personas."""
    rows, cols = np.triu_indices(matrix.shape[-1], k=1)
    return matrix[..., rows, cols]


def mean_off_diagonal_cosines(vectors: np.ndarray) -> np.ndarray:
    """M1's statistic of every ``(p, d)`` set of persona vectors in ``(..., p, d)``."""
    return off_diagonal(cosine_matrix(vectors)).mean(axis=-1)


def mean_off_diagonal_cosine(vectors: np.ndarray) -> float:
    """M1's statistic for one checkpoint: the mean cosine over all distinct persona pairs."""
    return float(mean_off_diagonal_cosines(vectors))


def _check_vectors(personas: Sequence[str], *arrays: np.ndarray) -> list[str]:
    names = list(personas)
    if len(set(names)) != len(names):
        raise ValueError("persona names must be distinct")
    for array in arrays:
        if np.ndim(array) != 2 or len(array) != len(names):
            raise ValueError(
                f"expected one vector per persona ({len(names)} rows), got shape {np.shape(array)}"
            )
    if len({np.shape(a)[1] for a in arrays}) > 1:
        raise ValueError("persona vectors of the compared checkpoints differ in dimension")
    return names


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class MetricTest:
    """One metric compared between a condition and its reference.

    ``delta = condition_value - reference_value`` is the tested statistic; ``n_units`` is what the
    permutation runs over (66 persona pairs for M1, 11 personas for M2, the label draws' rows for M3).
    """

    metric: str
    reference_value: float
    condition_value: float
    delta: float
    p_value: float
    n_iter: int
    exact: bool
    n_units: int
    alternative: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ThreeWayContrast:
    """EM vs benign-SFT on one metric: is the EM shift from base larger than the benign-SFT shift?

    ``em_minus_benign = em_shift - benign_shift = EM value - benign value``; ``p_value`` tests it in the
    metric's pre-registered direction (``PREREGISTERED_DIRECTION``), paired as the metric itself is.
    """

    metric: str
    em_shift: float
    benign_shift: float
    em_minus_benign: float
    p_value: float
    n_iter: int
    alternative: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _three_way(
    em_vs_base: MetricTest, benign_vs_base: MetricTest, em_vs_benign: MetricTest
) -> ThreeWayContrast:
    return ThreeWayContrast(
        metric=em_vs_base.metric,
        em_shift=em_vs_base.delta,
        benign_shift=benign_vs_base.delta,
        em_minus_benign=em_vs_benign.delta,
        p_value=em_vs_benign.p_value,
        n_iter=em_vs_benign.n_iter,
        alternative=em_vs_benign.alternative,
    )


# --------------------------------------------------------------------------------------------------- M1


def m1_pair_differences(reference_vectors: np.ndarray, condition_vectors: np.ndarray) -> np.ndarray:
    """Per-pair change in cosine, condition minus reference, over the off-diagonal pairs (66 for 12)."""
    return off_diagonal(cosine_matrix(condition_vectors)) - off_diagonal(cosine_matrix(reference_vectors))


def m1_persona_contributions(reference_vectors: np.ndarray, condition_vectors: np.ndarray) -> np.ndarray:
    """``x`` (one value per persona) whose sign-flip test is M1's persona-level permutation test.

    Swapping persona i's two vectors between the checkpoints (sign s_i = -1) changes the pairs it is in: a pair of
    two swapped personas flips the sign of its cosine change, a pair of one swapped and one kept compares
    ``cos(condition_i, reference_j)`` with ``cos(reference_i, condition_j)``. Summed over the pairs, the M1 change
    under any swap pattern s is exactly ``mean(s * x)`` with ``x_i = p/(2 P) sum_j (D_ij + E_ij)``, where
    ``D_ij = cos(c_i, c_j) - cos(r_i, r_j)``, ``E_ij = cos(c_i, r_j) - cos(r_i, c_j)`` and P the number of pairs;
    ``mean(x)`` is the observed M1 change (E is antisymmetric). So ``stats.paired_permutation_test(x)`` is the
    persona-level test, with every pattern enumerated when 2**p <= n_iter.
    """
    reference, condition = np.asarray(reference_vectors, dtype=float), np.asarray(condition_vectors, dtype=float)
    p = reference.shape[-2]
    unit = unit_rows(np.concatenate([reference, condition], axis=-2))
    gram = unit @ np.swapaxes(unit, -1, -2)
    d = gram[..., p:, p:] - gram[..., :p, :p]
    cross = gram[..., p:, :p]  # cos(condition_i, reference_j)
    e = cross - np.swapaxes(cross, -1, -2)
    n_pairs = p * (p - 1) / 2
    diagonal = np.eye(p, dtype=bool)
    return p * np.where(diagonal, 0.0, d + e).sum(axis=-1) / (2 * n_pairs)


def m1_collapse(
    reference_vectors: np.ndarray,
    condition_vectors: np.ndarray,
    personas: Sequence[str],
    *,
    n_iter: int = 10_000,
    rng: stats.RngLike = None,
    alternative: stats.Alternative = "two-sided",
) -> MetricTest:
    """M1: change in mean off-diagonal cosine, permutation test that swaps whole personas between the two
    checkpoints (``m1_persona_contributions``; ``n_units`` is the number of personas).

    Rows of both arrays are the personas in ``personas`` order. Two-sided by default (the pre-registered
    firing rule asks for delta > 0 and consistency of direction, so the sign is read off ``delta``).
    """
    _check_vectors(personas, reference_vectors, condition_vectors)
    differences = m1_persona_contributions(reference_vectors, condition_vectors)
    result = stats.paired_permutation_test(differences, alternative=alternative, n_iter=n_iter, rng=rng)
    return MetricTest(
        metric="M1",
        reference_value=mean_off_diagonal_cosine(reference_vectors),
        condition_value=mean_off_diagonal_cosine(condition_vectors),
        delta=float(result.statistic),
        p_value=float(result.p_value),
        n_iter=result.n_iter,
        exact=result.exact,
        n_units=differences.size,
        alternative=alternative,
    )


def m1_three_way(
    base_vectors: np.ndarray,
    em_vectors: np.ndarray,
    benign_vectors: np.ndarray,
    personas: Sequence[str],
    *,
    n_iter: int = 10_000,
    rng: stats.RngLike = None,
) -> ThreeWayContrast:
    """M1's EM-vs-benign contrast: do EM cosines exceed benign-SFT's, pair by pair (one-sided)?"""
    generator = stats.as_generator(rng)
    em = m1_collapse(base_vectors, em_vectors, personas, n_iter=n_iter, rng=generator)
    benign = m1_collapse(base_vectors, benign_vectors, personas, n_iter=n_iter, rng=generator)
    contrast = m1_collapse(
        benign_vectors,
        em_vectors,
        personas,
        n_iter=n_iter,
        rng=generator,
        alternative=PREREGISTERED_DIRECTION["M1"],
    )
    return _three_way(em, benign, contrast)


def _dispersion_swap_null(reference_centred: np.ndarray, condition_centred: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``log D(A) - log D(B)`` for every swap pattern: A takes persona i's condition vector where ``signs[:, i] > 0``
    and its reference vector elsewhere, B the others. From the Gram matrix of the 2p vectors, so the dimension
    costs one product; each set is re-centred on its own mean (``dispersion``)."""
    p = reference_centred.shape[0]
    stacked = np.concatenate([reference_centred, condition_centred])
    gram = stacked @ stacked.T

    def log_dispersion(index: np.ndarray) -> np.ndarray:
        diagonal = gram[index, index].sum(axis=1)
        total = gram[index[:, :, None], index[:, None, :]].sum(axis=(1, 2))
        return np.log(np.maximum(diagonal / p - total / p**2, 1e-300))

    take_condition = (signs > 0).astype(int)
    persona = np.arange(p)[None, :]
    return log_dispersion(persona + p * take_condition) - log_dispersion(persona + p * (1 - take_condition))


def m1_dispersion_change(
    reference_vectors: np.ndarray,
    condition_vectors: np.ndarray,
    personas: Sequence[str],
    *,
    n_iter: int = 10_000,
    rng: stats.RngLike = None,
    alternative: stats.Alternative = "less",
) -> MetricTest:
    """Shift-invariant M1: ``log(D_condition / D_reference)``, the change in between-persona dispersion (negative: the
    personas contracted towards each other; log, so a contraction by f gives 2 log f whatever the scale).

    Test: swap whole personas between the two checkpoints, as raw M1's test does, but swap their vectors CENTRED on
    their own checkpoint's mean, so that a shift the checkpoints differ by is no part of the null (under "only a
    shared shift" the centred vectors are exchangeable). All 2**p patterns when that is no more than ``n_iter``.
    """
    _check_vectors(personas, reference_vectors, condition_vectors)
    reference, condition = centre(reference_vectors), centre(condition_vectors)
    n = reference.shape[0]
    size, exhaustive = stats.sign_flip_null_size(n, n_iter)
    signs = stats.all_sign_patterns(n) if exhaustive else stats.as_generator(rng).choice(np.array([-1.0, 1.0]), size=(n_iter, n))
    null = _dispersion_swap_null(reference, condition, signs)
    reference_value, condition_value = float(dispersion(reference_vectors)), float(dispersion(condition_vectors))
    observed = float(np.log(condition_value / reference_value)) if reference_value > 0 and condition_value > 0 else float("nan")
    p_value = float(stats.permutation_p_value(observed, null, alternative, exhaustive=exhaustive)) if np.isfinite(observed) else 1.0
    return MetricTest(
        metric="M1",
        reference_value=reference_value,
        condition_value=condition_value,
        delta=observed,
        p_value=p_value,
        n_iter=size,
        exact=exhaustive,
        n_units=n,
        alternative=alternative,
    )


# --------------------------------------------------------------------------------------------------- M2


class UndefinedAxisError(ValueError):
    """The assistant vector did not move (on centred geometry: it moved only as every persona did)."""


# an axis shorter than this fraction of its endpoints is rounding noise, not a direction
AXIS_RELATIVE_TOLERANCE = 1e-9


def em_axis(assistant_reference: np.ndarray, assistant_post_em: np.ndarray) -> np.ndarray:
    """Unit EM axis ``assistant_post_EM - assistant_reference`` (M2's primary axis with E0 and base)."""
    reference, post = np.asarray(assistant_reference, dtype=float), np.asarray(assistant_post_em, dtype=float)
    axis = post - reference
    norm = np.linalg.norm(axis)
    if norm <= AXIS_RELATIVE_TOLERANCE * max(np.linalg.norm(reference), np.linalg.norm(post)):
        raise UndefinedAxisError("the assistant vector did not move, so the EM axis is undefined")
    return axis / norm


def e0_anchored_em_axis(
    base_vectors: np.ndarray, e0_vectors: np.ndarray, personas: Sequence[str], *, assistant: str = ASSISTANT
) -> np.ndarray:
    """M2's primary axis: ``assistant_post_E0 - assistant_base``, one axis for every condition."""
    names = _check_vectors(personas, base_vectors, e0_vectors)
    index = _persona_index(names, assistant)
    return em_axis(np.asarray(base_vectors)[index], np.asarray(e0_vectors)[index])


def shift_pc1_axis(reference_vectors: np.ndarray, condition_vectors: np.ndarray) -> np.ndarray:
    """Robustness axis: PC-1 of the persona shifts ``condition - reference`` (all personas, not centred).

    Not centring keeps the shift the personas share, which is the EM direction this axis stands in for;
    the sign is arbitrary and irrelevant because M2 uses ``|cos|``.
    """
    shifts = np.asarray(condition_vectors, dtype=float) - np.asarray(reference_vectors, dtype=float)
    # the top right singular vector, from the (personas x personas) Gram matrix: no SVD of a 3584-wide matrix
    _, vectors = np.linalg.eigh(shifts @ shifts.T)
    axis = shifts.T @ vectors[:, -1]
    return axis / np.linalg.norm(axis)


def _persona_index(names: list[str], persona: str) -> int:
    if persona not in names:
        raise ValueError(f"persona {persona!r} is not among {names}")
    return names.index(persona)


def abs_cos_to_axis(vectors: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """``|cos(vector, axis)|`` for each row."""
    return np.abs(unit_rows(vectors) @ (np.asarray(axis, dtype=float) / np.linalg.norm(axis)))


def m2_alignments(
    reference_vectors: np.ndarray,
    condition_vectors: np.ndarray,
    personas: Sequence[str],
    axis: np.ndarray,
    *,
    assistant: str = ASSISTANT,
) -> tuple[np.ndarray, np.ndarray]:
    """``|cos(persona, axis)|`` of the non-assistant personas (11 of 12): (reference, condition)."""
    names = _check_vectors(personas, reference_vectors, condition_vectors)
    keep = np.arange(len(names)) != _persona_index(names, assistant)
    return abs_cos_to_axis(reference_vectors, axis)[keep], abs_cos_to_axis(condition_vectors, axis)[keep]


def m2_em_axis_projection(
    reference_vectors: np.ndarray,
    condition_vectors: np.ndarray,
    personas: Sequence[str],
    axis: np.ndarray,
    *,
    assistant: str = ASSISTANT,
    n_iter: int = 10_000,
    rng: stats.RngLike = None,
    alternative: stats.Alternative = "two-sided",
) -> MetricTest:
    """M2: change in mean ``|cos(persona, EM axis)|`` over the non-assistant personas, paired test.

    The assistant is left out because the E0 axis is built from the assistant itself (a tautology).
    With 11 personas all 2,048 sign patterns are enumerated, so ``exact`` is True at n_iter = 10,000.
    """
    reference_alignment, condition_alignment = m2_alignments(
        reference_vectors, condition_vectors, personas, axis, assistant=assistant
    )
    result = stats.paired_permutation_test(
        condition_alignment, reference_alignment, alternative=alternative, n_iter=n_iter, rng=rng
    )
    return MetricTest(
        metric="M2",
        reference_value=float(reference_alignment.mean()),
        condition_value=float(condition_alignment.mean()),
        delta=float(result.statistic),
        p_value=float(result.p_value),
        n_iter=result.n_iter,
        exact=result.exact,
        n_units=reference_alignment.size,
        alternative=alternative,
    )


def m2_three_way(
    base_vectors: np.ndarray,
    em_vectors: np.ndarray,
    benign_vectors: np.ndarray,
    personas: Sequence[str],
    axis: np.ndarray,
    *,
    assistant: str = ASSISTANT,
    n_iter: int = 10_000,
    rng: stats.RngLike = None,
) -> ThreeWayContrast:
    """M2's EM-vs-benign contrast on the same axis: do EM personas align more than benign-SFT's?"""
    generator = stats.as_generator(rng)
    common = {"assistant": assistant, "n_iter": n_iter, "rng": generator}
    em = m2_em_axis_projection(base_vectors, em_vectors, personas, axis, **common)
    benign = m2_em_axis_projection(base_vectors, benign_vectors, personas, axis, **common)
    contrast = m2_em_axis_projection(
        benign_vectors, em_vectors, personas, axis, alternative=PREREGISTERED_DIRECTION["M2"], **common
    )
    return _three_way(em, benign, contrast)


# ----------------------------------------------------------------------------- bootstrap over questions

GEOMETRIES = ("raw", "shift_invariant")


def resampled_centroids(
    per_question: np.ndarray, valid: np.ndarray, counts: np.ndarray, rows: list[np.ndarray] | None = None
) -> np.ndarray:
    """``(b, checkpoint, persona, d)`` float64 centroids of ``b`` question resamples.

    ``per_question`` is ``(checkpoint, persona, question, d)``; ``valid`` ``(persona, question)`` says which
    questions enter a persona's centroid (Method B's paired empty-reply filter); ``counts`` ``(b, question)`` how
    often each resample drew each question. A persona left with no valid question is NaN in that resample.
    ``rows`` (``question_rows(per_question)``) saves rearranging the activations on every call.
    """
    n_ckpt, n_personas, _, dim = per_question.shape
    rows = question_rows(per_question) if rows is None else rows
    sums = np.empty((n_personas, n_ckpt * dim, len(counts)), dtype=per_question.dtype)
    totals = np.empty((n_personas, len(counts)))
    for i in range(n_personas):
        weights = (counts * valid[i]).astype(per_question.dtype)
        np.matmul(rows[i], weights.T, out=sums[i])  # every checkpoint and resample in one product
        totals[i] = weights.sum(axis=1, dtype=float)
    centroids = np.array(sums.reshape(n_personas, n_ckpt, dim, -1).transpose(3, 1, 0, 2), dtype=float, order="C")
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids /= totals.T[:, None, :, None]
    return centroids


def question_rows(per_question: np.ndarray) -> list[np.ndarray]:
    """Per persona, its activations as ``(checkpoint * d, question)``: what ``resampled_centroids`` multiplies."""
    n_ckpt, n_personas, n_questions, dim = per_question.shape
    return [np.ascontiguousarray(per_question[:, i].transpose(0, 2, 1)).reshape(n_ckpt * dim, n_questions)
            for i in range(n_personas)]


def _double_centre(gram: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Inner products of centred vectors from those of raw ones: <x_i - m, x_j - m> over the last two axes, with m the
    mean of all the vectors, or of those where ``keep`` is True (``centre_excluding``)."""
    keep = np.ones(gram.shape[-1], bool) if keep is None else keep
    rows = gram[..., keep].mean(axis=-1, keepdims=True)  # <x_i, m>
    both = gram[..., keep, :][..., keep].mean(axis=(-2, -1), keepdims=True)  # <m, m>
    return gram - rows - np.swapaxes(rows, -1, -2) + both


def _log_dispersion(gram: np.ndarray) -> np.ndarray:
    """log of ``dispersion`` from the Gram matrix of the persona vectors (last two axes)."""
    p = gram.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.trace(gram, axis1=-2, axis2=-1) / p - gram.sum(axis=(-2, -1)) / p**2)


def _m1_m2(within: np.ndarray, to_axis: np.ndarray, axis_square: np.ndarray, ends: np.ndarray, keep: np.ndarray):
    """M1 and M2 of every checkpoint, ``(..., checkpoint)`` each, from inner products alone: ``within[..., c, i, j] =
    <v_ci, v_cj>``, ``to_axis[..., c, i] = <v_ci, axis>``, ``axis_square = |axis|^2`` and ``ends`` the squared norms of
    the axis's two end points (M2 is NaN where the axis is shorter than ``AXIS_RELATIVE_TOLERANCE`` of them)."""
    squares = np.diagonal(within, axis1=-2, axis2=-1)  # (..., c, p)
    with np.errstate(invalid="ignore", divide="ignore"):
        m1 = off_diagonal(within / np.sqrt(squares[..., :, None] * squares[..., None, :])).mean(axis=-1)
        axis_square = np.maximum(axis_square, 0.0)
        defined = np.sqrt(axis_square) > AXIS_RELATIVE_TOLERANCE * np.sqrt(ends.max(axis=-1))
        cosines = np.abs(to_axis / np.sqrt(squares * axis_square[..., None, None]))
        m2 = np.where(defined[..., None], cosines[..., keep].mean(axis=-1), np.nan)
    return m1, m2


def bootstrap_deltas(
    per_question: np.ndarray,
    valid: np.ndarray,
    checkpoints: Sequence[str],
    personas: Sequence[str],
    comparisons: Sequence[tuple[str, str]],
    *,
    base: str = "base",
    e0: str = "E0",
    assistant: str = ASSISTANT,
    n_boot: int = 1_000,
    rng: stats.RngLike = None,
    chunk: int = 100,
) -> dict[tuple[str, str, str, str], np.ndarray]:
    """Bootstrap replicates of the M1 and M2 changes over questions, raw and shift-invariant.

    Each replicate draws the questions with replacement (one draw shared by every checkpoint and persona, since
    all of them answered the same questions), rebuilds every centroid and M2's E0 axis from them, and recomputes
    the statistics. Returns ``{(metric, geometry, condition, reference): (n_boot,) changes}`` for each
    ``(condition, reference)`` in ``comparisons`` and ``geometry`` in ``GEOMETRIES``; NaN replicates are resamples on
    which the statistic is undefined.

    Cost: one matrix product per persona and chunk of resamples builds the centroids; the statistics then need only
    inner products, within each checkpoint and with four anchors (base's and E0's assistant, base's and E0's mean
    non-assistant persona), from which the centred ones follow by double centring.
    """
    names, ckpts = list(personas), list(checkpoints)
    if per_question.shape[:2] != (len(ckpts), len(names)) or np.shape(valid) != per_question.shape[1:3]:
        raise ValueError(f"per-question activations {per_question.shape} and validity {np.shape(valid)} do not match "
                         f"{len(ckpts)} checkpoints x {len(names)} personas")
    a, b0, e = _persona_index(names, assistant), ckpts.index(base), ckpts.index(e0)
    keep = np.arange(len(names)) != a
    generator = stats.as_generator(rng)
    n_questions = per_question.shape[2]
    rows = question_rows(per_question)
    raw_axis, centred_axis = np.array([-1.0, 1.0, 0.0, 0.0]), np.array([-1.0, 1.0, 1.0, -1.0])  # over the anchors
    out: dict[tuple[str, str, str, str], list[np.ndarray]] = {}
    for start in range(0, n_boot, chunk):
        counts = generator.multinomial(n_questions, np.full(n_questions, 1 / n_questions), size=min(chunk, n_boot - start))
        centroids = resampled_centroids(per_question, valid, counts, rows)  # (b, c, p, d)
        anchors = np.stack([centroids[:, b0, a], centroids[:, e, a], centroids[:, b0][:, keep].mean(axis=1),
                            centroids[:, e][:, keep].mean(axis=1)], axis=1)  # (b, 4, d), rows contiguous for the products
        within = centroids @ np.swapaxes(centroids, -1, -2)  # (b, c, p, p)
        flat = centroids.reshape(len(counts), -1, centroids.shape[-1])
        cross = (flat @ np.swapaxes(anchors, -1, -2)).reshape(*centroids.shape[:3], 4)  # (b, c, p, 4)
        gram = anchors @ np.swapaxes(anchors, -1, -2)  # (b, 4, 4)
        centred_within = _double_centre(within, keep)
        to_centred = cross @ centred_axis
        raw_m1, raw_m2 = _m1_m2(within, cross @ raw_axis, np.einsum("k,bkl,l->b", raw_axis, gram, raw_axis),
                                np.stack([within[:, b0, a, a], within[:, e, a, a]], axis=-1), keep)
        m1 = {"raw": raw_m1, "shift_invariant": _log_dispersion(within)}
        m2 = {"raw": raw_m2,
              "shift_invariant": _m1_m2(centred_within, to_centred - to_centred[..., keep].mean(axis=-1, keepdims=True),
                                        np.einsum("k,bkl,l->b", centred_axis, gram, centred_axis),
                                        np.stack([centred_within[:, b0, a, a], centred_within[:, e, a, a]], axis=-1), keep)[1]}
        for geometry in GEOMETRIES:
            for metric, per_ckpt in (("M1", m1[geometry]), ("M2", m2[geometry])):
                for condition, reference in comparisons:
                    delta = per_ckpt[:, ckpts.index(condition)] - per_ckpt[:, ckpts.index(reference)]
                    out.setdefault((metric, geometry, condition, reference), []).append(delta)
    return {key: np.concatenate(parts) for key, parts in out.items()}


# --------------------------------------------------------------------------------------------------- M3


@dataclass(frozen=True)
class M3Result:
    """Held-out LDA accuracy of every checkpoint under one shared GroupKFold and one joint-shuffle null."""

    checkpoints: tuple[str, ...]
    accuracy: dict[str, float]
    p_above_chance: dict[str, float]
    chance_level: float
    n_iter: int
    n_components: int
    n_splits: int
    test: stats.LdaShuffleTest = field(repr=False)
    rng: np.random.Generator | None = field(default=None, repr=False, compare=False)
    contrast_iter: int | None = None  # draws of the swap null (None: n_iter)

    def delta(
        self, condition: str, reference: str = "base", alternative: stats.Alternative = "two-sided",
        null: str = "swap", rng: stats.RngLike = None,
    ) -> MetricTest:
        """M3 for one condition: accuracy change vs ``reference``.

        ``null="swap"`` (the test): a null of equal separability, whole questions' rows swapped between the two
        checkpoints (``stats.lda_swap_contrast``; ``n_units`` is the number of questions). ``null="label_shuffle"``
        compares the difference with the joint-shuffle draws (persona labels shuffled in both checkpoints): a null
        of "no persona information in either", far too narrow for a difference between two checkpoints that both
        separate personas; kept to show that.
        """
        reference_index, condition_index = self._index(reference), self._index(condition)
        if null == "swap":
            result = self.test.swap_contrast(reference_index, condition_index, alternative,
                                             n_iter=self.contrast_iter or self.n_iter, rng=rng if rng is not None else self.rng)
            n_units = int(np.unique(self.test.groups).size)
        elif null == "label_shuffle":
            result = self.test.contrast(reference_index, condition_index, alternative)
            n_units = self.test.null_accuracy.shape[1]
        else:
            raise ValueError(f"null must be 'swap' or 'label_shuffle', got {null!r}")
        return MetricTest(
            metric="M3",
            reference_value=self.accuracy[reference],
            condition_value=self.accuracy[condition],
            delta=float(result.statistic),
            p_value=float(result.p_value),
            n_iter=result.n_iter,
            exact=False,
            n_units=n_units,
            alternative=alternative,
        )

    def three_way(self, em: str, benign: str = "benign", base: str = "base") -> ThreeWayContrast:
        """M3's EM-vs-benign contrast: does EM lose more separability than benign-SFT (one-sided)?"""
        return _three_way(
            self.delta(em, base),
            self.delta(benign, base),
            self.delta(em, benign, PREREGISTERED_DIRECTION["M3"]),
        )

    def _index(self, checkpoint: str) -> int:
        if checkpoint not in self.checkpoints:
            raise ValueError(f"checkpoint {checkpoint!r} is not among {list(self.checkpoints)}")
        return self.checkpoints.index(checkpoint)


def m3_separability(
    activations: Mapping[str, np.ndarray],
    row_personas: Sequence[str] | np.ndarray,
    row_questions: Sequence | np.ndarray,
    *,
    n_iter: int = 10_000,
    rng: stats.RngLike = None,
    n_splits: int = 5,
    n_components: int = 16,
    label_draws: np.ndarray | None = None,
    n_threads: int | None = None,
    center_within_questions: bool = True,
    joint_basis: bool = True,
    contrast_iter: int | None = None,
) -> M3Result:
    """M3 for every checkpoint of one (method, layer): held-out LDA accuracy, its joint-shuffle null (is it above
    chance?) and, through ``M3Result.delta``, contrasts between checkpoints against a null of equal separability.

    ``joint_basis`` (default) projects every checkpoint on one label-free basis of all their rows, so that their
    accuracies are measured in the same 16 dimensions and rows can be swapped between checkpoints under the
    contrast's null; False gives each checkpoint its own basis (no swap contrast then).

    ``activations[checkpoint]`` is ``(n_rows, d)``, row i being persona ``row_personas[i]`` answering question
    ``row_questions[i]`` in every checkpoint (after the paired empty-response filter). Folds are shared
    GroupKFold splits by question, so each training fold holds every persona - grouping by persona (the
    record's leave-one-persona-out, 0% on base) raises ``stats.GroupedCVError``. See
    ``stats.lda_joint_shuffle_test`` for the exact reading of "joint-shuffle null".

    ``center_within_questions`` (default) subtracts each question's mean activation over its personas
    before the 16-component projection. The question offset carries no persona information and is the
    same under every joint-shuffle draw, but it can dominate the variance: left in, the top principal
    components are the questions' and LDA scores chance even for personas that separate perfectly within
    every question - another way for M3 to be uninformative. The centring uses no labels, so the
    held-out rows' labels stay unseen; set False for LDA on the raw projected activations.
    """
    names = tuple(activations)
    generator = stats.as_generator(rng)
    test = stats.lda_joint_shuffle_test(
        [activations[name] for name in names],
        row_personas,
        row_questions,
        n_iter=n_iter,
        rng=generator,
        n_splits=n_splits,
        n_components=n_components,
        label_draws=label_draws,
        n_threads=n_threads,
        center_within_groups=center_within_questions,
        joint_basis=joint_basis,
    )
    p_above = np.atleast_1d(test.p_above_chance)
    return M3Result(
        checkpoints=names,
        accuracy={name: float(a) for name, a in zip(names, test.accuracy, strict=True)},
        p_above_chance={name: float(p) for name, p in zip(names, p_above, strict=True)},
        chance_level=test.chance_level,
        n_iter=test.n_iter,
        n_components=test.n_components,
        n_splits=n_splits,
        test=test,
        rng=generator,
        contrast_iter=contrast_iter,
    )


# ------------------------------------------------------------------------------------------ the whole family


@dataclass(frozen=True)
class GeometryCell:
    """One tested cell of the geometry analysis, with its family's BH-FDR and Holm adjusted p-values."""

    family: str  # "em_vs_base" | "benign_vs_base" | "em_vs_benign"
    metric: str
    method: str
    layer: int
    condition: str
    reference: str
    test: MetricTest
    p_bh: float = float("nan")
    p_holm: float = float("nan")
    notes: dict[str, float] = field(default_factory=dict)  # M3: chance level and each side's p above chance

    def as_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "metric": self.metric,
            "method": self.method,
            "layer": self.layer,
            "condition": self.condition,
            "reference": self.reference,
            **{key: value for key, value in self.test.as_dict().items() if key != "metric"},
            "p_bh": self.p_bh,
            "p_holm": self.p_holm,
            **self.notes,
        }


@dataclass(frozen=True)
class _Comparison:
    condition: str
    reference: str
    family: str
    alternative: str | None  # None: the metric's pre-registered direction (the EM-vs-benign contrast)

    def alternative_for(self, metric: str, geometry: str = "raw") -> str:
        return self.alternative or DIRECTIONS[geometry][metric]


def geometry_family(
    persona_vectors: Mapping[tuple[str, int], Mapping[str, np.ndarray]],
    personas: Sequence[str],
    *,
    em_conditions: Sequence[str],
    activations: Mapping[tuple[str, int], Mapping[str, np.ndarray]] | None = None,
    row_personas: Sequence[str] | np.ndarray | None = None,
    row_questions: Sequence | np.ndarray | None = None,
    base: str = "base",
    benign: str = "benign",
    e0: str = "E0",
    assistant: str = ASSISTANT,
    n_iter: int = 10_000,
    seed: int = 42,
    n_components: int = 16,
    n_splits: int = 5,
    n_threads: int | None = None,
    center_within_questions: bool = True,
    geometry: str = "raw",
    m3_contrast_iter: int | None = None,
) -> list[GeometryCell]:
    """Every pre-registered geometry test of #205, with BH-FDR and Holm per family.

    ``geometry="shift_invariant"`` runs M1 as the change in between-persona dispersion (``m1_dispersion_change``,
    one-sided "less") and M2 on vectors centred on the non-assistant personas' mean (``centre_excluding``; the axis
    is then the assistant's shift beyond theirs). Where that axis is undefined (the assistant moved only as every
    persona did), M2's cells have NaN values and p = 1.

    ``persona_vectors[(method, layer)][checkpoint]`` is ``(12, d)`` in ``personas`` order; checkpoints are
    ``base``, ``benign`` and each of ``em_conditions`` (``e0`` among them anchors M2's axis).
    ``activations`` (same keys, ``(n_rows, d)`` per checkpoint) adds M3; without it M3 is skipped.
    Families: ``em_vs_base`` (M1/M2/M3 x methods x layers x EM conditions: the 150 primary cells),
    ``benign_vs_base`` and ``em_vs_benign`` (the three-way contrast, one-sided in each metric's
    pre-registered direction). Cells of one metric share their permutation draws (each p-value is valid on
    its own; cells are dependent anyway). ``n_iter`` and ``seed`` make the whole family reproducible.
    """
    generator = np.random.default_rng(seed)
    names = list(personas)
    comparisons = [_Comparison(c, base, "em_vs_base", "two-sided") for c in em_conditions]
    comparisons.append(_Comparison(benign, base, "benign_vs_base", "two-sided"))
    comparisons += [_Comparison(c, benign, "em_vs_benign", None) for c in em_conditions]

    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    cells: list[GeometryCell] = []
    if geometry == "shift_invariant":
        for (method, layer), vectors in persona_vectors.items():
            for comparison in comparisons:
                test = m1_dispersion_change(vectors[comparison.reference], vectors[comparison.condition], names,
                                            n_iter=n_iter, rng=generator, alternative=comparison.alternative_for("M1", geometry))
                cells.append(GeometryCell(comparison.family, "M1", method, layer, comparison.condition, comparison.reference, test))
        a = _persona_index(names, assistant)
        persona_vectors = {key: {c: centre_excluding(v, a) for c, v in per.items()} for key, per in persona_vectors.items()}
    for metric in ("M1", "M2") if geometry == "raw" else ("M2",):
        rows = []
        for (method, layer), vectors in persona_vectors.items():
            try:
                axis = e0_anchored_em_axis(vectors[base], vectors[e0], names, assistant=assistant)
            except UndefinedAxisError:
                axis = None
            for comparison in comparisons:
                if metric == "M2" and axis is None:
                    cells.append(_undefined_m2_cell(method, layer, comparison, n_iter, len(names) - 1))
                    continue
                differences, values = _vector_metric(metric, vectors, names, comparison, axis, assistant)
                rows.append((method, layer, comparison, differences, values))
        if rows:
            cells += _paired_cells(metric, rows, n_iter, generator)

    if activations is not None:
        if row_personas is None or row_questions is None:
            raise ValueError("M3 needs row_personas and row_questions alongside the activations")
        # One set of joint-shuffle draws serves every (method, layer): the rows are the same grid.
        codes, _ = stats.encode_labels(row_personas)
        draws = stats.grouped_label_shuffles(codes, stats.encode_labels(row_questions)[0], n_iter, generator)
        for (method, layer), per_checkpoint in activations.items():
            m3 = m3_separability(
                per_checkpoint,
                row_personas,
                row_questions,
                n_splits=n_splits,
                n_components=n_components,
                label_draws=draws,
                n_threads=n_threads,
                center_within_questions=center_within_questions,
                rng=generator,
                contrast_iter=m3_contrast_iter,
            )
            # the contrasts refit LDA under every swap draw: in threads (numpy releases the GIL), each with its own
            # child generator drawn here, so the result does not depend on the thread count
            children = generator.spawn(len(comparisons))
            with ThreadPoolExecutor(max_workers=n_threads or stats.available_cpus()) as pool:
                cells += list(pool.map(partial(_m3_cell, m3, method, layer), comparisons, children))
    return _adjust_by_family(cells)


def _vector_metric(
    metric: str,
    vectors: Mapping[str, np.ndarray],
    names: list[str],
    comparison: _Comparison,
    axis: np.ndarray,
    assistant: str,
) -> tuple[np.ndarray, tuple[float, float]]:
    """M1's per-pair or M2's per-persona differences, and the (reference, condition) statistic values."""
    reference, condition = vectors[comparison.reference], vectors[comparison.condition]
    if metric == "M1":
        _check_vectors(names, reference, condition)
        values = (mean_off_diagonal_cosine(reference), mean_off_diagonal_cosine(condition))
        return m1_persona_contributions(reference, condition), values
    before, after = m2_alignments(reference, condition, names, axis, assistant=assistant)
    return after - before, (float(before.mean()), float(after.mean()))


def _paired_cells(
    metric: str, rows: list[tuple], n_iter: int, generator: np.random.Generator
) -> list[GeometryCell]:
    """Paired tests of many cells at once: one set of sign draws per alternative, one matrix product."""
    cells: list[GeometryCell | None] = [None] * len(rows)
    for alternative in sorted({row[2].alternative_for(metric) for row in rows}):
        members = [i for i, row in enumerate(rows) if row[2].alternative_for(metric) == alternative]
        differences = np.array([rows[i][3] for i in members])
        result = stats.paired_permutation_test(
            differences, alternative=alternative, n_iter=n_iter, rng=generator
        )
        statistics, p_values = np.atleast_1d(result.statistic), np.atleast_1d(result.p_value)
        for i, statistic, p in zip(members, statistics, p_values, strict=True):
            method, layer, comparison, _, (reference_value, condition_value) = rows[i]
            test = MetricTest(
                metric=metric,
                reference_value=reference_value,
                condition_value=condition_value,
                delta=float(statistic),
                p_value=float(p),
                n_iter=result.n_iter,
                exact=result.exact,
                n_units=differences.shape[1],
                alternative=alternative,
            )
            cells[i] = GeometryCell(
                comparison.family, metric, method, layer, comparison.condition, comparison.reference, test
            )
    return [cell for cell in cells if cell is not None]


def _undefined_m2_cell(method: str, layer: int, comparison: _Comparison, n_iter: int, n_units: int) -> GeometryCell:
    alternative = comparison.alternative_for("M2")
    nan = float("nan")
    test = MetricTest("M2", nan, nan, nan, 1.0, n_iter, False, n_units, alternative)
    return GeometryCell(comparison.family, "M2", method, layer, comparison.condition, comparison.reference, test,
                        notes={"axis_undefined": 1.0})


def _m3_cell(m3: M3Result, method: str, layer: int, comparison: _Comparison, rng: stats.RngLike = None) -> GeometryCell:
    test = m3.delta(comparison.condition, comparison.reference, comparison.alternative_for("M3"), rng=rng)
    notes = {
        "chance_level": m3.chance_level,
        "reference_p_above_chance": m3.p_above_chance[comparison.reference],
        "condition_p_above_chance": m3.p_above_chance[comparison.condition],
    }
    return GeometryCell(
        comparison.family, "M3", method, layer, comparison.condition, comparison.reference, test, notes=notes
    )


def _adjust_by_family(cells: list[GeometryCell]) -> list[GeometryCell]:
    adjusted = list(cells)
    for family in sorted({cell.family for cell in cells}):
        members = [i for i, cell in enumerate(cells) if cell.family == family]
        family_adjustment = stats.adjust_family([cells[i].test.p_value for i in members])
        for i, p_bh, p_holm in zip(members, family_adjustment.p_bh, family_adjustment.p_holm, strict=True):
            cell = cells[i]
            adjusted[i] = dataclasses.replace(cell, p_bh=float(p_bh), p_holm=float(p_holm))
    return adjusted
