"""The stage ``analyze_issue170``: ``run`` puts the four parts together (results, decisions, ``headline.json``,
figures, report, REPRODUCIBILITY.md); ``SPEC`` is what the registry finds, ``main`` its command line."""

from __future__ import annotations

from jobs.analyze_issue170.decisions import decisions
from jobs.analyze_issue170.figures import draw_figures
from jobs.analyze_issue170.report import REPRODUCES, report_text
from jobs.analyze_issue170.results import Config, results
from shared.contract.stage import Resources, StageSpec
from shared.core import store


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
    data = results(cfg)
    data["decisions"] = decisions(data)
    store.write_json(ctx.out("headline.json"), data)
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
