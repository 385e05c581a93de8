"""Vectorised statistics for the persona experiments.

Every permutation test here draws its whole null in one go (numpy arrays of shape ``(n_iter, ...)``) from a
seeded ``np.random.Generator``, so 10,000 iterations cost milliseconds rather than the minutes of a Python
loop (#205's analysis took ~56 minutes).

P-values follow one convention throughout (the one ``scipy.stats.permutation_test`` uses):

* Monte Carlo null of ``n`` draws: ``p_greater = (1 + #{null >= obs}) / (1 + n)`` and
  ``p_less = (1 + #{null <= obs}) / (1 + n)``; the +1 counts the observed labelling, so no p is ever 0.
* Exhaustive null (every labelling enumerated, the observed one among them): ``#{...} / n``, exact.
* ``alternative="two-sided"``: ``min(1, 2 * min(p_greater, p_less))``.
* Comparisons carry a relative tolerance of ``100 * eps * |obs|`` so that null values equal to the observed
  one up to floating-point noise count as ties (permutations of discrete data tie exactly in theory).

Sections: p-values; paired (sign-flip), label (two-sample / k-group / blocked) and exact Spearman permutation
tests; bootstrap CIs; Cohen's d; BH-FDR and Holm; contrasts with the training seed as the unit and decisions
pooled over seeds; held-out LDA with GroupKFold and its joint-shuffle null; the pre-registered behavioural
hypotheses H1/H2/H3 of #205.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import stats as scipy_stats
from threadpoolctl import threadpool_limits

Alternative = Literal["two-sided", "greater", "less"]
ALTERNATIVES: tuple[str, ...] = ("two-sided", "greater", "less")
RngLike = np.random.Generator | int | None

# Largest nulls enumerated in full: 2**n sign patterns (paired test), two-group labellings, n! orderings.
MAX_EXHAUSTIVE_PAIRS = 20
MAX_EXHAUSTIVE_LABELLINGS = 1_000_000
MAX_SPEARMAN_N = 8


def as_generator(rng: RngLike) -> np.random.Generator:
    """A ``np.random.Generator`` from a Generator, an integer seed or None (fresh entropy)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the host's core count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


# ----------------------------------------------------------------------------------------------- p-values


def permutation_p_value(
    observed: np.ndarray | float,
    null: np.ndarray,
    alternative: Alternative = "two-sided",
    *,
    exhaustive: bool = False,
) -> np.ndarray | float:
    """P-value of ``observed`` against ``null`` (draws on axis 0), by the module's convention.

    ``exhaustive=True`` means ``null`` enumerates every labelling including the observed one, so the p-value
    is the exact fraction with no +1. Shapes broadcast: ``observed`` (...) against ``null`` (n, ...).
    """
    _check_alternative(alternative)
    observed = np.asarray(observed, dtype=float)
    null = np.asarray(null, dtype=float)
    n_null = null.shape[0]
    tolerance = 100 * np.finfo(float).eps * np.abs(observed)
    adjustment = 0 if exhaustive else 1

    def one_sided(count: np.ndarray) -> np.ndarray:
        return (count + adjustment) / (n_null + adjustment)

    p_greater = one_sided(np.sum(null >= observed - tolerance, axis=0))
    p_less = one_sided(np.sum(null <= observed + tolerance, axis=0))
    if alternative == "greater":
        p = p_greater
    elif alternative == "less":
        p = p_less
    else:
        p = np.minimum(1.0, 2 * np.minimum(p_greater, p_less))
    return float(p) if np.ndim(p) == 0 else p


@dataclass(frozen=True)
class PermutationResult:
    """A permutation test's outcome; ``statistic`` and ``p_value`` are arrays when the test ran over cells.

    ``n_iter`` is the size of the null actually used: the requested draws, or every labelling when
    ``exact`` (then the p-value is exact and carries no +1).
    """

    statistic: float | np.ndarray
    p_value: float | np.ndarray
    n_iter: int
    exact: bool
    alternative: str
    null_distribution: np.ndarray | None = field(default=None, repr=False, compare=False)


def _scalar_or_array(value: np.ndarray) -> float | np.ndarray:
    return float(value) if np.ndim(value) == 0 else value


# ---------------------------------------------------------------------------------- paired sign-flip test


def all_sign_patterns(n: int) -> np.ndarray:
    """Every one of the ``2**n`` vectors of +1/-1 signs, shape ``(2**n, n)``; row 0 is all +1."""
    bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
    return 1.0 - 2.0 * bits


def paired_permutation_test(
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    alternative: Alternative = "two-sided",
    n_iter: int = 10_000,
    rng: RngLike = None,
    exact: bool | None = None,
    keep_null: bool = False,
) -> PermutationResult:
    """Paired permutation test of ``mean(x - y)`` by random sign flips of the pair differences.

    Swapping the two members of a pair flips the sign of its difference, so under H0 (the members are
    exchangeable) the differences are symmetric about 0. ``x`` and ``y`` have shape ``(..., n_pairs)``:
    leading axes are independent cells (e.g. every (method, layer, condition) of #205's M1) tested at once
    against one shared set of sign draws; ``y=None`` means ``x`` already holds the differences.

    ``exact=None`` enumerates all ``2**n`` sign patterns when that is no more than ``n_iter`` (the p-value is
    then exact), otherwise draws ``n_iter`` patterns.
    """
    _check_alternative(alternative)
    differences = (
        np.asarray(x, dtype=float) if y is None else np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    )
    if differences.ndim == 0 or differences.shape[-1] < 1:
        raise ValueError("paired_permutation_test needs at least one pair")
    n_pairs = differences.shape[-1]
    exhaustive = (2**n_pairs <= n_iter) if exact is None else exact
    if exhaustive and n_pairs > MAX_EXHAUSTIVE_PAIRS:
        raise ValueError(f"exact enumeration of 2**{n_pairs} sign patterns is too large; use exact=False")
    if exhaustive:
        signs = all_sign_patterns(n_pairs)
    else:
        signs = as_generator(rng).choice(np.array([-1.0, 1.0]), size=(n_iter, n_pairs))
    cells = differences.reshape(-1, n_pairs)
    null = (signs @ cells.T) / n_pairs  # (n_null, n_cells): one matrix product for every cell
    observed = cells.mean(axis=1)
    p = permutation_p_value(observed, null, alternative, exhaustive=exhaustive)
    cell_shape = differences.shape[:-1]
    return PermutationResult(
        statistic=_scalar_or_array(observed.reshape(cell_shape)),
        p_value=_scalar_or_array(np.asarray(p).reshape(cell_shape)),
        n_iter=signs.shape[0],
        exact=exhaustive,
        alternative=alternative,
        null_distribution=null.reshape((-1, *cell_shape)) if keep_null else None,
    )


# -------------------------------------------------------------------------- label (two-sample, k-group) tests


