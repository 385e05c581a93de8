"""Part 2 of ``analyze_issue81``: the record's pre-registered decision rules, applied to the results object."""

from __future__ import annotations

import numpy as np

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
