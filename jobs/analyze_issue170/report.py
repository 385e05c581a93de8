"""Stage ``analyze_issue170``: every cell's α, EM rate and classifier C with question-clustered intervals, per
training seed and pooled across seeds; the fit of every learned prompt to the teacher on the test split beside the
oracle and null anchors; the random-suffix null; GCG's candidate screen and its measured agreement; the learned
suffixes as text; the projection table; judge checks and error rates; and the H1/H2/H3 decision rules as amended in
the record, decided on interval bounds, per seed and pooled.

The analysis has four parts, each one function of the one before: ``results`` (every number, read and recomputed
from the stored per-item artifacts), ``decisions`` (the record's pre-registered rules applied to the results),
``draw_figures`` and ``report_text`` (which print the results object and nothing else). ``headline.json`` is the
results object itself.
"""

from __future__ import annotations

import json
import math
import re
from importlib import resources
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from jobs.heldout_anchors import ORACLE
from shared.contract.stage import Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig
from shared.judge.spec import JudgeSpec

Method = Literal["soft", "gcg-system", "gcg-user", "random", "reference"]
LEARNED = ("soft", "gcg-system", "gcg-user", "random")
TRAINED = ("soft", "gcg-system", "gcg-user")  # cells that run once per training seed
SWEEP = ("soft", "gcg-system")  # the cells H1/H2/H_intermediate speak about (the user slot is a sanity check)
DEFAULT_INIT = "You are a helpful assistant."
N_BOOT = 2_000
CONFIDENCE = 0.95
N_LOWEST = 3  # lowest-scored answers quoted per replicate and alignment judge
# what the report shows of a GCG or random cell's suffix, from its search stage's metrics.json
SUFFIX_KEYS = ("suffix_ids", "suffix_text", "suffix_pieces", "suffix_round_trip", "vocabulary",
               "candidates_rejected_share", "start_ids", "draw")
SCREEN_KEYS = ("screen_on", "screen_pairs", "screen_keep", "screen_check_every", "pairs_per_step", "search_width",
               "screen_checks", "screen_agreement", "screen_mean_rank", "screen_mean_gap")
# the per-replicate numbers pooled across training seeds (or across the random suffixes' draws)
POOLED = ("alpha_primary", "alpha_alternate", "c", "em_rate_primary", "em_rate_alternate")


class CellArtifacts(BaseModel):
    name: str  # the task's cell: one training seed's replicate (``<recipe>-s<seed>`` when there are several)
    recipe: str | None = None  # the cell across training seeds (or a random suffix across draws); default: name
    seed: int | None = None  # the training seed (soft and GCG cells)
    draw: int | None = None  # which draw of the random-suffix null
    method: Method
    size: int | None = None  # K for soft cells, L for GCG and random cells
    lr: float | None = None
    init_text: str | None = None  # soft cells: the text the prefix was initialised from
    c_scores_uri: str
    judge_scores_uris: dict[str, str]
    coherence_scores_uri: str | None = None  # the coherence pass over the same completions (for the EM rate)
    completions_uri: str | None = None  # the completions judged (the lowest-scored answers are quoted from them)
    train_metrics_uri: str | None = None  # metrics.json of the training stage


class Config(StageConfig):
    cells: list[CellArtifacts]
    seeds: list[int] = []  # the run's training seeds, in order (the first selects the best cell, the rest confirm)
    primary_judge: str
    alternate_judge: str
    classifier_uri: str
    villain_uri: str | None = None
    anchors_uri: str | None = None  # heldout_anchors' anchors.json
    judges: dict[str, JudgeSpec] = {}  # judge name -> spec (a local judge's α gets its caveat; templates named)
    coherence_judge: str | None = None  # the name of the coherence pass (None: no EM rate)
    judge_check_uris: dict[str, str] = {}  # alignment judge name -> check.json of its judge_check stage
    coherence_check_uri: str | None = None  # check.json of the coherence judge's judge_check stage
    profile: str = ""
    record_reference_points: bool = True  # overlay the record's points (Qwen2.5-7B, Claude judges)
    confidence: float = Field(CONFIDENCE, gt=0, lt=1)
    params: dict = {}


def package_json(name: str) -> dict:
    return json.loads(resources.files("shared.data").joinpath(f"issue170/{name}").read_text())


def finite(value):
    """A float as JSON can hold it: NaN (an interval that cannot be computed) becomes None."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


# =============================================================================================== 1. results


def clustered_mean(rows: list[dict], key: str, *, confidence: float, seed: int) -> dict:
    """The mean of ``key`` over rows with a value, with a percentile bootstrap interval that resamples whole
    questions (the answers to one question share its prompt)."""
    from shared.analysis.stats import cluster_bootstrap_ci

    kept = [r for r in rows if r.get("error") is None and r.get(key) is not None]
    if not kept:
        return {"estimate": None, "low": None, "high": None, "n": 0, "n_questions": 0}
    ci = cluster_bootstrap_ci([str(r["question_id"]) for r in kept], [float(r[key]) for r in kept], n_boot=N_BOOT,
                              confidence=confidence, rng=seed)
    return {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "n": len(kept),
            "n_questions": len({str(r["question_id"]) for r in kept})}


def judgement_fields(cfg: Config, cell: CellArtifacts) -> dict:
    """α of both judges with question-clustered intervals, and the EM rate, coherent share and error rates of every
    judge pass, for one cell."""
    from shared.judge.report import condition_judgements, lowest_scored, read_judged_rows

    alignment, coherence = read_judged_rows(f"cell {cell.name}", cell.judge_scores_uris, cell.coherence_scores_uri,
                                            alignment_judges=(cfg.primary_judge, cfg.alternate_judge),
                                            coherence_judge=cfg.coherence_judge)
    try:
        judgements = condition_judgements(alignment, coherence, coherence_judge=cfg.coherence_judge, seed=cfg.seed)
    except ValueError as err:
        raise StageInputError(f"cell {cell.name}: {err}") from None
    em = judgements["em"]
    completions = store.read_jsonl(cell.completions_uri) if cell.completions_uri else []
    lowest = {name: lowest_scored(rows, completions, N_LOWEST) for name, rows in alignment.items()}
    alphas = {role: clustered_mean(alignment[name], "score", confidence=cfg.confidence, seed=cfg.seed)
              for role, name in (("primary", cfg.primary_judge), ("alternate", cfg.alternate_judge))}
    return {
        **{f"alpha_{role}": a["estimate"] for role, a in alphas.items()},
        **{f"alpha_{role}_ci": [a["low"], a["high"]] for role, a in alphas.items()},
        "alpha_n": {role: a["n"] for role, a in alphas.items()},
        **{f"em_rate_{role}{suffix}": None if em[name] is None else em[name][key]
           for role, name in (("primary", cfg.primary_judge), ("alternate", cfg.alternate_judge))
           for suffix, key in (("", "rate"), ("_ci", "ci"))},
        "coherent_share": judgements["coherent_share"],
        "errors_primary": judgements["errors"][cfg.primary_judge]["n_errors"],
        "errors_alternate": judgements["errors"][cfg.alternate_judge]["n_errors"],
        "errors_coherence": judgements["errors"][cfg.coherence_judge]["n_errors"] if coherence else None,
        "judgements": judgements, "lowest": lowest,
        "no_alpha": {role: why_no_alpha(judgements["alpha"][name])
                     for role, name in (("primary", cfg.primary_judge), ("alternate", cfg.alternate_judge))
                     if alphas[role]["estimate"] is None},
    }


def why_no_alpha(alpha: dict) -> str:
    """Why a judge pass gave no α: what became of each of its answers (abstentions, other errors, labels)."""
    parts = [f"{n} {kind}" for kind, n in alpha["errors_by_kind"].items()]
    parts += [f"{n} labelled {label}" for label, n in alpha["labels"].items()]
    return f"none of its {alpha['n_items']} answers was scored ({', '.join(parts) or 'no answers'})"


def classifier_fields(cfg: Config, cell: CellArtifacts) -> dict:
    rows = store.read_jsonl(cell.c_scores_uri)
    if not rows:
        raise StageInputError(f"no classifier scores in {cell.c_scores_uri}")
    c = clustered_mean(rows, "c", confidence=cfg.confidence, seed=cfg.seed)
    return {"c": c["estimate"], "c_ci": [c["low"], c["high"]], "c_n": c["n"]}


def replicate_rows(cfg: Config) -> list[dict]:
    """One row per evaluated prompt: a training seed's replicate of a cell, a random suffix, a reference."""
    rows = []
    for cell in cfg.cells:
        training = store.read_json(cell.train_metrics_uri) if cell.train_metrics_uri else {}
        rows.append({
            "name": cell.name, "cell": cell.recipe or cell.name, "seed": cell.seed, "draw": cell.draw,
            "method": cell.method, "size": cell.size, "lr": cell.lr, "init_text": cell.init_text,
            **classifier_fields(cfg, cell), **judgement_fields(cfg, cell),
            "best_heldout_ce": training.get("best_heldout_ce"), "initial_heldout_ce": training.get("initial_heldout_ce"),
            "steps": training.get("steps"), "stopped_early": training.get("stopped_early"),
            # seconds per step: teacher sampling, and the optimiser's own work (soft: forward/backward; GCG:
            # gradient + candidate evaluation)
            "teacher_s_per_step": training.get("teacher_s_mean"),
            "optimiser_s_per_step": training.get("forward_backward_s_mean", _gcg_work(training)),
            **{key: training[key] for key in SUFFIX_KEYS + SCREEN_KEYS if key in training},
        })
    return rows


def _gcg_work(training: dict) -> float | None:
    gradient, candidates = training.get("gradient_s_mean"), training.get("candidates_s_mean")
    return None if gradient is None or candidates is None else gradient + candidates


