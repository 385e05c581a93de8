"""The stage ``analyze_issue164``: ``run`` puts the four parts together (results, decisions, ``headline.json``,
figures, report, REPRODUCIBILITY.md); ``SPEC`` is what the registry finds, ``main`` its command line."""

from __future__ import annotations

from jobs.analyze_issue164.decisions import decisions
from jobs.analyze_issue164.figures import figures
from jobs.analyze_issue164.report import report_text, reproducibility_notes
from jobs.analyze_issue164.results import Config, results
from shared.contract.stage import Resources, StageSpec
from shared.core import store


def run(cfg: Config, ctx) -> dict:
    from shared.analysis.reporting import producing_manifest, reproducibility

    data = results(cfg)
    data["decisions"] = decisions(data)
    store.write_json(ctx.out("headline.json"), data)
    data = store.read_json(ctx.out("headline.json"))  # the figures and report print exactly what was stored
    figures(data, ctx.out)
    store.write_text(ctx.out("report.md"), report_text(data))
    upstream = [producing_manifest(cfg.classifier_uri)]
    for cond in cfg.conditions:
        upstream.append(producing_manifest(cond.c_scores_uri))
        upstream += [producing_manifest(uri) for uri in cond.judge_scores_uris.values()]
        if cond.coherence_scores_uri:
            upstream.append(producing_manifest(cond.coherence_scores_uri))
    upstream += [producing_manifest(uri) for uri in [*cfg.judge_check_uris.values(), cfg.coherence_check_uri] if uri]
    unique = {(m["cell"], m["stage"]): m for m in upstream}
    store.write_text(ctx.out("REPRODUCIBILITY.md"),
                     reproducibility("#164", cfg.params, list(unique.values())) + reproducibility_notes(data))
    metrics = {r["condition"]: {"c": r["c"], "alpha_primary": r["alpha_primary"],
                                "em_rate_primary": r["em_rate_primary"]} for r in data["conditions"]}
    metrics["classifier_val_accuracy"] = data["classifier"]["val_accuracy"]
    metrics["judge_check_auc"] = {name: check.get("auc") for name, check in data["judge_checks"].items()}
    return metrics


SPEC = StageSpec(
    name="analyze_issue164", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=1, memory="2Gi", timeout_s=1800),
    description="#164 headline table, C-vs-α figure and report from stored judge and classifier scores.",
)
main = SPEC.main
