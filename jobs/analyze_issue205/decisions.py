"""Part 2 of ``analyze_issue205``: the record's pre-registered decision rules, applied to the results object."""

from __future__ import annotations

import math

import numpy as np

from jobs.analyze_issue205.results import DECISIONS, METRICS


def monotone(cos: list[float], effects: list[float], rules: dict) -> dict:
    """(b) of the cross-condition rule: exact Spearman between cos-to-assistant and the condition's mean delta."""
    from shared.analysis.stats import spearman_exact_test

    if not np.all(np.isfinite(effects)):  # an undefined metric (centred M2 without an axis): no trend to test
        return {"rho": None, "p": None, "fires": False, "note": "a condition's mean change is undefined"}
    try:
        trend = spearman_exact_test(cos, effects)
    except ValueError as err:  # constant effects or too few conditions: no trend to test
        return {"rho": None, "p": None, "fires": False, "note": str(err)}
    return {"rho": trend.rho, "p": trend.p_value,
            "fires": bool(abs(trend.rho) >= rules["monotone_min_abs_rho"] and trend.p_value < rules["monotone_alpha"])}


def fires_in_direction(kind: str, cell: dict, rules: dict) -> bool:
    """A primary cell fires: BH p below the bar and the change in the pre-registered direction (an M3 drop of at
    least ``m3_min_drop``)."""
    from shared.analysis.geometry import DIRECTIONS

    delta = cell["delta"]
    if not np.isfinite(delta):
        return False
    if cell["metric"] == "M3":
        direction = delta <= -rules["m3_min_drop"]
    else:
        direction = delta > 0 if DIRECTIONS[kind][cell["metric"]] == "greater" else delta < 0
    return bool(direction and cell["p_bh"] < rules["geometry_alpha"])


def decide_family(data: dict, kind: str, fam: dict) -> dict:
    """The pre-registered rules on one geometry of one seed: which cells fire, and G1/G2/G3."""
    rules, em_names, layers, methods = data["rules"], data["em_conditions"], data["layers"], data["methods"]
    cell_fires = [fires_in_direction(kind, c, rules) for c in fam["cells"]]
    n_layers_needed = math.ceil(rules["min_layer_fraction"] * len(layers))
    out = {"cell_fires": cell_fires, "n_cells": len(cell_fires), "n_firing": sum(cell_fires), "layers_needed": n_layers_needed}
    for metric in METRICS:
        per_cond = {}
        for cond in em_names:
            mine = [(c, f) for c, f in zip(fam["cells"], cell_fires, strict=True) if c["metric"] == metric and c["condition"] == cond]
            layers_fired = {m: sum(f for c, f in mine if c["method"] == m) for m in methods}
            fires_vs_base = all(n >= n_layers_needed for n in layers_fired.values())
            # the three-way bar (pre-registered): a firing condition x metric must ALSO separate from benign SFT
            # (EM-vs-benign BH p < 0.05) at a majority of layers, under each method, or it does not count
            beat = {(x["method"], x["layer"]) for x in fam["em_vs_benign"]
                    if x["metric"] == metric and x["condition"] == cond and x["p_bh"] < rules["contrast_alpha"]}
            layers_beating = {m: sum((m, layer) in beat for layer in layers) for m in methods}
            beats_benign = all(n > len(layers) / 2 for n in layers_beating.values())
            deltas = [c["delta"] for c, _ in mine]
            per_cond[cond] = {"fires": fires_vs_base and beats_benign, "fires_vs_base": fires_vs_base,
                              "layers_fired": layers_fired, "beats_benign": beats_benign, "layers_beating_benign": layers_beating,
                              "mean_delta": float(np.mean(deltas)) if np.all(np.isfinite(deltas)) else None}
        mean_deltas = [per_cond[c]["mean_delta"] if per_cond[c]["mean_delta"] is not None else math.nan for c in em_names]
        decision = {"metric": metric, "conditions": per_cond, "all_fire": all(v["fires"] for v in per_cond.values()),
                    "cos_monotone": monotone([c["cos_to_assistant"] for c in data["conditions"]], mean_deltas, rules)}
        decision["fires"] = bool(any(v["fires"] for v in per_cond.values()) and (decision["all_fire"] or decision["cos_monotone"]["fires"]))
        out[DECISIONS[metric]] = decision
    return out


def shift_status(data: dict, geo: dict, condition: str) -> dict:
    """Whether a shared shift of ``condition`` from base is measured at the headline layer under every method, and its
    size there (norm of the mean shift over base's spread)."""
    layer = data["headline_layer"]
    per_method = {m: geo["shift"][f"{m}/L{layer}"][condition] for m in data["methods"]}
    return {"measured": all(v["measured"] for v in per_method.values()),
            "ratio": {m: v["ratio"] for m, v in per_method.items()}, "p": {m: v["p"] for m, v in per_method.items()}}


