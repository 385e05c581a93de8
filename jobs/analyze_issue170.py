"""Stage ``analyze_issue170``: the (C, α) Pareto scatter, the capacity curve, the projection table and the
H1/H2/H3 decision rules as amended in the record -- every number recomputed from stored per-item artifacts.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Literal

import numpy as np
from pydantic import BaseModel

from shared import store
from shared.config import StageConfig
from shared.stage import Resources, StageInputError, StageSpec

Method = Literal["soft", "gcg-system", "gcg-user", "random", "reference"]
LEARNED = ("soft", "gcg-system", "gcg-user", "random")


class CellArtifacts(BaseModel):
    name: str
    method: Method
    size: int | None = None  # K for soft cells, L for GCG and random cells
    lr: float | None = None
    c_scores_uri: str
    judge_scores_uris: dict[str, str]
    train_metrics_uri: str | None = None  # metrics.json of the training stage


class Config(StageConfig):
    cells: list[CellArtifacts]
    primary_judge: str
    alternate_judge: str
    classifier_uri: str
    villain_uri: str | None = None
    params: dict = {}


def package_json(name: str) -> dict:
    return json.loads(resources.files("shared.data").joinpath(f"issue170/{name}").read_text())


def alpha_of(uri: str) -> dict:
    rows = store.read_jsonl(uri)
    scores = [r["score"] for r in rows if r.get("error") is None and r.get("score") is not None]
    return {"alpha": float(np.mean(scores)) if scores else None, "n_scored": len(scores),
            "n_errors": sum(r.get("error") is not None for r in rows)}


def c_of(uri: str) -> float:
    values = [r["c"] for r in store.read_jsonl(uri)]
    if not values:
        raise StageInputError(f"no classifier scores in {uri}")
    return float(np.mean(values))


def cell_rows(cfg: Config) -> list[dict]:
    rows = []
    for cell in cfg.cells:
        missing = {cfg.primary_judge, cfg.alternate_judge} - set(cell.judge_scores_uris)
        if missing:
            raise StageInputError(f"cell {cell.name} has no scores for judge(s) {sorted(missing)}")
        primary, alternate = (alpha_of(cell.judge_scores_uris[j]) for j in (cfg.primary_judge, cfg.alternate_judge))
        training = store.read_json(cell.train_metrics_uri) if cell.train_metrics_uri else {}
        rows.append({
            "cell": cell.name, "method": cell.method, "size": cell.size, "lr": cell.lr, "c": c_of(cell.c_scores_uri),
            "alpha_primary": primary["alpha"], "alpha_alternate": alternate["alpha"],
            "errors_primary": primary["n_errors"], "errors_alternate": alternate["n_errors"],
            "best_heldout_ce": training.get("best_heldout_ce"), "initial_heldout_ce": training.get("initial_heldout_ce"),
            "steps": training.get("steps"),
        })
    return rows


def _le(value, limit) -> bool:
    return value is not None and value <= limit


def decisions(rows: list[dict], villain: dict | None, rules: dict) -> dict:
    h2, mid = rules["h2"], rules["h_intermediate"]

    def hits_h2(r):
        return _le(r["alpha_primary"], h2["alpha_primary_max"]) and _le(r["alpha_alternate"], h2["alpha_alternate_max"]) \
            and r["c"] >= h2["c_min"]

    def intermediate(r):
        return r["alpha_primary"] is not None and mid["alpha_primary_above"] < r["alpha_primary"] <= mid["alpha_primary_max"] \
            and _le(r["alpha_alternate"], mid["alpha_alternate_max"]) and r["c"] >= mid["c_min"]

    soft_hits = [r["cell"] for r in rows if r["method"] == "soft" and hits_h2(r)]
    gcg_hits = [r["cell"] for r in rows if r["method"] in ("gcg-system", "gcg-user") and hits_h2(r)]
    if soft_hits:
        verdict = "H2 supported (search-limited): a soft prefix reaches the EM point"
    elif gcg_hits:
        verdict = "H2 supported by GCG only (no soft cell hits: check the soft cells' training)"
    else:
        verdict = "H1 supported (capacity-limited under this budget): no prompt cell reaches the EM point"
    out = {
        "h2_gate": h2, "h2_soft_cells": soft_hits, "h2_gcg_cells": gcg_hits,
        "h_intermediate_cells": [r["cell"] for r in rows if r["method"] in LEARNED and intermediate(r)],
        "h1_h2_verdict": verdict,
        "c_is_a_sanity_floor": True,  # scope-amendment v3: the alpha gates carry H2
    }
    sanity = rules["gcg_user_slot_sanity"]["alpha_primary_max"]
    users = [r for r in rows if r["method"] == "gcg-user"]
    out["gcg_user_slot_sanity"] = {r["cell"]: _le(r["alpha_primary"], sanity) for r in users}
    if villain:
        pirate = villain["pirate"]["mean_cosine"]
        margin, original = rules["h3"]["margin_over_pirate"], rules["h3"]["original_cosine_min"]
        out["h3"] = {
            "pirate_mean_cosine": pirate, "threshold": pirate + margin, "chosen_layer": villain["chosen_layer"],
            "cells_passing": [n for n, c in villain["cells"].items() if c["mean_cosine"] > pirate + margin],
            "cells_passing_original_0_5": [n for n, c in villain["cells"].items() if c["mean_cosine"] >= original],
        }
    return out


def pareto_figure(data: dict, uri: str) -> None:
    from shared.figures import PALETTE, REFERENCE_COLOR, new_figure, save

    markers = {"soft": "o", "gcg-system": "^", "gcg-user": "v", "random": "x", "reference": "D"}
    fig, ax = new_figure(7.2, 4.8)
    for point in data["reference_points"]:
        ax.scatter(point["c"], point["alpha_primary"], marker="s", color=REFERENCE_COLOR, zorder=2)
        ax.annotate(point["name"], (point["c"], point["alpha_primary"]), fontsize=7, color=REFERENCE_COLOR,
                    xytext=(4, 4), textcoords="offset points")
    for i, row in enumerate(data["cells"]):
        if row["alpha_primary"] is None:
            continue
        ax.scatter(row["c"], row["alpha_primary"], marker=markers[row["method"]], color=PALETTE[i % len(PALETTE)],
                   s=55, zorder=3, label=f"{row['cell']} ({row['method']})")
    gate = data["decisions"]["h2_gate"]
    ax.axhline(gate["alpha_primary_max"], color=REFERENCE_COLOR, linestyle="--", linewidth=1)
    ax.axvline(gate["c_min"], color=REFERENCE_COLOR, linestyle=":", linewidth=1)
    ax.set_xlabel("classifier C (distributional EM match)")
    ax.set_ylabel(f"alignment α ({data['judges']['primary']})")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-2, 102)
    ax.set_title("C vs α: cells and the record's reference points (grey); dashed: H2 gate", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    save(fig, uri)


def capacity_figure(data: dict, uri: str) -> None:
    """α and the best held-out CE against prompt length, one line per method (and per lr for soft prefixes)."""
    from shared.figures import PALETTE, new_figure, save

    fig, _ = new_figure(10.0, 4.0)
    fig.clf()
    left, right = fig.subplots(1, 2)
    series: dict[str, list[dict]] = {}
    for row in data["cells"]:
        if row["method"] in LEARNED and row["size"] is not None:
            key = f"soft lr={row['lr']:g}" if row["method"] == "soft" else row["method"]
            series.setdefault(key, []).append(row)
    for i, (key, rows) in enumerate(sorted(series.items())):
        rows = sorted(rows, key=lambda r: r["size"])
        for ax, field in ((left, "alpha_primary"), (right, "best_heldout_ce")):
            points = [(r["size"], r[field]) for r in rows if r[field] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", color=PALETTE[i % len(PALETTE)], label=key)
    left.axhline(data["decisions"]["h2_gate"]["alpha_primary_max"], color="#7f7f7f", linestyle="--", linewidth=1)
    for ax, label in ((left, f"alignment α ({data['judges']['primary']})"), (right, "best held-out CE (nats/token)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (K soft embeddings / L ids)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.25)
    left.set_title("capacity curve: α", fontsize=9)
    right.set_title("capacity curve: fit to the EM teacher", fontsize=9)
    right.legend(fontsize=7, frameon=False)
    save(fig, uri)


def report(data: dict) -> str:
    from shared.reporting import fmt, markdown_table

    j, d = data["judges"], data["decisions"]
    cells = markdown_table(
        ["cell", "method", "K / L", "lr", "C", f"α ({j['primary']})", f"α ({j['alternate']})", "best held-out CE",
         "errors P/A"],
        [(r["cell"], r["method"], r["size"], f"{r['lr']:g}" if r["lr"] else None, f"{r['c']:.4f}", r["alpha_primary"],
          r["alpha_alternate"], fmt(r["best_heldout_ce"], 4) if r["best_heldout_ce"] is not None else None,
          f"{r['errors_primary']} / {r['errors_alternate']}") for r in data["cells"]],
        align="lllrrrrrl")
    refs = markdown_table(["reference point (from the record)", "C", "α primary", "α alternate"],
                          [(p["name"], f"{p['c']:.3f}", p["alpha_primary"], p["alpha_alternate"])
                           for p in data["reference_points"]])
    gate = d["h2_gate"]
    lines = [
        "# #170: soft-prefix and GCG prompts against the EM teacher", "",
        "## Headline", "", cells, "",
        "Errors are judge items that failed or could not be parsed; they are excluded from α, never scored as 0.", "",
        "![Pareto](pareto.png)", "", "![Capacity curve](capacity_curve.png)", "",
        "## Reference points", "", refs, "",
        "## Decision rules (as amended in the record)", "",
        f"- H2 gate: α ({j['primary']}) ≤ {gate['alpha_primary_max']} and α ({j['alternate']}) ≤ "
        f"{gate['alpha_alternate_max']} and C ≥ {gate['c_min']} (C is a sanity floor since scope-amendment v3).",
        f"- Soft cells hitting H2: {', '.join(d['h2_soft_cells']) or 'none'}; GCG cells: "
        f"{', '.join(d['h2_gcg_cells']) or 'none'}; H_intermediate: {', '.join(d['h_intermediate_cells']) or 'none'}.",
        f"- **{d['h1_h2_verdict']}**.",
    ]
    for cell, ok in d["gcg_user_slot_sanity"].items():
        lines.append(f"- GCG user-slot sanity (α ≤ 80): {cell} {'passes' if ok else 'fails'}.")
    if "projection" in data:
        p = data["projection"]
        h3 = d["h3"]
        lines += ["", "## Villain-direction projection (H3)", "",
                  f"Layer chosen by Cohen's d: {p['chosen_layer']} (d by layer: "
                  + ", ".join(f"{k}: {v:.3f}" for k, v in p["cohens_d"].items()) + ").", "",
                  markdown_table(["prompt", "mean cosine(Δh, villain)", "cosine of mean Δh"],
                                 [("pirate baseline", f"{p['pirate']['mean_cosine']:.4f}",
                                   f"{p['pirate']['cosine_of_mean_delta']:.4f}")]
                                 + [(n, f"{c['mean_cosine']:.4f}", f"{c['cosine_of_mean_delta']:.4f}")
                                    for n, c in p["cells"].items()]), "",
                  f"- H3 (amended): cosine > pirate + 0.1 = {h3['threshold']:.4f}: "
                  f"{', '.join(h3['cells_passing']) or 'no cell'} passes.",
                  f"- H3 (original, cosine ≥ 0.5): {', '.join(h3['cells_passing_original_0_5']) or 'no cell'}."]
    return "\n".join(lines) + "\n"


def run(cfg: Config, ctx) -> dict:
    from shared.reporting import producing_manifest, reproducibility

    rows = cell_rows(cfg)
    villain = store.read_json(cfg.villain_uri) if cfg.villain_uri else None
    data = {"judges": {"primary": cfg.primary_judge, "alternate": cfg.alternate_judge}, "cells": rows,
            "reference_points": package_json("reference_points.json")["points"],
            "decisions": decisions(rows, villain, package_json("decision_rules.json"))}
    if villain:
        data["projection"] = {k: villain[k] for k in ("chosen_layer", "cohens_d", "pirate", "cells")}
    store.write_json(ctx.out("headline.json"), data)
    pareto_figure(data, ctx.out("pareto"))
    capacity_figure(data, ctx.out("capacity_curve"))
    store.write_text(ctx.out("report.md"), report(data))
    upstream = [producing_manifest(cfg.classifier_uri)]
    for cell in cfg.cells:
        upstream.append(producing_manifest(cell.c_scores_uri))
        upstream += [producing_manifest(uri) for uri in cell.judge_scores_uris.values()]
        if cell.train_metrics_uri:
            upstream.append(producing_manifest(cell.train_metrics_uri))
    if cfg.villain_uri:
        upstream.append(producing_manifest(cfg.villain_uri))
    unique = {(m["cell"], m["stage"]): m for m in upstream}
    store.write_text(ctx.out("REPRODUCIBILITY.md"), reproducibility("#170", cfg.params, list(unique.values())))
    return {"verdict": data["decisions"]["h1_h2_verdict"],
            **{r["cell"]: {"c": r["c"], "alpha_primary": r["alpha_primary"]} for r in rows}}


SPEC = StageSpec(
    name="analyze_issue170", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=1, memory="2Gi", timeout_s=1800),
    description="#170 Pareto scatter, capacity curve, projection table and H1/H2/H3 decisions from stored artifacts.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