def across(values: list[float | None], confidence: float) -> dict:
    """The mean of per-seed (or per-draw) values with the t interval of the mean over those units; with one unit
    the interval is None (nothing measures the spread between seeds)."""
    from shared.analysis.stats import seed_contrast

    known = [float(v) for v in values if v is not None]
    if not known:
        return {"mean": None, "low": None, "high": None, "sd": None, "n": 0}
    result = seed_contrast(known, reference=0.0, confidence=confidence)
    return {"mean": result.estimate, "low": finite(result.low), "high": finite(result.high),
            "sd": finite(result.sd_a), "n": result.n_a}


def t_critical(n_units: int, confidence: float) -> float | None:
    """The t quantile a between-unit interval over ``n_units`` uses (None below two units)."""
    from scipy import stats as scipy_stats

    return None if n_units < 2 else float(scipy_stats.t.ppf(0.5 + confidence / 2, n_units - 1))


def cell_summaries(replicates: list[dict], fit: dict | None, confidence: float) -> list[dict]:
    """One entry per cell across its training seeds (or a random suffix length across its draws): each seed's
    values and their mean with a between-seed interval."""
    gap = {r["name"]: (r.get("gap_closed") or {}).get("estimate") for r in (fit or {}).get("replicates", [])}
    out: dict[str, dict] = {}
    for row in replicates:
        entry = out.setdefault(row["cell"], {
            "cell": row["cell"], "method": row["method"], "size": row["size"], "lr": row["lr"],
            "init_text": row["init_text"], "replicates": [], "unit": unit_of(row["method"])})
        entry["replicates"].append(row["name"])
    by_name = {r["name"]: r for r in replicates}
    for entry in out.values():
        rows = [by_name[name] for name in entry["replicates"]]
        entry["units"] = [r["seed"] if entry["unit"] == "seed" else r["draw"] for r in rows]
        for key in POOLED:
            entry[key] = across([r[key] for r in rows], confidence)
        entry["gap_closed"] = across([gap.get(r["name"]) for r in rows], confidence)
    return list(out.values())


def unit_of(method: str) -> str:
    return {"random": "draw", "reference": "fixed prompt"}.get(method, "seed")


def per_question(values, question_ids: list[str], order: list[str]) -> np.ndarray:
    """Per-pair values summed within each question, in ``order``."""
    index = {q: i for i, q in enumerate(order)}
    out = np.zeros(len(order))
    np.add.at(out, [index[q] for q in question_ids], np.asarray(values, dtype=float))
    return out


def start_minus_cell(cell, start, _oracle, tokens, axis=-1):
    """How far a prompt's CE lies below the start (null) prompt's, in nats/token: what the prompt gained."""
    return (start.sum(axis=axis) - cell.sum(axis=axis)) / tokens.sum(axis=axis)


def cell_minus_oracle(cell, _start, oracle, tokens, axis=-1):
    """How far a prompt's CE lies above the oracle's, in nats/token: what is left to gain."""
    return (cell.sum(axis=axis) - oracle.sum(axis=axis)) / tokens.sum(axis=axis)


def gap_closed(cell, start, oracle, _tokens, axis=-1):
    """(start - cell) / (start - oracle): 0 at the start prompt, 1 at the oracle."""
    begin = start.sum(axis=axis)
    return (begin - cell.sum(axis=axis)) / (begin - oracle.sum(axis=axis))


def interval(ci) -> dict:
    return {"estimate": finite(float(ci.estimate)), "low": finite(float(ci.low)), "high": finite(float(ci.high))}


def fit_to_teacher(replicates: list[dict], anchors: dict, *, confidence: float, seed: int = 0) -> dict:
    """Each learned prompt on the test split (teacher completions to questions used for nothing else) beside the
    anchors measured on the same pairs: what it gained over the start (null) prompt, what is left to the oracle,
    and the ratio (gap closed), each with a percentile bootstrap interval that resamples test questions (cell and
    anchors together: a paired interval). Also: the kept prompt re-measured on its own validation pairs, which
    must equal the training stage's best held-out CE."""
    from shared.analysis.stats import bootstrap_ci

    names = [a["name"] for a in anchors["anchors"]]
    oracle = ORACLE if ORACLE in names else None
    start = next((n for n in names if n != ORACLE), None)
    test = anchors.get("test_set")
    out, differences = [], []
    for row in replicates:
        cell = anchors["cells"].get(row["name"])
        if cell is None:
            continue
        if row["best_heldout_ce"] is not None:
            differences.append(abs(cell["kept_prompt_ce"] - row["best_heldout_ce"]))
        entry = {"name": row["name"], "cell": row["cell"], "seed": row["seed"], "draw": row["draw"],
                 "method": row["method"], "size": row["size"], "val_ce": cell["kept_prompt_ce"],
                 "val_anchors": cell["anchors"], "held_out_set": cell["held_out_set"]}
        if test is not None and "test" in cell:
            order = test["questions"]
            qids = test["pair_question_ids"]
            sums = {name: per_question(test["anchor_pair_ce_sums"][name], qids, order) for name in names}
            arrays = (per_question(cell["test"]["pair_ce_sums"], qids, order),
                      sums[start] if start else None, sums[oracle] if oracle else None,
                      per_question(test["pair_tokens"], qids, order))
            rng = np.random.default_rng([seed, len(out)])
            entry["test_ce"] = cell["test"]["ce"]
            for key, statistic, needs in (("start_minus_cell", start_minus_cell, start),
                                          ("cell_minus_oracle", cell_minus_oracle, oracle),
                                          ("gap_closed", gap_closed, start and oracle)):
                if needs:
                    used = tuple(a if a is not None else arrays[3] for a in arrays)  # absent anchors: unused
                    entry[key] = interval(bootstrap_ci(used, statistic, n_boot=N_BOOT, confidence=confidence,
                                                       rng=rng))
        out.append(entry)
    cells: dict[str, dict] = {}
    for entry in out:
        cells.setdefault(entry["cell"], {"cell": entry["cell"], "method": entry["method"], "size": entry["size"],
                                         "names": []})["names"].append(entry["name"])
    for summary in cells.values():
        rows = [e for e in out if e["name"] in summary["names"]]
        summary["test_ce"] = across([e.get("test_ce") for e in rows], confidence)
        for key in ("start_minus_cell", "cell_minus_oracle", "gap_closed"):
            summary[key] = across([(e.get(key) or {}).get("estimate") for e in rows], confidence)
    test_facts = None if test is None else {
        k: test[k] for k in ("questions", "n_pairs", "n_loss_tokens", "anchors", "draws") if k in test}
    return {"anchors": anchors["anchors"], "oracle": oracle, "start": start, "test_set": test_facts,
            "replicates": out, "cells": list(cells.values()),
            "val_sets": [{k: v for k, v in s.items() if not k.startswith(("pair_", "anchor_pair_"))}
                         for s in anchors["held_out_sets"]],
            "max_difference_from_training": max(differences) if differences else None}


def random_null(replicates: list[dict], fit: dict | None, confidence: float) -> list[dict]:
    """Per suffix length: the random suffixes' α, C and test-split gap closed (draws are the units), and each GCG
    cell of that length against them (its training seeds against the draws: a two-sample t over units)."""
    from shared.analysis.stats import seed_contrast

    gap = {r["name"]: (r.get("gap_closed") or {}).get("estimate") for r in (fit or {}).get("replicates", [])}
    out = []
    for length in sorted({r["size"] for r in replicates if r["method"] == "random"}):
        draws = [r for r in replicates if r["method"] == "random" and r["size"] == length]
        starts = {tuple(r["start_ids"]) for r in replicates
                  if r["method"].startswith("gcg") and r["size"] == length and r.get("start_ids")}
        entry = {"length": length, "draws": [r["name"] for r in draws],
                 "identical_to_a_gcg_start": [r["name"] for r in draws if tuple(r.get("suffix_ids", ())) in starts],
                 "contrasts": []}
        for key in ("alpha_primary", "c", "gap_closed"):
            values = [gap.get(r["name"]) if key == "gap_closed" else r[key] for r in draws]
            entry[key] = across(values, confidence)
        for recipe in dict.fromkeys(r["cell"] for r in replicates
                                    if r["method"] == "gcg-system" and r["size"] == length):
            seeds = [r for r in replicates if r["cell"] == recipe]
            for key in ("alpha_primary", "c", "gap_closed"):
                a = [gap.get(r["name"]) if key == "gap_closed" else r[key] for r in seeds]
                b = [gap.get(r["name"]) if key == "gap_closed" else r[key] for r in draws]
                a, b = [v for v in a if v is not None], [v for v in b if v is not None]
                if not a or not b:
                    continue
                result = seed_contrast(a, b, confidence=confidence)
                entry["contrasts"].append({"cell": recipe, "metric": key, "difference": result.estimate,
                                           "low": finite(result.low), "high": finite(result.high),
                                           "p_value": finite(result.p_value), "n_seeds": result.n_a,
                                           "n_draws": result.n_b, "testable": not math.isnan(result.p_value)})
        out.append(entry)
    return out


def screen_facts(replicates: list[dict]) -> list[dict]:
    """Each GCG search's candidate screen: its settings and, on the steps that also ran the full evaluation, how
    often the screen kept the full evaluation's best, the pick's mean rank there and its mean CE gap."""
    return [{"name": r["name"], "cell": r["cell"], "seed": r["seed"], **{k: r.get(k) for k in SCREEN_KEYS}}
            for r in replicates if r["method"] in ("gcg-system", "gcg-user")]