def raw_only(data: dict, geo: dict, raw: dict, invariant: dict) -> list[dict]:
    """Every pre-registered geometry rule (and each condition's part of it) that holds on raw geometry but not on
    shift-invariant geometry, with whether a shared shift is measured for the conditions concerned: only then may the
    raw result be a shift that every persona shares. One entry per rule: ``decision`` (G1..G3), ``rule``,
    ``conditions`` (empty for a whole-decision rule) and ``shift_measured`` (for every condition concerned)."""
    out = []
    for name in ("G1", "G2", "G3"):
        d, c = raw[name], invariant[name]
        entries = [(rule, []) for rule, on_raw, on_inv in (("fires", d["fires"], c["fires"]), ("all conditions fire", d["all_fire"], c["all_fire"]),
                                                            ("cos-monotone", d["cos_monotone"]["fires"], c["cos_monotone"]["fires"]))
                   if on_raw and not on_inv]  # fmt: skip
        for rule, key in (("vs base", "fires_vs_base"), ("beats benign SFT", "beats_benign"), ("condition fires", "fires")):
            conds = [cond for cond, v in d["conditions"].items() if v[key] and not c["conditions"][cond][key]]
            if conds:
                entries.append((rule, conds))
        for rule, conds in entries:
            concerned = conds or data["em_conditions"]
            shifts = {cond: shift_status(data, geo, cond) for cond in concerned}
            out.append({"decision": name, "metric": d["metric"], "rule": rule, "conditions": conds,
                        "shift_measured": all(s["measured"] for s in shifts.values()),
                        "shift_measured_for": [cond for cond, s in shifts.items() if s["measured"]]})
    return out


def outcome(data: dict, fired: dict, raw_fam: dict, beh: dict | None) -> dict:
    """The pre-registered headline mapping and joint-null kill criterion (plan v2, sections 5-6), for one seed."""
    headlines = []
    if fired["G1"] and fired.get("H2"):
        headlines.append("EM induces general persona-vector collapse under all induction personas; mean bystander leakage is induction-invariant.")
    if fired["G1"] and fired.get("H3"):
        headlines.append("EM-induced collapse scales with the induction persona's cosine to the assistant; the same scaling shows behaviourally.")
    if fired.get("H1"):
        headlines.append("EM corrupts whichever persona was active during induction (induction-persona self-leakage).")
    if not any(fired.values()):
        headlines.append("No G or H fires: see the kill criterion.")
    kill = None
    # every geometry cell BH p > 0.5; leakage range <= 5 pp and every mean <= 5 %; |rho| < 0.3 with p > 0.20. Without
    # the coupling in every condition, near-zero leakage is no null result: the criterion is then left undecided
    if beh and not beh["coupling"]["not_taken"]:
        means = [c["mean_bystander"] for c in beh["conditions"]]
        h3 = beh["H3"]
        kill = bool(
            all(c["p_bh"] > 0.5 for c in raw_fam["cells"])
            and beh["H2"]["range"] <= 0.05 and max(means) <= 0.05
            and (h3["rho"] is None or (abs(h3["rho"]) < 0.3 and h3["p"] > 0.20))
        )
    return {"fired": fired, "headlines": headlines, "joint_null_kill": kill}


def decisions(data: dict) -> dict:
    """The record's pre-registered rules on the results object: per seed (both geometries, H1/H2/H3, the headline
    mapping), pooled over seeds (``shared.analysis.stats.PooledDecision``: every seed must pass), and the effects the seed-level
    EM-vs-benign test licenses calling EM-specific (none with one seed)."""
    from shared.analysis.stats import PooledDecision

    rules = data["rules"]
    per_seed = {}
    for seed, result in data["per_seed"].items():
        geo, beh = result["geometry"], result["behaviour"]
        families = {kind: decide_family(data, kind, geo["families"][kind]) for kind in geo["families"]}
        fired = {name: families["raw"][name]["fires"] for name in ("G1", "G2", "G3")}
        if beh:
            fired |= {name: beh[name]["fires"] for name in ("H1", "H2", "H3")}
        per_seed[seed] = {"families": families, "fired": fired,
                          "raw_only": raw_only(data, geo, families["raw"], families["shift_invariant"]),
                          "outcome": outcome(data, fired, geo["families"]["raw"], beh)}
    pooled = {}
    names = list(next(iter(per_seed.values()))["fired"])
    for name in names:
        decision = PooledDecision({int(s): bool(v["fired"][name]) for s, v in per_seed.items()})
        pooled[name] = {"per_seed": {str(k): v for k, v in decision.per_seed.items()}, "passes": decision.passes,
                        "n_pass": decision.n_pass, "rule": decision.rule,
                        "not_testable": [str(s) for s, v in data["per_seed"].items() if not testable(v["behaviour"], name)]}
    for name in ("G1", "G2", "G3"):
        decision = PooledDecision({int(s): bool(v["families"]["shift_invariant"][name]["fires"]) for s, v in per_seed.items()})
        pooled[f"{name} (shift-invariant)"] = {"per_seed": {str(k): v for k, v in decision.per_seed.items()},
                                               "passes": decision.passes, "n_pass": decision.n_pass, "rule": decision.rule}
    level = data["seed_level"]
    em_specific = [r for r in level["rows"] if r["contrast"] == "em_vs_benign" and r["testable"] and r["p_bh"] < rules["contrast_alpha"]
                   and (r["geometry"] != "leakage" or r["estimate"] > 0)] if level["testable"] else []  # fmt: skip
    return {"per_seed": per_seed, "pooled": pooled, "pooled_headlines": pooled_headlines(per_seed),
            "em_specific": em_specific, "single_seed": not level["testable"]}


def testable(beh: dict | None, name: str) -> bool:
    """Whether a seed could decide ``name`` at all: H1 needs a condition that took the coupling, H2 and H3 need it
    in every condition (a geometry rule is always decidable)."""
    if not name.startswith("H") or not beh:
        return True
    return beh["H1"]["testable"] > 0 if name == "H1" else beh[name]["testable"]


def pooled_headlines(per_seed: dict) -> list[str]:
    """The pre-registered headlines every seed reaches (the pooled mapping: all seeds must pass)."""
    lists = [set(v["outcome"]["headlines"]) for v in per_seed.values()]
    first = next(iter(per_seed.values()))["outcome"]["headlines"]
    return [h for h in first if all(h in other for other in lists)]
