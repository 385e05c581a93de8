"""Part 2 of ``analyze_issue170``: the record's pre-registered decision rules, applied to the results object."""

from __future__ import annotations

from jobs.analyze_issue170.results import LEARNED, SWEEP

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