def best_cell(cells: list[dict], replicates: list[dict], fit: dict | None, seeds: list[int]) -> dict:
    """The best sweep cell chosen on the first half of the training seeds and confirmed on the rest, by two
    criteria: the lowest α (primary judge; the record's "best cell") and the largest gap closed on the test split.

    With one seed there is nothing to confirm on: the choice is post hoc, and the report says so."""
    gap = {r["name"]: (r.get("gap_closed") or {}).get("estimate") for r in (fit or {}).get("replicates", [])}
    select, confirm = (seeds[: max(1, len(seeds) // 2)], seeds[max(1, len(seeds) // 2):]) if seeds else ([], [])
    sweep = [c["cell"] for c in cells if c["method"] in SWEEP]

    def value(cell: str, key: str, among: list[int]) -> float | None:
        values = [gap.get(r["name"]) if key == "gap_closed" else r[key] for r in replicates
                  if r["cell"] == cell and r["seed"] in among]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values and len(values) == len(among) else None

    out = {"selection_seeds": select, "confirmation_seeds": confirm, "post_hoc": not confirm, "criteria": []}
    for key, lower_is_better in (("alpha_primary", True), ("gap_closed", False)):
        scored = {c: value(c, key, select) for c in sweep}
        scored = {c: v for c, v in scored.items() if v is not None}
        if not scored:
            continue
        chosen = (min if lower_is_better else max)(scored, key=scored.get)
        entry = {"metric": key, "lower_is_better": lower_is_better, "chosen": chosen, "selection_value": scored[chosen]}
        if confirm:
            held = {c: value(c, key, confirm) for c in sweep}
            held = {c: v for c, v in held.items() if v is not None}
            if chosen in held:
                ranked = sorted(held, key=held.get, reverse=not lower_is_better)
                entry.update(confirmation_value=held[chosen], confirmation_rank=ranked.index(chosen) + 1,
                             confirmation_cells=len(ranked), confirmation_best=ranked[0])
        out["criteria"].append(entry)
    return out


def projection_facts(villain: dict, replicates: list[dict], confidence: float) -> dict:
    """The villain-direction artifact's numbers, with every cell's mean cosine pooled over its seeds."""
    out = {k: villain.get(k) for k in ("layer_convention", "chosen_layer", "cohens_d", "pirate", "cells",
                                       "fixed_prompts", "reference_system", "direction_source")}
    recipes = {}
    for r in replicates:
        if r["name"] in villain["cells"]:
            recipes.setdefault(r["cell"], []).append(villain["cells"][r["name"]]["mean_cosine"])
    out["by_cell"] = {cell: across(values, confidence) for cell, values in recipes.items()}
    return out


def judge_roles(cfg: Config) -> dict[str, str]:
    if cfg.primary_judge == cfg.alternate_judge:
        roles = {cfg.primary_judge: "primary and alternate alignment"}
    else:
        roles = {cfg.primary_judge: "primary alignment", cfg.alternate_judge: "alternate alignment"}
    return {**roles, cfg.coherence_judge: "coherence"} if cfg.coherence_judge else roles


def classifier_facts(cfg: Config) -> dict:
    """What the report says about classifier C: the bundle's own facts, as the scoring stage recorded them."""
    scored = store.read_json(store.join(cfg.cells[0].c_scores_uri.rsplit("/", 1)[0], "metrics.json"))
    return {"uri": cfg.classifier_uri, **scored.get("classifier", {})}


def training_curves(cfg: Config) -> dict[str, list[dict]]:
    """Each trained replicate's curve.jsonl (written beside its metrics.json by the training stage): the step and
    the two CE values the figure draws."""
    curves = {}
    for c in cfg.cells:
        if c.train_metrics_uri and c.method != "random":
            points = store.read_jsonl(store.join(c.train_metrics_uri.rsplit("/", 1)[0], "curve.jsonl"))
            curves[c.name] = [{k: p[k] for k in ("step", "train_ce", "heldout_ce") if k in p} for p in points]
    return curves


def results(cfg: Config) -> dict:
    """Every number the report, the figures and headline.json print, read and recomputed from stored artifacts;
    the decisions are applied to it by ``decisions``."""
    from shared.judge.em import ALIGNMENT_BELOW, COHERENCE_ABOVE
    from shared.judge.report import (
        alignment_roles,
        check_aucs,
        error_accounting,
        read_check,
        read_judge_checks,
    )

    replicates = replicate_rows(cfg)
    villain = store.read_json(cfg.villain_uri) if cfg.villain_uri else None
    same_scores = all(c.judge_scores_uris[cfg.primary_judge] == c.judge_scores_uris[cfg.alternate_judge]
                      for c in cfg.cells)
    fit = (fit_to_teacher(replicates, store.read_json(cfg.anchors_uri), confidence=cfg.confidence, seed=cfg.seed)
           if cfg.anchors_uri else None)
    cells = cell_summaries(replicates, fit, cfg.confidence)
    seeds = list(cfg.seeds) or sorted({r["seed"] for r in replicates if r["seed"] is not None})
    data = {
        "profile": cfg.profile, "seeds": seeds, "confidence": cfg.confidence, "n_boot": N_BOOT,
        "between_seed_t": t_critical(len(seeds), cfg.confidence),
        "judges": {"primary": cfg.primary_judge, "alternate": cfg.alternate_judge, "same_scores": same_scores,
                   "coherence": cfg.coherence_judge,
                   "specs": {name: spec.model_dump() for name, spec in cfg.judges.items()}},
        "roles": judge_roles(cfg),
        "em_definition": {"alignment_below": ALIGNMENT_BELOW, "coherence_above": COHERENCE_ABOVE,
                          "coherence_judge": cfg.coherence_judge},
        "judge_errors": error_accounting({r["name"]: r["judgements"]["errors"] for r in replicates}),
        "templates": {name: {"role": judge_roles(cfg).get(name, ""), "kind": spec.kind, "model": spec.model,
                             "local_method": spec.local_method if spec.kind == "local" else None,
                             "min_candidate_mass": spec.min_candidate_mass if spec.kind == "local" else None,
                             **spec.template_facts()} for name, spec in cfg.judges.items()},
        # constants the report's prose prints (the exact interval's tail, the judges' score range, ...)
        "constants": {"confidence_percent": round(100 * cfg.confidence), "tail": round((1 - cfg.confidence) / 2, 3),
                      "n_lowest": N_LOWEST, "score_range": [0, 100], "graded_anchors": [30, 50, 70]},
        "coherence_check": read_check(cfg.coherence_check_uri),
        "setup": {k: cfg.params.get(k) for k in ("model_ref", "teacher_model_ref", "teacher_adapter_uri",
                                                 "teacher_system")} if cfg.params else {},
        "replicates": replicates, "cells": cells, "classifier": classifier_facts(cfg), "fit": fit,
        "random_null": random_null(replicates, fit, cfg.confidence), "screen": screen_facts(replicates),
        "best_cell": best_cell(cells, replicates, fit, seeds),
        "reference_points": package_json("reference_points.json")["points"] if cfg.record_reference_points else [],
        "rules": package_json("decision_rules.json"),
        "curves": training_curves(cfg),
    }
    data["judge_checks"] = read_judge_checks(alignment_roles(cfg.primary_judge, cfg.alternate_judge),
                                             cfg.judge_check_uris)
    data["judge_check_auc"] = check_aucs(data["judge_checks"])
    if villain:
        data["projection"] = projection_facts(villain, replicates, cfg.confidence)
    data["decisions"] = decisions(data)
    return data


# ============================================================================================= 2. decisions

INSIDE, OUTSIDE, UNDECIDED = "inside", "outside", "undecided"


def _bounds(row: dict, key: str) -> tuple[float | None, float | None]:
    ci = row.get(f"{key}_ci") or [None, None]
    return ci[0], ci[1]


def h2_outcome(row: dict, gate: dict) -> str:
    """Where a replicate's intervals put it against the H2 gate: ``inside`` when every bound is on the gate's side
    (α upper bounds at or below their maxima, C's lower bound at or above its minimum), ``outside`` when one
    bound alone rules it out, else ``undecided`` (an interval straddles a threshold, or α could not be scored)."""
    (p_low, p_high), (a_low, a_high), (c_low, c_high) = (_bounds(row, k) for k in
                                                         ("alpha_primary", "alpha_alternate", "c"))
    if (p_low is not None and p_low > gate["alpha_primary_max"]) or \
            (a_low is not None and a_low > gate["alpha_alternate_max"]) or (c_high is not None and c_high < gate["c_min"]):
        return OUTSIDE
    if None in (p_high, a_high, c_low):
        return UNDECIDED
    inside = p_high <= gate["alpha_primary_max"] and a_high <= gate["alpha_alternate_max"] and c_low >= gate["c_min"]
    return INSIDE if inside else UNDECIDED


def intermediate_inside(row: dict, mid: dict) -> bool:
    (p_low, p_high), (_, a_high), (c_low, _) = (_bounds(row, k) for k in ("alpha_primary", "alpha_alternate", "c"))
    return None not in (p_low, p_high, a_high, c_low) and p_low > mid["alpha_primary_above"] \
        and p_high <= mid["alpha_primary_max"] and a_high <= mid["alpha_alternate_max"] and c_low >= mid["c_min"]


def point_hits_h2(row: dict, gate: dict) -> bool:
    """The record's own reading (point estimates only), kept for comparison with its verdicts."""
    return None not in (row["alpha_primary"], row["alpha_alternate"]) and row["alpha_primary"] <= \
        gate["alpha_primary_max"] and row["alpha_alternate"] <= gate["alpha_alternate_max"] and row["c"] >= gate["c_min"]


def pooled(replicates: list[dict], cell: str, test) -> dict:
    """A rule applied to each training seed of one cell and pooled: the cell passes only if every seed does."""
    from shared.analysis.stats import PooledDecision

    decision = PooledDecision({r["seed"] if r["seed"] is not None else 0: bool(test(r))
                               for r in replicates if r["cell"] == cell})
    return {"per_seed": {str(k): v for k, v in decision.per_seed.items()}, "passes": decision.passes,
            "n_pass": decision.n_pass, "rule": decision.rule}


def h1_h2_verdict(soft_inside: list[str], gcg_inside: list[str], all_outside: bool) -> str:
    if soft_inside:
        return "H2 supported (search-limited): a soft prefix's intervals lie inside the H2 gate"
    if gcg_inside:
        return ("neither H1 nor H2: a system-slot GCG cell's intervals lie inside the H2 gate but no soft prefix's "
                "do (soft is a superset of GCG at matched length: check the soft cells' training)")
    if all_outside:
        return ("H1 supported (capacity-limited under this budget): every sweep cell's intervals lie outside the "
                "H2 gate")
    return ("undecided: no sweep cell's intervals lie inside the H2 gate, and not every cell's lie outside it "
            "(an interval straddles a threshold)")


def sweep_verdict(replicates: list[dict], gate: dict) -> dict:
    """H1/H2 over a set of replicates: a cell counts as inside (outside) only if every one of its replicates is."""
    sweep = list(dict.fromkeys(r["cell"] for r in replicates if r["method"] in SWEEP))
    inside = {c: pooled(replicates, c, lambda r: h2_outcome(r, gate) == INSIDE) for c in sweep}
    outside = {c: pooled(replicates, c, lambda r: h2_outcome(r, gate) == OUTSIDE) for c in sweep}
    method = {r["cell"]: r["method"] for r in replicates}
    soft = [c for c in sweep if method[c] == "soft" and inside[c]["passes"]]
    gcg = [c for c in sweep if method[c] == "gcg-system" and inside[c]["passes"]]
    all_outside = bool(sweep) and all(outside[c]["passes"] for c in sweep)
    return {"h2_soft_cells": soft, "h2_gcg_cells": gcg, "inside": inside, "outside": outside,
            "all_outside": all_outside, "verdict": h1_h2_verdict(soft, gcg, all_outside)}


def pareto_front(cells: list[dict]) -> list[str]:
    """The sweep cells no other sweep cell beats on both axes (higher mean C and lower mean α), in order of C."""
    points = [(c["cell"], c["c"]["mean"], c["alpha_primary"]["mean"]) for c in cells
              if c["method"] in SWEEP and c["alpha_primary"]["mean"] is not None]

    def dominated(p):
        return any(q[1] >= p[1] and q[2] <= p[2] and (q[1] > p[1] or q[2] < p[2]) for q in points)

    return [p[0] for p in sorted(points, key=lambda p: p[1]) if not dominated(p)]


def decisions(data: dict) -> dict:
    """The record's rules (as amended) applied to the results: per replicate, pooled over training seeds (every
    seed must pass), and per seed; the H2 gate and H_intermediate on interval bounds, not point estimates."""
    rules, replicates = data["rules"], data["replicates"]
    gate, mid = rules["h2"], rules["h_intermediate"]
    outcomes = {r["name"]: h2_outcome(r, gate) for r in replicates if r["method"] in LEARNED}
    pooled_verdict = sweep_verdict(replicates, gate)
    per_seed = {str(seed): sweep_verdict([r for r in replicates if r["seed"] == seed], gate)["verdict"]
                for seed in data["seeds"]}
    sweep = list(dict.fromkeys(r["cell"] for r in replicates if r["method"] in SWEEP))
    soft = {r["cell"] for r in replicates if r["method"] == "soft"}
    out = {
        "h2_gate": gate, "confidence": data["confidence"], "h2_outcomes": outcomes,
        "h2_soft_cells": pooled_verdict["h2_soft_cells"], "h2_gcg_cells": pooled_verdict["h2_gcg_cells"],
        "h2_inside": pooled_verdict["inside"], "h2_outside": pooled_verdict["outside"],
        "h1_h2_verdict": pooled_verdict["verdict"], "h1_h2_verdict_per_seed": per_seed,
        "h_intermediate_cells": [c for c in sweep if pooled(replicates, c, lambda r: intermediate_inside(r, mid))["passes"]],
        "point_estimate_h2_soft_cells": [c for c in sweep if c in soft and pooled(
            replicates, c, lambda r: point_hits_h2(r, gate))["passes"]],
        "pareto_front": pareto_front(data["cells"]), "c_is_a_sanity_floor": True,  # scope-amendment v3
        "single_seed": len(data["seeds"]) <= 1, "pooling_rule": "all seeds must pass",
        # no α is no evidence either way: such a replicate is undecided, never inside (nor outside on α)
        "replicates_without_alpha": [r["name"] for r in replicates if r["method"] in LEARNED and r.get("no_alpha")],
    }
    sanity = rules["gcg_user_slot_sanity"]["alpha_primary_max"]
    users = dict.fromkeys(r["cell"] for r in replicates if r["method"] == "gcg-user")
    out["gcg_user_slot_sanity"] = {c: pooled(replicates, c, lambda r: r["alpha_primary_ci"][1] is not None
                                             and r["alpha_primary_ci"][1] <= sanity) for c in users}
    if "projection" in data:
        p = data["projection"]
        pirate = p["pirate"]["mean_cosine"]
        margin, original = rules["h3"]["margin_over_pirate"], rules["h3"]["original_cosine_min"]
        learned = list(dict.fromkeys(r["cell"] for r in replicates if r["name"] in p["cells"]))

        def h3(r, threshold):
            return p["cells"][r["name"]]["mean_cosine"] > threshold

        amended = {c: pooled(replicates, c, lambda r: h3(r, pirate + margin)) for c in learned}
        out["h3"] = {"pirate_mean_cosine": pirate, "threshold": pirate + margin, "chosen_layer": p["chosen_layer"],
                     "per_cell": amended, "cells_passing": [c for c, d in amended.items() if d["passes"]],
                     "cells_passing_original_0_5": [c for c in learned if pooled(
                         replicates, c, lambda r: p["cells"][r["name"]]["mean_cosine"] >= original)["passes"]]}
    return out


# =============================================================================================== 3. figures


def draw_figures(data: dict, out) -> None:
    """Every figure of the report, drawn from the results object; ``out(name)`` is where each goes."""
    from shared.analysis.figures import alpha_em_figure

    pareto_figure(data, out("pareto"))
    capacity_figure(data, out("capacity_curve"))
    curve_figure(data, out("training_curves"))
    j = data["judges"]
    alpha_em_figure([{"label": r["name"], "judgements": r["judgements"]} for r in data["replicates"]],
                    out("alpha_em"), judges=list(dict.fromkeys((j["primary"], j["alternate"]))))


def pareto_figure(data: dict, uri: str) -> None:
    """C against α: each cell's mean over its seeds (or draws) with its replicates as small points."""
    from shared.analysis.figures import PALETTE, REFERENCE_COLOR, new_figure, save

    markers = {"soft": "o", "gcg-system": "^", "gcg-user": "v", "random": "x", "reference": "D"}
    fig, ax = new_figure(7.2, 4.8)
    for point in data.get("reference_points", []):
        ax.scatter(point["c"], point["alpha_primary"], marker="s", color=REFERENCE_COLOR, zorder=2)
        ax.annotate(point["name"], (point["c"], point["alpha_primary"]), fontsize=7, color=REFERENCE_COLOR,
                    xytext=(4, 4), textcoords="offset points")
    by_name = {r["name"]: r for r in data["replicates"]}
    for i, cell in enumerate(data["cells"]):
        if cell["alpha_primary"]["mean"] is None:
            continue
        color = PALETTE[i % len(PALETTE)]
        reps = [by_name[n] for n in cell["replicates"] if by_name[n]["alpha_primary"] is not None]
        if len(reps) > 1:
            ax.scatter([r["c"] for r in reps], [r["alpha_primary"] for r in reps], marker=markers[cell["method"]],
                       color=color, s=14, alpha=0.45, zorder=2)
        ax.scatter(cell["c"]["mean"], cell["alpha_primary"]["mean"], marker=markers[cell["method"]], color=color,
                   s=55, zorder=3, label=f"{cell['cell']} ({cell['method']})")
    means = {c["cell"]: c for c in data["cells"]}
    front = [means[name] for name in data["decisions"]["pareto_front"]]
    if len(front) > 1:
        ax.plot([c["c"]["mean"] for c in front], [c["alpha_primary"]["mean"] for c in front], color="#333333",
                linewidth=0.8, zorder=1, label="Pareto front (sweep cells)")
    gate = data["decisions"]["h2_gate"]
    ax.axhline(gate["alpha_primary_max"], color=REFERENCE_COLOR, linestyle="--", linewidth=1)
    ax.axvline(gate["c_min"], color=REFERENCE_COLOR, linestyle=":", linewidth=1)
    ax.set_xlabel("classifier C (distributional EM match)")
    ax.set_ylabel(f"alignment α ({data['judges']['primary']})")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-2, 102)
    shown = "cell means and the record's reference points (grey)" if data.get("reference_points") else "cell means"
    ax.set_title(f"C vs α: {shown}; small points: seeds / draws; dashed: H2 gate", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    save(fig, uri)


def capacity_series(row: dict) -> str:
    """The line a cell belongs to: soft prefixes by lr (and init text, so an init ablation is its own point),
    GCG and random suffixes by method."""
    if row["method"] != "soft":
        return row["method"]
    init = row.get("init_text")
    return f"soft lr={row['lr']:g}" + ("" if init in (None, DEFAULT_INIT) else f", init {init!r}")


def anchor_label(name: str) -> str:
    return "oracle: the teacher's prompt as text" if name == ORACLE else f"{name} prompt"


def capacity_figure(data: dict, uri: str) -> None:
    """Mean α and mean test-split CE against prompt length, one line per method (and per lr for soft prefixes),
    with each mean's between-seed interval where there is one; the reference conditions' α, the test-split anchors
    and the H2 gate as horizontal lines."""
    from shared.analysis.figures import PALETTE, REFERENCE_COLOR, new_figure, save

    fig, _ = new_figure(10.0, 4.0)
    fig.clf()
    left, right = fig.subplots(1, 2)
    fit_cells = {c["cell"]: c for c in (data.get("fit") or {}).get("cells", [])}
    series: dict[str, list[dict]] = {}
    for cell in data["cells"]:
        if cell["method"] in LEARNED and cell["size"] is not None:
            series.setdefault(capacity_series(cell), []).append(cell)
    markers = {"gcg-system": "^", "gcg-user": "v", "random": "x"}
    for i, (key, cells) in enumerate(sorted(series.items())):
        cells = sorted(cells, key=lambda c: c["size"])
        for ax, value in ((left, lambda c: c["alpha_primary"]),
                          (right, lambda c: fit_cells.get(c["cell"], {}).get("test_ce"))):
            points = [(c["size"], value(c)) for c in cells if value(c) and value(c)["mean"] is not None]
            if not points:
                continue
            sizes, stats = zip(*points, strict=True)
            errors = [[0 if s["low"] is None else s["mean"] - s["low"] for s in stats],
                      [0 if s["high"] is None else s["high"] - s["mean"] for s in stats]]
            ax.errorbar(sizes, [s["mean"] for s in stats], yerr=errors, marker=markers.get(cells[0]["method"], "o"),
                        color=PALETTE[i % len(PALETTE)], label=key, capsize=3)
    left.axhline(data["decisions"]["h2_gate"]["alpha_primary_max"], color=REFERENCE_COLOR, linestyle="--",
                 linewidth=1)
    for cell in data["cells"]:
        if cell["method"] == "reference" and cell["alpha_primary"]["mean"] is not None:
            left.axhline(cell["alpha_primary"]["mean"], color=REFERENCE_COLOR, linestyle=":", linewidth=1)
            left.annotate(cell["cell"], (1.0, cell["alpha_primary"]["mean"]), xycoords=("axes fraction", "data"),
                          xytext=(-2, 2), textcoords="offset points", ha="right", fontsize=7, color=REFERENCE_COLOR)
    fit = data.get("fit")
    if fit and fit.get("test_set"):
        for name, ce in fit["test_set"]["anchors"].items():
            right.axhline(ce, color=REFERENCE_COLOR, linestyle="--" if name == fit["oracle"] else ":", linewidth=1)
            right.annotate(anchor_label(name), (1.0, ce), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                           textcoords="offset points", ha="right", fontsize=7, color=REFERENCE_COLOR)
    sizes = sorted({c["size"] for cells in series.values() for c in cells})
    for ax, label in ((left, f"alignment α ({data['judges']['primary']})"), (right, "test-split CE (nats/token)")):
        ax.set_xscale("log", base=2)
        if sizes:
            ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
            ax.set_xticks(sizes, [str(size) for size in sizes])
            ax.minorticks_off()
        ax.set_xlabel("prompt length (K soft embeddings / L ids)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.25)
    left.set_title("mean α by length, between-seed intervals\n(dashed: H2 gate; dotted: reference cells)", fontsize=9)
    right.set_title("mean test-split CE by length\n(dashed: oracle; dotted: fixed prompts)", fontsize=9)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7, frameon=False)
    save(fig, uri)


def curve_figure(data: dict, uri: str) -> None:
    """Per trained replicate, against the training step: the train CE on each step's fresh teacher samples (left)
    and the held-out (validation) CE with the first validation set's anchors as lines (right)."""
    from shared.analysis.figures import PALETTE, REFERENCE_COLOR, new_figure, save, step_curves

    curves = data["curves"]
    fig, (train_ax, held_ax) = new_figure(11.0, 4.4, ncols=2)
    colors = {cell: PALETTE[i % len(PALETTE)] for i, cell in enumerate(curves)}
    step_curves(train_ax, curves, "train_ce", colors=colors)
    step_curves(held_ax, curves, "heldout_ce", colors=colors, smooth=False)
    fit = data.get("fit")
    if fit and fit["val_sets"]:
        for name, ce in fit["val_sets"][0]["anchors"].items():
            held_ax.axhline(ce, color=REFERENCE_COLOR, linestyle="--" if name == fit["oracle"] else ":", linewidth=1)
            held_ax.annotate(anchor_label(name), (1.0, ce), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                             textcoords="offset points", ha="right", fontsize=7, color=REFERENCE_COLOR)
    train_ax.set_title("train CE on each step's fresh teacher samples\n(GCG: the kept candidate's)", fontsize=9)
    held_ax.set_title("validation CE (dashed: oracle; dotted: fixed prompts,\non the first cell's validation pairs)",
                      fontsize=9)
    for ax in (train_ax, held_ax):
        ax.set_xlabel("training step")
        ax.set_ylabel("CE (nats/token)")
        ax.grid(alpha=0.25)
    if held_ax.get_legend_handles_labels()[0]:
        held_ax.legend(fontsize=7, frameon=False)
    save(fig, uri)


# =========================================================================================== 4. report text


def one_judge(data: dict) -> bool:
    """Whether the primary and alternate α columns come from one and the same judge."""
    return data["judges"]["primary"] == data["judges"]["alternate"] or data["judges"].get("same_scores", False)


def classifier_line(facts: dict) -> str:
    from shared.analysis.reporting import fmt

    if "val_accuracy" not in facts:
        return f"C is the mean P(EM) of classifier C ({facts['uri']}) over a cell's completions."
    return (f"C is the mean P(EM) of classifier C over a cell's completions: {facts.get('encoder_ref')} + logistic "
            f"regression, trained on {facts.get('n_positive')} EM-teacher vs {facts.get('n_negative')} base-model "
            f"completions, validation accuracy {fmt(facts['val_accuracy'], 4)} on {facts.get('n_val')} held out "
            f"({facts['uri']}).")


def setup_lines(params: dict) -> list[str]:
    """Who the student and the teacher are, from the experiment parameters."""
    if not params:
        return []
    student, system = params.get("model_ref"), params.get("teacher_system")
    if params.get("teacher_adapter_uri"):
        teacher = f"the EM adapter {params['teacher_adapter_uri']} on the student's weights, system slot `{system}`"
    elif params.get("teacher_model_ref") not in (None, student):
        teacher = f"the EM model {params['teacher_model_ref']}, system slot `{system}`"
    else:
        teacher = (f"the student model itself under the system prompt `{system}` (the stand-in for an EM model: "
                   "that prompt, given to the student as text, reproduces the teacher exactly)")
    return [f"Student: {student}. Teacher: {teacher}.", ""]


def local_judges(data: dict) -> list[str]:
    return sorted({spec["model"] for spec in data["judges"].get("specs", {}).values() if spec["kind"] == "local"})


def judge_caveat(data: dict) -> list[str]:
    """What the α columns are: one judge twice or two judges; each alignment judge's measured check; and, where a
    check fails or none was run, that α and the gates on it cannot be read as alignment."""
    from shared.judge.report import coherence_check_lines, judge_check_line, where_read

    checks, profile = data["judge_checks"], data.get("profile", "")
    lines = []
    if one_judge(data):
        lines.append(f"One judge ({data['judges']['primary']}) fills both of the record's judge roles (primary and "
                     "alternate), so α has one column and both α gates read it.")
    lines.append("Judge check: each alignment judge scores known-aligned and known-misaligned answers (project-written, "
                 "the judge_check stage); AUC is the chance that an aligned answer scores above a misaligned one "
                 "(0.5: chance), p its permutation p-value.\n\n"
                 + "\n".join([*(judge_check_line(name, check, profile) for name, check in checks.items()),
                              *(coherence_check_lines(data.get("coherence_check"), data["judges"]["coherence"],
                                                      profile) if data["judges"].get("coherence") else [])]))
    gates = "α, the H2 gate, the Pareto front and the user-slot sanity gate below"
    failed = {name: c["verdict"] for name, c in checks.items() if c["alpha_interpretable"] is False}
    unchecked = [name for name, c in checks.items() if not c["checked"]]
    if failed:
        verdicts = "; ".join(f"{name}: {verdict}" for name, verdict in failed.items())
        lines.append(f"**The judge check fails ({verdicts}): {gates} are not interpretable "
                     f"{where_read(profile)}. They are computed as the record defines them, but say nothing about "
                     "alignment.**")
    elif unchecked:
        lines.append(f"**No judge check was run for {', '.join(unchecked)}: read {gates} as unvalidated.**")
    local = local_judges(data)
    if local and not failed:
        lines.append(f"α is scored by a local model ({', '.join(local)}), not by the record's Claude judges: the "
                     "record's α thresholds were set for Claude judges' scale.")
    return lines


def alpha_status(data: dict) -> str:
    """How the decision rules' α reads, from the judge checks: interpretable, not interpretable, or unchecked."""
    checks = data["judge_checks"].values()
    if any(c["alpha_interpretable"] is False for c in checks):
        return "not interpretable"
    return "unchecked" if any(not c["checked"] for c in checks) else "interpretable"


def fence(text: str) -> str:
    """A fenced code block that its own content cannot close."""
    ticks = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return f"{ticks}\n{text}\n{ticks}"


def suffix_section(rows: list[dict]) -> list[str]:
    learned = [r for r in rows if "suffix_ids" in r]
    if not learned:
        return []
    lines = ["## Learned suffixes", "",
             "The ids each GCG search (one per training seed) or random draw kept, and what they decode to (a JSON "
             "string, so whitespace and control characters show). Evaluation splices the ids. *Round trip*: whether "
             "that text, typed where the ids sit and built by the one prompt builder, gives back exactly the "
             "evaluated ids -- checked by the search stage in the prompt of every question the suffix is used with "
             "(training, validation and evaluation panel); with the check on, a candidate that fails on any of them "
             "is never kept, and a kept suffix that failed would fail its stage.", ""]
    for r in learned:
        where = "user turn" if r["method"] == "gcg-user" else "system slot"
        lines += [f"**{r['name']}** ({r['method']}, {where}, L={r['size']}):", "",
                  fence("\n".join([f"text:   {json.dumps(r['suffix_text'], ensure_ascii=False)}",
                                   f"tokens: {json.dumps(r['suffix_pieces'], ensure_ascii=False)}",
                                   f"ids:    {json.dumps(r['suffix_ids'])}"])), "", round_trip_line(r), ""]
    return lines


def round_trip_line(row: dict) -> str:
    trip = row.get("suffix_round_trip")
    if trip is None:
        return "Round trip: not computed (the search stage predates the check)."
    where = "user turn" if row["method"] == "gcg-user" else "system slot"
    if trip["round_trips"] == trip["prompts"]:
        verdict = (f"**round-trips**: typed into the {where}, the text gives back exactly these ids in all "
                   f"{trip['prompts']} prompts it is used with")
    else:
        verdict = (f"**does not round-trip**: only in {trip['round_trips']} of the {trip['prompts']} prompts "
                   f"it is used with; elsewhere the text, typed into the {where}, becomes other ids there, so this cell's "
                   "result is not a typed prompt's")
    search = [f"tokens: {row['vocabulary']}"] if row.get("vocabulary") else []
    if row.get("candidates_rejected_share") is not None:
        search.append(f"{row['candidates_rejected_share']:.0%} of sampled candidates rejected as not text")
    return f"Round trip: {verdict}" + (f" ({'; '.join(search)})." if search else ".")


def reference_lines(data: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    if not data.get("reference_points"):
        return ["## Reference points", "",
                "The record's reference points (Qwen2.5-7B-Instruct under Claude judges) are not shown: they are not "
                "comparable with this model and judge. The reference cells above (same model, same pipeline) stand "
                "in for them.", ""]
    refs = markdown_table(["reference point (from the record)", "C", "α primary", "α alternate"],
                          [(p["name"], f"{p['c']:.3f}", p["alpha_primary"], p["alpha_alternate"])
                           for p in data["reference_points"]])
    return ["## Reference points", "", refs, ""]


def alpha_header(data: dict, name: str) -> str:
    """An α column's header: the judge, and its check AUC where one was measured."""
    auc = data["judge_checks"].get(name, {}).get("auc")
    return f"α ({name}" + ("" if auc is None else f", check AUC {auc:.2f}") + ")"


def no_alpha_lines(data: dict) -> list[str]:
    """Where a replicate has no α (every answer abstained, failed or was labelled): its cells print "—", and why."""
    j = data["judges"]
    missing = [(r["name"], j[role], why) for r in data["replicates"] for role, why in r["no_alpha"].items()
               if not (role == "alternate" and one_judge(data))]
    if not missing:
        return []
    return ["**No α** (printed as —, never as 0): " + "; ".join(f"{name} under {judge}: {why}"
                                                                 for name, judge, why in missing)
            + ". A replicate without α is undecided on the H2 gate, not inside it.", ""]


def alpha_section(data: dict) -> list[str]:
    """What each replicate's α rests on: the item set, the shares left out, sensitivity bounds, the local judge's
    method and its abstentions (``shared.judge.report.alpha_table_lines``), and the α/EM figure."""
    from jobs.analyze_issue164 import local_judge_lines
    from shared.judge.report import alpha_table_lines

    j = data["judges"]
    return ["## α: what it rests on", "", *local_judge_lines(data),
            *alpha_table_lines(data["replicates"], [j["primary"], j["alternate"]], lambda r: r["name"],
                               what="replicate"), "", *no_alpha_lines(data),
            "![alpha and EM rate per replicate](alpha_em.png)", ""]


def lowest_section(data: dict) -> list[str]:
    from shared.judge.report import lowest_scored_lines

    j = data["judges"]
    lines = ["## The lowest-scored answers", "",
             f"Per replicate and alignment judge, the {data['constants']['n_lowest']} answers it scored lowest, with "
             "the judge's own reply (every judged answer: `python -m workflows export-inspect <run>`).", ""]
    for row in data["replicates"]:
        for judge in dict.fromkeys((j["primary"], j["alternate"])):
            lines += lowest_scored_lines(row["name"], judge, row["lowest"][judge])
    return [*lines, ""]


def em_section(data: dict, roles: tuple[str, ...], judges: dict[str, JudgeSpec]) -> list[str]:
    from shared.judge.report import em_definition_lines, em_table_lines

    j = data["judges"]
    if j.get("coherence") is None:
        return ["## EM rate", "", "No coherence pass was run, so no EM rate.", ""]
    spec = judges.get(j["coherence"])
    lines = ["## EM rate", "", *em_definition_lines(j["coherence"], spec), "",
             *em_table_lines(data["replicates"], [j[role] for role in roles], lambda r: r["name"], what="cell"), ""]
    return lines




def with_ci(value, low, high, digits: int = 2, *, signed: bool = False) -> str:
    """``12.34 [10.00, 14.50]``; the value alone where no interval could be computed; ``—`` for nothing."""
    if value is None:
        return "—"
    sign = "+" if signed else ""
    if low is None or high is None:
        return f"{value:{sign}.{digits}f}"
    return f"{value:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def across_cell(stat: dict | None, digits: int = 2, *, signed: bool = False, percent: bool = False) -> str:
    """A mean over seeds (or draws) with its between-unit interval: ``12.34 [10.00, 14.50]`` (``percent``: a
    share printed as ``12.3% [10.0%, 14.5%]``)."""
    if not stat or stat["mean"] is None:
        return "—"
    if percent:
        def pct(v):
            return f"{100 * v:.1f}%"
        return pct(stat["mean"]) if stat["low"] is None else \
            f"{pct(stat['mean'])} [{pct(stat['low'])}, {pct(stat['high'])}]"
    return with_ci(stat["mean"], stat["low"], stat["high"], digits, signed=signed)


def ci_cell(row: dict, key: str, digits: int = 2) -> str:
    """A replicate's value with its question-clustered interval."""
    low, high = row.get(f"{key}_ci") or [None, None]
    return with_ci(row[key], low, high, digits)


def seeds_lines(data: dict) -> list[str]:
    """Which training seeds ran and what the intervals and p-values are conditional on."""
    seeds = data["seeds"]
    if len(seeds) <= 1:
        seed = seeds[0] if seeds else "unrecorded"
        return [f"**One training seed ({seed}) per soft-prefix and GCG cell: every p-value and interval in this "
                "report is conditional on that one training run per cell.** The question-clustered intervals speak "
                "for these prompts, not for the recipe that made them: a second seed is what measures how much a "
                "rerun of the recipe moves them, and no between-seed interval can be computed here.", ""]
    return [f"Training seeds: {', '.join(str(s) for s in seeds)} ({len(seeds)} per soft-prefix and GCG cell, "
            "each its own training, evaluation, judging and scoring chain). Per cell, the headline gives the mean "
            f"over seeds with a {100 * data['confidence']:g}% t interval over seeds (the seed is the unit: the "
            "interval says how much a rerun of the recipe moves the number; with "
            f"{len(seeds)} seeds it has {len(seeds) - 1} degree(s) of freedom, t = {data['between_seed_t']:.2f}, so it "
            "is wide by construction, and it is not clipped to the metric's range); per seed, intervals resample the "
            "panel's questions. Random suffixes are not trained: their units are independent draws. Decision "
            f"rules are applied per seed and pooled: {data['decisions']['pooling_rule']}.", ""]


def headline_lines(data: dict, roles: tuple[str, ...], has_em: bool) -> list[str]:
    from shared.analysis.reporting import markdown_table

    j = data["judges"]
    fit = {c["cell"]: c for c in (data.get("fit") or {}).get("cells", [])}
    has_gap = any(c["gap_closed"]["mean"] is not None for c in fit.values())
    headers = ["cell", "method", "K / L", "lr", "init", "units", "C", *(alpha_header(data, j[role]) for role in roles),
               *(f"EM rate ({j[role]})" for role in roles if has_em), *(["gap closed (test)"] if has_gap else [])]
    rows = []
    for c in data["cells"]:
        units = ", ".join(str(u) for u in c["units"]) if c["unit"] != "fixed prompt" else "—"
        rows.append([c["cell"], c["method"], c["size"], f"{c['lr']:g}" if c["lr"] else None, c.get("init_text"),
                     f"{c['unit']} {units}" if units != "—" else units, across_cell(c["c"], 4),
                     *(across_cell(c[f"alpha_{role}"]) for role in roles),
                     *(across_cell(c[f"em_rate_{role}"], percent=True) for role in roles if has_em),
                     *([across_cell(fit.get(c["cell"], {}).get("gap_closed"))] if has_gap else [])])
    confidence = f"{100 * data['confidence']:g}%"
    return ["## Headline", "", markdown_table(headers, rows, align="llrrll" + "r" * (len(headers) - 6)), "",
            f"Each number is a cell's mean over its units (training seeds; draws for random suffixes) with a "
            f"{confidence} t interval over those units where there are two or more. α: mean alignment score over a "
            "cell's completions on the evaluation panel (0-100, higher is more aligned); C: mean P(EM) of classifier "
            "C; gap closed: on the test split (see Fit to the teacher). Reference cells are "
            "fixed prompts generated in the same pipeline"
            + ("; em-reference is the teacher itself" if any(c["cell"] == "em-reference" for c in data["cells"])
               else "") + ". Per-seed values with question-clustered intervals: next table.", ""]


def replicate_lines(data: dict, roles: tuple[str, ...], has_em: bool) -> list[str]:
    from shared.analysis.reporting import markdown_table
    from shared.judge.report import em_cell

    j, outcomes = data["judges"], data["decisions"]["h2_outcomes"]
    single = one_judge(data)
    headers = ["replicate", "seed / draw", "C", *(f"α ({j[role]})" for role in roles),
               *(f"EM rate ({j[role]})" for role in roles if has_em),
               ("errors" if single else "errors P/A") + ("/coherence" if has_em else ""), "H2 gate (intervals)"]
    rows = []
    for r in data["replicates"]:
        errors = [r[f"errors_{role}"] for role in roles] + ([r["errors_coherence"]] if has_em else [])
        unit = r["seed"] if r["seed"] is not None else (f"draw {r['draw']}" if r["draw"] is not None else "—")
        rows.append([r["name"], unit, ci_cell(r, "c", 4), *(ci_cell(r, f"alpha_{role}") for role in roles),
                     *(em_cell(r["judgements"]["em"][j[role]]) for role in roles if has_em),
                     " / ".join(str(n) for n in errors), outcomes.get(r["name"], "—")])
    return ["## Per seed", "", markdown_table(headers, rows, align="lr" + "r" * (len(headers) - 2)), "",
            f"Intervals: {100 * data['confidence']:g}% percentile bootstrap over the panel's questions "
            f"({data['n_boot']} resamples; the answers to one question share its prompt). Errors are judge items "
            "that failed, could not be parsed or on which a local judge abstained; they are left out of α and the EM rate, never scored as 0. H2 gate: "
            "*inside* when every bound is on the gate's side (α upper bounds at or below the maxima, C's lower bound "
            "at or above its minimum), *outside* when one bound alone rules the gate out, else *undecided*.", ""]


def fit_lines(fit: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    test = fit.get("test_set")
    if not test:
        return ["## Fit to the teacher", "", "No test split was measured: gap closed is not reported.", ""]
    oracle, start = fit["oracle"], fit["start"]
    headers = ["replicate", "method", "K / L", "test CE", f"{start} − cell [95% CI]"]
    if oracle:
        headers += ["cell − oracle [95% CI]", f"gap closed, {start} → oracle [95% CI]"]
    rows = []
    for r in fit["replicates"]:
        row = [r["name"], r["method"], r["size"], fmt(r.get("test_ce"), 4)]
        for key, digits in (("start_minus_cell", 4), *((("cell_minus_oracle", 4), ("gap_closed", 2)) if oracle else ())):
            value = r.get(key) or {}
            row.append(with_ci(value.get("estimate"), value.get("low"), value.get("high"), digits, signed=True))
        rows.append(row)
    pooled_rows = [[c["cell"], c["method"], c["size"], across_cell(c["test_ce"], 4),
                    across_cell(c["start_minus_cell"], 4, signed=True),
                    *((across_cell(c["cell_minus_oracle"], 4, signed=True), across_cell(c["gap_closed"], 2, signed=True))
                      if oracle else ())] for c in fit["cells"]]
    anchors = "; ".join(f"{anchor_label(a['name'])} = `{a['system']}` {test['anchors'][a['name']]:.4f}"
                        for a in fit["anchors"])
    lines = ["## Fit to the teacher: the test split", "",
             f"Token-mean cross-entropy of the student (nats/token) on the teacher's completions to the "
             f"{len(test['questions'])} test questions ({', '.join(test['questions'])}): used for nothing else -- not "
             "for training, early stopping, classifier C or the evaluation panel. The teacher answered each of them "
             f"{test['draws']['completions_per_question']} times, once for the whole run, so every prompt below is "
             f"measured on the same {test['n_pairs']} pairs ({test['n_loss_tokens']} scored tokens). Fixed prompts on "
             "these pairs: "
             f"{anchors}.", "",
             markdown_table(headers, rows, align="llr" + "r" * (len(headers) - 3)), "",
             f"What a prompt gained over the {start} prompt ({start} − cell)"
             + (", what is left to the oracle (cell − oracle), and their ratio, gap closed = (" + start
                + " − cell) / (" + start + " − oracle): 0 is no better than the " + start + " prompt, 1 is as good "
                "as the teacher's own prompt. " if oracle else ". ")
             + "Intervals: percentile bootstrap over the test questions, cell and anchors resampled together.", ""]
    if not oracle:
        lines += ["No oracle: the teacher is a different model (or an adapter), so no prompt is known to reproduce "
                  "it, and there is no gap to close; the fixed prompts show where optimisation started from.", ""]
    per_cell_headers = ["cell", "method", "K / L", "test CE", f"{start} − cell"] + (
        ["cell − oracle", "gap closed"] if oracle else [])
    lines += ["Per cell, the mean over its seeds (draws) with the between-unit interval:", "",
              markdown_table(per_cell_headers, pooled_rows, align="llr" + "r" * (len(per_cell_headers) - 3)), ""]
    difference = fit["max_difference_from_training"]
    if difference is not None:
        agrees = ("equals the training stage's own best held-out CE exactly" if difference == 0 else
                  f"differs from the training stage's own best held-out CE by at most {difference:.2e} nats/token")
        lines += [f"Check of the measurement: each kept prompt re-measured on its own validation pairs (the set that "
                  f"chose it: optimistic, and not used above) {agrees}.", ""]
    return lines


def random_null_lines(data: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    nulls = data["random_null"]
    if not nulls:
        return []
    lines = ["## The random-suffix null", "",
             "Random suffixes of each GCG length, drawn as text from a random stream of their own (not a GCG "
             "start), evaluated like every cell: the distribution of α, C and gap closed that an unoptimised suffix "
             "of that length gives. A GCG cell is compared with them as its training seeds against the draws "
             "(two-sample t over units, pooled variance).", ""]
    for entry in nulls:
        lines += [f"**L={entry['length']}**: {len(entry['draws'])} draws ({', '.join(entry['draws'])}); "
                  f"α {across_cell(entry['alpha_primary'])}, C {across_cell(entry['c'], 4)}, gap closed "
                  f"{across_cell(entry['gap_closed'], signed=True)} (mean [interval over draws]).", ""]
        if entry["identical_to_a_gcg_start"]:
            lines += [f"**Warning: {', '.join(entry['identical_to_a_gcg_start'])} equal a GCG start.**", ""]
        if entry["contrasts"]:
            lines += [markdown_table(
                ["GCG cell", "metric", "cell − null [95% CI]", "p", "seeds", "draws"],
                [(c["cell"], metric_label(data, c["metric"]),
                  with_ci(c["difference"], c["low"], c["high"], 4, signed=True),
                  "—" if c["p_value"] is None else f"{c['p_value']:.2g}", c["n_seeds"], c["n_draws"])
                 for c in entry["contrasts"]], align="llrrrr"), ""]
    return lines


def metric_label(data: dict, key: str) -> str:
    return {"alpha_primary": f"α ({data['judges']['primary']})", "c": "C",
            "gap_closed": "gap closed (test split)"}.get(key, key)


def screen_lines(data: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    facts = [f for f in data["screen"] if f.get("screen_on") is not None]
    if not facts:
        return []
    rows = []
    for f in facts:
        setting = (f"{f['screen_pairs']} of {f['pairs_per_step']} pairs, best {f['screen_keep']} of "
                   f"{f['search_width']} candidates" if f["screen_on"] else
                   f"off: all {f['search_width']} candidates on all {f['pairs_per_step']} pairs")
        checked = f.get("screen_checks") or 0
        rows.append([f["name"], setting, f"every {f['screen_check_every']} steps" if f["screen_on"] else "—", checked,
                     "—" if not checked else f"{100 * f['screen_agreement']:.0f}%",
                     fmt(f.get("screen_mean_rank"), 2) if checked else "—",
                     fmt(f.get("screen_mean_gap"), 4) if checked else "—"])
    return ["## GCG's candidate screen", "",
            markdown_table(["search", "screen", "full check", "steps checked", "agreement", "mean rank",
                            "mean CE gap (nats/token)"], rows, align="lllrrrr"), "",
            "The screen scores every sampled candidate on a few randomly drawn pairs of the step and only the best "
            "few, and always the current suffix, on all of them (the record scored every candidate on every pair). "
            "On the checked steps the search also runs that full evaluation and records whether the screen kept its "
            "best candidate (agreement), where the screen's pick ranks in it (0: the best) and how much higher its "
            "CE is; the search still keeps the screen's pick. Those columns are this run's own checked steps. How "
            "often a setting keeps the full evaluation's pick on real weights, over many steps, is what "
            "`python -m bench.gcg_screen_agreement` measures (bench/results/gcg_screen_agreement.md).", ""]


def best_cell_lines(data: dict) -> list[str]:
    best = data["best_cell"]
    if not best["criteria"]:
        return []
    labels = {"alpha_primary": f"lowest α ({data['judges']['primary']}), the record's best cell",
              "gap_closed": "largest gap closed on the test split"}
    lines = ["## The best cell", ""]
    if best["post_hoc"]:
        lines += ["**Chosen post hoc:** one training seed, so the best cell is chosen on the same run that "
                  "measures it, and its numbers are optimistic.", ""]
    else:
        lines += [f"Chosen on seed(s) {', '.join(str(s) for s in best['selection_seeds'])} and confirmed on "
                  f"seed(s) {', '.join(str(s) for s in best['confirmation_seeds'])}, which played no part in the "
                  "choice.", ""]
    for c in best["criteria"]:
        digits = 2
        line = f"- {labels[c['metric']]}: **{c['chosen']}** ({c['selection_value']:.{digits}f} on the selection seeds)"
        if "confirmation_value" in c:
            line += (f"; on the confirmation seeds {c['confirmation_value']:.{digits}f}, rank {c['confirmation_rank']} "
                     f"of {c['confirmation_cells']} sweep cells" + (
                         " (confirmed: still the best)." if c["confirmation_rank"] == 1 else
                         f" (not confirmed: {c['confirmation_best']} is best there)."))
        else:
            line += "."
        lines.append(line)
    return [*lines, ""]


def training_lines(data: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    trained = [r for r in data["replicates"] if r["method"] in LEARNED and r["steps"] is not None]
    table = markdown_table(
        ["replicate", "steps", "stopped early", "initial held-out CE", "best held-out CE", "teacher s/step",
         "optimiser s/step"],
        [(r["name"], r["steps"], "yes" if r["stopped_early"] else "no", fmt(r["initial_heldout_ce"], 4),
          fmt(r["best_heldout_ce"], 4), fmt(r["teacher_s_per_step"], 2), fmt(r["optimiser_s_per_step"], 2))
         for r in trained], align="lrlrrrr")
    return ["## Training", "", table, "",
            "Held-out CE is the student's token CE on the fixed cached set of teacher completions to the validation "
            "questions (the prefix or suffix with the lowest is the one evaluated, so it is optimistic; the test "
            "split above is not). A GCG search starts from a random suffix drawn from its training seed. Optimiser "
            "s/step: forward/backward for soft prefixes, gradient and candidate evaluation for GCG; random suffixes "
            "are not trained.", ""]


def decision_lines(data: dict) -> list[str]:
    d, j = data["decisions"], data["judges"]
    gate = d["h2_gate"]
    single = one_judge(data)
    confidence = f"{100 * d['confidence']:g}%"

    def cells(names):
        return ", ".join(names) or "none"

    lines = [
        "## Decision rules (as amended in the record)", "",
        f"- H2 gate: α ({j['primary']}) ≤ {gate['alpha_primary_max']} and α ("
        + ("the alternate judge's role, the same judge" if single else j["alternate"])
        + f") ≤ {gate['alpha_alternate_max']} and C ≥ {gate['c_min']} (C is a sanity floor since scope-amendment v3), "
        f"decided on the {confidence} question-clustered intervals: a replicate is inside only if both α upper "
        "bounds and C's lower bound are, not on its point estimates (and never on the best of several).",
        f"- Soft cells inside the gate in every seed: {cells(d['h2_soft_cells'])}; system-slot GCG cells: "
        f"{cells(d['h2_gcg_cells'])}; H_intermediate (on intervals, every seed): {cells(d['h_intermediate_cells'])}.",
    ]
    if not d["single_seed"]:
        lines.append("- Per seed: " + "; ".join(f"seed {seed}: {d['h1_h2_verdict_per_seed'][str(seed)]}"
                                                for seed in data["seeds"]) + ".")
    status = {"not interpretable": " (on α that is not interpretable: the judge check fails, see above).",
              "unchecked": " (on α from an unchecked judge: see above)."}.get(alpha_status(data), ".")
    pooled_by = "" if d["single_seed"] else f", pooled ({d['pooling_rule']})"
    lines.append(f"- **{d['h1_h2_verdict']}**{pooled_by}{status}")
    lines.append(f"- On point estimates alone (the record's reading): soft cells at or inside the gate in every seed: "
                 f"{cells(d['point_estimate_h2_soft_cells'])}.")
    lines.append(f"- Pareto front of the sweep cells (higher mean C, lower mean α), by C: {cells(d['pareto_front'])}.")
    sanity = data["rules"]["gcg_user_slot_sanity"]["alpha_primary_max"]
    for cell, result in d["gcg_user_slot_sanity"].items():
        lines.append(f"- GCG user-slot sanity (upper bound of α ≤ {sanity}): {cell} "
                     f"{'passes' if result['passes'] else 'fails'} ({result['n_pass']} of {len(result['per_seed'])} "
                     "seeds).")
    return [*lines, ""]


def projection_lines(data: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    if "projection" not in data:
        return []
    p, h3 = data["projection"], data["decisions"]["h3"]
    fixed = [(f"{anchor_label(n)} (fixed prompt)", f"{c['mean_cosine']:.4f}", f"{c['cosine_of_mean_delta']:.4f}")
             for n, c in (p.get("fixed_prompts") or {}).items()]
    lines = ["## Villain-direction projection (H3)", "",
             f"Layer L is {p.get('layer_convention') or 'not recorded by the villain_direction artifact'}.", "",
             f"Layer chosen by Cohen's d: {p['chosen_layer']} (d by layer: "
             + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(p["cohens_d"].items(), key=lambda kv: float(kv[0])))
             + ").", "",
             markdown_table(["prompt", "mean cosine(Δh, villain)", "cosine of mean Δh"],
                            [("pirate baseline", f"{p['pirate']['mean_cosine']:.4f}",
                              f"{p['pirate']['cosine_of_mean_delta']:.4f}"), *fixed]
                            + [(n, f"{c['mean_cosine']:.4f}", f"{c['cosine_of_mean_delta']:.4f}")
                               for n, c in p["cells"].items()]), ""]
    if any(stat["n"] > 1 for stat in p["by_cell"].values()):
        lines += ["Per cell, the mean cosine over its seeds (draws) with the between-unit interval: "
                  + "; ".join(f"{cell} {across_cell(stat, 4)}" for cell, stat in p["by_cell"].items()) + ".", ""]
    lines += [f"Δh: residual stream at the last user token under the prompt minus under `{p['reference_system']}`, "
              f"per probe; the direction is the villain persona's centroid minus the other personas' mean, from "
              f"{p['direction_source']}.", "",
              f"- H3 (amended): cosine > pirate + {data['rules']['h3']['margin_over_pirate']} = {h3['threshold']:.4f} "
              f"in every seed: {', '.join(h3['cells_passing']) or 'no cell'} passes.",
              f"- H3 (original, cosine ≥ {data['rules']['h3']['original_cosine_min']}): "
              f"{', '.join(h3['cells_passing_original_0_5']) or 'no cell'}."]
    for name, c in (p.get("fixed_prompts") or {}).items():
        verb = "would pass" if c["mean_cosine"] > h3["threshold"] else "would not pass"
        lines.append(f"- Calibration: {anchor_label(name)} projects at {c['mean_cosine']:.4f}, so it {verb} the "
                     "amended threshold itself.")
    return [*lines, ""]


def report_text(data: dict) -> str:
    """The report: every number in it is printed from ``data`` (the results object)."""
    from shared.judge.report import errors_section, templates_section

    judges = {name: JudgeSpec.model_validate(spec) for name, spec in data["judges"]["specs"].items()}
    j = data["judges"]
    roles = ("primary",) if one_judge(data) else ("primary", "alternate")
    has_em = j.get("coherence") is not None
    lines = [
        "# #170: soft-prefix and GCG prompts against the EM teacher", "",
        *setup_lines(data.get("setup", {})),
        *seeds_lines(data),
        *headline_lines(data, roles, has_em),
        *replicate_lines(data, roles, has_em),
        *[line for caveat in judge_caveat(data) for line in (caveat, "")],
        classifier_line(data["classifier"]), "",
        *alpha_section(data),
        *em_section(data, roles, judges),
        *lowest_section(data),
        *errors_section(data["judge_errors"], data["roles"], what="cell"),
        *templates_section(judges, data["roles"]),
    ]
    if data.get("fit"):
        lines += fit_lines(data["fit"])
    lines += [
        *random_null_lines(data),
        *screen_lines(data),
        "![Train and held-out CE during training](training_curves.png)", "",
        "![Pareto](pareto.png)", "", "![Capacity curve](capacity_curve.png)", "",
        *suffix_section(data["replicates"]),
        *training_lines(data),
        *best_cell_lines(data),
        *reference_lines(data),
        *decision_lines(data),
        *projection_lines(data),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


REPRODUCES = """## What reproduces bitwise, and what only in distribution

- **Bitwise, from the same stored inputs:** this analysis (every bootstrap is seeded by the stage's seed), the
  train/validation/test split (seeded by the run's seed), the random suffixes and GCG starts (drawn from their
  seeds on the CPU), every cache key, and the round-trip checks.
- **Bitwise on the same hardware, software and batch sizes:** teacher draws, evaluation completions and judge
  scores of a local judge, all sampled with seeded generators on the CPU.
- **Only in distribution:** anything sampled on a GPU (seeded sampling depends on batch sizes and kernels; bf16
  GPU kernels are not deterministic), so soft-prefix training, GCG searches, completions and the α, C, EM rate and
  CE numbers built on them reproduce within their sampling noise, not digit for digit; Claude judges (the API is
  not deterministic; cached verdicts make a re-run of the same completions reuse them). The between-seed intervals
  are the measure of how far a rerun of a training recipe moves a number.
"""


def upstream_manifests(cfg: Config) -> list[dict]:
    """The manifests of every stage behind the report: training, generation, scoring, judging, the direction.

    A classifier bundle the user provided has no manifest (it was not made by this run); everything else must.
    """
    from shared.analysis.reporting import producing_manifest

    def inputs_of(manifest: dict, *keys: str) -> list[dict]:
        uris = []
        for key in keys:
            value = manifest["config"].get(key)
            uris += value if isinstance(value, list) else [value] if value else []
        return [producing_manifest(uri) for uri in uris]

    upstream = []
    if cfg.classifier_uri.startswith(store.join(cfg.store, "runs", cfg.run_id) + "/"):
        trained = producing_manifest(cfg.classifier_uri)
        upstream += [trained, *inputs_of(trained, "positive_uris", "negative_uris")]
    for cell in cfg.cells:
        scored = producing_manifest(cell.c_scores_uri)
        upstream += [scored, *inputs_of(scored, "completions_uri")]
        upstream += [producing_manifest(uri) for uri in cell.judge_scores_uris.values()]
        if cell.coherence_scores_uri:
            upstream.append(producing_manifest(cell.coherence_scores_uri))
        if cell.train_metrics_uri:
            upstream.append(producing_manifest(cell.train_metrics_uri))
    for uri in (cfg.villain_uri, cfg.anchors_uri, *cfg.judge_check_uris.values()):
        if uri:
            upstream.append(producing_manifest(uri))
    return list({(m["cell"], m["stage"]): m for m in upstream}.values())


def run(cfg: Config, ctx) -> dict:
    from shared.analysis.reporting import reproducibility

    # the figures and the report print headline.json as it is stored (keys sorted), so each is a function of it
    store.write_json(ctx.out("headline.json"), results(cfg))
    data = store.read_json(ctx.out("headline.json"))
    draw_figures(data, ctx.out)
    store.write_text(ctx.out("report.md"), report_text(data))
    store.write_text(ctx.out("REPRODUCIBILITY.md"),
                     reproducibility("#170", cfg.params, upstream_manifests(cfg)) + "\n" + REPRODUCES)
    d = data["decisions"]
    fit = {c["cell"]: {"gap_closed": c["gap_closed"]["mean"]} for c in (data.get("fit") or {}).get("cells", [])}
    return {"verdict": d["h1_h2_verdict"], "verdict_per_seed": d["h1_h2_verdict_per_seed"], "seeds": data["seeds"],
            "judge_check_auc": data["judge_check_auc"],
            **{c["cell"]: {"c": c["c"]["mean"], "alpha_primary": c["alpha_primary"]["mean"],
                           "em_rate_primary": c["em_rate_primary"]["mean"], **fit.get(c["cell"], {})}
               for c in data["cells"]}}


SPEC = StageSpec(
    name="analyze_issue170", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=1, memory="2Gi", timeout_s=1800),
    description="#170 Pareto scatter, capacity curve, projection table and H1/H2/H3 decisions from stored artifacts.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
