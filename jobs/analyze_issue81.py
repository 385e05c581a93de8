"""Stage ``analyze_issue81``: #81's hypotheses, figures and report from the stored marker rates, judge scores and
base-model centroids. Every number is recomputed here from those artifacts.

Estimands (as the record pins them; rates are base-subtracted: rate(source model) - rate(base model)):

- H1 implantation: ``rate(source, A2/<source noun>) > 0.80``.
- H2 noun vs trait, per source (on the coherent subset, incoherent cells dropped):
  ``noun_effect(trait, L) = median over other nouns of |r(source_noun, trait, L) - r(other_noun, trait, L)|``
  (25 values); ``trait_effect(noun, trait, L) = median over (trait', L') != (trait, L) of
  |r(noun, trait, L) - r(noun, trait', L')|`` (125 values); H2 holds if median(noun_effect) > median(trait_effect).
  Significance: a blocked permutation test of "bystanders sharing the source's noun leak more" (noun labels
  shuffled within each (source, trait, level) block).
- H3 gradation: per (source, noun, trait) the OLS slope of the base-subtracted rate over levels 1..5 against the
  half-width of its binomial-bootstrap 95% CI (B = n_boot; each replicate redraws the source's and the base
  model's counts); count of triples with |slope| > half-width.
- Head-to-head (#88): per Big-5 axis, adjective effect = mean |r(noun, trait, L) - r(A2 noun)| over
  (source, noun, L) (125 cells); noun swap = mean over the 25 (source, L) contexts of the median over the 10 noun
  pairs of |r(n_i) - r(n_j)|; the same with r replaced by the base-model cosine between the source's and the
  bystander's centroids at the headline layer. Axis-label permutation test per metric (range of the per-axis
  means of the adjective effect; trait labels shuffled over the 625 (source, A1) rows, n_perm draws).
- H4: base-model cosine between source and bystander centroids vs leakage; the source x pure-noun submatrix.
"""

from __future__ import annotations

import itertools

import numpy as np
from pydantic import BaseModel

from shared import store
from shared.config import StageConfig
from shared.stage import Resources, StageInputError, StageSpec

H1_THRESHOLD = 0.80


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
    label: str
    rates_uri: str
    coherence_uri: str | None = None
    train_log_uri: str | None = None  # train_lora's per-step losses, for a fine-tuned cell


class Config(StageConfig):
    sources: list[SourceInfo]
    bystanders: list[Bystander]
    cells: list[CellArtifacts]
    base_label: str = "base"
    marker: str = "[ZLT]"
    centroids_uri: str | None = None
    centroid_personas_uri: str | None = None
    headline_layer: int = 20
    n_boot: int = 1000
    n_perm: int = 10_000
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
        self.a1_id = {(b.noun, b.trait, b.level): b.id for b in a1}
        self.a2_id = {b.noun: b.id for b in bystanders if b.kind == "A2"}

    def cube(self, values: dict[str, float]) -> np.ndarray:
        """``[noun, trait, level]`` array of ``values`` (NaN where a cell is missing)."""
        out = np.full((len(self.nouns), len(self.traits), len(self.levels)), np.nan)
        for (i, n), (j, t), (k, lv) in itertools.product(enumerate(self.nouns), enumerate(self.traits), enumerate(self.levels)):
            key = self.a1_id.get((n, t, lv))
            if key is not None and key in values and values[key] is not None:
                out[i, j, k] = values[key]
        return out

    def a2(self, values: dict[str, float]) -> np.ndarray:
        return np.array([values.get(self.a2_id.get(n, ""), np.nan) for n in self.nouns], dtype=float)


# ---------------------------------------------------------------------------------------------------------------
# estimands (pure functions on arrays: the statistics tests call these on synthetic grids)


def _nanmedian(values: np.ndarray) -> float | None:
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return float(np.median(finite)) if finite.size else None


def noun_effects(cube: np.ndarray, source_noun: int) -> np.ndarray:
    """``[trait, level]``: median over the other nouns of |r(source noun) - r(other noun)|."""
    others = [i for i in range(cube.shape[0]) if i != source_noun]
    if not others:
        return np.full(cube.shape[1:], np.nan)
    return _quietly(np.nanmedian, np.abs(cube[source_noun][None] - cube[others]), axis=0)


