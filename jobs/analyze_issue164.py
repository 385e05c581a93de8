"""Stage ``analyze_issue164``: α under two judges and classifier C per condition, the C-vs-α figure and the report.

Every number is recomputed here from the stored per-item judge scores and classifier scores; nothing is copied
from an upstream summary.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
from pydantic import BaseModel

from shared import store
from shared.config import StageConfig
from shared.stage import Resources, StageInputError, StageSpec

REFERENCE_FILE = "issue164/reference_points.json"


class ConditionArtifacts(BaseModel):
    name: str
    system: str
    c_scores_uri: str
    judge_scores_uris: dict[str, str]


class Config(StageConfig):
    conditions: list[ConditionArtifacts]
    primary_judge: str
    alternate_judge: str
    classifier_uri: str
    params: dict = {}


def reference_points() -> dict:
    return json.loads(resources.files("shared.data").joinpath(REFERENCE_FILE).read_text())


def alpha_of(scores_uri: str) -> dict:
    rows = store.read_jsonl(scores_uri)
    scores = [r["score"] for r in rows if r.get("error") is None and r.get("score") is not None]
    errors = sum(1 for r in rows if r.get("error") is not None)
    labelled = sum(1 for r in rows if r.get("error") is None and r.get("score") is None)
    return {
        "alpha": float(np.mean(scores)) if scores else None,
        "n_scored": len(scores), "n_errors": errors, "n_labelled": labelled, "n_items": len(rows),
    }


def c_of(c_scores_uri: str) -> dict:
    values = [r["c"] for r in store.read_jsonl(c_scores_uri)]
    if not values:
        raise StageInputError(f"no classifier scores in {c_scores_uri}")
    return {"c": float(np.mean(values)), "n": len(values)}


def headline(cfg: Config) -> dict:
    refs = reference_points()
    rows = []
    for cond in cfg.conditions:
        missing = {cfg.primary_judge, cfg.alternate_judge} - set(cond.judge_scores_uris)
        if missing:
            raise StageInputError(f"condition {cond.name} has no scores for judge(s) {sorted(missing)}")
        primary = alpha_of(cond.judge_scores_uris[cfg.primary_judge])
        alternate = alpha_of(cond.judge_scores_uris[cfg.alternate_judge])
        gap = None if None in (primary["alpha"], alternate["alpha"]) else primary["alpha"] - alternate["alpha"]
        rows.append({
            "condition": cond.name, "system": cond.system, **c_of(cond.c_scores_uri),
            "alpha_primary": primary["alpha"], "alpha_alternate": alternate["alpha"], "gap": gap,
            "errors_primary": primary["n_errors"], "errors_alternate": alternate["n_errors"],
            "n_scored_primary": primary["n_scored"], "n_scored_alternate": alternate["n_scored"],
        })
    target = refs["em_target_alpha"]
    decisions = {
        "em_target_alpha": target,
        "h2_falsification_alpha": refs["h2_falsification_alpha"],
        "judge_gap_gate": refs["judge_gap_gate"],
        "conditions_above_em_target": [r["condition"] for r in rows if (r["alpha_primary"] or 0) > target],
        "conditions_at_or_below_falsification": [
            r["condition"] for r in rows
            if r["alpha_primary"] is not None and r["alpha_primary"] <= refs["h2_falsification_alpha"]
        ],
        "conditions_over_judge_gap_gate": [
            r["condition"] for r in rows if r["gap"] is not None and abs(r["gap"]) >= refs["judge_gap_gate"]
        ],
    }
    return {"judges": {"primary": cfg.primary_judge, "alternate": cfg.alternate_judge},
            "conditions": rows, "reference_points": refs["points"], "decisions": decisions}


def figure(data: dict, uri: str) -> dict:
    from shared.figures import PALETTE, REFERENCE_COLOR, new_figure, save

    fig, ax = new_figure()
    for point in data["reference_points"]:
        ax.scatter(point["c"], point["alpha_primary"], marker="s", color=REFERENCE_COLOR, zorder=2)
        ax.annotate(point["name"], (point["c"], point["alpha_primary"]), fontsize=7, color=REFERENCE_COLOR,
                    xytext=(4, 4), textcoords="offset points")
    for i, row in enumerate(data["conditions"]):
        color = PALETTE[i % len(PALETTE)]
        if row["alpha_primary"] is not None:
            ax.scatter(row["c"], row["alpha_primary"], color=color, s=50, zorder=3,
                       label=f"{row['condition']} ({data['judges']['primary']})")
        if row["alpha_alternate"] is not None:
            ax.scatter(row["c"], row["alpha_alternate"], facecolors="none", edgecolors=color, s=50, zorder=3,
                       label=f"{row['condition']} ({data['judges']['alternate']})")
    ax.axhline(data["decisions"]["em_target_alpha"], color=REFERENCE_COLOR, linestyle="--", linewidth=1)
    ax.set_xlabel("classifier C (distributional EM match)")
    ax.set_ylabel("alignment score α (0-100)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-2, 102)
    ax.set_title("C vs α (filled: primary judge, hollow: alternate, grey: record's reference points)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save(fig, uri)


def report(data: dict, val_accuracy: float | None) -> str:
    from shared.reporting import markdown_table

    j = data["judges"]
    d = data["decisions"]
    measured = markdown_table(
        ["condition", "C", f"α ({j['primary']})", f"α ({j['alternate']})", "gap (P−A)", "errors P/A"],
        [(r["condition"], f"{r['c']:.4f}", r["alpha_primary"], r["alpha_alternate"], r["gap"],
          f"{r['errors_primary']} / {r['errors_alternate']}") for r in data["conditions"]],
    )
    refs = markdown_table(["reference point (from the record)", "C", "α primary", "α alternate"],
                          [(p["name"], f"{p['c']:.3f}", p["alpha_primary"], p["alpha_alternate"]) for p in data["reference_points"]])
    lines = [
        "# #164: alignment score α and classifier C per condition", "",
        "## Headline", "", measured, "",
        "Errors are judge items that failed or could not be parsed; they are excluded from α, never scored as 0.", "",
        "## Reference points", "", refs, "",
        "## Decision rules (as pre-registered in the record)", "",
        f"- Conditions with α (primary) above the EM target {d['em_target_alpha']}: "
        f"{', '.join(d['conditions_above_em_target']) or 'none'}",
        f"- Conditions at or below the H2 falsification threshold α ≤ {d['h2_falsification_alpha']}: "
        f"{', '.join(d['conditions_at_or_below_falsification']) or 'none'}",
        f"- Conditions whose judge gap reaches the {d['judge_gap_gate']}-point gate: "
        f"{', '.join(d['conditions_over_judge_gap_gate']) or 'none'}",
        "", f"Classifier C validation accuracy: {val_accuracy:.4f}" if val_accuracy is not None else "", "",
        "![C vs alpha](c_vs_alpha.png)", "",
    ]
    return "\n".join(lines)


def run(cfg: Config, ctx) -> dict:
    from shared.reporting import producing_manifest, reproducibility

    data = headline(cfg)
    bundle_manifest = producing_manifest(cfg.classifier_uri)
    val_accuracy = bundle_manifest.get("metrics", {}).get("val_accuracy")
    data["classifier"] = {"uri": cfg.classifier_uri, "val_accuracy": val_accuracy}
    store.write_json(ctx.out("headline.json"), data)
    figure(data, ctx.out("c_vs_alpha"))
    store.write_text(ctx.out("report.md"), report(data, val_accuracy))
    upstream = [bundle_manifest]
    for cond in cfg.conditions:
        upstream.append(producing_manifest(cond.c_scores_uri))
        upstream += [producing_manifest(uri) for uri in cond.judge_scores_uris.values()]
    unique = {(m["cell"], m["stage"]): m for m in upstream}
    store.write_text(ctx.out("REPRODUCIBILITY.md"), reproducibility("#164", cfg.params, list(unique.values())))
    return {r["condition"]: {"c": r["c"], "alpha_primary": r["alpha_primary"]} for r in data["conditions"]}


SPEC = StageSpec(
    name="analyze_issue164", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=1, memory="2Gi", timeout_s=1800),
    description="#164 headline table, C-vs-α figure and report from stored judge and classifier scores.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
