"""Part 1 of ``analyze_issue170``: the stage's config (the artifacts it reads) and the results object, every
number read and recomputed from those stored artifacts."""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from jobs.heldout_anchors import ORACLE
from shared.contract.stage import StageInputError
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
    return data
