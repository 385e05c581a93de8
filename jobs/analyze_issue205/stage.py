"""The stage ``analyze_issue205``: ``run`` puts the four parts together (results, decisions, ``headline.json``,
figures, report, REPRODUCIBILITY.md); ``SPEC`` is what the registry finds, ``main`` its command line."""

from __future__ import annotations

from jobs.analyze_issue205.decisions import decisions
from jobs.analyze_issue205.figures import figures
from jobs.analyze_issue205.report import REPRODUCES, report
from jobs.analyze_issue205.results import (
    Config,
    check_personas,
    load_activations,
    load_leakage,
    results,
    sample_replies,
    seed_checkpoints,
    training_summary,
)
from shared.contract.stage import Resources, StageSpec
from shared.core import store


def run(cfg: Config, ctx) -> dict:
    from shared.analysis.reporting import producing_manifest, reproducibility

    per_seed_acts = load_activations(cfg)
    first = next(iter(per_seed_acts.values()))
    for seed, acts in per_seed_acts.items():
        for method in acts.methods:
            low = [p for p, f in acts.retained(method).items() if f < cfg.rules.min_paired_fraction]
            if low:
                ctx.log(f"warning: seed {seed}, method {method}: personas {low} keep < {cfg.rules.min_paired_fraction:.0%} "
                        "of questions after the paired filter")
    check_personas(cfg, first.personas)  # before the marker rows are read
    leakage = load_leakage(cfg, first.personas)
    replies = sample_replies(cfg, seed_checkpoints(cfg)[cfg.training_seeds()[0]], first.personas, first.questions)
    data = results(cfg, per_seed_acts, leakage, training_summary(cfg), replies)
    data["decisions"] = decisions(data)
    store.write_json(ctx.out("headline.json"), data)
    losses = {f"{t.name} s{t.seed}" if t.seed is not None else t.name: store.read_jsonl(t.log_uri) for t in cfg.trainings}
    figures(data, ctx.out, losses)
    store.write_text(ctx.out("report.md"), report(data))
    upstream = [producing_manifest(c.activations_uri) for c in cfg.checkpoints]
    upstream += [producing_manifest(m.marker_uri) for m in cfg.markers]
    upstream += [producing_manifest(t.log_uri) for t in cfg.trainings]
    unique = {(m["cell"], m["stage"]): m for m in upstream}
    store.write_text(ctx.out("REPRODUCIBILITY.md"), reproducibility("#205", cfg.params, list(unique.values())) + "\n" + REPRODUCES)
    fired = data["decisions"]["pooled"]
    return {"seeds": len(data["seeds"]), **{f"pooled_{k}": v["passes"] for k, v in fired.items() if " " not in k},
            "geometry_cells_firing": sum(d["families"]["raw"]["n_firing"] for d in data["decisions"]["per_seed"].values())}


SPEC = StageSpec(
    name="analyze_issue205", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=8, memory="32Gi", timeout_s=3 * 3600),
    description="#205 statistics per seed and with the seed as the unit (M1/M2/M3 raw and shift-invariant, H1/H2/H3, "
                "BH-FDR + Holm), decisions, figures and report from stored activations and marker rows.",
)
main = SPEC.main
