"""Stage ``analyze_issue81``: #81's hypotheses, figures and report from the stored marker rates, judge scores and
base-model centroids, per training seed and across seeds. Every number is recomputed here from those artifacts.

The stage has four parts, each one function: ``results`` (every number, from the artifacts), ``decisions`` (the
pre-registered rules applied to those numbers, per seed and pooled), ``draw_figures`` and ``report``. One results
object holds every number that the report, the figures and ``headline.json`` print; the decisions are part of it.

Units. A training seed replicates the whole recipe of a source (its on-policy data, negatives, LoRA and
evaluation sampling). Within one seed, the completions of one question share its prompt, so every interval
resamples questions (``shared.analysis.stats.clustered_rate_bootstrap``), never single completions; between seeds, a claim
about a source's leakage is a t interval over the seeds' values (``shared.analysis.stats.seed_contrast``). With one seed,
every p-value is conditional on that one fine-tune and the report says so.

Estimands (as the record pins them; rates are base-subtracted: rate(source model) - rate(base model)):

- Leakage per source and seed: the rate on the source's own pure-noun bystander (implantation), the
  base-subtracted rate pooled over every other bystander, and on the assistant QC persona.
- H1 implantation: ``rate(source, A2/<source noun>) > 0.80``, per seed; pooled: every seed must pass.
- H2 noun vs trait, per source and seed (on the coherent subset, incoherent cells dropped):
  ``noun_effect(trait, L) = median over other nouns of |r(source_noun, trait, L) - r(other_noun, trait, L)|``
  (25 values); ``trait_effect(noun, trait, L) = median over (trait', L') != (trait, L) of
  |r(noun, trait, L) - r(noun, trait', L')|`` (125 values); H2 holds if median(noun_effect) > median(trait_effect).
  Significance per seed: a blocked permutation test of "bystanders sharing the source's noun leak more" (noun labels
  shuffled within each (source, trait, level) block); across seeds, a t-test of the seeds' differences.
- H3 gradation: per (source, noun, trait) the OLS slope of the base-subtracted rate over levels 1..5 with its 95%
  question-clustered bootstrap interval (each replicate redraws the questions, the same ones for the source's and
  the base model's cells); the record's count of triples with |slope| > half-width; a permutation p-value per
  triple (levels shuffled within each question), counted raw (with the alpha x m false positives that raw counting
  expects when no slope is real) and after Benjamini-Hochberg over the seed's triples.
- Head-to-head (#88): per Big-5 axis, adjective effect = mean |r(noun, trait, L) - r(A2 noun)| over
  (source, noun, L) (125 cells); noun swap = mean over the 25 (source, L) contexts of the median over the 10 noun
  pairs of |r(n_i) - r(n_j)|; the same with r replaced by the base-model cosine between the source's and the
  bystander's centroids at the headline layer. Axis-label permutation test per metric (range of the per-axis
  means of the adjective effect; trait labels shuffled over the 625 (source, A1) rows, n_perm draws).
- H4: base-model cosine between source and bystander centroids vs leakage; the source x pure-noun submatrix.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
from pydantic import BaseModel

from shared.contract.stage import Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig

H1_THRESHOLD = 0.80

# the seeds of the analysis' random draws, one stream per purpose (with the config's seed, the training seed and
# the source's index), so that a number does not change when another source or seed joins the run
NOUN_MATCH, AXIS_LEAK, AXIS_COS, H3_BOOT, LEAK_BOOT, H4_PERM, H4_MEAN_PERM = range(7)


class SourceInfo(BaseModel):
    name: str
    noun: str


class Bystander(BaseModel):
    id: str
    kind: str
    noun: str | None = None
    trait: str | None = None
    level: str | None = None


class CellArtifacts(BaseModel):
    label: str  # the evaluated model's name in this run: a source (one seed), ``<source>-s<seed>``, or the base
    source: str | None = None  # the source it was trained on (None: the base model, or ``label`` itself)
    seed: int | None = None  # its training seed (None: the config's seed)
    rates_uri: str
    coherence_uri: str | None = None
    train_log_uri: str | None = None  # train_lora's per-step losses, for a fine-tuned cell


class Config(StageConfig):
    sources: list[SourceInfo]
    bystanders: list[Bystander]
    cells: list[CellArtifacts]
    seeds: list[int] | None = None  # the training seeds (None: the seeds the cells name)
    base_label: str = "base"
    marker: str = "[ZLT]"
    centroids_uri: str | None = None
    centroid_personas_uri: str | None = None
    headline_layer: int = 20
    n_boot: int = 1000
    n_perm: int = 10_000
    alpha: float = 0.05  # every test's level, BH's q, and 1 - the intervals' confidence
    coherence_threshold: float = 50.0
    params: dict = {}


# ---------------------------------------------------------------------------------------------------------------
# the grid as arrays


class Grid:
    """Axis orders of the A1 factorial present in the evaluation, and indexers into it."""

    def __init__(self, bystanders: list[Bystander]):
        a1 = [b for b in bystanders if b.kind == "A1"]
        self.nouns = list(dict.fromkeys(b.noun for b in a1))
        self.traits = list(dict.fromkeys(b.trait for b in a1))
        self.levels = sorted(dict.fromkeys(b.level for b in a1))
        self.ids = [b.id for b in bystanders]
        self.row = {b: i for i, b in enumerate(self.ids)}
        self.a1_id = {(b.noun, b.trait, b.level): b.id for b in a1}
        self.a2_id = {b.noun: b.id for b in bystanders if b.kind == "A2"}
        self.qc_ids = [b.id for b in bystanders if b.kind == "QC"]

    def cube(self, values: dict[str, float]) -> np.ndarray:
        """``[noun, trait, level]`` array of ``values`` (NaN where a cell is missing)."""
        out = np.full((len(self.nouns), len(self.traits), len(self.levels)), np.nan)
        for (i, n), (j, t), (k, lv) in itertools.product(enumerate(self.nouns), enumerate(self.traits), enumerate(self.levels)):
            key = self.a1_id.get((n, t, lv))
            if key is not None and key in values and values[key] is not None:
                out[i, j, k] = values[key]
        return out

    def cube_rows(self) -> np.ndarray:
        """``[noun, trait, level]`` row of each A1 cell in ``ids`` order (-1 where the cell is not evaluated)."""
        rows = np.full((len(self.nouns), len(self.traits), len(self.levels)), -1)
        for (i, n), (j, t), (k, lv) in itertools.product(enumerate(self.nouns), enumerate(self.traits), enumerate(self.levels)):
            key = self.a1_id.get((n, t, lv))
            if key is not None:
                rows[i, j, k] = self.row[key]
        return rows

    def a2(self, values: dict[str, float]) -> np.ndarray:
        return np.array([values.get(self.a2_id.get(n, ""), np.nan) for n in self.nouns], dtype=float)


# ---------------------------------------------------------------------------------------------------------------
# estimands (pure functions on arrays: the statistics tests call these on synthetic grids)


def _nanmedian(values: np.ndarray) -> float | None:
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return float(np.median(finite)) if finite.size else None


def _quietly(reduce, values: np.ndarray, axis) -> np.ndarray:
    """``np.nanmedian``/``np.nanmean`` without the warning for all-NaN slices (incoherent cells), which stay NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return reduce(values, axis=axis)


def noun_effects(cube: np.ndarray, source_noun: int) -> np.ndarray:
    """``[trait, level]``: median over the other nouns of |r(source noun) - r(other noun)|."""
    others = [i for i in range(cube.shape[0]) if i != source_noun]
    if not others:
        return np.full(cube.shape[1:], np.nan)
    return _quietly(np.nanmedian, np.abs(cube[source_noun][None] - cube[others]), axis=0)


def trait_effects(cube: np.ndarray) -> np.ndarray:
    """``[noun, trait, level]``: median over the other (trait', level') anchors of the same noun of |difference|."""
    flat = cube.reshape(cube.shape[0], -1)
    diffs = np.abs(flat[:, :, None] - flat[:, None, :])
    idx = np.arange(flat.shape[1])
    diffs[:, idx, idx] = np.nan
    return _quietly(np.nanmedian, diffs, axis=2).reshape(cube.shape)


def h2_for_source(cube: np.ndarray, source_noun: int) -> dict:
    noun = noun_effects(cube, source_noun)
    trait = trait_effects(cube)
    med_noun, med_trait = _nanmedian(noun), _nanmedian(trait)
    ratio = None if not med_noun or not med_trait else med_noun / med_trait
    return {"median_noun_effect": med_noun, "median_trait_effect": med_trait, "ratio": ratio,
            "n_noun_cells": int(np.isfinite(noun).sum()), "n_trait_cells": int(np.isfinite(trait).sum()),
            "noun_effect_by_trait_level": _listify(noun)}


def noun_match_test(cubes: list[tuple[int, np.ndarray]], *, n_perm: int, seed) -> dict:
    """Blocked permutation test: do bystanders sharing the source's noun leak more than other nouns?

    ``cubes`` pairs each source's noun index with its base-subtracted ``[noun, trait, level]`` cube. Rows are the
    A1 cells, the label is "same noun as the source", and labels are shuffled within each (source, trait, level).
    """
    from shared.analysis.stats import label_permutation_test

    values, labels, blocks = [], [], []
    for source, (s, cube) in enumerate(cubes):
        for i, j, k in itertools.product(*map(range, cube.shape)):
            if np.isfinite(cube[i, j, k]):
                values.append(cube[i, j, k])
                labels.append(int(i == s))
                blocks.append(f"{source}/{j}/{k}")
    if len(set(labels)) < 2:
        return {"statistic": None, "p_value": None, "n_rows": len(values), "note": "needs same- and other-noun cells"}
    result = label_permutation_test(np.array(values), np.array(labels), statistic="mean_difference",
                                    blocks=np.array(blocks), alternative="greater", n_iter=n_perm, rng=seed)
    return {"statistic": float(result.statistic), "p_value": float(result.p_value), "n_rows": len(values),
            "n_iter": result.n_iter}