def encode_labels(labels: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, classes)``: integer codes 0..k-1 in the sorted order of the distinct labels."""
    classes, codes = np.unique(np.asarray(labels), return_inverse=True)
    return codes.astype(np.int64), classes


def _smallest_int_dtype(n_values: int) -> type:
    return np.int8 if n_values <= 127 else np.int16 if n_values <= 32_767 else np.int32


def grouped_label_shuffles(
    labels: np.ndarray, groups: np.ndarray, n_iter: int, rng: RngLike = None
) -> np.ndarray:
    """``n_iter`` relabellings that shuffle ``labels`` only within each group; shape ``(n_iter, n)``.

    Each draw permutes the labels among the rows of every group independently and uniformly, so every group
    keeps its multiset of labels (and every fold made of whole groups keeps its class counts). ``labels``
    must be integer codes (see ``encode_labels``); the result uses the smallest integer dtype that holds them.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise ValueError("labels and groups must be 1-D arrays of equal length")
    generator = as_generator(rng)
    dtype = _smallest_int_dtype(int(labels.max(initial=0)) + 1)
    # Sort rows by (group size, group) so the groups of each size form one rectangular table.
    _, group_codes, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.lexsort((group_codes, sizes[group_codes]))
    sorted_labels = labels[order].astype(dtype)
    shuffled_sorted = np.empty((n_iter, labels.size), dtype=dtype)
    start = 0
    for size in np.unique(sizes):
        width = size * int(np.sum(sizes == size))
        table = np.broadcast_to(
            sorted_labels[start : start + width].reshape(-1, size), (n_iter, width // size, size)
        )
        shuffled_sorted[:, start : start + width] = generator.permuted(
            table.reshape(-1, size), axis=1
        ).reshape(n_iter, -1)
        start += width
    shuffled = np.empty((n_iter, labels.size), dtype=dtype)
    shuffled[:, order] = shuffled_sorted
    return shuffled


def _two_group_labellings(codes: np.ndarray) -> np.ndarray:
    """Every distinct assignment of the two labels of ``codes`` to its positions, shape ``(C(n, n1), n)``."""
    n, n_ones = codes.size, int(codes.sum())
    labellings = np.zeros((math.comb(n, n_ones), n), dtype=np.int8)
    for row, positions in enumerate(itertools.combinations(range(n), n_ones)):
        labellings[row, list(positions)] = 1
    return labellings


GroupStatistic = Callable[[np.ndarray], np.ndarray]


def group_mean_range(group_means: np.ndarray) -> np.ndarray:
    """Spread of the group means (max - min) over the last axis: #81's inter-axis spread, #205's H2 range."""
    return group_means.max(axis=-1) - group_means.min(axis=-1)


def group_mean_difference(group_means: np.ndarray) -> np.ndarray:
    """Second group's mean minus the first's (two groups, in the sorted order of their labels)."""
    return group_means[..., 1] - group_means[..., 0]


_NAMED_GROUP_STATISTICS: dict[str, GroupStatistic] = {
    "mean_difference": group_mean_difference,
    "range": group_mean_range,
}


def label_permutation_test(
    values: np.ndarray,
    labels: Sequence | np.ndarray,
    *,
    statistic: str | GroupStatistic = "mean_difference",
    blocks: Sequence | np.ndarray | None = None,
    alternative: Alternative = "two-sided",
    n_iter: int = 10_000,
    rng: RngLike = None,
    exact: bool | None = None,
    chunk_size: int = 2_000,
) -> PermutationResult:
    """Permutation test of a statistic of the group means, shuffling the group labels of the rows.

    ``values`` has shape ``(n,)`` or ``(n_cells, n)`` (cells share the labels and the label draws);
    ``statistic`` maps group means ``(..., k)`` (groups in the sorted order of their labels) to a number:
    ``"mean_difference"`` (two groups: second minus first), ``"range"`` (max - min over groups) or a callable.
    ``blocks`` restricts the shuffle to within each block (a randomised-block design: labels are exchangeable
    only among rows of the same block). With two groups, no blocks and ``C(n, n1) <= n_iter`` (or
    ``exact=True``) every distinct labelling is enumerated and the p-value is exact.
    """
    _check_alternative(alternative)
    stat_fn = _NAMED_GROUP_STATISTICS[statistic] if isinstance(statistic, str) else statistic
    values = np.asarray(values, dtype=float)
    cells = values.reshape(-1, values.shape[-1])
    codes, classes = encode_labels(labels)
    if codes.size != cells.shape[1]:
        raise ValueError(f"{codes.size} labels for {cells.shape[1]} values")
    n_groups = classes.size
    if n_groups < 2:
        raise ValueError("a label permutation test needs at least two groups")
    counts = np.bincount(codes, minlength=n_groups).astype(float)

    def statistic_of(label_draws: np.ndarray) -> np.ndarray:
        # Group sums of every draw by one bincount per cell: bin = draw * n_groups + label.
        bins = (label_draws + n_groups * np.arange(len(label_draws))[:, None]).ravel()
        sums = [
            np.bincount(bins, np.tile(cell, len(label_draws)), len(label_draws) * n_groups) for cell in cells
        ]
        group_means = (
            np.stack(sums, axis=1).reshape(len(label_draws), n_groups, len(cells)) / counts[None, :, None]
        )
        return stat_fn(np.moveaxis(group_means, 1, -1))  # (draws, cells)

    can_enumerate = n_groups == 2 and blocks is None
    exhaustive = (
        (can_enumerate and math.comb(codes.size, int(codes.sum())) <= n_iter) if exact is None else exact
    )
    if exhaustive and not can_enumerate:
        raise ValueError("exact enumeration is implemented for two unblocked groups only")
    if exhaustive and math.comb(codes.size, int(codes.sum())) > MAX_EXHAUSTIVE_LABELLINGS:
        raise ValueError(f"more than {MAX_EXHAUSTIVE_LABELLINGS:,} labellings to enumerate; use exact=False")
    if exhaustive:
        draws = _two_group_labellings(codes)
    elif blocks is None:
        generator = as_generator(rng)
        dtype = _smallest_int_dtype(n_groups)
        draws = generator.permuted(np.broadcast_to(codes.astype(dtype), (n_iter, codes.size)), axis=1)
    else:
        draws = grouped_label_shuffles(codes, encode_labels(blocks)[0], n_iter, rng)

    observed = statistic_of(codes[None, :])[0]
    null = np.concatenate([statistic_of(draws[i : i + chunk_size]) for i in range(0, len(draws), chunk_size)])
    p = permutation_p_value(observed, null, alternative, exhaustive=exhaustive)
    cell_shape = values.shape[:-1]
    return PermutationResult(
        statistic=_scalar_or_array(observed.reshape(cell_shape)),
        p_value=_scalar_or_array(np.asarray(p).reshape(cell_shape)),
        n_iter=len(draws),
        exact=exhaustive,
        alternative=alternative,
        null_distribution=null.reshape((-1, *cell_shape)),
    )


def two_sample_permutation_test(
    x: np.ndarray,
    y: np.ndarray,
    *,
    alternative: Alternative = "two-sided",
    n_iter: int = 10_000,
    rng: RngLike = None,
    exact: bool | None = None,
) -> PermutationResult:
    """Independent two-sample permutation test of ``mean(x) - mean(y)`` (pooled rows, labels shuffled)."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    values = np.concatenate([y, x])
    labels = np.concatenate([np.zeros(y.size, dtype=int), np.ones(x.size, dtype=int)])
    return label_permutation_test(
        values,
        labels,
        statistic="mean_difference",
        alternative=alternative,
        n_iter=n_iter,
        rng=rng,
        exact=exact,
    )


# --------------------------------------------------------------------------------- exact Spearman test


@dataclass(frozen=True)
class SpearmanResult:
    """Spearman's rho with its exact permutation p-value over all ``n_orderings = n!`` orderings."""

    rho: float
    p_value: float
    n_orderings: int
    alternative: str


def spearman_exact_test(
    x: Sequence[float], y: Sequence[float], *, alternative: Alternative = "two-sided"
) -> SpearmanResult:
    """Exact permutation test of Spearman's rho: ``y`` is paired with every one of the ``n!`` orderings.

    Ranks use average ties. With ``n = 5`` the 120 orderings give p = 10/120 = 0.083 at |rho| = 0.9, so
    p < 0.05 needs |rho| = 1 (the constraint #205's plan noted for H3).
    """
    _check_alternative(alternative)
    x_ranks = scipy_stats.rankdata(np.asarray(x, dtype=float))
    y_ranks = scipy_stats.rankdata(np.asarray(y, dtype=float))
    n = x_ranks.size
    if y_ranks.size != n:
        raise ValueError(f"x has {n} values but y has {y_ranks.size}")
    if not 3 <= n <= MAX_SPEARMAN_N:
        raise ValueError(
            f"exact Spearman test enumerates n! orderings; needs 3 <= n <= {MAX_SPEARMAN_N}, got {n}"
        )
    if np.ptp(x_ranks) == 0 or np.ptp(y_ranks) == 0:
        raise ValueError("Spearman's rho is undefined when x or y is constant")
    orderings = np.array(list(itertools.permutations(range(n))))
    x_centred = x_ranks - x_ranks.mean()
    y_centred = y_ranks[orderings] - y_ranks.mean()
    null = (y_centred @ x_centred) / (np.linalg.norm(x_centred) * np.linalg.norm(y_centred, axis=1))
    rho = float(null[0])  # ordering 0 is the identity
    p = permutation_p_value(rho, null, alternative, exhaustive=True)
    return SpearmanResult(rho=rho, p_value=float(p), n_orderings=len(orderings), alternative=alternative)


# ---------------------------------------------------------------------------------------- bootstrap CIs


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile bootstrap interval: ``estimate`` on the data, ``[low, high]`` at ``confidence``."""

    estimate: float
    low: float
    high: float
    n_boot: int
    confidence: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def _percentile_interval(estimate: float, replicates: np.ndarray, confidence: float) -> BootstrapCI:
    low, high = percentile_interval(replicates, confidence)
    return BootstrapCI(float(estimate), float(low), float(high), len(replicates), confidence)


def percentile_interval(
    replicates: np.ndarray, confidence: float = 0.95, axis: int = 0
) -> tuple[np.ndarray | float, np.ndarray | float]:
    """``(low, high)``: the percentile interval of bootstrap ``replicates`` along ``axis`` (one per cell for the
    other axes), ignoring NaN replicates (a resample on which the statistic is undefined); NaN where all are."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2
    with warnings.catch_warnings():  # an all-NaN cell is NaN, said here rather than warned about
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(np.asarray(replicates, dtype=float), [tail, 1 - tail], axis=axis)
    return _scalar_or_array(low), _scalar_or_array(high)


def bootstrap_ci(
    data: np.ndarray | Sequence[float] | tuple[np.ndarray, ...],
    statistic: Callable[..., np.ndarray] = np.mean,
    *,
    n_boot: int = 1_000,
    confidence: float = 0.95,
    rng: RngLike = None,
) -> BootstrapCI:
    """Percentile bootstrap CI of ``statistic`` by resampling rows with replacement, all draws at once.

    ``data`` is one array, or a tuple of equal-length arrays resampled together (paired rows, e.g.
    ``(x, y)`` for a slope). ``statistic(*arrays, axis=-1)`` must reduce the last axis (``np.mean``,
    ``ols_slope``...).
    """
    samples = data if isinstance(data, tuple) else (data,)
    arrays = tuple(np.asarray(a, dtype=float) for a in samples)
    n = arrays[0].shape[-1]
    if any(a.shape[-1] != n for a in arrays):
        raise ValueError("arrays resampled together must have the same length")
    rows = as_generator(rng).integers(0, n, size=(n_boot, n))
    replicates = statistic(*(a[rows] for a in arrays), axis=-1)
    return _percentile_interval(statistic(*arrays, axis=-1), replicates, confidence)


def cluster_bootstrap_ci(
    clusters: Sequence,
    values: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2_000,
    confidence: float = 0.95,
    rng: RngLike = None,
) -> BootstrapCI:
    """Percentile bootstrap CI of the mean of ``values`` that resamples whole clusters, not single values.

    ``clusters[i]`` names the cluster of ``values[i]`` (e.g. the question an answer was given to: the answers to
    one question share its prompt and are not independent). Each replicate draws as many clusters as there are,
    with replacement, and takes sum(values) / count over the drawn clusters, so the estimate is exactly the plain
    mean even when clusters hold different numbers of values, and a 0/1 ``values`` gives a rate's interval.
    """
    if len(clusters) != len(values):
        raise ValueError(f"{len(clusters)} cluster labels for {len(values)} values")
    if not len(values):
        raise ValueError("cluster_bootstrap_ci needs at least one value")
    codes, _ = encode_labels(list(clusters))
    sums = np.bincount(codes, weights=np.asarray(values, dtype=float))
    counts = np.bincount(codes).astype(float)

    def pooled_mean(s, c, axis=-1):
        return s.sum(axis=axis) / c.sum(axis=axis)

    return bootstrap_ci((sums, counts), pooled_mean, n_boot=n_boot, confidence=confidence, rng=rng)


def binomial_bootstrap_ci(
    successes: np.ndarray,
    trials: np.ndarray,
    statistic: Callable[..., np.ndarray],
    *,
    n_boot: int = 1_000,
    confidence: float = 0.95,
    rng: RngLike = None,
) -> BootstrapCI:
    """Parametric (binomial) bootstrap CI of ``statistic(rates, axis=-1)`` over cells of counts.

    Each replicate redraws every cell's count from ``Binomial(trials, successes / trials)`` (#81's "binomial
    resampling" of leakage rates) and applies ``statistic`` to the resampled rates.
    """
    successes = np.asarray(successes, dtype=float)
    trials = np.asarray(trials, dtype=float)
    rates = successes / trials
    draws = as_generator(rng).binomial(trials.astype(np.int64), rates, size=(n_boot, *rates.shape))
    return _percentile_interval(statistic(rates, axis=-1), statistic(draws / trials, axis=-1), confidence)


def binomial_lower_bound(successes: int, trials: int, alpha: float = 0.05) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial rate: the true rate is at least this with
    confidence 1 - alpha (exact, so conservative: it is the lower end of the two-sided 1 - 2 alpha interval)."""
    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    return float(scipy_stats.binomtest(successes, trials).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low)


def ols_slope(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Least-squares slope of ``y`` on ``x`` along ``axis`` (broadcasts, so it works on bootstrap batches)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    x_centred = x - x.mean(axis=axis, keepdims=True)
    y_centred = y - y.mean(axis=axis, keepdims=True)
    return (x_centred * y_centred).sum(axis=axis) / (x_centred * x_centred).sum(axis=axis)


# ---------------------------------------------------------------------------------------------- Cohen's d


def cohens_d(x: np.ndarray, y: np.ndarray) -> float:
    """Cohen's d for independent samples: ``(mean(x) - mean(y)) / pooled SD`` (pooled with ddof=1)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    pooled_variance = ((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2)
    return float((x.mean() - y.mean()) / np.sqrt(pooled_variance))


def cohens_d_paired(x: np.ndarray, y: np.ndarray) -> float:
    """Cohen's d_z for paired samples: ``mean(x - y) / SD(x - y)`` (ddof=1)."""
    differences = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    return float(differences.mean() / differences.std(ddof=1))


# ------------------------------------------------------------------------------------- multiple testing


def _validated_p_values(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError("a family of p-values must be a 1-D array")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("p-values must be finite and in [0, 1]")
    return p


def bh_fdr(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (``scipy.stats.false_discovery_control``, method 'bh')."""
    p = _validated_p_values(p_values)
    return scipy_stats.false_discovery_control(p, method="bh") if p.size else p


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values: the i-th smallest is ``max_{j<=i} min(1, (m - j + 1) p_(j))``."""
    p = _validated_p_values(p_values)
    order = np.argsort(p, kind="stable")
    multipliers = p.size - np.arange(p.size)
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate(multipliers * p[order]))
    adjusted = np.empty_like(p)
    adjusted[order] = adjusted_sorted
    return adjusted


@dataclass(frozen=True)
class FamilyAdjustment:
    """One family's raw p-values with BH-FDR (primary) and Holm (robustness) adjustments, in input order."""

    p_raw: np.ndarray
    p_bh: np.ndarray
    p_holm: np.ndarray


def adjust_family(p_values: Sequence[float] | np.ndarray) -> FamilyAdjustment:
    """BH-FDR and Holm adjustments of one family of tests (e.g. #205's 150 geometry cells)."""
    p = _validated_p_values(p_values)
    return FamilyAdjustment(p_raw=p, p_bh=bh_fdr(p), p_holm=holm(p))


# ------------------------------------------------------------ rates of clustered completions, slope tests


@dataclass(frozen=True)
class ClusteredIntervals:
    """Estimates with percentile intervals from a bootstrap over whole clusters (arrays over leading cells)."""

    estimate: np.ndarray | float
    low: np.ndarray | float
    high: np.ndarray | float
    n_boot: int
    n_clusters: int
    confidence: float

    @property
    def half_width(self) -> np.ndarray | float:
        return (np.asarray(self.high) - np.asarray(self.low)) / 2


def cluster_multiplicities(n_clusters: int, n_boot: int, rng: RngLike = None) -> np.ndarray:
    """``(n_boot, n_clusters)``: how often each cluster is drawn in each resample of ``n_clusters`` with replacement."""
    draws = as_generator(rng).integers(0, n_clusters, size=(n_boot, n_clusters))
    offsets = n_clusters * np.arange(n_boot)[:, None]
    return np.bincount((draws + offsets).ravel(), minlength=n_boot * n_clusters).reshape(n_boot, n_clusters)


def clustered_rate_bootstrap(
    hits: np.ndarray,
    totals: np.ndarray,
    statistic: Callable[..., np.ndarray] | None = None,
    *,
    n_boot: int = 1_000,
    confidence: float = 0.95,
    rng: RngLike = None,
) -> ClusteredIntervals:
    """Percentile bootstrap of a statistic of pooled rates, resampling whole clusters (questions), not completions.

    ``hits`` and ``totals`` are ``(..., n_clusters, k)`` counts: k cells (e.g. five gradation levels of a source
    model and the same five of the base model) observed on the same clusters (the questions every cell is asked).
    Each cell's rate is ``sum(hits) / sum(totals)`` over the clusters; a replicate draws the clusters with
    replacement, the same draw for every cell and every leading index, so cells that share a question stay paired.
    ``statistic(rates, axis=-1)`` reduces the k rates to one number (default: k must be 1 and the rate is the
    statistic). The completions of one question share its prompt, so they are not independent draws: resampling
    them one by one (``binomial_bootstrap_ci``) gives intervals that are too narrow whenever questions differ.
    """
    hits = np.asarray(hits, dtype=float)
    totals = np.asarray(totals, dtype=float)
    if hits.shape != totals.shape or hits.ndim < 2:
        raise ValueError("hits and totals must have the same shape (..., n_clusters, k)")
    if statistic is None:
        if hits.shape[-1] != 1:
            raise ValueError("without a statistic there must be exactly one cell (k = 1)")

        def statistic(rates, axis=-1):
            return np.take(rates, 0, axis=axis)

    n_clusters = hits.shape[-2]
    if n_clusters < 1:
        raise ValueError("clustered_rate_bootstrap needs at least one cluster")
    with np.errstate(invalid="ignore", divide="ignore"):
        estimate = statistic(hits.sum(axis=-2) / totals.sum(axis=-2), axis=-1)
        weights = cluster_multiplicities(n_clusters, n_boot, rng).astype(float)
        drawn_hits = np.einsum("bg,...gk->...bk", weights, hits)
        drawn_totals = np.einsum("bg,...gk->...bk", weights, totals)
        replicates = statistic(drawn_hits / drawn_totals, axis=-1)  # (..., n_boot)
    low, high = percentile_interval(replicates, confidence, axis=-1)
    return ClusteredIntervals(_scalar_or_array(np.asarray(estimate)), low, high, n_boot, n_clusters, confidence)


def within_cluster_slope_test(
    values: np.ndarray,
    x: Sequence[float] | np.ndarray | None = None,
    *,
    alternative: Alternative = "two-sided",
    n_iter: int = 10_000,
    rng: RngLike = None,
) -> PermutationResult:
    """Permutation test of the OLS slope over levels of the mean over clusters, levels shuffled within each cluster.

    ``values`` is ``(..., n_clusters, n_levels)``: one value per (cluster, level), e.g. a question's base-subtracted
    marker rate at each of five gradation levels; leading axes are independent cells tested against one shared set
    of draws. The statistic is the slope of ``mean over clusters`` against ``x`` (default 1..n_levels). Under H0 the
    level does not matter, so the levels are exchangeable within every cluster; shuffling them there keeps each
    cluster's own offset (a question that draws the marker more at every level) out of the null, which a shuffle of
    single completions across questions would not. Each draw's slope is one dot product per cluster with a permuted
    contrast vector, so the null of every cell costs one einsum.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim < 2:
        raise ValueError("values must be (..., n_clusters, n_levels)")
    n_clusters, n_levels = values.shape[-2:]
    if n_levels < 2:
        raise ValueError("a slope needs at least two levels")
    x = np.arange(1, n_levels + 1, dtype=float) if x is None else np.asarray(x, dtype=float)
    if x.shape != (n_levels,) or np.ptp(x) == 0:
        raise ValueError(f"x must hold {n_levels} values that are not all equal")
    contrast = (x - x.mean()) / np.sum((x - x.mean()) ** 2)  # slope = contrast @ y
    observed = np.einsum("l,...ql->...", contrast, values) / n_clusters
    orders = np.argsort(as_generator(rng).random((n_iter, n_clusters, n_levels)), axis=-1)
    permuted = contrast[orders]  # (n_iter, Q, L): the contrast each level of each cluster receives in a draw
    null = np.einsum("dql,...ql->d...", permuted, values) / n_clusters
    p = permutation_p_value(observed, null, alternative)
    return PermutationResult(
        statistic=_scalar_or_array(np.asarray(observed)),
        p_value=_scalar_or_array(np.asarray(p)),
        n_iter=n_iter,
        exact=False,
        alternative=alternative,
    )


@dataclass(frozen=True)
class Discoveries:
    """A family of tests read two ways: raw p < alpha (with the false positives it expects under the global null)
    and Benjamini-Hochberg at q = alpha (with the false discoveries it allows among its own)."""

    n_tests: int
    alpha: float
    n_raw: int  # p < alpha, no correction
    expected_false_raw: float  # alpha * n_tests: what raw counting finds when no effect is real
    n_bh: int  # BH-adjusted p < alpha
    expected_false_bh: float  # alpha * n_bh: the FDR bound on the false among BH's discoveries
    p_bh: np.ndarray = field(repr=False)

    @property
    def raw_rule(self) -> str:
        return f"raw p < {self.alpha:g}, no correction"

    @property
    def bh_rule(self) -> str:
        return f"Benjamini-Hochberg, q = {self.alpha:g}"


def discoveries(p_values: Sequence[float] | np.ndarray, alpha: float = 0.05) -> Discoveries:
    """Count a family's 'significant' tests raw and after BH, with the false positives each count expects.

    Counting raw p < alpha over m tests finds ``alpha * m`` false positives on average when no effect is real (6.25
    of #81's 125 slope triples); BH at q = alpha keeps the expected share of false discoveries among its
    discoveries at or below alpha.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    p = _validated_p_values(p_values)
    p_bh = bh_fdr(p)
    n_bh = int(np.sum(p_bh < alpha))
    return Discoveries(n_tests=int(p.size), alpha=alpha, n_raw=int(np.sum(p < alpha)),
                       expected_false_raw=alpha * p.size, n_bh=n_bh, expected_false_bh=alpha * n_bh, p_bh=p_bh)


# ------------------------------------------------------------------------------- training seeds as units


@dataclass(frozen=True)
class SeedContrast:
    """A contrast between training recipes with the training seed as the unit of inference.

    ``estimate`` is the mean over ``a``'s seeds minus the mean over ``b``'s (or minus a fixed ``reference``, such
    as the base model, which has no seed). ``sd_a``/``sd_b`` are the between-seed standard deviations (NaN with one
    seed). The p-value and the ``[low, high]`` interval come from a t-test over seed values (Student's pooled
    variance for two recipes, one-sample against a reference): exact when seed values are normal, and the only
    honest test with two or three seeds, where a permutation of seed labels cannot go below 1/3 or 1/10.
    With one seed per recipe nothing is testable: p, low and high are NaN and ``method`` says why.
    """

    estimate: float
    low: float
    high: float
    p_value: float
    n_a: int
    n_b: int
    sd_a: float
    sd_b: float
    df: float
    method: str
    confidence: float

    @property
    def testable(self) -> bool:
        return not math.isnan(self.p_value)


def _between_seed_sd(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if values.size > 1 else math.nan


def seed_contrast(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray | None = None,
    *,
    reference: float | None = None,
    alternative: Alternative = "two-sided",
    confidence: float = 0.95,
) -> SeedContrast:
    """Test recipe ``a`` against recipe ``b`` (or against a fixed ``reference``) over per-seed values.

    ``a[i]`` is one training seed's value of the statistic (e.g. M1 of the EM fine-tune with seed i); whatever
    sampling noise each seed's value carries is part of the between-seed spread, so the test asks whether the
    recipes differ beyond what retraining with another seed does.
    """
    _check_alternative(alternative)
    if (b is None) == (reference is None):
        raise ValueError("give exactly one of b (a second recipe's seed values) or reference (a fixed value)")
    a = np.asarray(a, dtype=float).ravel()
    b_values = np.asarray([] if b is None else b, dtype=float).ravel()
    if not a.size or (b is not None and not b_values.size):
        raise ValueError("seed_contrast needs at least one seed value per recipe")
    if b is None:
        estimate, df = float(a.mean() - reference), a.size - 1
        method = "one-sample t over seeds against a fixed reference"
    else:
        estimate, df = float(a.mean() - b_values.mean()), a.size + b_values.size - 2
        method = "Student t over seeds (pooled variance)"
    p_value = low = high = math.nan
    spread = float(np.ptp(a)) + (float(np.ptp(b_values)) if b_values.size else 0.0)
    if df < 1:
        method = "not testable: one seed per recipe (a second seed measures the between-seed spread)"
    elif spread == 0:
        # t would read identical seeds as a spread of zero and give an interval of zero width (or p = 0): with
        # two or three seeds equal values are chance (rates over a few completions take few values), not certainty
        method = "not testable: every seed gave the same value, so the seeds measure no spread"
    else:
        if b is None:  # spread is not zero here, so t and its interval are finite
            result = scipy_stats.ttest_1samp(a, reference, alternative=alternative)
        else:
            result = scipy_stats.ttest_ind(a, b_values, equal_var=True, alternative=alternative)
        interval = result.confidence_interval(confidence)
        p_value = float(result.pvalue)
        low, high = float(interval.low), float(interval.high)
        if b is None:  # scipy's one-sample interval is for the mean itself, not for its difference from reference
            low, high = low - reference, high - reference
    return SeedContrast(
        estimate=estimate, low=low, high=high, p_value=p_value, n_a=int(a.size), n_b=int(b_values.size),
        sd_a=_between_seed_sd(a), sd_b=_between_seed_sd(b_values), df=float(df), method=method,
        confidence=confidence,
    )


@dataclass(frozen=True)
class PooledDecision:
    """A pre-registered rule applied per seed and pooled by ``rule``: the run passes only if every seed does."""

    per_seed: dict[int, bool]
    rule: str = "all seeds must pass"

    @property
    def passes(self) -> bool:
        return bool(self.per_seed) and all(self.per_seed.values())

    @property
    def n_pass(self) -> int:
        return sum(self.per_seed.values())


# ------------------------------------------------------------------------- held-out LDA with GroupKFold


class GroupedCVError(ValueError):
    """The grouped cross-validation cannot measure held-out accuracy (see ``grouped_folds``)."""


def grouped_folds(
    labels: Sequence | np.ndarray, groups: Sequence | np.ndarray, n_splits: int = 5
) -> list[tuple[np.ndarray, np.ndarray]]:
    """GroupKFold splits, refusing any split in which a class has no training rows.

    A class absent from a training fold can never be predicted, so every held-out row of it scores wrong.
    #205's M3 did exactly that: it held out one persona's vector at a time (one row per persona, i.e. groups
    nested in labels) and scored 0% even on the base model. Group by a unit that spans every class (the
    question: each question is asked under every persona) so that each fold trains on every persona.
    """
    codes, classes = encode_labels(labels)
    group_codes, group_names = encode_labels(groups)
    if codes.size != group_codes.size:
        raise GroupedCVError(f"{codes.size} labels but {group_codes.size} group ids")
    if group_names.size < n_splits:
        raise GroupedCVError(f"{group_names.size} groups cannot make {n_splits} GroupKFold folds")
    from sklearn.model_selection import GroupKFold

    folds = list(GroupKFold(n_splits=n_splits).split(np.zeros(codes.size), codes, group_codes))
    classes_per_group = np.array([np.unique(codes[group_codes == g]).size for g in range(group_names.size)])
    for fold, (train, _test) in enumerate(folds):
        missing = np.setdiff1d(np.arange(classes.size), codes[train])
        if missing.size:
            hint = (
                " Every group holds a single class (groups nested in labels, e.g. leave-one-persona-out), so a "
                "held-out class is never seen in training and accuracy is 0 by construction - the failure of "
                "#205's M3."
                if np.all(classes_per_group == 1)
                else ""
            )
            raise GroupedCVError(
                f"fold {fold} has no training rows of class(es) {[str(c) for c in classes[missing]]}.{hint} "
                "Group by a unit that spans every class (the question), not by the class itself."
            )
    return folds


def _group_means(matrix: np.ndarray, group_codes: np.ndarray) -> np.ndarray:
    """``(n_groups, d)`` float64 mean row of each group (codes 0..G-1, every code present).

    Groups of equal size are summed as one ``(groups, size, d)`` block (rows ordered by size, then group); rows
    already in that order (e.g. question-major rows of a full grid) are summed in place, without a copy.
    """
    sizes = np.bincount(group_codes)
    order = np.lexsort((np.arange(group_codes.size), group_codes, sizes[group_codes]))
    in_place = np.array_equal(order, np.arange(order.size))
    means = np.empty((sizes.size, matrix.shape[1]))
    start = 0
    for size in np.unique(sizes):
        members = np.flatnonzero(sizes == size)  # ascending codes, as the sort put their rows
        stop = start + size * members.size
        block = matrix[start:stop] if in_place else matrix[order[start:stop]]
        means[members] = block.reshape(members.size, size, -1).sum(axis=1, dtype=np.float64) / size
        start = stop
    return means


def label_free_projection(
    activations: np.ndarray,
    n_components: int,
    *,
    groups: Sequence | np.ndarray | None = None,
    power_iterations: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """Scores of the centred rows on their top ``n_components`` principal components (labels never used).

    Persona activations have more dimensions (3584) than rows in a training fold, where LDA's within-class
    covariance is singular; projecting on a few principal components first (PCA-LDA) makes it estimable.
    The projection ignores labels, so it cannot leak them into held-out scores and is the same for the
    observed labels and every shuffled draw. Rows are centred on the column means, or with ``groups`` on
    their group's mean (removing e.g. each question's own offset, which is shared by all its rows).
    Large inputs use a seeded randomized SVD (Halko et al.; two power iterations recover the top
    components of a decaying spectrum to 1e-4) that centres implicitly, so the (n, d) matrix is not copied.
    """
    matrix = np.asarray(activations)
    matrix = matrix if matrix.dtype in (np.float32, np.float64) else matrix.astype(np.float64)
    group_codes = np.zeros(len(matrix), dtype=np.int64) if groups is None else encode_labels(groups)[0]
    means = _group_means(matrix, group_codes).astype(matrix.dtype)  # (n_groups, d)
    n_components = min(n_components, *matrix.shape)
    sketch_size = n_components + 10
    if min(matrix.shape) <= 2 * sketch_size:
        centred = (matrix - means[group_codes]).astype(np.float64)
        return centred @ np.linalg.svd(centred, full_matrices=False)[2][:n_components].T

    def times(right: np.ndarray) -> np.ndarray:  # (X - E M) @ right, E the row-to-group indicator
        return matrix @ right - (means @ right)[group_codes]

    def transpose_times(left: np.ndarray) -> np.ndarray:  # (X - E M)' @ left
        group_sums = np.zeros((len(means), left.shape[1]), dtype=left.dtype)
        np.add.at(group_sums, group_codes, left)
        return matrix.T @ left - means.T @ group_sums

    sketch = np.random.default_rng(seed).standard_normal((matrix.shape[1], sketch_size)).astype(matrix.dtype)
    basis, _ = np.linalg.qr(times(sketch))
    for _ in range(power_iterations):
        basis, _ = np.linalg.qr(times(np.linalg.qr(transpose_times(basis))[0]))
    _u, _s, vt = np.linalg.svd(transpose_times(basis).T, full_matrices=False)
    return times(vt[:n_components].T.astype(matrix.dtype)).astype(np.float64)


def lda_heldout_accuracy(
    activations: np.ndarray,
    labels: Sequence | np.ndarray,
    groups: Sequence | np.ndarray,
    *,
    n_splits: int = 5,
    n_components: int = 16,
    center_within_groups: bool = False,
) -> float:
    """Held-out accuracy of scikit-learn's LDA over GroupKFold folds (the reference, one labelling only).

    Same definition as ``lda_joint_shuffle_test``'s observed accuracy: label-free PCA projection (rows
    centred within their group if asked), then ``LinearDiscriminantAnalysis(solver="lsqr")`` fitted on each
    training fold and scored on its test fold; accuracy = correct held-out predictions / all rows.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    codes, _ = encode_labels(labels)
    folds = grouped_folds(codes, groups, n_splits)
    projected = label_free_projection(
        activations, n_components, groups=groups if center_within_groups else None
    )
    correct = 0
    for train, test in folds:
        model = LinearDiscriminantAnalysis(solver="lsqr").fit(projected[train], codes[train])
        correct += int(np.sum(model.predict(projected[test]) == codes[test]))
    return correct / codes.size


@dataclass(frozen=True)
class LdaShuffleTest:
    """Held-out LDA accuracy of each checkpoint with its joint-shuffle null (one null row per draw).

    ``null_accuracy[i, c]`` is checkpoint ``c``'s held-out accuracy under label draw ``i``; the same draw is
    applied to every checkpoint, so differences between checkpoints have a paired null.
    """

    accuracy: np.ndarray  # (n_checkpoints,)
    null_accuracy: np.ndarray = field(repr=False)  # (n_iter, n_checkpoints)
    chance_level: float
    n_iter: int
    n_splits: int
    n_components: int
    classes: np.ndarray = field(repr=False)
    # what a contrast of equal separability (``lda_swap_contrast``) needs: the projected rows, labels and groups
    projected: np.ndarray | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)
    groups: np.ndarray | None = field(default=None, repr=False)
    joint_basis: bool = False

    @property
    def p_above_chance(self) -> np.ndarray:
        """One-sided p that each checkpoint's accuracy exceeds what shuffled persona labels reach."""
        return permutation_p_value(self.accuracy, self.null_accuracy, "greater")

    def contrast(
        self, reference: int, condition: int, alternative: Alternative = "two-sided"
    ) -> PermutationResult:
        """Test ``accuracy[condition] - accuracy[reference]`` against the same difference under each draw."""
        observed = self.accuracy[condition] - self.accuracy[reference]
        null = self.null_accuracy[:, condition] - self.null_accuracy[:, reference]
        p = permutation_p_value(observed, null, alternative)
        return PermutationResult(float(observed), float(p), self.n_iter, False, alternative, null)

    def swap_contrast(
        self, reference: int, condition: int, alternative: Alternative = "two-sided", *, n_iter: int | None = None,
        rng: RngLike = None,
    ) -> PermutationResult:
        """``accuracy[condition] - accuracy[reference]`` against a null of equal separability (``lda_swap_contrast``:
        whole questions' rows swapped between the two checkpoints). Needs the checkpoints on one joint basis."""
        if not self.joint_basis or self.projected is None:
            raise ValueError("a swap contrast needs the checkpoints projected on one joint basis (joint_basis=True)")
        return lda_swap_contrast(self.projected[reference], self.projected[condition], self.labels, self.groups,
                                 n_splits=self.n_splits, n_iter=n_iter or self.n_iter, rng=rng, alternative=alternative)


@dataclass(frozen=True)
class _FoldModel:
    """What every label draw of one GroupKFold fold shares: class counts and whitened test rows.

    In coordinates where the training rows' (uncentred) second moment ``T = L L'`` is the identity, LDA's
    within-class scatter is ``I - U U'`` with ``U`` the class sums scaled by ``1/sqrt(n_k)``, so a draw needs
    only a k x k inverse instead of a refit in r dimensions.
    """

    test_rows: slice
    test_counts: np.ndarray  # (k,)
    train_counts: np.ndarray  # (k,)
    log_priors: np.ndarray  # (k,)
    inverse_factors_t: np.ndarray  # (C, r, r): (L^-1)' per checkpoint
    whitened_test_t: np.ndarray  # (C, r + 1, n_test) float32: (L^-1 x)' with a row of ones for the intercept

    @property
    def n_train(self) -> float:
        return float(self.train_counts.sum())


def _fold_models(
    projected: np.ndarray, test_counts: list[np.ndarray], fold_rows: list[slice]
) -> list[_FoldModel]:
    n_rows = projected.shape[1]
    total_counts = np.sum(test_counts, axis=0)
    models = []
    for rows, counts in zip(fold_rows, test_counts, strict=True):
        train = np.r_[0 : rows.start, rows.stop : n_rows]
        inverse_factors, whitened = [], []
        for checkpoint in projected:
            inverse_factor = np.linalg.inv(np.linalg.cholesky(checkpoint[train].T @ checkpoint[train]))
            test_whitened = checkpoint[rows] @ inverse_factor.T
            inverse_factors.append(inverse_factor.T)
            whitened.append(np.vstack([test_whitened.T, np.ones((1, rows.stop - rows.start))]))
        train_counts = (total_counts - counts).astype(float)
        models.append(
            _FoldModel(
                test_rows=rows,
                test_counts=counts,
                train_counts=train_counts,
                log_priors=np.log(train_counts / train_counts.sum()),
                inverse_factors_t=np.stack(inverse_factors),
                whitened_test_t=np.stack(whitened).astype(np.float32),
            )
        )
    return models


def _count_correct(
    draws: np.ndarray, stacked: np.ndarray, models: list[_FoldModel], n_classes: int, n_checkpoints: int
) -> np.ndarray:
    """Correct held-out predictions per draw and checkpoint, ``(n_draws, C)``, for one chunk of draws.

    Matches ``LinearDiscriminantAnalysis(solver="lsqr")`` fitted per fold (covariance ``S_W / n_train``,
    priors = training class frequencies). Per fold: class sums of every checkpoint from one matrix product;
    whitened, scaled sums ``U`` (k x r); ``A = I - U U'``; by the push-through identity the LDA weights are
    ``n_train / sqrt(n_k) * (A^-1 U)_k`` and the intercepts
    ``-n_train / (2 n_k) * (A^-1_kk - 1) + log prior_k``.
    A row counts as correct when its true label's score is the maximum.
    """
    n_draws = len(draws)
    rank = (stacked.shape[1] - 1) // n_checkpoints
    class_ids = np.arange(n_classes, dtype=draws.dtype)
    fold_sums = []
    for model in models:
        rows = model.test_rows
        one_hot = np.empty((n_draws, n_classes, rows.stop - rows.start), dtype=np.float32)
        np.equal(draws[:, None, rows], class_ids[None, :, None], out=one_hot, casting="unsafe")
        sums = one_hot.reshape(n_draws * n_classes, -1) @ stacked[rows]  # last column: class counts
        if np.any(sums[:, -1].reshape(n_draws, n_classes) != model.test_counts):
            raise ValueError("label draws must keep each fold's class counts (shuffle labels within groups)")
        fold_sums.append(sums[:, :-1])
    total_sums = np.sum(fold_sums, axis=0)

    correct = np.zeros((n_draws, n_checkpoints))
    for model, test_sums in zip(models, fold_sums, strict=True):
        rows, counts = model.test_rows, model.train_counts
        n_test = rows.stop - rows.start
        train_sums = (
            (total_sums - test_sums).reshape(n_draws * n_classes, n_checkpoints, rank).transpose(1, 0, 2)
        )
        scaled = (train_sums.astype(float) @ model.inverse_factors_t).reshape(-1, n_classes, rank)
        scaled /= np.sqrt(counts)[None, :, None]
        a_inverse = np.linalg.inv(np.eye(n_classes) - scaled @ scaled.transpose(0, 2, 1))
        weights = (model.n_train / np.sqrt(counts))[None, :, None] * (a_inverse @ scaled)
        intercepts = (
            -0.5 * (model.n_train / counts) * (np.diagonal(a_inverse, axis1=1, axis2=2) - 1)
            + model.log_priors
        )
        augmented = np.concatenate([weights, intercepts[:, :, None]], axis=2).astype(np.float32)
        augmented = augmented.reshape(n_checkpoints, n_draws * n_classes, rank + 1)
        true_labels = draws[:, rows].astype(np.int64)
        true_score_index = (
            (np.arange(n_draws)[:, None] * n_classes + true_labels) * n_test + np.arange(n_test)
        ).ravel()
        for checkpoint in range(n_checkpoints):
            scores = augmented[checkpoint] @ model.whitened_test_t[checkpoint]  # (draws * k, n_test)
            best = scores.reshape(n_draws, n_classes, n_test).max(axis=1)
            true_scores = scores.ravel()[true_score_index].reshape(n_draws, n_test)
            correct[:, checkpoint] += np.sum(true_scores >= best, axis=1)
    return correct


def _lda_draw_accuracies(
    projected: np.ndarray,
    label_draws: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    n_classes: int,
    *,
    chunk_size: int = 64,
    n_threads: int | None = None,
) -> np.ndarray:
    """Held-out accuracy of LDA refitted under every label draw, for every checkpoint: ``(n_draws, C)``.

    ``projected`` is ``(C, n, r)``; ``label_draws`` ``(n_draws, n)`` must keep each fold's class counts
    (within-group shuffles do). Chunks of draws run on ``n_threads`` threads with BLAS pinned to one thread
    each: numpy releases the GIL in every heavy call here, while OpenBLAS's own threads spin badly on small
    products when the machine is busy.
    """
    n_checkpoints, n_rows, rank = projected.shape
    # Reorder rows fold by fold so each fold's test rows are one contiguous slice.
    row_order = np.concatenate([test for _train, test in folds])
    projected = projected[:, row_order]
    label_draws = label_draws[:, row_order]
    bounds = np.cumsum([0] + [len(test) for _train, test in folds])
    fold_rows = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    test_counts = [np.bincount(label_draws[0, rows], minlength=n_classes) for rows in fold_rows]
    # Every checkpoint's coordinates side by side, plus a ones column that yields the class counts.
    stacked = np.hstack(
        [projected.transpose(1, 0, 2).reshape(n_rows, n_checkpoints * rank), np.ones((n_rows, 1))]
    )
    stacked = stacked.astype(np.float32)
    starts = range(0, len(label_draws), chunk_size)
    n_threads = n_threads or available_cpus()

    def run_chunk(first: int) -> np.ndarray:
        return _count_correct(
            label_draws[first : first + chunk_size], stacked, models, n_classes, n_checkpoints
        )

    with threadpool_limits(limits=1, user_api="blas"):
        models = _fold_models(projected, test_counts, fold_rows)
        if n_threads == 1 or len(starts) == 1:
            correct = [run_chunk(first) for first in starts]
        else:
            with ThreadPoolExecutor(max_workers=n_threads) as pool:
                correct = list(pool.map(run_chunk, starts))
    return np.concatenate(correct) / n_rows


def lda_joint_shuffle_test(
    activations: np.ndarray | Sequence[np.ndarray],
    labels: Sequence | np.ndarray,
    groups: Sequence | np.ndarray,
    *,
    n_iter: int = 10_000,
    rng: RngLike = None,
    n_splits: int = 5,
    n_components: int = 16,
    label_draws: np.ndarray | None = None,
    n_threads: int | None = None,
    center_within_groups: bool = False,
    joint_basis: bool = False,
) -> LdaShuffleTest:
    """Held-out LDA accuracy (shared GroupKFold) of one or more checkpoints, with a joint-shuffle null.

    ``joint_basis=True`` projects every checkpoint on one basis of all their rows (``joint_label_free_projection``)
    instead of one basis per checkpoint: accuracies are then comparable and ``swap_contrast`` can test two
    checkpoints against a null of equal separability.

    #205's M3: "held-out LDA accuracy with shared GroupKFold, joint-shuffle null, n_iter=10,000". Reading:

    * rows are (persona, question) activations, ``labels`` the personas, ``groups`` the questions;
      ``activations`` is ``(n, d)`` or ``(C, n, d)`` / a list of ``(n, d)``, one per checkpoint, row i of
      every checkpoint being the same (persona, question);
    * shared GroupKFold: one fold split (by question) used for every checkpoint and every null draw;
    * held-out LDA: label-free PCA to ``n_components`` per checkpoint (rows centred on their question's
      mean when ``center_within_groups``), then LDA (lsqr) fitted per training fold and scored on the
      held-out questions; accuracy over all rows;
    * joint-shuffle null: each draw permutes the persona labels within every question (so each question
      still has one row per persona and each fold keeps its class counts), jointly for training and test
      rows (labels are shuffled before the split, as in Ojala & Garriga's test 1) and jointly for all
      checkpoints (the same draw for each), then refits the whole cross-validation.

    The null therefore says "the activations carry no persona information"; ``p_above_chance`` tests each
    checkpoint against it and ``contrast`` tests accuracy differences between checkpoints against their
    paired null. ``label_draws`` lets callers reuse one set of draws (from ``grouped_label_shuffles`` on
    the encoded labels) across analyses with the same row layout; ``n_iter`` is then their number.
    """
    checkpoints = (
        [activations] if isinstance(activations, np.ndarray) and activations.ndim == 2 else list(activations)
    )
    codes, classes = encode_labels(labels)
    group_codes, _ = encode_labels(groups)
    if any(np.ndim(c) != 2 or len(c) != codes.size for c in checkpoints):
        raise ValueError(f"every checkpoint needs an (n_rows, d) array with one row per label ({codes.size})")
    if classes.size < 2:
        raise ValueError("LDA needs at least two classes")
    folds = grouped_folds(codes, group_codes, n_splits)
    if np.all(np.array([np.unique(codes[group_codes == g]).size for g in np.unique(group_codes)]) == 1):
        raise GroupedCVError("every group holds one class, so shuffling labels within groups changes nothing")
    smallest_train = min(len(train) for train, _ in folds)
    rank = min(n_components, min(np.shape(c)[1] for c in checkpoints), smallest_train - classes.size - 1)
    if rank < 1:
        raise GroupedCVError(
            f"training folds of {smallest_train} rows are too small for {classes.size} classes"
        )

    n_threads = n_threads or available_cpus()
    centring_groups = group_codes if center_within_groups else None
    if joint_basis:
        projected = joint_label_free_projection(checkpoints, rank, groups=centring_groups)
    else:
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=n_threads) as pool:
            projected = np.stack(
                list(
                    pool.map(lambda acts: label_free_projection(acts, rank, groups=centring_groups), checkpoints)
                )
            )
    rank = projected.shape[2]
    if label_draws is None:
        label_draws = grouped_label_shuffles(codes, group_codes, n_iter, rng)
    elif label_draws.shape[1] != codes.size:
        raise ValueError(f"label_draws has {label_draws.shape[1]} columns for {codes.size} rows")
    observed_labels = codes[None].astype(label_draws.dtype)
    accuracy = _lda_draw_accuracies(projected, observed_labels, folds, classes.size, n_threads=1)[0]
    null_accuracy = _lda_draw_accuracies(projected, label_draws, folds, classes.size, n_threads=n_threads)
    return LdaShuffleTest(
        accuracy=accuracy,
        null_accuracy=null_accuracy,
        chance_level=float(np.bincount(codes).max() / codes.size),
        n_iter=len(label_draws),
        n_splits=n_splits,
        n_components=rank,
        classes=classes,
        projected=projected if joint_basis else None,
        labels=codes,
        groups=group_codes,
        joint_basis=joint_basis,
    )


# ------------------------------------------------------------------ #205 pre-registered behavioural tests


@dataclass(frozen=True)
class HypothesisResult:
    """A pre-registered hypothesis test: its statistic, p-value, the decision rule and whether it fired."""

    name: str
    statistic: float
    p_value: float
    n_iter: int
    fires: bool
    rule: str
    details: dict = field(default_factory=dict)


def h1_self_leakage_test(
    leakage: np.ndarray,
    personas: Sequence[str],
    induction_persona: str,
    *,
    source_persona: str = "confab",
    n_iter: int = 10_000,
    rng: RngLike = None,
    min_excess: float = 0.05,
    alpha: float = 0.05,
) -> HypothesisResult:
    """H1 (induction-self-leakage) for one EM condition.

    Pre-registered: ``leakage_to_E_i_persona - mean_other_bystanders >= 5 pp``, raw p < 0.05, no FDR.
    ``leakage`` is ``(n_personas, n_questions)`` marker rates (each over that question's completions). The
    other bystanders are every persona but the source and the induction persona. Test: one-sided paired
    sign-flip over questions of ``rate_E(q) - mean_bystanders(q)``; the question is the unit because each
    question is asked of every persona. (Ranking the E persona among the 11 bystanders instead - which the
    record's p-values 0.81/0.91/0.28/0.09 look like - cannot go below p = 1/11 and so could never fire.)
    """
    names = list(personas)
    if induction_persona not in names:
        raise ValueError(
            f"{induction_persona!r} is not in the persona grid; H1 is untestable for this condition"
        )
    leakage = np.asarray(leakage, dtype=float)
    others = [i for i, name in enumerate(names) if name not in (source_persona, induction_persona)]
    per_question_excess = leakage[names.index(induction_persona)] - leakage[others].mean(axis=0)
    result = paired_permutation_test(per_question_excess, alternative="greater", n_iter=n_iter, rng=rng)
    fires = bool(result.statistic >= min_excess and result.p_value < alpha)
    return HypothesisResult(
        "H1",
        float(result.statistic),
        float(result.p_value),
        result.n_iter,
        fires,
        f"excess >= {min_excess} and p < {alpha}",
        {"induction_persona": induction_persona, "n_questions": per_question_excess.size},
    )


def h2_invariance_test(
    leakage: np.ndarray,
    personas: Sequence[str],
    induction_personas: Sequence[str],
    *,
    source_persona: str = "confab",
    n_iter: int = 10_000,
    rng: RngLike = None,
    max_range: float = 0.15,
    alpha: float = 0.10,
) -> HypothesisResult:
    """H2 (induction-invariant): range of mean bystander leakage over conditions <= 15 pp and raw p > 0.10.

    ``leakage`` is ``(n_conditions, n_personas, n_questions)``; ``induction_personas[c]`` is condition c's
    EM persona. A condition's bystanders exclude the source and its own induction persona - for the observed
    range and for the null alike, since both come from one long table of (condition, persona, question)
    rates (the mismatch fixed in #205's review round 2 cannot recur). Null: condition labels permuted within
    each (persona, question) block, so persona and question effects stay put.
    """
    leakage = np.asarray(leakage, dtype=float)
    names = list(personas)
    values, conditions, blocks = [], [], []
    for condition, induction in enumerate(induction_personas):
        for index, name in enumerate(names):
            if name in (source_persona, induction):
                continue
            values.append(leakage[condition, index])
            conditions.append(np.full(leakage.shape[2], condition))
            blocks.append(index * leakage.shape[2] + np.arange(leakage.shape[2]))
    result = label_permutation_test(
        np.concatenate(values),
        np.concatenate(conditions),
        statistic="range",
        blocks=np.concatenate(blocks),
        alternative="greater",
        n_iter=n_iter,
        rng=rng,
    )
    fires = bool(result.statistic <= max_range and result.p_value > alpha)
    return HypothesisResult(
        "H2",
        float(result.statistic),
        float(result.p_value),
        result.n_iter,
        fires,
        f"range <= {max_range} and p > {alpha}",
        {"n_conditions": len(induction_personas)},
    )


def h3_cos_monotone_test(
    cos_to_assistant: Sequence[float],
    mean_bystander_leakage: Sequence[float],
    *,
    min_abs_rho: float = 0.7,
    alpha: float = 0.05,
) -> HypothesisResult:
    """H3 (cos-monotone): Spearman |rho| >= 0.7 between cos-to-assistant and mean bystander leakage,
    exact two-sided permutation p < 0.05 over all n! orderings (120 for the 5 conditions)."""
    result = spearman_exact_test(cos_to_assistant, mean_bystander_leakage)
    fires = bool(abs(result.rho) >= min_abs_rho and result.p_value < alpha)
    return HypothesisResult(
        "H3", result.rho, result.p_value, result.n_orderings, fires, f"|rho| >= {min_abs_rho} and p < {alpha}"
    )


# ----------------------------------------------------------------------- what a test can and cannot reach


def smallest_p(n_null: int, alternative: Alternative = "two-sided", *, exhaustive: bool = False) -> float:
    """The smallest p-value a permutation test with a null of ``n_null`` labellings can return (its floor).

    By the module's convention: an exhaustive null that holds the observed labelling gives ``1/n`` one-sided (the
    observed value is the only one at the extreme) and ``2/n`` two-sided; a Monte Carlo null of ``n`` draws gives
    ``1/(n+1)`` and ``2/(n+1)``. Sign-flip nulls are symmetric, so the two-sided floor is always reachable.
    """
    _check_alternative(alternative)
    if n_null < 1:
        raise ValueError(f"a null needs at least one labelling, got {n_null}")
    size = n_null if exhaustive else n_null + 1
    return min(1.0, (1 if alternative != "two-sided" else 2) / size)


def sign_flip_null_size(n_units: int, n_iter: int) -> tuple[int, bool]:
    """``(size, exhaustive)`` of the null ``paired_permutation_test`` uses for ``n_units`` units at ``n_iter``."""
    return (2**n_units, True) if 2**n_units <= n_iter else (n_iter, False)


def correction_reach(floors: Sequence[float], alpha: float) -> dict:
    """What BH-FDR and Holm over a family can reach, given each cell's smallest attainable p (its floor).

    Both adjustments only grow when any raw p grows, so a cell's best adjusted p is its adjusted p when every cell of
    the family sits at its floor: ``bh_best`` and ``holm_best`` hold those, per cell in input order. Holm's best is
    ``m * floor`` for the cell with the smallest floor; where even that is not below ``alpha``, Holm cannot reject
    anything by construction (``holm_reachable`` False).
    """
    floors = np.asarray(floors, dtype=float)
    if floors.size == 0:
        raise ValueError("a family needs at least one cell")
    best = adjust_family(floors)
    return {"m": int(floors.size), "alpha": alpha, "smallest_floor": float(floors.min()),
            "bh_best": best.p_bh.tolist(), "holm_best": best.p_holm.tolist(),
            "bh_reachable": bool(best.p_bh.min() < alpha), "holm_reachable": bool(best.p_holm.min() < alpha)}


def spearman_exact_floor(n: int, alpha: float = 0.05) -> dict:
    """What the exact two-sided Spearman test over all ``n!`` orderings can reach (no ties).

    ``smallest_p`` is the p at |rho| = 1; ``min_abs_rho_below_alpha`` the smallest |rho| whose p is below ``alpha``
    (None where no rho is), and ``p_at`` the p of every attainable |rho|. At n = 5 only rho = +-1 gives p < 0.05
    (p = 2/120); rho = 0.9 gives 10/120 = 0.083.
    """
    if not 3 <= n <= MAX_SPEARMAN_N:
        raise ValueError(f"exact Spearman test enumerates n! orderings; needs 3 <= n <= {MAX_SPEARMAN_N}, got {n}")
    ranks = np.arange(n, dtype=float)
    orderings = np.array(list(itertools.permutations(range(n))), dtype=float)
    centred = ranks - ranks.mean()
    null = ((orderings - ranks.mean()) @ centred) / (centred @ centred)
    values = np.unique(np.round(np.abs(null), 12))
    p_at = {float(v): float(min(1.0, 2 * np.mean(null >= v - 1e-12)) if v > 0 else 1.0) for v in values}
    below = [v for v, p in p_at.items() if p < alpha]
    return {"n": n, "n_orderings": len(null), "alpha": alpha, "smallest_p": p_at[max(p_at)],
            "min_abs_rho_below_alpha": min(below) if below else None, "p_at": p_at}


# ----------------------------------------------------------------- sign flips of vectors (a mean shift test)


def vector_sign_flip_test(
    differences: np.ndarray, *, n_iter: int = 10_000, rng: RngLike = None
) -> PermutationResult:
    """Is the mean of paired difference vectors zero? ``differences`` is ``(n_units, dim)``.

    Statistic: the norm of the mean difference. Null: each unit's difference flips sign (its two members are
    exchangeable under H0), every one of the ``2**n`` patterns when that is no more than ``n_iter``, otherwise
    ``n_iter`` draws; one-sided (a norm can only be larger). Works from the units' Gram matrix, so the dimension
    costs one product.
    """
    differences = np.asarray(differences, dtype=float)
    if differences.ndim != 2 or len(differences) < 1:
        raise ValueError(f"expected (n_units, dim) differences, got shape {differences.shape}")
    n = len(differences)
    exhaustive = sign_flip_null_size(n, n_iter)[1] and n <= MAX_EXHAUSTIVE_PAIRS
    signs = all_sign_patterns(n) if exhaustive else as_generator(rng).choice(np.array([-1.0, 1.0]), size=(n_iter, n))
    gram = differences @ differences.T
    null = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", signs, gram, signs), 0.0)) / n
    observed = float(np.linalg.norm(differences.mean(axis=0)))
    p = permutation_p_value(observed, null, "greater", exhaustive=exhaustive)
    return PermutationResult(observed, float(p), len(signs), exhaustive, "greater", null)


# -------------------------------------------------- M3 between two checkpoints: a null of equal separability


def joint_label_free_projection(
    checkpoints: Sequence[np.ndarray], n_components: int, *, groups: Sequence | np.ndarray | None = None
) -> np.ndarray:
    """``(C, n, r)``: every checkpoint's rows scored on ONE label-free basis, the top principal components of all
    checkpoints' rows together (each checkpoint's rows centred on their own mean, or on their own group's mean).

    One basis for all checkpoints makes their accuracies comparable and, since it is a symmetric function of the
    pooled rows, it does not change when rows are exchanged between checkpoints (``lda_swap_contrast``'s null).
    """
    arrays = [np.asarray(c) for c in checkpoints]
    n = len(arrays[0])
    if any(len(a) != n or a.ndim != 2 for a in arrays):
        raise ValueError("every checkpoint needs an (n_rows, d) array with the same rows")
    group_codes = np.zeros(n, dtype=np.int64) if groups is None else encode_labels(groups)[0]
    n_groups = int(group_codes.max()) + 1
    combined = np.concatenate([c * n_groups + group_codes for c in range(len(arrays))])
    stacked = np.concatenate(arrays)
    return label_free_projection(stacked, n_components, groups=combined).reshape(len(arrays), n, -1)


def _lda_weights(second_moment: np.ndarray, class_sums: np.ndarray, class_counts: np.ndarray):
    """LDA(solver="lsqr") of scikit-learn from sufficient statistics, for a batch of fits.

    ``second_moment`` ``(m, r, r)`` = sum of x x' over the training rows, ``class_sums`` ``(m, k, r)``,
    ``class_counts`` ``(k,)``. Covariance = within-class scatter / n_train (priors = class frequencies); returns
    weights ``(m, k, r)`` and intercepts ``(m, k)`` with score = x . w_k + b_k.
    """
    n_train = class_counts.sum()
    means = class_sums / class_counts[None, :, None]
    scatter = second_moment - np.einsum("mki,mkj->mij", class_sums, means)
    weights = np.linalg.solve(scatter / n_train, means.transpose(0, 2, 1)).transpose(0, 2, 1)
    intercepts = -0.5 * np.einsum("mki,mki->mk", means, weights) + np.log(class_counts / n_train)[None]
    return weights, intercepts


def lda_swap_contrast(
    projected_reference: np.ndarray,
    projected_condition: np.ndarray,
    labels: Sequence | np.ndarray,
    groups: Sequence | np.ndarray,
    *,
    n_splits: int = 5,
    n_iter: int = 10_000,
    rng: RngLike = None,
    alternative: Alternative = "two-sided",
    chunk_size: int = 256,
) -> PermutationResult:
    """Held-out LDA accuracy of ``condition`` minus ``reference`` against a null of EQUAL separability.

    Rows are (persona, question) activations already projected on one basis shared by both checkpoints
    (``joint_label_free_projection``); ``labels`` are the personas, ``groups`` the questions. Under H0 the two
    checkpoints are one model, so a question's rows may come from either: each null draw swaps the two checkpoints'
    rows of a random half of the questions (whole questions, all their personas), refits the GroupKFold LDA of both
    pseudo-checkpoints and takes their accuracy difference. (A label-shuffle null asks whether either checkpoint
    carries persona information at all; two checkpoints drawn from one model then differ "significantly" far more
    often than alpha.) Each fit uses sufficient statistics per question, so a draw costs k x r products, not a refit.
    """
    _check_alternative(alternative)
    codes, classes = encode_labels(labels)
    group_codes, group_names = encode_labels(groups)
    a, b = np.asarray(projected_reference, dtype=float), np.asarray(projected_condition, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or len(a) != codes.size:
        raise ValueError("both checkpoints need (n_rows, r) projected rows, one per label")
    folds = grouped_folds(codes, group_codes, n_splits)
    k, n_groups, r = classes.size, group_names.size, a.shape[1]

    def per_group(values: np.ndarray, index: np.ndarray, n_bins: int) -> np.ndarray:
        out = np.zeros((n_bins, values.shape[1]))
        np.add.at(out, index, values)
        return out

    # per question: the rows' second moment (r x r) and each class's row sum, for either checkpoint
    moments = {name: per_group(np.einsum("ni,nj->nij", x, x).reshape(len(x), -1), group_codes, n_groups).reshape(-1, r, r)
               for name, x in (("a", a), ("b", b))}
    sums = {name: per_group(x, group_codes * k + codes, n_groups * k).reshape(n_groups, k, r) for name, x in (("a", a), ("b", b))}
    counts = np.bincount(group_codes * k + codes, minlength=n_groups * k).reshape(n_groups, k).astype(float)

    def accuracies(draws: np.ndarray) -> np.ndarray:
        """``(m, 2)`` held-out accuracy of pseudo-reference and pseudo-condition; draws[i, g] = 1 swaps question g."""
        correct = np.zeros((len(draws), 2))
        for train, test in folds:
            in_train = np.zeros(n_groups, bool)
            in_train[np.unique(group_codes[train])] = True
            chosen = draws[:, in_train]
            class_counts = counts[in_train].sum(axis=0)
            total_t = moments["a"][in_train].sum(axis=0) + moments["b"][in_train].sum(axis=0)
            total_u = sums["a"][in_train].sum(axis=0) + sums["b"][in_train].sum(axis=0)
            delta_t = (moments["b"] - moments["a"])[in_train].reshape(int(in_train.sum()), -1)
            delta_u = (sums["b"] - sums["a"])[in_train].reshape(int(in_train.sum()), -1)
            t_ref = moments["a"][in_train].sum(axis=0) + (chosen @ delta_t).reshape(-1, r, r)
            u_ref = sums["a"][in_train].sum(axis=0) + (chosen @ delta_u).reshape(-1, k, r)
            test_swapped = draws[:, group_codes[test]].astype(bool)  # (m, n_test)
            for side, (t, u) in enumerate(((t_ref, u_ref), (total_t - t_ref, total_u - u_ref))):
                weights, intercepts = _lda_weights(t, u, class_counts)
                # pseudo-reference reads b where its question is swapped; pseudo-condition the other way round
                from_b = test_swapped if side == 0 else ~test_swapped
                flat = weights.reshape(-1, r)  # every draw's weights in one product per checkpoint: (m k, r)
                predicted = []
                for rows in (a[test], b[test]):
                    scores = (flat @ rows.T).reshape(len(draws), k, -1)  # (m, k, n_test)
                    scores += intercepts[:, :, None]
                    predicted.append(scores.argmax(axis=1))
                chosen_prediction = np.where(from_b, predicted[1], predicted[0])
                correct[:, side] += np.sum(chosen_prediction == codes[test][None], axis=1)
        return correct / codes.size

    draws = as_generator(rng).integers(0, 2, size=(n_iter, n_groups)).astype(float)
    with threadpool_limits(limits=1, user_api="blas"):  # small products: BLAS threads only spin on a busy machine
        observed = accuracies(np.zeros((1, n_groups)))[0]
        null = np.concatenate([accuracies(draws[at : at + chunk_size]) for at in range(0, n_iter, chunk_size)])
    statistic = float(observed[1] - observed[0])
    null_delta = null[:, 1] - null[:, 0]
    p = permutation_p_value(statistic, null_delta, alternative)
    return PermutationResult(statistic, float(p), n_iter, False, alternative, null_delta)


# ----------------------------------------------------------------- #205's H2 as an equivalence test (TOST)


def _paired_tost(differences: np.ndarray, margin: float, alpha: float) -> dict:
    """Two one-sided t-tests over units that the mean difference lies inside (-margin, margin); the p-value is the
    larger of the two one-sided ones, and the (1 - 2 alpha) interval is the one TOST's decision reads."""
    d = np.asarray(differences, dtype=float)
    mean, n = float(d.mean()), d.size
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    if n < 2 or sd == 0 or math.isnan(sd):  # no spread to test with: equivalent only if every difference is inside
        inside = bool(np.all(np.abs(d) < margin))
        return {"mean": mean, "p": 0.0 if inside and n > 1 else 1.0, "low": mean, "high": mean, "n": n}
    upper = scipy_stats.ttest_1samp(d, margin, alternative="less").pvalue  # H0: mean >= margin
    lower = scipy_stats.ttest_1samp(d, -margin, alternative="greater").pvalue  # H0: mean <= -margin
    half = scipy_stats.t.ppf(1 - alpha, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "p": float(max(upper, lower)), "low": mean - half, "high": mean + half, "n": n}


def h2_equivalence_test(
    leakage: np.ndarray,
    personas: Sequence[str],
    induction_personas: Sequence[str],
    *,
    source_persona: str = "confab",
    margin: float = 0.15,
    alpha: float = 0.05,
) -> HypothesisResult:
    """H2 (induction-invariant) as an equivalence test: is every condition's mean bystander leakage within
    ``margin`` (the record's 15 points) of every other's?

    ``leakage`` is ``(n_conditions, n_personas, n_questions)``. Per question, a condition's bystander mean (its
    bystanders exclude the source and its own induction persona); for every pair of conditions, TOST over the
    questions (paired: each question is asked in every condition) of the difference of those means. All pairs inside
    the margin is "range < margin", so the intersection-union test's p is the largest pair p (no multiplicity
    correction is needed, and none would help). ``fires`` (equivalence shown) when that p < ``alpha``. The record's
    rule, "range <= 15 pp and a difference test's p > 0.10", is absence of evidence, not an equivalence test.
    """
    leakage = np.asarray(leakage, dtype=float)
    names = list(personas)
    per_question = np.stack([
        leakage[c][[i for i, name in enumerate(names) if name not in (source_persona, induction)]].mean(axis=0)
        for c, induction in enumerate(induction_personas)
    ])  # fmt: skip
    pairs = {}
    for i, j in itertools.combinations(range(len(induction_personas)), 2):
        pairs[(i, j)] = _paired_tost(per_question[i] - per_question[j], margin, alpha)
    means = per_question.mean(axis=1)
    p = max((v["p"] for v in pairs.values()), default=1.0)
    worst = max(pairs, key=lambda ij: (pairs[ij]["p"], abs(pairs[ij]["mean"]))) if pairs else None
    return HypothesisResult(
        "H2", float(means.max() - means.min()), float(p), 0, bool(p < alpha),
        f"TOST: every pair of conditions within +-{margin}; equivalent when the largest pair p < {alpha}",
        {"margin": margin, "alpha": alpha, "n_questions": per_question.shape[1], "worst_pair": worst,
         "pairs": {f"{i}-{j}": v for (i, j), v in pairs.items()}},
    )
