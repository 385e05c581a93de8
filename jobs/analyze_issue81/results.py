"""Part 1 of ``analyze_issue81``: the stage's config (the artifacts it reads) and the results object, every
number read and recomputed from those stored artifacts."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
from pydantic import BaseModel

from shared.contract.stage import StageInputError
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
    abstained: dict[str, int] = {}  # a local judge's "no valid score is likely enough": not a failure, no score
    for row in store.read_jsonl(uri):
        if row.get("error") == "abstained":
            abstained[row["condition"]] = abstained.get(row["condition"], 0) + 1
        elif row.get("error") is not None or row.get("score") is None:
            errors[row["condition"]] = errors.get(row["condition"], 0) + 1
        else:
            by_cell.setdefault(row["condition"], []).append(float(row["score"]))
    cells = set(by_cell) | set(errors) | set(abstained)
    return {c: {"mean": float(np.mean(by_cell[c])) if by_cell.get(c) else None, "n": len(by_cell.get(c, [])),
                "errors": errors.get(c, 0), "abstained": abstained.get(c, 0)} for c in cells}


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
                      "n_abstained": {label: sum(c["abstained"] for c in coh.values()) for label, coh in coherence.items()},
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