def h3_slopes(hits: np.ndarray, totals: np.ndarray, base_hits: np.ndarray | None = None,
              base_totals: np.ndarray | None = None, *, n_boot: int, n_perm: int, seed, alpha: float = 0.05) -> dict:
    """Slopes over the levels of the base-subtracted rate, per row of ``hits``/``totals`` (``[..., question, level]``).

    Each row's slope is that of the pooled rate (source minus base) over levels 1..n; its interval is a percentile
    bootstrap over questions (every replicate redraws the questions, the same draw for the source's and the base
    model's cells, which were asked the same questions); its p-value is a permutation test that shuffles the levels
    within each question (``shared.analysis.stats.within_cluster_slope_test``). Rows with a missing or empty cell get NaN.
    """
    from shared.analysis.stats import clustered_rate_bootstrap, ols_slope, within_cluster_slope_test

    hits, totals = np.asarray(hits, dtype=float), np.asarray(totals, dtype=float)
    if base_hits is None:
        base_hits, base_totals = np.zeros_like(hits), np.ones_like(totals)
    n_levels = hits.shape[-1]
    x = np.arange(1, n_levels + 1, dtype=float)
    shape = hits.shape[:-2]
    counts = [np.reshape(a, (-1, *hits.shape[-2:])) for a in (hits, totals, base_hits, base_totals)]
    usable = np.all([np.all(np.isfinite(a), axis=(1, 2)) for a in counts], axis=0)
    usable &= np.all(counts[1] > 0, axis=(1, 2)) & np.all(counts[3] > 0, axis=(1, 2))
    out = {key: np.full(usable.size, np.nan) for key in ("slope", "low", "high", "half_width", "p_value")}
    if usable.any():
        h, t, bh, bt = (a[usable] for a in counts)

        def slope(rates, axis=-1):  # rates: [..., source levels + base levels]
            return ols_slope(x, rates[..., :n_levels] - rates[..., n_levels:], axis=-1)

        interval = clustered_rate_bootstrap(np.concatenate([h, bh], axis=-1), np.concatenate([t, bt], axis=-1),
                                            slope, n_boot=n_boot, confidence=1 - alpha, rng=np.random.default_rng(seed))
        test = within_cluster_slope_test(h / t - bh / bt, x, n_iter=n_perm,
                                         rng=np.random.default_rng([*np.atleast_1d(seed), 1]))
        out["slope"][usable] = interval.estimate
        out["low"][usable], out["high"][usable] = interval.low, interval.high
        out["half_width"][usable] = interval.half_width
        out["p_value"][usable] = test.p_value
    return {key: value.reshape(shape) for key, value in out.items()}


