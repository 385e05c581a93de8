"""The stage ``analyze_issue81``: ``run`` puts the four parts together (results, decisions, ``headline.json``,
figures, report, REPRODUCIBILITY.md); ``SPEC`` is what the registry finds, ``main`` its command line."""

from __future__ import annotations

from jobs.analyze_issue81.decisions import decisions
from jobs.analyze_issue81.figures import draw_figures
from jobs.analyze_issue81.report import REPRODUCIBILITY_NOTES, report
from jobs.analyze_issue81.results import Config, results
from shared.contract.stage import Resources, StageSpec
from shared.core import store


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