def _quietly(reduce, values: np.ndarray, axis) -> np.ndarray:
    """``np.nanmedian``/``np.nanmean`` without the warning for all-NaN slices (incoherent cells), which stay NaN."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return reduce(values, axis=axis)


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
    holds = None if med_noun is None or med_trait is None else bool(med_noun > med_trait)
    ratio = None if not med_noun or not med_trait else med_noun / med_trait
    return {"median_noun_effect": med_noun, "median_trait_effect": med_trait, "ratio": ratio, "holds": holds,
            "n_noun_cells": int(np.isfinite(noun).sum()), "n_trait_cells": int(np.isfinite(trait).sum()),
            "noun_effect_by_trait_level": _listify(noun)}


def noun_match_test(cubes: list[tuple[int, np.ndarray]], *, n_perm: int, seed: int) -> dict:
    """Blocked permutation test: do bystanders sharing the source's noun leak more than other nouns?

    ``cubes`` pairs each source's noun index with its base-subtracted ``[noun, trait, level]`` cube. Rows are the
    A1 cells, the label is "same noun as the source", and labels are shuffled within each (source, trait, level).
    """
    from shared.stats import label_permutation_test

    values, labels, blocks = [], [], []
    for source, (s, cube) in enumerate(cubes):
        for i, j, k in itertools.product(*map(range, cube.shape)):
            if np.isfinite(cube[i, j, k]):
                values.append(cube[i, j, k])
                labels.append(int(i == s))
                blocks.append(f"{source}/{j}/{k}")
    labels_arr = np.array(labels)
    if len(set(labels)) < 2:
        return {"statistic": None, "p_value": None, "n_rows": len(values), "note": "needs same- and other-noun cells"}
    result = label_permutation_test(np.array(values), labels_arr, statistic="mean_difference", blocks=np.array(blocks),
                                    alternative="greater", n_iter=n_perm, rng=seed)
    return {"statistic": float(result.statistic), "p_value": float(result.p_value), "n_rows": len(values),
            "n_iter": result.n_iter}


def h3_slopes(hits: np.ndarray, totals: np.ndarray, base_hits: np.ndarray | None = None,
              base_totals: np.ndarray | None = None, *, n_boot: int, seed: int) -> dict:
    """Slopes over the levels for every row of ``hits``/``totals`` (``[..., 5]``) with binomial-bootstrap CIs.

    With ``base_hits``/``base_totals`` (the base model's counts on the same cells) the slope is that of the
    base-subtracted rate, and every replicate redraws the source's and the base model's counts alike."""
    from shared.stats import binomial_bootstrap_ci, ols_slope

    n_levels = hits.shape[-1]
    x = np.arange(1, n_levels + 1, dtype=float)
    if base_hits is None:
        base_hits, base_totals = np.zeros_like(hits, dtype=float), np.ones_like(totals, dtype=float)

    def slope(rates, axis=-1):  # rates: [..., source levels + base levels]
        return ols_slope(x, rates[..., :n_levels] - rates[..., n_levels:], axis=-1)

    rng = np.random.default_rng(seed)
    flat_hits = np.concatenate([hits, base_hits], axis=-1).reshape(-1, 2 * n_levels)
    flat_totals = np.concatenate([totals, base_totals], axis=-1).reshape(-1, 2 * n_levels)
    slopes, half_widths, significant = [], [], []
    for h, t in zip(flat_hits, flat_totals, strict=True):
        if not (np.isfinite(h).all() and np.isfinite(t).all() and (t > 0).all()):
            slopes.append(np.nan), half_widths.append(np.nan), significant.append(False)
            continue
        ci = binomial_bootstrap_ci(h, t, slope, n_boot=n_boot, rng=rng)
        slopes.append(ci.estimate)
        half_widths.append(ci.half_width)
        significant.append(bool(abs(ci.estimate) > ci.half_width))
    shape = hits.shape[:-1]
    return {"slope": np.array(slopes).reshape(shape), "half_width": np.array(half_widths).reshape(shape),
            "significant": np.array(significant).reshape(shape)}


def adjective_effects(cube: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """``[noun, trait, level]``: |r(noun, trait, L) - r(A2 noun)| (the persona with vs without the adjective)."""
    return np.abs(cube - a2[:, None, None])


def noun_swap_effects(cube: np.ndarray) -> np.ndarray:
    """``[trait, level]``: median over noun pairs of |r(n_i, trait, L) - r(n_j, trait, L)|."""
    pairs = list(itertools.combinations(range(cube.shape[0]), 2))
    if not pairs:
        return np.full(cube.shape[1:], np.nan)
    return _quietly(np.nanmedian, np.stack([np.abs(cube[i] - cube[j]) for i, j in pairs]), axis=0)


def axis_permutation_test(effects: np.ndarray, *, n_perm: int, seed: int) -> dict:
    """Range of the per-axis means of ``effects`` (``[..., trait, level]``, rows pooled) vs trait labels shuffled."""
    from shared.stats import label_permutation_test

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


def spearman_permutation(x: np.ndarray, y: np.ndarray, *, n_perm: int, seed: int) -> dict:
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
                         table: dict, *, n_perm: int, seed: int) -> dict:
    """The adjective-vs-noun head-to-head of one metric (``leak``: base-subtracted emission; ``cos``: base-model
    cosine to the source), written into ``table[trait]``; returns the axis-label permutation test.

    ``per_source`` holds, for every source, the metric's A1 cube ``[noun, trait, level]`` and its A2 vector
    ``[noun]``. Per axis: adjective = mean over (source, noun, level) of |m(noun, trait, L) - m(A2 noun)|;
    noun swap = mean over the (source, level) contexts of the median over noun pairs of |m(n_i) - m(n_j)|."""
    adjective = np.stack([adjective_effects(cube, a2) for cube, a2 in per_source])  # [source, noun, trait, level]
    noun_swap = np.stack([noun_swap_effects(cube) for cube, _ in per_source])  # [source, trait, level]
    for j, trait in enumerate(grid.traits):
        adj, swap = _nanmean(adjective[:, :, j, :]), _nanmean(noun_swap[:, j, :])
        table[trait].update({f"adjective_{metric}": adj, f"noun_swap_{metric}": swap,
                             f"ratio_{metric}": adj / swap if adj is not None and swap else None,
                             f"n_adjective_{metric}": int(np.isfinite(adjective[:, :, j, :]).sum()),
                             f"n_noun_swap_contexts_{metric}": int(np.isfinite(noun_swap[:, j, :]).sum())})
    return axis_permutation_test(adjective.reshape(-1, len(grid.traits), len(grid.levels)), n_perm=n_perm, seed=seed)


def cosine_matrix(centroids: np.ndarray) -> np.ndarray:
    unit = centroids / np.linalg.norm(centroids, axis=-1, keepdims=True)
    return unit @ unit.T


# ---------------------------------------------------------------------------------------------------------------
# reading the artifacts


def read_rates(uri: str) -> tuple[dict[str, float], dict[str, int], dict[str, int], dict[str, int | None]]:
    """Rates, hits, totals and truncated completions per bystander (truncated is None where not recorded)."""
    data = store.read_json(uri)
    rates = data.get("rates") or {}
    if not rates:
        raise StageInputError(f"no marker rates in {uri}")
    return ({k: v["rate"] for k, v in rates.items()}, {k: v["hits"] for k, v in rates.items()},
            {k: v["total"] for k, v in rates.items()}, {k: v.get("truncated") for k, v in rates.items()})


def emission_summary(rates: dict[str, float], hits: dict[str, int], totals: dict[str, int],
                     truncated: dict[str, int | None], own: str | None) -> dict:
    """One model's emission over the whole grid: pooled rate, the mean and the largest rate over the bystanders
    other than ``own`` (the source's own pure-noun bystander, if any), and the share of truncated completions."""
    others = {b: r for b, r in rates.items() if b != own}
    top = max(others, key=others.get) if others else None
    counted = [t for t in truncated.values() if t is not None]
    return {"pooled_rate": sum(hits.values()) / sum(totals.values()), "hits": sum(hits.values()),
            "total": sum(totals.values()), "own_bystander": own, "own_rate": rates.get(own) if own else None,
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


# ---------------------------------------------------------------------------------------------------------------
# the analysis


def analyse(cfg: Config) -> dict:
    grid = Grid(cfg.bystanders)
    labels = [c.label for c in cfg.cells]
    if cfg.base_label not in labels:
        raise StageInputError(f"no base-model cell {cfg.base_label!r} among {labels}")
    missing = [s.name for s in cfg.sources if s.name not in labels]
    if missing:
        raise StageInputError(f"no evaluation for source(s) {missing}")
    rates, hits, totals, truncated, coherence = {}, {}, {}, {}, {}
    for cell in cfg.cells:
        rates[cell.label], hits[cell.label], totals[cell.label], truncated[cell.label] = read_rates(cell.rates_uri)
        coherence[cell.label] = read_coherence(cell.coherence_uri)
    own_noun = {s.name: grid.a2_id.get(s.noun) for s in cfg.sources}
    emission = {label: emission_summary(rates[label], hits[label], totals[label], truncated[label], own_noun.get(label))
                for label in labels}
    base = rates[cfg.base_label]
    flagged = {label: sorted(b for b, c in coh.items() if c["mean"] is not None and c["mean"] < cfg.coherence_threshold)
               for label, coh in coherence.items()}

    def subtracted(label: str, *, coherent_only: bool) -> dict[str, float]:
        out = {}
        for b in grid.ids:
            if b not in rates[label] or b not in base:
                continue
            if coherent_only and b in flagged.get(label, []):
                continue
            out[b] = rates[label][b] - base[b]
        return out

    # H1
    h1 = {}
    for s in cfg.sources:
        a2 = grid.a2_id.get(s.noun)
        rate = rates[s.name].get(a2) if a2 else None
        h1[s.name] = {"bystander": a2, "rate": rate, "hits": hits[s.name].get(a2), "total": totals[s.name].get(a2),
                      "base_rate": base.get(a2), "passes": None if rate is None else bool(rate > H1_THRESHOLD)}

    # H2 and the noun-match permutation test
    cubes = {s.name: grid.cube(subtracted(s.name, coherent_only=True)) for s in cfg.sources}
    h2, noun_cubes = {}, []
    for s in cfg.sources:
        if s.noun not in grid.nouns:
            h2[s.name] = {"holds": None, "note": f"the source noun {s.noun!r} is not among the bystander nouns"}
            continue
        h2[s.name] = h2_for_source(cubes[s.name], grid.nouns.index(s.noun))
        noun_cubes.append((grid.nouns.index(s.noun), cubes[s.name]))
    noun_test = noun_match_test(noun_cubes, n_perm=cfg.n_perm, seed=cfg.seed)

    # H3
    h3 = {"per_source": {}, "n_significant": 0, "n_triples": 0}
    if len(grid.levels) == 5:
        for s in cfg.sources:
            counts = [grid.cube({k: float(v) for k, v in table[label].items()})
                      for label in (s.name, cfg.base_label) for table in (hits, totals)]
            res = h3_slopes(*counts, n_boot=cfg.n_boot, seed=cfg.seed)
            count = int(res["significant"].sum())
            n = int(np.isfinite(res["slope"]).sum())
            h3["per_source"][s.name] = {"n_significant": count, "n_triples": n, "slope": _listify(res["slope"]),
                                        "half_width": _listify(res["half_width"])}
            h3["n_significant"] += count
            h3["n_triples"] += n
    else:
        h3["note"] = f"H3 needs the 5 gradation levels; this evaluation has {grid.levels}"

    # head-to-head on leakage
    head_to_head = {trait: {} for trait in grid.traits}
    axis_leak = head_to_head_columns(
        grid, [(cubes[s.name], grid.a2(subtracted(s.name, coherent_only=True))) for s in cfg.sources], "leak",
        head_to_head, n_perm=cfg.n_perm, seed=cfg.seed)

    # geometry: cosine head-to-head, axis test on cosine, H4
    geometry = read_geometry(cfg)
    cos_section: dict = {"available": geometry is not None}
    if geometry is not None:
        by_layer, ids, convention = geometry
        if cfg.headline_layer not in by_layer:
            raise StageInputError(f"headline layer {cfg.headline_layer} not among the stored layers {sorted(by_layer)}")
        cos_section.update(geometry_section(cfg, grid, by_layer, ids, subtracted, head_to_head))
        cos_section["layer_convention"] = convention

    return {
        "marker": cfg.marker, "sources": [s.model_dump() for s in cfg.sources], "base_label": cfg.base_label,
        "axes": {"nouns": grid.nouns, "traits": grid.traits, "levels": grid.levels},
        "n_bystanders": len(grid.ids), "bystander_ids": grid.ids,
        "rates": rates, "hits": hits, "totals": totals, "emission": emission,
        "base_subtracted": {s.name: subtracted(s.name, coherent_only=False) for s in cfg.sources},
        "coherence": {"threshold": cfg.coherence_threshold, "flagged": flagged,
                      "cell_mean": {label: {b: c["mean"] for b, c in coh.items()} for label, coh in coherence.items()},
                      "n_flagged": {k: len(v) for k, v in flagged.items()},
                      "n_cells_scored": {label: sum(1 for c in coh.values() if c["mean"] is not None)
                                         for label, coh in coherence.items()},
                      "n_scores": {label: sum(c["n"] for c in coh.values()) for label, coh in coherence.items()},
                      "n_judge_errors": {label: sum(c["errors"] for c in coh.values()) for label, coh in coherence.items()},
                      "mean": {label: _nanmean(np.array([c["mean"] for c in coh.values() if c["mean"] is not None]))
                               for label, coh in coherence.items()}},
        "h1": {"threshold": H1_THRESHOLD, "per_source": h1,
               "n_pass": sum(1 for v in h1.values() if v["passes"]), "n_sources": len(h1)},
        "h2": {"per_source": h2, "n_holds": sum(1 for v in h2.values() if v.get("holds")),
               "noun_match_test": noun_test},
        "h3": h3,
        "head_to_head": head_to_head,
        "axis_permutation_leak": axis_leak,
        "geometry": cos_section,
        "settings": {"n_boot": cfg.n_boot, "n_perm": cfg.n_perm, "seed": cfg.seed, "headline_layer": cfg.headline_layer},
    }


def geometry_section(cfg, grid: Grid, by_layer, ids, subtracted, head_to_head) -> dict:
    """Cosine columns of the head-to-head (added to ``head_to_head`` in place), the axis test on cosine and H4."""
    index = {pid: i for i, pid in enumerate(ids)}
    out: dict = {"layers": sorted(by_layer), "headline_layer": cfg.headline_layer}
    cos = {layer: cosine_matrix(c) for layer, c in by_layer.items()}
    c = cos[cfg.headline_layer]

    def cos_between(a: str | None, b: str | None) -> float:
        return float(c[index[a], index[b]]) if a in index and b in index else np.nan

    # the head-to-head on base-model cosine to the source (the source's prompt is its pure-noun bystander's)
    cos_cubes = []
    for s in cfg.sources:
        src = grid.a2_id.get(s.noun)
        cos_cubes.append((grid.cube({b: cos_between(src, b) for b in grid.a1_id.values()}),
                           np.array([cos_between(src, grid.a2_id.get(n)) for n in grid.nouns])))
    out["axis_permutation_cos"] = head_to_head_columns(grid, cos_cubes, "cos", head_to_head, n_perm=cfg.n_perm,
                                                       seed=cfg.seed)

    # H4: source x pure-noun submatrix, and each source against every bystander
    a2_nouns = [n for n in grid.nouns if n in grid.a2_id]
    leak_sub = np.array([[subtracted(s.name, coherent_only=True).get(grid.a2_id[n], np.nan) for n in a2_nouns] for s in cfg.sources])
    cos_sub = np.array([[cos_between(grid.a2_id.get(s.noun), grid.a2_id[n]) for n in a2_nouns] for s in cfg.sources])
    off = np.array([[s.noun != n for n in a2_nouns] for s in cfg.sources])
    out["h4"] = {"nouns": a2_nouns, "leak": _listify(leak_sub), "cos": _listify(cos_sub),
                 "off_diagonal": spearman_permutation(cos_sub[off], leak_sub[off], n_perm=cfg.n_perm, seed=cfg.seed),
                 "per_layer_off_diagonal": {}}
    for layer, matrix in cos.items():
        sub = np.array([[matrix[index[grid.a2_id[s.noun]], index[grid.a2_id[n]]] if grid.a2_id.get(s.noun) in index
                         and grid.a2_id[n] in index else np.nan for n in a2_nouns] for s in cfg.sources])
        out["h4"]["per_layer_off_diagonal"][str(layer)] = spearman_permutation(sub[off], leak_sub[off], n_perm=cfg.n_perm, seed=cfg.seed)
    per_source = {}
    for s in cfg.sources:
        sub = subtracted(s.name, coherent_only=True)
        src_id = grid.a2_id.get(s.noun)
        keys = [b for b in grid.ids if b in sub and b != src_id]
        per_source[s.name] = spearman_permutation(np.array([cos_between(src_id, b) for b in keys]),
                                                  np.array([sub[b] for b in keys]), n_perm=cfg.n_perm, seed=cfg.seed)
    out["h4"]["cos_vs_leak_all_bystanders"] = per_source
    out["cos_to_source"] = {s.name: {b: cos_between(grid.a2_id.get(s.noun), b) for b in grid.ids} for s in cfg.sources}
    return out


def _nanmean(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _listify(array: np.ndarray):
    """Nested lists with NaN as None, so headline.json stays strict JSON."""
    return [_listify(a) for a in array] if np.ndim(array) > 1 else [None if not np.isfinite(v) else float(v) for v in array]


# ---------------------------------------------------------------------------------------------------------------
# figures. Low-coherence cells are marked wherever a cell is drawn: hatched in the matrix panels, a black "x" on
# the line panels; line-panel means are over the coherent cells only. Each figure function returns the written
# URIs and ``marked``, the number of low-coherence cells it marked.

HATCH_NOTE = "hatched: low coherence"


def _flagged(data: dict, source: str) -> set[str]:
    return set(data["coherence"]["flagged"].get(source, []))


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
    from shared.figures import new_figure, save

    sources = [s["name"] for s in data["sources"]]
    ids = data["bystander_ids"]
    matrix = np.array([[data["base_subtracted"][s].get(b, np.nan) for b in ids] for s in sources])
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
    ax.set_title(f"{data['marker']} emission minus base model ({len(sources)} sources x {len(ids)} bystanders; "
                 f"{HATCH_NOTE})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01, label="rate - base rate")
    return {**save(fig, uri), "marked": marked}


def _house_style():
    """pyplot with the house style applied (``new_figure`` sets it); for figures with several panels."""
    import matplotlib.pyplot as plt

    from shared.figures import new_figure

    plt.close(new_figure()[0])
    return plt


def _per_source_axes(n: int, width_each: float = 3.2, height: float = 3.0):
    fig, axes = _house_style().subplots(1, n, figsize=(width_each * n, height), squeeze=False, sharey=True)
    return fig, axes[0]


def _cube_of(data: dict, source: str, *, coherent_only: bool = False) -> np.ndarray:
    axes = data["axes"]
    sub = data["base_subtracted"][source]
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
    from shared.figures import PALETTE, save

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
    fig.suptitle("Label isolation: trait and level fixed, the noun swept", fontsize=10)
    fig.tight_layout()
    return {**save(fig, uri), "marked": marked}


def trait_gradation_figure(data: dict, uri: str) -> dict:
    from shared.figures import PALETTE, save

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
    fig.suptitle("Trait gradation: the noun fixed, trait and level swept (x: a low-coherence noun left out)",
                 fontsize=10)
    fig.tight_layout()
    return {**save(fig, uri), "marked": marked}


def interaction_figure(data: dict, uri: str) -> dict:
    from shared.figures import save

    axes, sources = data["axes"], [s["name"] for s in data["sources"]]
    fig, panels = _per_source_axes(len(sources), height=3.2)
    marked = 0
    for ax, source, info in zip(panels, sources, data["sources"], strict=True):
        ax.grid(False)
        effect = np.array(data["h2"]["per_source"][source].get("noun_effect_by_trait_level") or
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
    from shared.figures import PALETTE

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
    from shared.figures import PALETTE, REFERENCE_COLOR, save

    sources = [s["name"] for s in data["sources"]]
    nouns = [n for n in data["axes"]["nouns"] if f"A2__{n}" in data["bystander_ids"]]
    geometry = data["geometry"]
    fig, grid = _house_style().subplots(2, 2, figsize=(12, 8.4))
    (matrix_ax, scatter_ax), (leak_ax, cos_ax) = grid
    matrix = np.array([[data["base_subtracted"][s].get(f"A2__{n}", np.nan) for n in nouns] for s in sources])
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
    matrix_ax.set_title(f"source x pure-noun bystander: emission - base ({HATCH_NOTE})", fontsize=9)
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
    from shared.figures import PALETTE, REFERENCE_COLOR, save

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
        source, cos, leak = info["name"], geometry["cos_to_source"][info["name"]], data["base_subtracted"][info["name"]]
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
                 "per source)", fontsize=10)
    fig.tight_layout()
    return {**save(fig, uri), "marked": marked}


# ---------------------------------------------------------------------------------------------------------------
# report


def _with_n(row: dict, key: str, n_key: str | None = None) -> str:
    from shared.reporting import fmt

    if row.get(key) is None:
        return "—"
    return f"{fmt(row[key], 4)} ({row[n_key or f'n_{key}']})"


def _spread(cell_means: dict) -> str:
    values = [v for v in cell_means.values() if v is not None]
    return "—" if not values else " / ".join(f"{v:.1f}" for v in (min(values), float(np.median(values)), max(values)))


def emission_section(data: dict) -> list[str]:
    """Each model's emission on the source's own pure noun, beside the base model's, and over the rest of the grid."""
    from shared.reporting import markdown_table

    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    emission, base = data["emission"], data["rates"][data["base_label"]]
    rows = []
    for label, e in emission.items():
        own = e["own_bystander"]
        rows.append((label, own or "—",
                     "—" if own is None else f"{pct(e['own_rate'])} ({data['hits'][label][own]}/{data['totals'][label][own]})",
                     "—" if own is None else pct(base.get(own)),
                     f"{pct(e['mean_rate_others'])} (n={e['n_others']})",
                     f"{e['max_other']}: {pct(e['max_other_rate'])}" if e["max_other"] else "—",
                     f"{pct(e['pooled_rate'])} ({e['hits']}/{e['total']})", pct(e["truncated_share"])))
    return ["## Marker emission: each source model and the base model", "",
            "Own rate: the model's rate on its source's own pure-noun bystander (the training prompt); the base model "
            "on the same bystander beside it. Other bystanders: every bystander but that one (for the base model, "
            "all). Truncated: completions that ran into the token limit before ending, where a marker trained to "
            "follow a reply's end cannot show.", "",
            markdown_table(["model", "own bystander", "own rate (hits/N)", "base model there", "mean over other bystanders",
                            "highest other bystander", "pooled over the grid", "truncated"], rows), ""]


def report(data: dict) -> str:
    from shared.reporting import fmt, markdown_table

    h1, h2, h3 = data["h1"], data["h2"], data["h3"]
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"# #81: {data['marker']} leakage over the Big-5 bystander grid", "",
             f"{len(data['sources'])} sources x {data['n_bystanders']} bystanders, plus the base model as reference. "
             f"Marker matching: {data['matching']}.", "",
             *emission_section(data),
             f"## H1 implantation (rate on the source's own pure-noun bystander > {h1['threshold']:.2f})", "",
             markdown_table(["source", "bystander", "rate", "hits / total", "base rate", "passes"],
                            [(s, v["bystander"], pct(v["rate"]), f"{v['hits']} / {v['total']}", pct(v["base_rate"]), v["passes"])
                             for s, v in h1["per_source"].items()]), "",
             f"H1 passes for {h1['n_pass']} of {h1['n_sources']} sources.", "",
             "## H2 noun vs trait (medians as pinned in the record; coherent cells only)", "",
             markdown_table(["source", "median noun effect", "median trait effect", "ratio", "H2 holds"],
                            [(s, fmt(v.get("median_noun_effect"), 4), fmt(v.get("median_trait_effect"), 4),
                              fmt(v.get("ratio"), 2), v.get("holds")) for s, v in h2["per_source"].items()]), "",
             f"H2 holds for {h2['n_holds']} of {len(h2['per_source'])} sources. Noun-match permutation test "
             f"(same-noun bystanders leak more; labels shuffled within source x trait x level): "
             f"Δ={fmt(h2['noun_match_test'].get('statistic'), 4)}, p={fmt(h2['noun_match_test'].get('p_value'), 4)}.", "",
             f"## H3 gradation slopes (|slope| > half-width of the binomial-bootstrap 95% CI, B={data['settings']['n_boot']})", "",
             "Per (source, noun, trait): the least-squares slope of the base-subtracted rate over L1..L5; every bootstrap "
             "replicate redraws the source's and the base model's counts.", ""]
    if h3.get("per_source"):
        lines += [markdown_table(["source", "significant triples", "triples"],
                                 [(s, v["n_significant"], v["n_triples"]) for s, v in h3["per_source"].items()]), "",
                  f"In all: {h3['n_significant']} of {h3['n_triples']} (source, noun, trait) triples.", ""]
    else:
        lines += [h3.get("note", "not computed"), ""]
    lines += ["## Adjective vs noun, per Big-5 axis", "",
              "Adjective Δ: mean over (source, noun, level) cells of |m(noun who <descriptor>) - m(pure noun)|; "
              "noun-swap Δ: mean over (source, level) contexts of the median over noun pairs of |m(noun i) - m(noun j)|, "
              "trait and level fixed. m is the base-subtracted emission (leak, coherent cells) or the base-model "
              f"cosine to the source at layer {data['settings']['headline_layer']} (cos). "
              "N: cells (adjective) and contexts (noun swap) behind each mean.", "",
              markdown_table(["axis", "adjective Δ leak (N)", "noun-swap Δ leak (N)", "ratio leak",
                              "adjective Δ cos (N)", "noun-swap Δ cos (N)", "ratio cos"],
                             [(t, _with_n(v, "adjective_leak"), _with_n(v, "noun_swap_leak", "n_noun_swap_contexts_leak"),
                               fmt(v["ratio_leak"], 2), _with_n(v, "adjective_cos"),
                               _with_n(v, "noun_swap_cos", "n_noun_swap_contexts_cos"), fmt(v.get("ratio_cos"), 2))
                              for t, v in data["head_to_head"].items()]), "",
              f"Axis-label permutation test (range of per-axis mean adjective Δ, {data['settings']['n_perm']} shuffles): "
              f"leakage spread {fmt(data['axis_permutation_leak'].get('spread'), 4)}, p={fmt(data['axis_permutation_leak'].get('p_value'), 4)}"]
    geometry = data["geometry"]
    if geometry.get("available"):
        ax_cos = geometry["axis_permutation_cos"]
        lines[-1] += f"; cosine spread {fmt(ax_cos.get('spread'), 4)}, p={fmt(ax_cos.get('p_value'), 4)}."
        h4 = geometry["h4"]
        off = h4["off_diagonal"]
        lines += ["", f"## H4 base-model cosine (layer {geometry['headline_layer']}) vs leakage", "",
                  f"Layer L is {geometry.get('layer_convention') or 'not recorded by the hidden_states artifact'}.", "",
                  f"Source x pure-noun submatrix, off-diagonal cells: Spearman ρ={fmt(off.get('rho'), 3)}, "
                  f"p={fmt(off.get('p_value'), 4)}, n={off.get('n')}" + (f" ({off['note']})" if off.get("note") else "") + ".", "",
                  markdown_table(["layer", "off-diagonal ρ", "p", "n"],
                                 [(layer, fmt(v.get("rho"), 3), fmt(v.get("p_value"), 4), v.get("n"))
                                  for layer, v in h4["per_layer_off_diagonal"].items()]), "",
                  markdown_table(["source", f"ρ(cos to source, leakage) over bystanders, layer {geometry['headline_layer']}", "p", "n"],
                                 [(s, fmt(v.get("rho"), 3), fmt(v.get("p_value"), 4), v.get("n"))
                                  for s, v in h4["cos_vs_leak_all_bystanders"].items()])]
    else:
        lines += ["", "## H4", "", "No base-model centroids were given: H4 and the cosine columns are omitted."]
    coh = data["coherence"]
    if coh["threshold"] > 0:
        coherence_head = [f"## Coherence (cells with mean judge score < {coh['threshold']:g} are flagged and hatched)", "",
                          "A source's flagged cells are left out of H2, the leakage head-to-head and H4; H1 and H3 use "
                          "every cell.", ""]
    else:
        coherence_head = ["## Coherence (flagging off: threshold 0)", "",
                          "The judge scored every sampled completion, but with the threshold at 0 no cell is flagged and "
                          "every analysis uses every cell. The spread of the per-cell means shows how much the judge "
                          "tells the cells apart.", ""]
    lines += ["", *coherence_head,
              markdown_table(["model", "mean coherence", "cell means: min / median / max", "cells scored", "scores",
                              "judge errors", "flagged cells"],
                             [(label, fmt(coh["mean"].get(label), 1), _spread(coh["cell_mean"].get(label, {})),
                               coh["n_cells_scored"].get(label, 0), coh["n_scores"].get(label, 0),
                               coh["n_judge_errors"].get(label, 0), coh["n_flagged"].get(label, 0))
                              for label in coh["mean"]]),
              "", "## Figures", ""]
    captions = {"hero_matrix": "hero: source x pure-noun matrix, H4 scatter, adjective vs noun on leakage and cosine",
                "heatmap_base_subtracted": "every source x every bystander, base-subtracted",
                "noun_isolation": "label isolation", "trait_gradation": "trait gradation",
                "interaction": "noun effect per trait x level",
                "cosine_leakage": "leakage against base-model cosine to the source, every bystander (H4)"}
    for name, figure in data.get("figures", {}).items():
        lines += [f"![{captions.get(name, name)}]({name}.png)", "",
                  f"*{captions.get(name, name)}; low-coherence cells marked: {figure['low_coherence_marked']}.*", ""]
    lines += training_section(data.get("training", {}))
    return "\n".join(lines)


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


def training_section(training: dict[str, dict]) -> list[str]:
    from shared.reporting import markdown_table

    if not training:
        return []
    return ["## LoRA training", "",
            "Each source's marker-only LoRA: its optimizer steps and its mean training loss (the marker tokens and, "
            "on negatives, the end-of-turn token) over its first and over its last `window` steps.", "",
            markdown_table(["source", "steps", "window", "loss, first steps", "loss, last steps"],
                           [(label, t["steps"], t["window"], f"{t['loss_start']:.3f}", f"{t['loss_end']:.3f}")
                            for label, t in training.items()]), "",
            "![LoRA training loss per source](lora_loss.png)", ""]


FIGURES = {"hero_matrix": hero_figure, "heatmap_base_subtracted": heatmap_figure, "noun_isolation": noun_isolation_figure,
           "trait_gradation": trait_gradation_figure, "interaction": interaction_figure,
           "cosine_leakage": cosine_leakage_figure}


def run(cfg: Config, ctx) -> dict:
    from shared.figures import training_loss_figure
    from shared.reporting import producing_manifest, reproducibility

    data = analyse(cfg)
    data["matching"] = store.read_json(cfg.cells[0].rates_uri).get("matching", "")
    figures = {name: draw(data, ctx.out(name)) for name, draw in FIGURES.items()}
    data["figures"] = {name: {"png": f["png"], "pdf": f["pdf"], "low_coherence_marked": f["marked"]}
                       for name, f in figures.items()}
    data["training"] = training_summary(cfg)
    if data["training"]:
        training_loss_figure({c.label: store.read_jsonl(c.train_log_uri) for c in cfg.cells if c.train_log_uri},
                             ctx.out("lora_loss"), title="marker-only LoRA training loss per source")
    store.write_json(ctx.out("headline.json"), data)
    store.write_text(ctx.out("report.md"), report(data))
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
    store.write_text(ctx.out("REPRODUCIBILITY.md"), reproducibility("#81", cfg.params, list(unique.values())))
    return {"h1_pass": data["h1"]["n_pass"], "h2_holds": data["h2"]["n_holds"], "h3_significant": data["h3"]["n_significant"],
            "self_rates": {s: v["rate"] for s, v in data["h1"]["per_source"].items()}}


SPEC = StageSpec(
    name="analyze_issue81", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=2, memory="4Gi", timeout_s=3600),
    description="#81 H1-H4, the adjective-vs-noun head-to-head, figures and report from stored rates and centroids.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