def adjective_effects(cube: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """``[noun, trait, level]``: |r(noun, trait, L) - r(A2 noun)| (the persona with vs without the adjective)."""
    return np.abs(cube - a2[:, None, None])


def noun_swap_effects(cube: np.ndarray) -> np.ndarray:
    """``[trait, level]``: median over noun pairs of |r(n_i, trait, L) - r(n_j, trait, L)|."""
    pairs = list(itertools.combinations(range(cube.shape[0]), 2))
    if not pairs:
        return np.full(cube.shape[1:], np.nan)
    return _quietly(np.nanmedian, np.stack([np.abs(cube[i] - cube[j]) for i, j in pairs]), axis=0)


def axis_permutation_test(effects: np.ndarray, *, n_perm: int, seed) -> dict:
    """Range of the per-axis means of ``effects`` (``[..., trait, level]``, rows pooled) vs trait labels shuffled."""
    from shared.analysis.stats import label_permutation_test

    moved = np.moveaxis(effects, -2, 0)  # [trait, ..., level]
    values, labels = [], []
    for t in range(moved.shape[0]):
        finite = moved[t][np.isfinite(moved[t])]
        values += finite.tolist()
        labels += [t] * finite.size
    if len(set(labels)) < 2:
        return {"spread": None, "p_value": None, "note": "needs at least two traits"}
    result = label_permutation_test(np.array(values), np.array(labels), statistic="range", alternative="greater",
                                    n_iter=n_perm, rng=seed)
    return {"spread": float(result.statistic), "p_value": float(result.p_value), "n_rows": len(values),
            "n_iter": result.n_iter}


def spearman_permutation(x: np.ndarray, y: np.ndarray, *, n_perm: int, seed) -> dict:
    """Spearman's rho with a two-sided permutation p-value (y's ranks shuffled ``n_perm`` times)."""
    from scipy.stats import rankdata

    keep = np.isfinite(x) & np.isfinite(y)
    x, y = np.asarray(x)[keep], np.asarray(y)[keep]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": None, "p_value": None, "n": int(x.size), "note": "needs >= 3 non-constant pairs"}
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    rho = float(rx @ ry / np.sqrt((rx @ rx) * (ry @ ry)))
    shuffled = np.random.default_rng(seed).permuted(np.broadcast_to(ry, (n_perm, ry.size)), axis=1)
    null = shuffled @ rx / np.sqrt((rx @ rx) * (ry @ ry))
    p = (1 + np.sum(np.abs(null) >= abs(rho) - 1e-12)) / (1 + n_perm)
    return {"rho": rho, "p_value": float(p), "n": int(x.size)}


def head_to_head_columns(grid: Grid, per_source: list[tuple[np.ndarray, np.ndarray]], metric: str,
                         table: dict, *, n_perm: int, seed) -> dict:
    """The adjective-vs-noun head-to-head of one metric (``leak``: base-subtracted emission; ``cos``: base-model
    cosine to the source), written into ``table[trait]``; returns the axis-label permutation test.

    ``per_source`` holds, for every source, the metric's A1 cube ``[noun, trait, level]`` and its A2 vector
    ``[noun]``. Per axis: adjective = mean over (source, noun, level) of |m(noun, trait, L) - m(A2 noun)|;
    noun swap = mean over the (source, level) contexts of the median over noun pairs of |m(n_i) - m(n_j)|."""
    adjective = np.stack([adjective_effects(cube, a2) for cube, a2 in per_source])  # [source, noun, trait, level]
    noun_swap = np.stack([noun_swap_effects(cube) for cube, _ in per_source])  # [source, trait, level]
    for j, trait in enumerate(grid.traits):
        adj, swap = _nanmean(adjective[:, :, j, :]), _nanmean(noun_swap[:, j, :])
        table.setdefault(trait, {}).update({
            f"adjective_{metric}": adj, f"noun_swap_{metric}": swap,
            f"ratio_{metric}": adj / swap if adj is not None and swap else None,
            f"n_adjective_{metric}": int(np.isfinite(adjective[:, :, j, :]).sum()),
            f"n_noun_swap_contexts_{metric}": int(np.isfinite(noun_swap[:, j, :]).sum())})
    return axis_permutation_test(adjective.reshape(-1, len(grid.traits), len(grid.levels)), n_perm=n_perm, seed=seed)


def cosine_matrix(centroids: np.ndarray) -> np.ndarray:
    unit = centroids / np.linalg.norm(centroids, axis=-1, keepdims=True)
    return unit @ unit.T


def _nanmean(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _listify(array: np.ndarray):
    """Nested lists with NaN as None, so headline.json stays strict JSON."""
    return [_listify(a) for a in array] if np.ndim(array) > 1 else [None if not np.isfinite(v) else float(v) for v in array]


def _interval(estimate, low, high) -> dict:
    return {"estimate": _finite(estimate), "low": _finite(low), "high": _finite(high)}


def _finite(value) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


# ---------------------------------------------------------------------------------------------------------------
# part 1: results, every number from the stored artifacts


class ModelCounts:
    """One evaluated model's marker counts: per bystander, and per (bystander, question) as arrays in grid order."""

    def __init__(self, cell: CellArtifacts, source: str | None, seed: int, grid: Grid):
        data = store.read_json(cell.rates_uri)
        rates = data.get("rates") or {}
        if not rates:
            raise StageInputError(f"no marker rates in {cell.rates_uri}")
        without = sorted(b for b, v in rates.items() if "questions" not in v)
        if without:
            raise StageInputError(f"{cell.rates_uri} has no per-question counts for {without[:3]} (written by an older "
                                  "marker_eval): re-run that evaluation")
        self.label, self.source, self.seed, self.matching = cell.label, source, seed, data.get("matching", "")
        self.rates = {k: v["rate"] for k, v in rates.items()}
        self.hits = {k: v["hits"] for k, v in rates.items()}
        self.totals = {k: v["total"] for k, v in rates.items()}
        self.truncated = {k: v.get("truncated") for k, v in rates.items()}
        self.questions = sorted({q for v in rates.values() for q in v["questions"]})
        self.by_question = {k: v["questions"] for k, v in rates.items()}
        self.grid = grid

    def question_counts(self, questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(hits, totals)`` of shape ``[bystander (grid order), question]``; NaN for a bystander not evaluated."""
        hits = np.full((len(self.grid.ids), len(questions)), np.nan)
        totals = np.full_like(hits, np.nan)
        for i, b in enumerate(self.grid.ids):
            if b in self.by_question:
                for j, q in enumerate(questions):
                    cell = self.by_question[b].get(q, {"hits": 0, "total": 0})
                    hits[i, j], totals[i, j] = cell["hits"], cell["total"]
        return hits, totals


def emission_summary(rates: dict[str, float], hits: dict[str, int], totals: dict[str, int],
                     truncated: dict[str, int | None], own: str | None) -> dict:
    """One model's emission over the whole grid: pooled rate, the mean and the largest rate over the bystanders
    other than ``own`` (the source's own pure-noun bystander, if any), and the share of truncated completions."""
    others = {b: r for b, r in rates.items() if b != own}
    top = max(others, key=others.get) if others else None
    counted = [t for t in truncated.values() if t is not None]
    return {"pooled_rate": sum(hits.values()) / sum(totals.values()), "hits": sum(hits.values()),
            "total": sum(totals.values()), "own_bystander": own, "own_rate": rates.get(own) if own else None,
            "own_hits": hits.get(own) if own else None, "own_total": totals.get(own) if own else None,
            "mean_rate_others": float(np.mean(list(others.values()))) if others else None,
            "n_others": len(others), "max_other": top, "max_other_rate": others.get(top) if top else None,
            "truncated_share": sum(counted) / sum(totals.values()) if len(counted) == len(truncated) else None}


def read_coherence(uri: str | None) -> dict[str, dict]:
    if not uri:
        return {}
    by_cell: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    for row in store.read_jsonl(uri):
        if row.get("error") is not None or row.get("score") is None:
            errors[row["condition"]] = errors.get(row["condition"], 0) + 1
            continue
        by_cell.setdefault(row["condition"], []).append(float(row["score"]))
    cells = set(by_cell) | set(errors)
    return {c: {"mean": float(np.mean(by_cell[c])) if by_cell.get(c) else None, "n": len(by_cell.get(c, [])),
                "errors": errors.get(c, 0)} for c in cells}


def read_geometry(cfg: Config) -> tuple[dict[str, np.ndarray], list[str], str | None] | None:
    """Centroids by layer, the persona ids, and the layer convention the hidden_states stage recorded."""
    if not cfg.centroids_uri or not cfg.centroid_personas_uri:
        return None
    arrays = store.read_npz(cfg.centroids_uri)
    index = store.read_json(cfg.centroid_personas_uri)
    by_layer = {int(layer): arrays["centroids"][i] for i, layer in enumerate(arrays["layers"])}
    return by_layer, index["persona_ids"], index.get("layer_convention")


def training_summary(cfg: Config) -> dict[str, dict]:
    """Per fine-tuned cell: its optimizer steps and its mean marker-only loss over its first and last few steps."""
    out = {}
    for cell in cfg.cells:
        if cell.train_log_uri:
            losses = [r["loss"] for r in store.read_jsonl(cell.train_log_uri)]
            if not losses:
                raise StageInputError(f"cell {cell.label}: no losses in {cell.train_log_uri}")
            window = max(1, min(5, len(losses) // 4))
            out[cell.label] = {"steps": len(losses), "window": window, "loss_start": float(np.mean(losses[:window])),
                               "loss_end": float(np.mean(losses[-window:]))}
    return out


def _models(cfg: Config, grid: Grid) -> tuple[dict[str, ModelCounts], dict[str, dict[int, str]], list[int]]:
    """Every evaluated model, the label of each (source, seed), and the training seeds; refuses a run with a gap."""
    labels = [c.label for c in cfg.cells]
    if len(set(labels)) != len(labels):
        raise StageInputError(f"cell labels must be distinct: {labels}")
    if cfg.base_label not in labels:
        raise StageInputError(f"no base-model cell {cfg.base_label!r} among {labels}")
    names = {s.name for s in cfg.sources}
    replicates: dict[str, dict[int, str]] = {s.name: {} for s in cfg.sources}
    models = {}
    for cell in cfg.cells:
        source = None if cell.label == cfg.base_label else cell.source or cell.label
        seed = cfg.seed if cell.seed is None else cell.seed
        if source is not None:
            if source not in names:
                raise StageInputError(f"cell {cell.label} names source {source!r}, not among {sorted(names)}")
            if seed in replicates[source]:
                raise StageInputError(f"two cells for source {source!r} and seed {seed}")
            replicates[source][seed] = cell.label
        models[cell.label] = ModelCounts(cell, source, seed, grid)
    missing = [s.name for s in cfg.sources if not replicates[s.name]]
    if missing:
        raise StageInputError(f"no evaluation for source(s) {missing}")
    seeds = cfg.seeds or sorted({seed for by_seed in replicates.values() for seed in by_seed})
    gaps = [f"{s}/seed {seed}" for s, by_seed in replicates.items() for seed in seeds if seed not in by_seed]
    if gaps:
        raise StageInputError(f"no evaluation for {gaps}: every source needs every training seed")
    questions = {tuple(m.questions) for m in models.values()}
    if len(questions) != 1:
        raise StageInputError("the evaluated models were asked different questions")
    return models, {s: {seed: by_seed[seed] for seed in seeds} for s, by_seed in replicates.items()}, seeds


def results(cfg: Config) -> dict:
    """Every number the report, the figures and headline.json print, computed from the stored artifacts."""
    from scipy import stats as scipy_stats

    from shared.analysis.stats import clustered_rate_bootstrap, discoveries, seed_contrast

    grid = Grid(cfg.bystanders)
    models, replicates, seeds = _models(cfg, grid)
    base = models[cfg.base_label]
    questions = base.questions
    confidence = 1 - cfg.alpha
    counts = {label: m.question_counts(questions) for label, m in models.items()}
    coherence = {c.label: read_coherence(c.coherence_uri) for c in cfg.cells}
    flagged = {label: sorted(b for b, c in coh.items() if c["mean"] is not None and c["mean"] < cfg.coherence_threshold)
               for label, coh in coherence.items()}
    source_index = {s.name: i for i, s in enumerate(cfg.sources)}
    own_id = {s.name: grid.a2_id.get(s.noun) for s in cfg.sources}

    def rng(purpose: int, seed: int = 0, source: str | None = None) -> np.random.Generator:
        return np.random.default_rng([cfg.seed, purpose, seed, 0 if source is None else 1 + source_index[source]])

    def subtracted(label: str, *, coherent_only: bool) -> dict[str, float]:
        drop = set(flagged.get(label, [])) if coherent_only else set()
        return {b: models[label].rates[b] - base.rates[b] for b in grid.ids
                if b in models[label].rates and b in base.rates and b not in drop}

    def cell_of(source: str, seed: int) -> str:
        return replicates[source][seed]

    # leakage per source and seed, with question-clustered intervals; then across seeds
    leakage: dict = {}
    for s in cfg.sources:
        per_seed = {}
        for seed in seeds:
            hits, totals = counts[cell_of(s.name, seed)]
            base_hits, base_totals = counts[cfg.base_label]
            own = grid.row.get(own_id[s.name])
            others = [grid.row[b] for b in grid.ids if b != own_id[s.name]]
            row = {}
            if own is not None:
                own_ci = clustered_rate_bootstrap(hits[own][:, None], totals[own][:, None], n_boot=cfg.n_boot,
                                                  confidence=confidence, rng=rng(LEAK_BOOT, seed, s.name))
                row["own"] = _interval(own_ci.estimate, own_ci.low, own_ci.high)
            for key, rows in (("others", others), ("assistant", [grid.row[b] for b in grid.qc_ids])):
                if not rows:
                    continue
                pair_hits = np.stack([np.nansum(hits[rows], axis=0), np.nansum(base_hits[rows], axis=0)], axis=-1)
                pair_totals = np.stack([np.nansum(totals[rows], axis=0), np.nansum(base_totals[rows], axis=0)], axis=-1)
                ci = clustered_rate_bootstrap(pair_hits, pair_totals, lambda r, axis=-1: r[..., 0] - r[..., 1],
                                              n_boot=cfg.n_boot, confidence=confidence, rng=rng(LEAK_BOOT, seed, s.name))
                row[key] = _interval(ci.estimate, ci.low, ci.high)
            per_seed[str(seed)] = row
        between = {}
        for key in ("own", "others", "assistant"):
            values = [per_seed[str(seed)][key]["estimate"] for seed in seeds if key in per_seed[str(seed)]]
            if len(values) == len(seeds):
                c = seed_contrast(values, reference=0.0, confidence=confidence)
                between[key] = {"mean": c.estimate, "low": _finite(c.low), "high": _finite(c.high),
                                "sd": _finite(c.sd_a), "n_seeds": c.n_a, "method": c.method}
        leakage[s.name] = {"per_seed": per_seed, "between_seeds": between}

    # H1: the raw rate on the source's own pure noun
    h1 = {s.name: {str(seed): {"label": cell_of(s.name, seed), "bystander": own_id[s.name],
                               "rate": models[cell_of(s.name, seed)].rates.get(own_id[s.name]),
                               "hits": models[cell_of(s.name, seed)].hits.get(own_id[s.name]),
                               "total": models[cell_of(s.name, seed)].totals.get(own_id[s.name]),
                               "base_rate": base.rates.get(own_id[s.name])} for seed in seeds}
          for s in cfg.sources}

    # H2 per source and seed, the noun-match test per seed, and its seed-level test
    cubes = {(s.name, seed): grid.cube(subtracted(cell_of(s.name, seed), coherent_only=True))
             for s in cfg.sources for seed in seeds}
    h2: dict = {s.name: {} for s in cfg.sources}
    noun_match: dict = {}
    for seed in seeds:
        matched = []
        for s in cfg.sources:
            if s.noun not in grid.nouns:
                h2[s.name][str(seed)] = {"note": f"the source noun {s.noun!r} is not among the bystander nouns"}
                continue
            h2[s.name][str(seed)] = h2_for_source(cubes[(s.name, seed)], grid.nouns.index(s.noun))
            matched.append((grid.nouns.index(s.noun), cubes[(s.name, seed)]))
        noun_match[str(seed)] = noun_match_test(matched, n_perm=cfg.n_perm, seed=rng(NOUN_MATCH, seed))
    deltas = [noun_match[str(seed)]["statistic"] for seed in seeds]
    noun_match_between = None
    if all(d is not None for d in deltas):
        c = seed_contrast(deltas, reference=0.0, confidence=confidence)
        noun_match_between = {"mean": c.estimate, "low": _finite(c.low), "high": _finite(c.high), "sd": _finite(c.sd_a),
                              "p_value": _finite(c.p_value), "n_seeds": c.n_a, "method": c.method}

    # H3: slopes with question-clustered intervals and within-question permutation p-values, per seed
    h3: dict = {"per_seed": {}, "levels": grid.levels}
    if len(grid.levels) == 5:
        rows = grid.cube_rows()
        base_hits, base_totals = counts[cfg.base_label]

        def by_level(array: np.ndarray) -> np.ndarray:  # [noun, trait, question, level]
            cube = np.where(rows[..., None] >= 0, array[np.maximum(rows, 0)], np.nan)  # [noun, trait, level, question]
            return np.swapaxes(cube, -1, -2)

        slopes_by_seed = {}
        for seed in seeds:
            per_source, p_values, record_rule = {}, [], 0
            for s in cfg.sources:
                hits, totals = counts[cell_of(s.name, seed)]
                res = h3_slopes(by_level(hits), by_level(totals), by_level(base_hits), by_level(base_totals),
                                n_boot=cfg.n_boot, n_perm=cfg.n_perm, alpha=cfg.alpha,
                                seed=[cfg.seed, H3_BOOT, seed, 1 + source_index[s.name]])
                usable = np.isfinite(res["slope"])
                above = usable & (np.abs(np.nan_to_num(res["slope"])) > np.nan_to_num(res["half_width"]))
                per_source[s.name] = {key: _listify(value) for key, value in res.items()}
                per_source[s.name].update(n_triples=int(usable.sum()), n_above_half_width=int(above.sum()))
                p_values += res["p_value"][usable].tolist()
                record_rule += int(above.sum())
                slopes_by_seed.setdefault(s.name, []).append(res["slope"])
            family = discoveries(p_values, alpha=cfg.alpha)
            h3["per_seed"][str(seed)] = {
                "per_source": per_source, "n_triples": family.n_tests, "n_above_half_width": record_rule,
                "n_raw": family.n_raw, "expected_false_raw": family.expected_false_raw, "n_bh": family.n_bh,
                "expected_false_bh": family.expected_false_bh, "raw_rule": family.raw_rule, "bh_rule": family.bh_rule}
            # BH-adjusted p per triple, back in [noun, trait] place
            adjusted = iter(family.p_bh.tolist())
            for s in cfg.sources:
                p = np.array(per_source[s.name]["p_value"], dtype=float)
                p_bh = np.array([[next(adjusted) if np.isfinite(v) else np.nan for v in row] for row in p])
                per_source[s.name].update(p_bh=_listify(p_bh), n_raw=int(np.sum(np.nan_to_num(p, nan=1.0) < cfg.alpha)),
                                          n_bh=int(np.sum(np.nan_to_num(p_bh, nan=1.0) < cfg.alpha)))
        h3["between_seeds"] = _h3_between_seeds(slopes_by_seed, seeds, cfg.alpha) if len(seeds) > 1 else None
    else:
        h3["note"] = f"H3 needs the 5 gradation levels; this evaluation has {grid.levels}"

    # head-to-head on leakage, per seed and its mean over seeds
    head_to_head_by_seed, axis_leak = {}, {}
    for seed in seeds:
        table = {trait: {} for trait in grid.traits}
        per_source = [(cubes[(s.name, seed)], grid.a2(subtracted(cell_of(s.name, seed), coherent_only=True)))
                      for s in cfg.sources]
        axis_leak[str(seed)] = head_to_head_columns(grid, per_source, "leak", table, n_perm=cfg.n_perm,
                                                    seed=rng(AXIS_LEAK, seed))
        head_to_head_by_seed[str(seed)] = table
    head_to_head = {trait: _mean_over_seeds([head_to_head_by_seed[str(seed)][trait] for seed in seeds])
                    for trait in grid.traits}

    # the seed-mean view the figures draw
    mean_subtracted = {s.name: _mean_dicts([subtracted(cell_of(s.name, seed), coherent_only=False) for seed in seeds])
                       for s in cfg.sources}
    flagged_any = {s.name: sorted(set().union(*(flagged.get(cell_of(s.name, seed), []) for seed in seeds)))
                   for s in cfg.sources}
    noun_effect_mean = {s.name: _listify(_quietly(np.nanmean, np.array(
        [np.array(h2[s.name][str(seed)].get("noun_effect_by_trait_level"), dtype=float) for seed in seeds]), axis=0))
        if s.noun in grid.nouns else None for s in cfg.sources}

    # geometry: cosine head-to-head, the axis test on cosine and H4 per seed and on the seed mean
    geometry = read_geometry(cfg)
    cos_section: dict = {"available": geometry is not None}
    if geometry is not None:
        by_layer, ids, convention = geometry
        if cfg.headline_layer not in by_layer:
            raise StageInputError(f"headline layer {cfg.headline_layer} not among the stored layers {sorted(by_layer)}")
        leak_views = {str(seed): {s.name: subtracted(cell_of(s.name, seed), coherent_only=True) for s in cfg.sources}
                      for seed in seeds}
        coherent_mean = {s.name: _mean_dicts([leak_views[str(seed)][s.name] for seed in seeds], every=True)
                         for s in cfg.sources}
        cos_section.update(geometry_section(cfg, grid, by_layer, ids, leak_views, coherent_mean, head_to_head,
                                            rng(AXIS_COS), [cfg.seed, H4_MEAN_PERM],
                                            lambda seed: [cfg.seed, H4_PERM, seed]))
        cos_section["layer_convention"] = convention

    emission = {label: emission_summary(m.rates, m.hits, m.totals, m.truncated, own_id.get(m.source))
                for label, m in models.items()}
    n_per_cell = {label: sorted(set(m.totals.values())) for label, m in models.items()}
    return {
        "marker": cfg.marker, "matching": base.matching, "sources": [s.model_dump() for s in cfg.sources],
        "n_sources": len(cfg.sources),
        "base_label": cfg.base_label, "seeds": seeds, "n_seeds": len(seeds),
        "replicates": {s: {str(seed): label for seed, label in by_seed.items()} for s, by_seed in replicates.items()},
        "models": {label: {"source": m.source, "seed": m.seed} for label, m in models.items()},
        "axes": {"nouns": grid.nouns, "traits": grid.traits, "levels": grid.levels},
        "n_bystanders": len(grid.ids), "bystander_ids": grid.ids, "questions": questions,
        "n_questions": len(questions), "completions_per_cell": n_per_cell,
        "rates": {label: m.rates for label, m in models.items()}, "hits": {label: m.hits for label, m in models.items()},
        "totals": {label: m.totals for label, m in models.items()}, "emission": emission,
        "base_subtracted": {label: subtracted(label, coherent_only=False) for label in models if label != cfg.base_label},
        "leakage": leakage,
        "coherence": {"threshold": cfg.coherence_threshold, "flagged": flagged,
                      "cell_mean": {label: {b: c["mean"] for b, c in coh.items()} for label, coh in coherence.items()},
                      "n_flagged": {k: len(v) for k, v in flagged.items()},
                      "n_cells_scored": {label: sum(1 for c in coh.values() if c["mean"] is not None)
                                         for label, coh in coherence.items()},
                      "n_scores": {label: sum(c["n"] for c in coh.values()) for label, coh in coherence.items()},
                      "n_judge_errors": {label: sum(c["errors"] for c in coh.values()) for label, coh in coherence.items()},
                      "mean": {label: _nanmean(np.array([c["mean"] for c in coh.values() if c["mean"] is not None]))
                               for label, coh in coherence.items()},
                      "spread": {label: _spread_of([c["mean"] for c in coh.values()]) for label, coh in coherence.items()}},
        "h1": {"threshold": H1_THRESHOLD, "per_source": h1},
        "h2": {"per_source": h2, "noun_match_test": noun_match, "noun_match_between_seeds": noun_match_between},
        "h3": h3,
        "head_to_head": head_to_head, "head_to_head_by_seed": head_to_head_by_seed,
        "axis_permutation_leak": axis_leak,
        "seed_mean": {"base_subtracted": mean_subtracted, "flagged": flagged_any, "noun_effect": noun_effect_mean},
        "geometry": cos_section,
        "training": training_summary(cfg),
        "training_curves": {c.label: store.read_jsonl(c.train_log_uri) for c in cfg.cells if c.train_log_uri},
        "settings": {"n_boot": cfg.n_boot, "n_perm": cfg.n_perm, "seed": cfg.seed, "headline_layer": cfg.headline_layer,
                     "alpha": cfg.alpha, "confidence": confidence, "confidence_pct": 100 * confidence,
                     "between_seed_df": len(seeds) - 1,
                     "between_seed_t_critical": (float(scipy_stats.t.ppf(1 - cfg.alpha / 2, len(seeds) - 1))
                                                 if len(seeds) > 1 else None)},
    }


def _h3_between_seeds(slopes_by_seed: dict[str, list[np.ndarray]], seeds: list[int], alpha: float) -> dict:
    """Per triple, a one-sample t-test over the seeds' slopes (the seed is the unit), BH over the triples."""
    from shared.analysis.stats import discoveries, seed_contrast

    p_values, per_source = [], {}
    for source, slopes in slopes_by_seed.items():
        stacked = np.stack(slopes)  # [seed, noun, trait]
        p = np.full(stacked.shape[1:], np.nan)
        for index in np.ndindex(*stacked.shape[1:]):
            values = stacked[(slice(None), *index)]
            if np.all(np.isfinite(values)):
                p[index] = seed_contrast(values, reference=0.0).p_value
        per_source[source] = {"mean_slope": _listify(stacked.mean(axis=0)), "p_value": _listify(p)}
        p_values += p[np.isfinite(p)].tolist()
    family = discoveries(p_values, alpha=alpha)
    return {"per_source": per_source, "n_triples": family.n_tests, "n_raw": family.n_raw,
            "expected_false_raw": family.expected_false_raw, "n_bh": family.n_bh,
            "expected_false_bh": family.expected_false_bh, "df": len(seeds) - 1,
            "method": "one-sample t over the seeds' slopes against 0, BH over the triples"}


def _mean_dicts(dicts: list[dict[str, float]], *, every: bool = False) -> dict[str, float]:
    """Key-wise mean over ``dicts`` (of the keys in every dict when ``every``, else of the keys in any)."""
    keys = set.intersection(*(set(d) for d in dicts)) if every else set().union(*dicts)
    return {k: float(np.mean([d[k] for d in dicts if k in d])) for k in sorted(keys)}


def _mean_over_seeds(rows: list[dict]) -> dict:
    """The head-to-head row of each metric averaged over seeds (counts are the same in every seed: the first's)."""
    out = {}
    for key in rows[0]:
        values = [r.get(key) for r in rows]
        if key.startswith("n_"):
            out[key] = values[0]
        else:
            finite = [v for v in values if v is not None]
            out[key] = float(np.mean(finite)) if len(finite) == len(values) else None
    return out


def _spread_of(values: list) -> dict | None:
    finite = [v for v in values if v is not None]
    if not finite:
        return None
    return {"min": float(min(finite)), "median": float(np.median(finite)), "max": float(max(finite))}


def geometry_section(cfg, grid: Grid, by_layer, ids, leak_views: dict, coherent_mean: dict, head_to_head: dict,
                     axis_rng, mean_entropy: list[int], seed_entropy) -> dict:
    """Cosine columns of the head-to-head (added to ``head_to_head`` in place), the axis test on cosine, and H4 on
    each seed's coherent leakage (``leak_views[seed][source]``) and on its mean over seeds (``coherent_mean``)."""
    index = {pid: i for i, pid in enumerate(ids)}
    out: dict = {"layers": sorted(by_layer), "headline_layer": cfg.headline_layer}
    cos = {layer: cosine_matrix(c) for layer, c in by_layer.items()}

    def cos_between(layer: int, a: str | None, b: str | None) -> float:
        return float(cos[layer][index[a], index[b]]) if a in index and b in index else np.nan

    headline = cfg.headline_layer
    # the head-to-head on base-model cosine to the source (the source's prompt is its pure-noun bystander's)
    cos_cubes = []
    for s in cfg.sources:
        src = grid.a2_id.get(s.noun)
        cos_cubes.append((grid.cube({b: cos_between(headline, src, b) for b in grid.a1_id.values()}),
                          np.array([cos_between(headline, src, grid.a2_id.get(n)) for n in grid.nouns])))
    out["axis_permutation_cos"] = head_to_head_columns(grid, cos_cubes, "cos", head_to_head, n_perm=cfg.n_perm,
                                                       seed=axis_rng)

    a2_nouns = [n for n in grid.nouns if n in grid.a2_id]
    off = np.array([[s.noun != n for n in a2_nouns] for s in cfg.sources])

    def submatrix(layer: int) -> np.ndarray:
        return np.array([[cos_between(layer, grid.a2_id.get(s.noun), grid.a2_id[n]) for n in a2_nouns]
                         for s in cfg.sources])

    def h4_of(leak: dict[str, dict[str, float]], entropy: list[int], per_layer: bool) -> dict:
        """H4 of one leakage view; every test draws from its own generator (the off-diagonal test at a layer from the
        same one whether it is read as the headline or in the per-layer table, so both print one p-value)."""
        def rng(*key: int) -> np.random.Generator:
            return np.random.default_rng([*entropy, *key])

        leak_sub = np.array([[leak[s.name].get(grid.a2_id[n], np.nan) for n in a2_nouns] for s in cfg.sources])

        def off_diagonal(layer: int) -> dict:
            return spearman_permutation(submatrix(layer)[off], leak_sub[off], n_perm=cfg.n_perm, seed=rng(1, layer))

        section = {"leak": _listify(leak_sub), "cos": _listify(submatrix(headline)), "off_diagonal": off_diagonal(headline)}
        if per_layer:
            section["per_layer_off_diagonal"] = {str(layer): off_diagonal(layer) for layer in sorted(cos)}
        per_source = {}
        for i, s in enumerate(cfg.sources):
            src_id = grid.a2_id.get(s.noun)
            keys = [b for b in grid.ids if b in leak[s.name] and b != src_id]
            per_source[s.name] = spearman_permutation(np.array([cos_between(headline, src_id, b) for b in keys]),
                                                      np.array([leak[s.name][b] for b in keys]), n_perm=cfg.n_perm,
                                                      seed=rng(2, i))
        section["cos_vs_leak_all_bystanders"] = per_source
        return section

    out["h4"] = {"nouns": a2_nouns, **h4_of(coherent_mean, mean_entropy, per_layer=True),
                 "per_seed": {seed: h4_of(view, seed_entropy(int(seed)), per_layer=False)
                              for seed, view in leak_views.items()}}
    out["cos_to_source"] = {s.name: {b: cos_between(headline, grid.a2_id.get(s.noun), b) for b in grid.ids}
                            for s in cfg.sources}
    return out


# ---------------------------------------------------------------------------------------------------------------
# part 2: the pre-registered decisions, per seed and pooled


def decisions(res: dict) -> dict:
    """The record's rules applied to the results, per training seed, and pooled over seeds by ``PooledDecision``'s
    rule (every seed must pass). H3 has no pass/fail in the record: its counts per seed are the decision."""
    from shared.analysis.stats import PooledDecision

    seeds = res["seeds"]
    h1, h2 = {}, {}
    for source, by_seed in res["h1"]["per_source"].items():
        pooled = PooledDecision({seed: by_seed[str(seed)]["rate"] is not None
                                 and by_seed[str(seed)]["rate"] > res["h1"]["threshold"] for seed in seeds})
        h1[source] = {"per_seed": {str(k): v for k, v in pooled.per_seed.items()}, "passes": pooled.passes,
                      "n_pass": pooled.n_pass}
    for source, by_seed in res["h2"]["per_source"].items():
        holds = {seed: _h2_holds(by_seed[str(seed)]) for seed in seeds}
        pooled = PooledDecision({seed: bool(v) for seed, v in holds.items()})
        h2[source] = {"per_seed": {str(k): v for k, v in holds.items()}, "passes": pooled.passes,
                      "n_pass": pooled.n_pass}
    h3: dict = {}
    if res["h3"].get("per_seed"):
        in_every_seed = 0
        per_seed = res["h3"]["per_seed"]
        for source in per_seed[str(seeds[0])]["per_source"]:
            adjusted = [np.array(per_seed[str(seed)]["per_source"][source]["p_bh"], dtype=float) for seed in seeds]
            for index in np.ndindex(*adjusted[0].shape):
                values = [a[index] for a in adjusted]
                if all(np.isfinite(values)):
                    in_every_seed += PooledDecision({seed: v < res["settings"]["alpha"]
                                                     for seed, v in zip(seeds, values, strict=True)}).passes
        h3 = {"n_bh_in_every_seed": in_every_seed, "n_triples": per_seed[str(seeds[0])]["n_triples"]}
    rule = PooledDecision({}).rule
    return {
        "rule": rule, "single_seed": len(seeds) == 1,
        "h1": {"per_source": h1, "n_sources": len(h1), "n_pass_pooled": sum(v["passes"] for v in h1.values()),
               "n_pass_per_seed": {str(seed): sum(v["per_seed"][str(seed)] for v in h1.values()) for seed in seeds}},
        "h2": {"per_source": h2, "n_sources": len(h2), "n_pass_pooled": sum(v["passes"] for v in h2.values()),
               "n_pass_per_seed": {str(seed): sum(bool(v["per_seed"][str(seed)]) for v in h2.values()) for seed in seeds}},
        "h3": h3,
    }


def _h2_holds(row: dict) -> bool | None:
    """H2's pinned comparison: the median noun effect exceeds the median trait effect (None: not computable)."""
    noun, trait = row.get("median_noun_effect"), row.get("median_trait_effect")
    return None if noun is None or trait is None else bool(noun > trait)


# ---------------------------------------------------------------------------------------------------------------
# part 3: figures, drawn from the results object alone. Leakage is the mean over the training seeds. Low-coherence
# cells are marked wherever a cell is drawn: hatched in the matrix panels, a black "x" on the line panels; line-panel
# means are over the coherent cells only. Each figure function returns the written URIs and ``marked``, the number
# of low-coherence cells it marked.

HATCH_NOTE = "hatched: low coherence"


def _flagged(data: dict, source: str) -> set[str]:
    """Bystanders marked low-coherence for ``source``: flagged under any of its seeds (the figures draw seed means)."""
    return set(data["seed_mean"]["flagged"].get(source, []))


def _seed_note(data: dict) -> str:
    return "one training seed" if data["n_seeds"] == 1 else f"mean over {data['n_seeds']} training seeds"


def _hatch(ax, x: float, y: float) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="xxx", edgecolor="#808080", linewidth=0))


def _cell_text(ax, x: float, y: float, value: float, digits: int = 2) -> None:
    text = "—" if not np.isfinite(value) else f"{value:.{digits}f}"
    ax.text(x, y, text, ha="center", va="center", fontsize=8,
            color="white" if np.isfinite(value) and abs(value) > 0.55 else "black")


def _short(bystander: str) -> str:
    return bystander.replace("A1__", "").replace("A2__", "A2 ").replace("__", " ")


def heatmap_figure(data: dict, uri: str) -> dict:
    from shared.analysis.figures import new_figure, save

    sources = [s["name"] for s in data["sources"]]
    ids = data["bystander_ids"]
    matrix = np.array([[data["seed_mean"]["base_subtracted"][s].get(b, np.nan) for b in ids] for s in sources])
    fig, ax = new_figure(width=max(6.0, 0.11 * len(ids) + 2), height=1.6 + 0.45 * len(sources))
    ax.grid(False)
    image = ax.imshow(matrix, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    marked = 0
    for i, s in enumerate(sources):
        for j, b in enumerate(ids):
            if b in _flagged(data, s):
                _hatch(ax, j, i)
                marked += 1
    # a thin line between the bystander nouns' blocks and before the pure-noun / QC columns
    prefixes = [b.split("__")[1] if b.startswith("A1__") else b.split("__")[0] for b in ids]
    for j in range(1, len(ids)):
        if prefixes[j] != prefixes[j - 1]:
            ax.axvline(j - 0.5, color="black", linewidth=0.6)
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xticks(range(len(ids)), [_short(b) for b in ids], rotation=90, fontsize=4)
    ax.set_xlabel("bystander (noun, Big-5 trait, level; then the pure nouns and the assistant QC)", fontsize=8)
    ax.set_ylabel("trained source")
    ax.set_title(f"{data['marker']} emission minus base model ({len(sources)} sources x {len(ids)} bystanders, "
                 f"{_seed_note(data)}; {HATCH_NOTE})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01, label="rate - base rate")
    return {**save(fig, uri), "marked": marked}


def _house_style():
    """pyplot with the house style applied (``new_figure`` sets it); for figures with several panels."""
    import matplotlib.pyplot as plt

    from shared.analysis.figures import new_figure

    plt.close(new_figure()[0])
    return plt


def _per_source_axes(n: int, width_each: float = 3.2, height: float = 3.0):
    fig, axes = _house_style().subplots(1, n, figsize=(width_each * n, height), squeeze=False, sharey=True)
    return fig, axes[0]


def _cube_of(data: dict, source: str, *, coherent_only: bool = False) -> np.ndarray:
    axes = data["axes"]
    sub = data["seed_mean"]["base_subtracted"][source]
    drop = _flagged(data, source) if coherent_only else set()
    return np.array([[[np.nan if f"A1__{n}__{t}__{lv}" in drop else sub.get(f"A1__{n}__{t}__{lv}", np.nan)
                       for lv in axes["levels"]] for t in axes["traits"]] for n in axes["nouns"]])


def _flag_cube(data: dict, source: str) -> np.ndarray:
    axes, drop = data["axes"], _flagged(data, source)
    return np.array([[[f"A1__{n}__{t}__{lv}" in drop for lv in axes["levels"]] for t in axes["traits"]]
                     for n in axes["nouns"]])


def _mark_legend(ax, marked: int) -> None:
    if marked:
        ax.plot([], [], "x", color="black", label="low coherence")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))


def noun_isolation_figure(data: dict, uri: str) -> dict:
    from shared.analysis.figures import PALETTE, save

    axes, sources = data["axes"], [s["name"] for s in data["sources"]]
    fig, panels = _per_source_axes(len(sources))
    x = np.arange(len(axes["nouns"]))
    marked = 0
    for ax, source in zip(panels, sources, strict=True):
        cube, flags = _cube_of(data, source), _flag_cube(data, source)
        for j, trait in enumerate(axes["traits"]):
            for k in range(len(axes["levels"])):
                ax.plot(x, cube[:, j, k], color=PALETTE[j % len(PALETTE)], alpha=0.45, linewidth=0.8,
                        label=trait if k == 0 else None)
                ax.plot(x[flags[:, j, k]], cube[flags[:, j, k], j, k], "x", color="black", markersize=5)
                marked += int(flags[:, j, k].sum())
        coherent = _cube_of(data, source, coherent_only=True)
        ax.plot(x, _quietly(np.nanmean, coherent.reshape(len(x), -1), axis=1), color="black", linewidth=2,
                label="mean (coherent cells)")
        ax.set_xticks(x, axes["nouns"], rotation=45)
        ax.set_xlabel("bystander noun")
        ax.set_title(f"source: {source}", fontsize=9)
    panels[0].set_ylabel("emission - base\n(one line per trait x level; noun swept)")
    _mark_legend(panels[-1], marked)
    fig.suptitle(f"Label isolation: trait and level fixed, the noun swept ({_seed_note(data)})", fontsize=10)
    fig.tight_layout()
    return {**save(fig, uri), "marked": marked}


def trait_gradation_figure(data: dict, uri: str) -> dict:
    from shared.analysis.figures import PALETTE, save

    axes, sources = data["axes"], [s["name"] for s in data["sources"]]
    fig, panels = _per_source_axes(len(sources))
    x = np.arange(1, len(axes["levels"]) + 1)
    marked = 0
    for ax, source in zip(panels, sources, strict=True):
        coherent, flags = _cube_of(data, source, coherent_only=True), _flag_cube(data, source)
        for j, trait in enumerate(axes["traits"]):
            mean = _quietly(np.nanmean, coherent[:, j, :], axis=0)
            ax.plot(x, mean, marker="o", color=PALETTE[j % len(PALETTE)], label=trait)
            some = flags[:, j, :].any(axis=0) & np.isfinite(mean)
            ax.plot(x[some], mean[some], "x", color="black", markersize=7)
            marked += int(flags[:, j, :].sum())
        ax.set_xticks(x, axes["levels"])
        ax.set_xlabel("gradation level (L1 very low ... L5 very high)", fontsize=8)
        ax.set_title(f"source: {source}", fontsize=9)
    panels[0].set_ylabel("emission - base\n(mean over the coherent nouns)")
    _mark_legend(panels[-1], marked)
    fig.suptitle(f"Trait gradation: the noun fixed, trait and level swept ({_seed_note(data)}; x: a low-coherence "
                 "noun left out)",
                 fontsize=10)
    fig.tight_layout()
    return {**save(fig, uri), "marked": marked}


def interaction_figure(data: dict, uri: str) -> dict:
    from shared.analysis.figures import save

    axes, sources = data["axes"], [s["name"] for s in data["sources"]]
    fig, panels = _per_source_axes(len(sources), height=3.2)
    marked = 0
    for ax, source, info in zip(panels, sources, data["sources"], strict=True):
        ax.grid(False)
        effect = np.array(data["seed_mean"]["noun_effect"].get(source) or
                          np.full((len(axes["traits"]), len(axes["levels"])), np.nan), dtype=float)
        image = ax.imshow(effect, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        flags = _flag_cube(data, source)
        own = axes["nouns"].index(info["noun"]) if info["noun"] in axes["nouns"] else None
        for j, k in itertools.product(range(len(axes["traits"])), range(len(axes["levels"]))):
            if (own is not None and flags[own, j, k]) or not np.isfinite(effect[j, k]):
                _hatch(ax, k, j)
                marked += 1
        ax.set_xticks(range(len(axes["levels"])), axes["levels"])
        ax.set_yticks(range(len(axes["traits"])), axes["traits"], fontsize=7)
        ax.set_title(f"noun effect, source: {source}", fontsize=9)
    fig.colorbar(image, ax=list(panels), fraction=0.03, label="median |Δ| over noun swaps")
    fig.suptitle(f"Interaction: the noun effect per trait x level ({HATCH_NOTE} / not computable)", fontsize=10,
                 y=1.04)
    return {**save(fig, uri), "marked": marked}


def _head_to_head_bars(ax, data: dict, metric: str, ylabel: str, title: str) -> None:
    from shared.analysis.figures import PALETTE

    traits = list(data["head_to_head"])
    x = np.arange(len(traits))
    adj = [data["head_to_head"][t].get(f"adjective_{metric}") or 0 for t in traits]
    swap = [data["head_to_head"][t].get(f"noun_swap_{metric}") or 0 for t in traits]
    ax.bar(x - 0.2, adj, 0.4, color=PALETTE[0], label="adjective (with vs without)")
    ax.bar(x + 0.2, swap, 0.4, color=PALETTE[1], label="noun swap")
    ax.set_xticks(x, traits, rotation=30, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)


def hero_figure(data: dict, uri: str) -> dict:
    from shared.analysis.figures import PALETTE, REFERENCE_COLOR, save

    sources = [s["name"] for s in data["sources"]]
    nouns = [n for n in data["axes"]["nouns"] if f"A2__{n}" in data["bystander_ids"]]
    geometry = data["geometry"]
    fig, grid = _house_style().subplots(2, 2, figsize=(12, 8.4))
    (matrix_ax, scatter_ax), (leak_ax, cos_ax) = grid
    matrix = np.array([[data["seed_mean"]["base_subtracted"][s].get(f"A2__{n}", np.nan) for n in nouns] for s in sources])
    matrix_ax.grid(False)
    image = matrix_ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    marked = 0
    for i, s in enumerate(sources):
        for j, n in enumerate(nouns):
            _cell_text(matrix_ax, j, i, matrix[i, j])
            if f"A2__{n}" in _flagged(data, s):
                _hatch(matrix_ax, j, i)
                marked += 1
    matrix_ax.set_xticks(range(len(nouns)), [f"You are a {n}." for n in nouns], rotation=30, fontsize=8)
    matrix_ax.set_yticks(range(len(sources)), sources)
    matrix_ax.set_ylabel("trained source")
    matrix_ax.set_title(f"source x pure-noun bystander: emission - base ({_seed_note(data)}; {HATCH_NOTE})", fontsize=9)
    fig.colorbar(image, ax=matrix_ax, fraction=0.046, pad=0.04)

    h4 = geometry.get("h4")
    if h4:
        cos, leak = np.array(h4["cos"], dtype=float), np.array(h4["leak"], dtype=float)
        for i, info in enumerate(data["sources"]):
            for j, n in enumerate(h4["nouns"]):
                same = info["noun"] == n
                scatter_ax.scatter(cos[i, j], leak[i, j], color=REFERENCE_COLOR if same else PALETTE[i % len(PALETTE)],
                                   marker="s" if same else "o", s=36, label=None if same else info["name"])
        scatter_ax.scatter([], [], color=REFERENCE_COLOR, marker="s", label="own noun (diagonal)")
        rho = h4["off_diagonal"].get("rho")
        scatter_ax.set_title(f"H4: base-model cos (layer {geometry['headline_layer']}) vs leakage"
                             + (f", off-diagonal ρ={rho:.2f} (n={h4['off_diagonal']['n']})" if rho is not None else ""),
                             fontsize=9)
        scatter_ax.set_xlabel("cos(source, pure-noun bystander)")
        scatter_ax.set_ylabel("emission - base")
        handles, labels = scatter_ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        scatter_ax.legend(unique.values(), unique.keys(), fontsize=7, frameon=False, title="source", title_fontsize=7)
    else:
        scatter_ax.set_axis_off()
        scatter_ax.text(0.5, 0.5, "H4: no base-model centroids", ha="center", va="center")

    _head_to_head_bars(leak_ax, data, "leak", "mean |Δ emission - base|", "adjective vs noun effect on leakage, per Big-5 axis")
    if geometry.get("available"):
        _head_to_head_bars(cos_ax, data, "cos", f"mean |Δ cos to source| (layer {geometry['headline_layer']})",
                           "adjective vs noun effect on base-model cosine, per Big-5 axis")
    else:
        cos_ax.set_axis_off()
    fig.tight_layout()
    return {**save(fig, uri), "marked": marked}


def cosine_leakage_figure(data: dict, uri: str) -> dict:
    """Per source, every bystander: base-model cosine to the source (headline layer) against emission - base.

    Colour is the bystander's noun; squares are the pure nouns, the star the source's own pure noun (cos = 1 by
    construction: it is the source's prompt), the diamond the assistant QC; a black x marks a low-coherence cell.
    The title's ρ is H4's per-source Spearman over the coherent bystanders other than the source's own."""
    from shared.analysis.figures import PALETTE, REFERENCE_COLOR, save

    geometry, sources = data["geometry"], data["sources"]
    fig, panels = _per_source_axes(len(sources), width_each=3.6, height=3.4)
    if not geometry.get("available"):
        for ax in panels:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no base-model centroids", ha="center", va="center")
        return {**save(fig, uri), "marked": 0}
    nouns = data["axes"]["nouns"]
    colour = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(nouns)}
    marked = 0
    for ax, info in zip(panels, sources, strict=True):
        source, cos, leak = info["name"], geometry["cos_to_source"][info["name"]], data["seed_mean"]["base_subtracted"][info["name"]]
        flagged = _flagged(data, source)
        for b in data["bystander_ids"]:
            x, y = cos.get(b), leak.get(b)
            if x is None or y is None or not np.isfinite(x):
                continue
            kind, noun = (b.split("__") + [None])[:2] if b.startswith(("A1__", "A2__")) else ("QC", None)
            if kind == "A2" and noun == info["noun"]:
                ax.scatter(x, y, marker="*", s=140, color=colour.get(noun, REFERENCE_COLOR), edgecolor="black",
                           linewidth=0.6, zorder=3)
            elif kind == "A2":
                ax.scatter(x, y, marker="s", s=40, color=colour.get(noun, REFERENCE_COLOR), edgecolor="black",
                           linewidth=0.6, zorder=3)
            elif kind == "QC":
                ax.scatter(x, y, marker="D", s=40, color=REFERENCE_COLOR, edgecolor="black", linewidth=0.6, zorder=3)
            else:
                ax.scatter(x, y, marker="o", s=16, color=colour.get(noun, REFERENCE_COLOR), alpha=0.75, linewidth=0)
            if b in flagged:
                ax.plot(x, y, "x", color="black", markersize=7, zorder=4)
                marked += 1
        fit = geometry["h4"]["cos_vs_leak_all_bystanders"].get(source, {})
        rho = "" if fit.get("rho") is None else f"\nρ={fit['rho']:.2f}, p={fit['p_value']:.3g}, n={fit['n']}"
        ax.set_title(f"source: {source}{rho}", fontsize=9)
        ax.set_xlabel(f"cos(source, bystander), layer {geometry['headline_layer']}", fontsize=8)
    panels[0].set_ylabel(f"{data['marker']} emission - base")
    for noun in nouns:
        panels[-1].scatter([], [], marker="o", color=colour[noun], label=f"{noun} (A1)")
    panels[-1].scatter([], [], marker="s", color="white", edgecolor="black", label="pure noun (A2)")
    panels[-1].scatter([], [], marker="*", s=100, color="white", edgecolor="black", label="source's own noun")
    panels[-1].scatter([], [], marker="D", color=REFERENCE_COLOR, edgecolor="black", label="assistant (QC)")
    _mark_legend(panels[-1], marked)
    fig.suptitle(f"Leakage against base-model cosine to the source, every bystander ({len(data['bystander_ids'])} "
                 f"per source; {_seed_note(data)})", fontsize=10)
    fig.tight_layout()
    return {**save(fig, uri), "marked": marked}


# ---------------------------------------------------------------------------------------------------------------


LEAKAGE_PANELS = {"own": "own pure noun (implantation)", "others": "every other bystander, minus base",
                  "assistant": "assistant QC, minus base"}


def leakage_per_seed_figure(data: dict, uri: str) -> dict:
    """Per source: each seed's leakage with its question-clustered interval, and the mean over seeds with the
    between-seed t interval (seeds as the unit; none with one seed)."""
    from shared.analysis.figures import PALETTE, save

    sources, seeds = [s["name"] for s in data["sources"]], data["seeds"]
    fig, panels = _house_style().subplots(1, len(LEAKAGE_PANELS), figsize=(4.2 * len(LEAKAGE_PANELS), 3.4),
                                          squeeze=False)
    offsets = np.linspace(-0.25, 0.25, len(seeds) + 1)
    for ax, (key, title) in zip(panels[0], LEAKAGE_PANELS.items(), strict=True):
        for i, source in enumerate(sources):
            rows = data["leakage"][source]
            for j, seed in enumerate(seeds):
                row = rows["per_seed"][str(seed)].get(key)
                if row and row["estimate"] is not None:
                    ax.errorbar(i + offsets[j], row["estimate"],
                                yerr=[[row["estimate"] - row["low"]], [row["high"] - row["estimate"]]], fmt="o",
                                color=PALETTE[j % len(PALETTE)], markersize=4, capsize=2,
                                label=f"seed {seed}" if i == 0 else None)
            between = rows["between_seeds"].get(key)
            if between and len(seeds) > 1:
                low, high = between["low"], between["high"]
                ax.errorbar(i + offsets[-1], between["mean"],
                            yerr=None if low is None else [[between["mean"] - low], [high - between["mean"]]],
                            fmt="s", color="black", markersize=5, capsize=3, label="mean over seeds" if i == 0 else None)
        ax.axhline(0, color="#808080", linewidth=0.6)
        ax.set_xticks(range(len(sources)), sources)
        ax.set_title(title, fontsize=9)
    panels[0][0].set_ylabel(f"{data['marker']} rate")
    panels[0][-1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"Leakage per source: each seed with its {data['settings']['confidence_pct']:g}% question-clustered "
                 "interval; the mean with the between-seed t interval", fontsize=10)
    fig.tight_layout()
    return {**save(fig, uri), "marked": 0}


FIGURES = {"hero_matrix": hero_figure, "heatmap_base_subtracted": heatmap_figure, "noun_isolation": noun_isolation_figure,
           "trait_gradation": trait_gradation_figure, "interaction": interaction_figure,
           "cosine_leakage": cosine_leakage_figure, "leakage_per_seed": leakage_per_seed_figure}


def draw_figures(res: dict, out) -> dict:
    """Every figure of the report from the results object; ``out(name)`` is where a figure's files go. Returns, per
    figure, its files and the number of low-coherence cells it marked (which the report prints)."""
    from shared.analysis.figures import training_loss_figure

    drawn = {name: draw(res, out(name)) for name, draw in FIGURES.items()}
    figures = {name: {"png": f["png"], "pdf": f["pdf"], "low_coherence_marked": f["marked"]} for name, f in drawn.items()}
    if res["training"]:
        written = training_loss_figure(res["training_curves"], out("lora_loss"),
                                       title="marker-only LoRA training loss per source and seed")
        figures["lora_loss"] = {"png": written["png"], "pdf": written["pdf"], "low_coherence_marked": 0}
    return figures


# ---------------------------------------------------------------------------------------------------------------
# part 4: the report text, from the results object alone (every number in it is one of the object's)


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _pp_interval(row: dict | None) -> str:
    """``12.3 [4.5, 20.1]``: an estimate and its interval in percentage points."""
    if not row or row.get("estimate") is None:
        return "—"
    if row.get("low") is None:
        return f"{100 * row['estimate']:.1f}"
    return f"{100 * row['estimate']:.1f} [{100 * row['low']:.1f}, {100 * row['high']:.1f}]"


def _between(row: dict | None) -> str:
    if not row:
        return "—"
    interval = "" if row["low"] is None else f" [{100 * row['low']:.1f}, {100 * row['high']:.1f}]"
    sd = "" if row["sd"] is None else f" (SD {100 * row['sd']:.1f})"
    return f"{100 * row['mean']:.1f}{interval}{sd}"


def _p(value) -> str:
    from shared.analysis.reporting import fmt

    return fmt(value, 4)


def units_section(res: dict) -> list[str]:
    s, d = res["settings"], res["decisions"]
    lines = [f"**Units.** Within a training seed, every interval is a {s['confidence_pct']:g}% percentile bootstrap over "
             f"the {res['n_questions']} evaluation questions ({s['n_boot']} replicates): the completions of one question "
             "share its prompt, so they are not independent draws, and resampling them one by one would give intervals "
             "that are too narrow.", ""]
    if d["single_seed"]:
        lines += [f"**One training seed per source (seed {res['seeds'][0]}): every p-value and interval in this report "
                  "is conditional on that one fine-tune.** It measures how the questions and samples of the evaluation "
                  "vary, not how a LoRA retrained with another seed would; no between-seed interval can be given, and "
                  "no difference between sources can be told apart from a difference between two fine-tunes.", ""]
    else:
        lines += [f"Across the {res['n_seeds']} training seeds ({', '.join(str(x) for x in res['seeds'])}), a source's "
                  "leakage is the mean over its seeds with a t interval over the seeds' values: the seed is the unit, "
                  "and it replicates the whole recipe (the on-policy sample and the negatives drawn, the LoRA's "
                  "initialisation, data order and dropout, the evaluation's sampling). Every pre-registered rule is "
                  f"applied per seed and pooled by one rule: **{d['rule']}**. With {res['n_seeds']} seeds the t "
                  f"interval has {s['between_seed_df']} degree(s) of freedom (critical value "
                  f"{s['between_seed_t_critical']:.2f}), so it is wide unless the seeds agree closely.", ""]
    return lines


def leakage_section(res: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    rows = []
    for source, row in res["leakage"].items():
        for seed in res["seeds"]:
            per = row["per_seed"][str(seed)]
            rows.append((source, seed, _pp_interval(per.get("own")), _pp_interval(per.get("others")),
                         _pp_interval(per.get("assistant"))))
        if res["n_seeds"] > 1:
            between = row["between_seeds"]
            rows.append((source, "mean over seeds", _between(between.get("own")), _between(between.get("others")),
                         _between(between.get("assistant"))))
    conf = f"{res['settings']['confidence_pct']:g}%"
    return ["## Leakage per source", "",
            f"Percentage points. Per seed: the estimate and its {conf} question-clustered interval. "
            + (f"Mean over seeds: the mean, its {conf} t interval over the seeds' values, and the between-seed SD. "
               if res["n_seeds"] > 1 else "")
            + "Own pure noun: the raw rate on the source's own training prompt; every other bystander: the rate pooled "
              "over all bystanders but that one, minus the base model's on the same bystanders and questions; assistant: "
              "the assistant QC persona, minus the base model.", "",
            markdown_table(["source", "seed", "own pure noun", "every other bystander - base", "assistant - base"], rows),
            ""]


def emission_section(res: dict) -> list[str]:
    """Each model's emission on the source's own pure noun, beside the base model's, and over the rest of the grid."""
    from shared.analysis.reporting import markdown_table

    base = res["rates"][res["base_label"]]
    rows = []
    for label, e in res["emission"].items():
        own = e["own_bystander"]
        rows.append((label, own or "—",
                     "—" if own is None else f"{_pct(e['own_rate'])} ({e['own_hits']}/{e['own_total']})",
                     "—" if own is None else _pct(base.get(own)),
                     f"{_pct(e['mean_rate_others'])} (n={e['n_others']})",
                     f"{e['max_other']}: {_pct(e['max_other_rate'])}" if e["max_other"] else "—",
                     f"{_pct(e['pooled_rate'])} ({e['hits']}/{e['total']})", _pct(e["truncated_share"])))
    return ["## Marker emission: each source model and the base model", "",
            "Own rate: the model's rate on its source's own pure-noun bystander (the training prompt); the base model "
            "on the same bystander beside it. Other bystanders: every bystander but that one (for the base model, "
            "all). Truncated: completions that ran into the token limit before ending, where a marker trained to "
            "follow a reply's end cannot show.", "",
            markdown_table(["model", "own bystander", "own rate (hits/N)", "base model there", "mean over other bystanders",
                            "highest other bystander", "pooled over the grid", "truncated"], rows), ""]


def _pooled_line(res: dict, key: str, what: str) -> str:
    d = res["decisions"][key]
    if res["n_seeds"] == 1:
        return f"{what} for {d['n_pass_pooled']} of {d['n_sources']} sources."
    per_seed = "; ".join(f"seed {seed}: {d['n_pass_per_seed'][str(seed)]} of {d['n_sources']} sources"
                         for seed in res["seeds"])
    return (f"{what}, per seed: {per_seed}. Pooled ({res['decisions']['rule']}): {d['n_pass_pooled']} of "
            f"{d['n_sources']} sources.")


def h1_section(res: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    h1, d = res["h1"], res["decisions"]["h1"]["per_source"]
    rows = [(source, seed, v[str(seed)]["bystander"], _pct(v[str(seed)]["rate"]),
             f"{v[str(seed)]['hits']} / {v[str(seed)]['total']}", _pct(v[str(seed)]["base_rate"]),
             d[source]["per_seed"][str(seed)]) for source, v in h1["per_source"].items() for seed in res["seeds"]]
    return [f"## H1 implantation (rate on the source's own pure-noun bystander > {h1['threshold']:.2f})", "",
            markdown_table(["source", "seed", "bystander", "rate", "hits / total", "base rate", "passes"], rows), "",
            _pooled_line(res, "h1", "H1 passes"), ""]


def h2_section(res: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    h2, d = res["h2"], res["decisions"]["h2"]["per_source"]
    rows = [(source, seed, fmt(v[str(seed)].get("median_noun_effect"), 4), fmt(v[str(seed)].get("median_trait_effect"), 4),
             fmt(v[str(seed)].get("ratio"), 2), d[source]["per_seed"][str(seed)])
            for source, v in h2["per_source"].items() for seed in res["seeds"]]
    tests = "; ".join(f"seed {seed}: Δ={fmt(t.get('statistic'), 4)}, p={_p(t.get('p_value'))}"
                      for seed, t in h2["noun_match_test"].items())
    lines = ["## H2 noun vs trait (medians as pinned in the record; coherent cells only)", "",
             markdown_table(["source", "seed", "median noun effect", "median trait effect", "ratio", "H2 holds"], rows), "",
             _pooled_line(res, "h2", "H2 holds"), "",
             "Noun-match permutation test (same-noun bystanders leak more; labels shuffled within source x trait x "
             f"level; {res['settings']['n_perm']} shuffles), per seed: {tests}."]
    between = h2["noun_match_between_seeds"]
    if between and res["n_seeds"] > 1:
        lines[-1] += (f" Across seeds (the seed as the unit): mean Δ={fmt(between['mean'], 4)}, "
                      f"{res['settings']['confidence_pct']:g}% t interval [{fmt(between['low'], 4)}, "
                      f"{fmt(between['high'], 4)}], p={_p(between['p_value'])} ({between['n_seeds']} seeds).")
    return [*lines, ""]


def h3_section(res: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    h3, s = res["h3"], res["settings"]
    head = ["## H3 gradation slopes", "",
            "Per (source, noun, trait): the least-squares slope of the base-subtracted rate over L1..L5, with its "
            f"{s['confidence_pct']:g}% question-clustered bootstrap interval (each replicate redraws the questions, the "
            "same ones for the source's and the base model's cells) and a permutation p-value (levels shuffled within "
            f"each question, {s['n_perm']} draws). The record counts triples with |slope| > the interval's half-width; "
            f"counting raw p < {s['alpha']:g} over m triples finds {s['alpha']:g} x m false positives on average when no "
            f"slope is real, so the count after Benjamini-Hochberg (q = {s['alpha']:g}) is given beside it, with the "
            "false discoveries BH allows among its own (q x its count).", ""]
    if not h3.get("per_seed"):
        return [*head, h3.get("note", "not computed"), ""]
    seeds = res["seeds"]
    family = [(seed, f["n_triples"], f["n_above_half_width"], f["n_raw"], fmt(f["expected_false_raw"], 2), f["n_bh"],
               fmt(f["expected_false_bh"], 2)) for seed, f in ((seed, h3["per_seed"][str(seed)]) for seed in seeds)]
    per_source = [(source, seed, v["n_triples"], v["n_above_half_width"], v["n_raw"], v["n_bh"])
                  for seed in seeds for source, v in h3["per_seed"][str(seed)]["per_source"].items()]
    lines = [*head,
             markdown_table(["seed", "triples", "abs(slope) > half-width (record)", f"raw p < {s['alpha']:g}",
                             "expected false if none real", f"BH q = {s['alpha']:g}", "false allowed among BH"], family), "",
             markdown_table(["source", "seed", "triples", "abs(slope) > half-width", f"raw p < {s['alpha']:g}",
                             f"BH q = {s['alpha']:g}"], per_source), ""]
    if res["n_seeds"] > 1:
        pooled, between = res["decisions"]["h3"], h3["between_seeds"]
        lines += [f"Pooled ({res['decisions']['rule']}): {pooled['n_bh_in_every_seed']} of {pooled['n_triples']} "
                  "triples are BH-significant in every seed. With the seed as the unit (a one-sample t-test of the "
                  f"seeds' slopes against 0, {between['df']} degree(s) of freedom): raw p < {s['alpha']:g} for "
                  f"{between['n_raw']} of {between['n_triples']} triples (expected false if none real: "
                  f"{fmt(between['expected_false_raw'], 2)}), BH {between['n_bh']}.", ""]
    return lines


def _with_n(row: dict, key: str, n_key: str | None = None) -> str:
    from shared.analysis.reporting import fmt

    if row.get(key) is None:
        return "—"
    return f"{fmt(row[key], 4)} ({row[n_key or f'n_{key}']})"


def head_to_head_section(res: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    axis = "; ".join(f"seed {seed}: spread {fmt(t.get('spread'), 4)}, p={_p(t.get('p_value'))}"
                     for seed, t in res["axis_permutation_leak"].items())
    lines = ["## Adjective vs noun, per Big-5 axis", "",
             "Adjective Δ: mean over (source, noun, level) cells of |m(noun who <descriptor>) - m(pure noun)|; "
             "noun-swap Δ: mean over (source, level) contexts of the median over noun pairs of |m(noun i) - m(noun j)|, "
             "trait and level fixed. m is the base-subtracted emission (leak, coherent cells; "
             + ("one seed" if res["n_seeds"] == 1 else f"each seed's value, averaged over the {res['n_seeds']} seeds")
             + f") or the base-model cosine to the source at layer {res['settings']['headline_layer']} (cos). "
             "N: cells (adjective) and contexts (noun swap) behind each mean.", "",
             markdown_table(["axis", "adjective Δ leak (N)", "noun-swap Δ leak (N)", "ratio leak",
                             "adjective Δ cos (N)", "noun-swap Δ cos (N)", "ratio cos"],
                            [(t, _with_n(v, "adjective_leak"), _with_n(v, "noun_swap_leak", "n_noun_swap_contexts_leak"),
                              fmt(v["ratio_leak"], 2), _with_n(v, "adjective_cos"),
                              _with_n(v, "noun_swap_cos", "n_noun_swap_contexts_cos"), fmt(v.get("ratio_cos"), 2))
                             for t, v in res["head_to_head"].items()]), "",
             f"Axis-label permutation test (range of per-axis mean adjective Δ, {res['settings']['n_perm']} shuffles) on "
             f"leakage, per seed: {axis}."]
    geometry = res["geometry"]
    if geometry.get("available"):
        ax_cos = geometry["axis_permutation_cos"]
        lines[-1] += f" On cosine: spread {fmt(ax_cos.get('spread'), 4)}, p={_p(ax_cos.get('p_value'))}."
    return [*lines, ""]


def _rho(fit: dict) -> tuple:
    from shared.analysis.reporting import fmt

    return fmt(fit.get("rho"), 3), _p(fit.get("p_value")), fit.get("n")


def h4_section(res: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    geometry = res["geometry"]
    if not geometry.get("available"):
        return ["## H4", "", "No base-model centroids were given: H4 and the cosine columns are omitted.", ""]
    h4, layer = geometry["h4"], geometry["headline_layer"]
    what = "one seed" if res["n_seeds"] == 1 else f"the mean over {res['n_seeds']} seeds"
    off = [("mean" if res["n_seeds"] > 1 else res["seeds"][0], *_rho(h4["off_diagonal"]))]
    if res["n_seeds"] > 1:
        off += [(seed, *_rho(h4["per_seed"][str(seed)]["off_diagonal"])) for seed in res["seeds"]]
    per_source = [(source, "mean" if res["n_seeds"] > 1 else res["seeds"][0], *_rho(fit))
                  for source, fit in h4["cos_vs_leak_all_bystanders"].items()]
    if res["n_seeds"] > 1:
        per_source += [(source, seed, *_rho(h4["per_seed"][str(seed)]["cos_vs_leak_all_bystanders"][source]))
                       for seed in res["seeds"] for source in h4["cos_vs_leak_all_bystanders"]]
    return [f"## H4 base-model cosine (layer {layer}) vs leakage", "",
            f"Layer L is {geometry.get('layer_convention') or 'not recorded by the hidden_states artifact'}. Leakage "
            f"is base-subtracted on the coherent cells, of {what}; Spearman ρ with a permutation p "
            f"({res['settings']['n_perm']} shuffles).", "",
            "Source x pure-noun submatrix, off-diagonal cells:", "",
            markdown_table(["seed", "ρ", "p", "n"], off), "",
            markdown_table(["layer", f"off-diagonal ρ ({what})", "p", "n"],
                           [(lyr, *_rho(v)) for lyr, v in h4["per_layer_off_diagonal"].items()]), "",
            markdown_table(["source", "seed", f"ρ(cos to source, leakage) over bystanders, layer {layer}", "p", "n"],
                           per_source), ""]


def coherence_section(res: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    coh = res["coherence"]
    if coh["threshold"] > 0:
        head = [f"## Coherence (cells with mean judge score < {coh['threshold']:g} are flagged and hatched)", "",
                "A model's flagged cells are left out of H2, the leakage head-to-head and H4; H1, H3 and the leakage "
                "table use every cell."
                + (" The figures draw the mean over seeds and mark a cell flagged under any seed." if res["n_seeds"] > 1
                   else ""), ""]
    else:
        head = ["## Coherence (flagging off: threshold 0)", "",
                "The judge scored every sampled completion, but with the threshold at 0 no cell is flagged and every "
                "analysis uses every cell. The spread of the per-cell means shows how much the judge tells the cells "
                "apart.", ""]

    def spread(label: str) -> str:
        v = coh["spread"].get(label)
        return "—" if v is None else f"{v['min']:.1f} / {v['median']:.1f} / {v['max']:.1f}"

    return [*head, markdown_table(
        ["model", "mean coherence", "cell means: min / median / max", "cells scored", "scores", "judge errors",
         "flagged cells"],
        [(label, fmt(coh["mean"].get(label), 1), spread(label), coh["n_cells_scored"].get(label, 0),
          coh["n_scores"].get(label, 0), coh["n_judge_errors"].get(label, 0), coh["n_flagged"].get(label, 0))
         for label in coh["mean"]]), ""]


CAPTIONS = {"hero_matrix": "hero: source x pure-noun matrix, H4 scatter, adjective vs noun on leakage and cosine",
            "heatmap_base_subtracted": "every source x every bystander, base-subtracted",
            "noun_isolation": "label isolation", "trait_gradation": "trait gradation",
            "interaction": "noun effect per trait x level",
            "cosine_leakage": "leakage against base-model cosine to the source, every bystander (H4)",
            "leakage_per_seed": "leakage per source: each seed and the mean over seeds",
            "lora_loss": "LoRA training loss per source and seed"}


def figures_section(res: dict) -> list[str]:
    lines = ["## Figures", ""]
    for name, figure in res.get("figures", {}).items():
        if name == "lora_loss":
            continue  # drawn in the training section
        lines += [f"![{CAPTIONS.get(name, name)}]({name}.png)", "",
                  f"*{CAPTIONS.get(name, name)}; low-coherence cells marked: {figure['low_coherence_marked']}.*", ""]
    return lines


def training_section(training: dict[str, dict]) -> list[str]:
    from shared.analysis.reporting import markdown_table

    if not training:
        return []
    return ["## LoRA training", "",
            "Each source model's marker-only LoRA: its optimizer steps and its mean training loss (the marker tokens "
            "and, on negatives, the end-of-turn token) over its first and over its last `window` steps.", "",
            markdown_table(["model", "steps", "window", "loss, first steps", "loss, last steps"],
                           [(label, t["steps"], t["window"], f"{t['loss_start']:.3f}", f"{t['loss_end']:.3f}")
                            for label, t in training.items()]), "",
            "![LoRA training loss per source and seed](lora_loss.png)", ""]


def report(res: dict) -> str:
    """The report: every number in it is read from ``res`` (tests/test_issue81_stats.py checks this)."""
    seeds = "one training seed" if res["n_seeds"] == 1 else f"{res['n_seeds']} training seeds"
    sections = [
        [f"# #81: {res['marker']} leakage over the Big-5 bystander grid", "",
         f"{res['n_sources']} sources x {res['n_bystanders']} bystanders x {seeds} per source, plus the base model as "
         f"reference; {res['n_questions']} evaluation questions, "
         f"{'/'.join(str(n) for n in res['completions_per_cell'][res['base_label']])} completions per (model, "
         f"bystander). Marker matching: {res['matching']}.", ""],
        units_section(res), leakage_section(res), emission_section(res), h1_section(res), h2_section(res),
        h3_section(res), head_to_head_section(res), h4_section(res), coherence_section(res), figures_section(res),
        training_section(res["training"]),
    ]
    return "\n".join(line for section in sections for line in section)


# ---------------------------------------------------------------------------------------------------------------
# the stage


REPRODUCIBILITY_NOTES = """
## What reproduces bitwise, and what only in distribution

- **This analysis, from the stored artifacts: bitwise.** Every number of `report.md`, `headline.json` and the
  figures is recomputed from the stored marker counts, judge scores and centroids; every bootstrap and permutation
  draws from a numpy Generator seeded by the config's seed, the purpose of the draw, the training seed and the
  source, so the same inputs and package versions give the same bytes (and one source or seed more does not move
  another's numbers).
- **A re-run of the workflow: bitwise, from the store.** A task whose code, config and inputs are unchanged is not
  recomputed: its stored result is reused (cached or hard-linked), so the report is rebuilt from the same bytes.
- **The plan and the prompts: bitwise.** The bystander grid, the prompts, their token ids (`shared.lm.chat`) and the
  negatives drawn for each source (seeded by the training seed and the source's name, not Python's `hash`) do not
  depend on the machine.
- **Recomputing a stage that samples or trains: in distribution only.** On-policy data, the LoRA and the
  evaluation are seeded (the training seed), but seeded sampling depends on the batch sizes and the batching the
  backend chooses (vLLM schedules requests together), bf16 GPU kernels are not deterministic, and thread counts
  change CPU reductions; a recomputed stage on other hardware, another batch size or another package version gives
  other completions from the same distribution. That is what the seed replicates measure: the between-seed spread
  includes this sampling noise.
- **Judges.** Judgements are cached by content (model, template bytes, question, answer), so a re-run re-judges
  nothing; a Claude judge asked again answers from its distribution, and the local judge's expected score is
  deterministic on one machine but carries the same kernel caveats.
"""


def run(cfg: Config, ctx) -> dict:
    from shared.analysis.reporting import producing_manifest, reproducibility

    res = results(cfg)
    res["decisions"] = decisions(res)
    res["figures"] = draw_figures(res, ctx.out)
    store.write_json(ctx.out("headline.json"), res)
    store.write_text(ctx.out("report.md"), report(res))
    upstream = []
    for cell in cfg.cells:
        evaluation = producing_manifest(cell.rates_uri)
        upstream.append(evaluation)
        if cell.coherence_uri:
            upstream.append(producing_manifest(cell.coherence_uri))
        adapter = evaluation["config"].get("adapter_uri")
        if adapter:  # the training stage and the data it trained on
            training = producing_manifest(store.join(adapter, "adapter_config.json"))
            upstream += [training, producing_manifest(training["config"]["data_uri"])]
    if cfg.centroids_uri:
        upstream.append(producing_manifest(cfg.centroids_uri))
    unique = {(m["cell"], m["stage"]): m for m in upstream}
    store.write_text(ctx.out("REPRODUCIBILITY.md"),
                     reproducibility("#81", cfg.params, list(unique.values())) + REPRODUCIBILITY_NOTES)
    d = res["decisions"]
    return {"n_seeds": res["n_seeds"], "h1_pass_pooled": d["h1"]["n_pass_pooled"],
            "h2_holds_pooled": d["h2"]["n_pass_pooled"],
            "h3_bh": {seed: f["n_bh"] for seed, f in res["h3"].get("per_seed", {}).items()},
            "self_rates": {s: {seed: v["rate"] for seed, v in by_seed.items()} for s, by_seed in res["h1"]["per_source"].items()}}


SPEC = StageSpec(
    name="analyze_issue81", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=2, memory="4Gi", timeout_s=3600),
    description="#81 H1-H4 per seed and pooled, leakage per source with between-seed intervals, the adjective-vs-noun "
                "head-to-head, figures and report from stored rates and centroids.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
