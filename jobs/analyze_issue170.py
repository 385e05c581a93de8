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
SWEEP = ("soft", "gcg-system")  # the cells H1/H2/H_intermediate speak about (the user slot is a sanity check)
DEFAULT_INIT = "You are a helpful assistant."


class CellArtifacts(BaseModel):
    name: str
    method: Method
    size: int | None = None  # K for soft cells, L for GCG and random cells
    lr: float | None = None
    init_text: str | None = None  # soft cells: the text the prefix was initialised from
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
            "cell": cell.name, "method": cell.method, "size": cell.size, "lr": cell.lr, "init_text": cell.init_text,
            "c": c_of(cell.c_scores_uri),
            "alpha_primary": primary["alpha"], "alpha_alternate": alternate["alpha"],
            "errors_primary": primary["n_errors"], "errors_alternate": alternate["n_errors"],
            "best_heldout_ce": training.get("best_heldout_ce"), "initial_heldout_ce": training.get("initial_heldout_ce"),
            "steps": training.get("steps"), "stopped_early": training.get("stopped_early"),
            # seconds per step: teacher sampling, and the optimiser's own work (soft: forward/backward; GCG:
            # gradient + candidate evaluation)
            "teacher_s_per_step": training.get("teacher_s_mean"),
            "optimiser_s_per_step": training.get("forward_backward_s_mean", _gcg_work(training)),
        })
    return rows


def _gcg_work(training: dict) -> float | None:
    gradient, candidates = training.get("gradient_s_mean"), training.get("candidates_s_mean")
    return None if gradient is None or candidates is None else gradient + candidates


def _le(value, limit) -> bool:
    return value is not None and value <= limit


def pareto_front(rows: list[dict]) -> list[str]:
    """The sweep cells no other sweep cell beats on both axes (higher C and lower α), in order of C."""
    points = [r for r in rows if r["method"] in SWEEP and r["alpha_primary"] is not None]

    def dominated(p):
        return any(q["c"] >= p["c"] and q["alpha_primary"] <= p["alpha_primary"]
                   and (q["c"] > p["c"] or q["alpha_primary"] < p["alpha_primary"]) for q in points)

    return [r["cell"] for r in sorted(points, key=lambda r: r["c"]) if not dominated(r)]


def decisions(rows: list[dict], villain: dict | None, rules: dict) -> dict:
    h2, mid = rules["h2"], rules["h_intermediate"]

    def hits_h2(r):
        return _le(r["alpha_primary"], h2["alpha_primary_max"]) and _le(r["alpha_alternate"], h2["alpha_alternate_max"]) \
            and r["c"] >= h2["c_min"]

    def intermediate(r):
        return r["alpha_primary"] is not None and mid["alpha_primary_above"] < r["alpha_primary"] <= mid["alpha_primary_max"] \
            and _le(r["alpha_alternate"], mid["alpha_alternate_max"]) and r["c"] >= mid["c_min"]

    # the record: H2 = at least one soft-prefix cell hits the gate; H1 = no soft-prefix or system-slot GCG cell does
    soft_hits = [r["cell"] for r in rows if r["method"] == "soft" and hits_h2(r)]
    gcg_hits = [r["cell"] for r in rows if r["method"] == "gcg-system" and hits_h2(r)]
    if soft_hits:
        verdict = "H2 supported (search-limited): a soft prefix reaches the EM point"
    elif gcg_hits:
        verdict = ("neither H1 nor H2: a system-slot GCG cell reaches the H2 gate but no soft prefix does "
                   "(soft is a superset of GCG at matched length: check the soft cells' training)")
    else:
        verdict = "H1 supported (capacity-limited under this budget): no prompt cell reaches the EM point"
    out = {
        "h2_gate": h2, "h2_soft_cells": soft_hits, "h2_gcg_cells": gcg_hits,
        "h_intermediate_cells": [r["cell"] for r in rows if r["method"] in SWEEP and intermediate(r)],
        "h1_h2_verdict": verdict, "pareto_front": pareto_front(rows),
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
    by_name = {r["cell"]: r for r in data["cells"]}
    front = [by_name[name] for name in data["decisions"]["pareto_front"]]
    if len(front) > 1:
        ax.plot([r["c"] for r in front], [r["alpha_primary"] for r in front], color="#333333", linewidth=0.8,
                zorder=1, label="Pareto front (sweep cells)")
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


def capacity_series(row: dict) -> str:
    """The line a cell belongs to: soft prefixes by lr (and init text, so an init ablation is its own point),
    GCG and random suffixes by method."""
    if row["method"] != "soft":
        return row["method"]
    init = row.get("init_text")
    return f"soft lr={row['lr']:g}" + ("" if init in (None, DEFAULT_INIT) else f", init {init!r}")


def capacity_figure(data: dict, uri: str) -> None:
    """α and the best held-out CE against prompt length, one line per method (and per lr for soft prefixes);
    the reference conditions' α (same pipeline) and the H2 gate as horizontal lines."""
    from shared.figures import PALETTE, REFERENCE_COLOR, new_figure, save

    fig, _ = new_figure(10.0, 4.0)
    fig.clf()
    left, right = fig.subplots(1, 2)
    series: dict[str, list[dict]] = {}
    for row in data["cells"]:
        if row["method"] in LEARNED and row["size"] is not None:
            series.setdefault(capacity_series(row), []).append(row)
    markers = {"gcg-system": "^", "gcg-user": "v", "random": "x"}
    for i, (key, rows) in enumerate(sorted(series.items())):
        rows = sorted(rows, key=lambda r: r["size"])
        for ax, field in ((left, "alpha_primary"), (right, "best_heldout_ce")):
            points = [(r["size"], r[field]) for r in rows if r[field] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker=markers.get(rows[0]["method"], "o"),
                        color=PALETTE[i % len(PALETTE)], label=key)
    left.axhline(data["decisions"]["h2_gate"]["alpha_primary_max"], color=REFERENCE_COLOR, linestyle="--",
                 linewidth=1)
    for row in data["cells"]:
        if row["method"] == "reference" and row["alpha_primary"] is not None:
            left.axhline(row["alpha_primary"], color=REFERENCE_COLOR, linestyle=":", linewidth=1)
            left.annotate(row["cell"], (1.0, row["alpha_primary"]), xycoords=("axes fraction", "data"),
                          xytext=(-2, 2), textcoords="offset points", ha="right", fontsize=7, color=REFERENCE_COLOR)
    sizes = sorted({r["size"] for rows in series.values() for r in rows})
    for ax, label in ((left, f"alignment α ({data['judges']['primary']})"), (right, "best held-out CE (nats/token)")):
        ax.set_xscale("log", base=2)
        if sizes:
            ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
            ax.set_xticks(sizes, [str(size) for size in sizes])
            ax.minorticks_off()
        ax.set_xlabel("prompt length (K soft embeddings / L ids)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.25)
    left.set_title("capacity curve: α (dashed: H2 gate; dotted: reference conditions)", fontsize=9)
    right.set_title("capacity curve: fit to the EM teacher (held-out CE)", fontsize=9)
    right.legend(fontsize=7, frameon=False)
    save(fig, uri)


def classifier_line(facts: dict) -> str:
    from shared.reporting import fmt

    if "val_accuracy" not in facts:
        return f"C is the mean P(EM) of classifier C ({facts['uri']}) over a cell's completions."
    return (f"C is the mean P(EM) of classifier C over a cell's completions: {facts.get('encoder_ref')} + logistic "
            f"regression, trained on {facts.get('n_positive')} EM-model vs {facts.get('n_negative')} base-model "
            f"completions, validation accuracy {fmt(facts['val_accuracy'], 4)} on {facts.get('n_val')} held out "
            f"({facts['uri']}).")


def report(data: dict) -> str:
    from shared.reporting import fmt, markdown_table

    j, d = data["judges"], data["decisions"]
    cells = markdown_table(
        ["cell", "method", "K / L", "lr", "init", "C", f"α ({j['primary']})", f"α ({j['alternate']})",
         "best held-out CE", "errors P/A"],
        [(r["cell"], r["method"], r["size"], f"{r['lr']:g}" if r["lr"] else None, r.get("init_text"),
          f"{r['c']:.4f}", r["alpha_primary"], r["alpha_alternate"],
          fmt(r["best_heldout_ce"], 4) if r["best_heldout_ce"] is not None else None,
          f"{r['errors_primary']} / {r['errors_alternate']}") for r in data["cells"]],
        align="llrrlrrrrl")
    trained = [r for r in data["cells"] if r["method"] in LEARNED and r["steps"] is not None]
    training = markdown_table(
        ["cell", "steps", "stopped early", "initial held-out CE", "best held-out CE", "teacher s/step",
         "optimiser s/step"],
        [(r["cell"], r["steps"], "yes" if r["stopped_early"] else "no",
          fmt(r["initial_heldout_ce"], 4), fmt(r["best_heldout_ce"], 4), r["teacher_s_per_step"],
          r["optimiser_s_per_step"]) for r in trained],
        align="lrlrrrr")
    refs = markdown_table(["reference point (from the record)", "C", "α primary", "α alternate"],
                          [(p["name"], f"{p['c']:.3f}", p["alpha_primary"], p["alpha_alternate"])
                           for p in data["reference_points"]])
    gate = d["h2_gate"]
    lines = [
        "# #170: soft-prefix and GCG prompts against the EM teacher", "",
        "## Headline", "", cells, "",
        "Errors are judge items that failed or could not be parsed; they are excluded from α, never scored as 0.", "",
        classifier_line(data["classifier"]), "",
        "![Pareto](pareto.png)", "", "![Capacity curve](capacity_curve.png)", "",
        "## Training", "", training, "",
        "Held-out CE is the student's token CE on the fixed cached set of teacher completions (the prefix or suffix "
        "with the lowest is the one evaluated). Optimiser s/step: forward/backward for soft prefixes, gradient and "
        "candidate evaluation for GCG; random suffixes are not trained.", "",
        "## Reference points", "", refs, "",
        "## Decision rules (as amended in the record)", "",
        f"- H2 gate: α ({j['primary']}) ≤ {gate['alpha_primary_max']} and α ({j['alternate']}) ≤ "
        f"{gate['alpha_alternate_max']} and C ≥ {gate['c_min']} (C is a sanity floor since scope-amendment v3).",
        f"- Soft cells hitting H2: {', '.join(d['h2_soft_cells']) or 'none'}; GCG cells: "
        f"{', '.join(d['h2_gcg_cells']) or 'none'}; H_intermediate: {', '.join(d['h_intermediate_cells']) or 'none'}.",
        f"- **{d['h1_h2_verdict']}**.",
        f"- Pareto front of the sweep cells (higher C, lower α), by C: {', '.join(d['pareto_front']) or 'none'}.",
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


def classifier_facts(cfg: Config) -> dict:
    """What the report says about classifier C: the bundle's own facts, as the scoring stage recorded them."""
    scored = store.read_json(store.join(cfg.cells[0].c_scores_uri.rsplit("/", 1)[0], "metrics.json"))
    return {"uri": cfg.classifier_uri, **scored.get("classifier", {})}


def upstream_manifests(cfg: Config) -> list[dict]:
    """The manifests of every stage behind the report: training, generation, scoring, judging, the direction.

    A classifier bundle the user provided has no manifest (it was not made by this run); everything else must.
    """
    from shared.reporting import producing_manifest

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
        if cell.train_metrics_uri:
            upstream.append(producing_manifest(cell.train_metrics_uri))
    if cfg.villain_uri:
        upstream.append(producing_manifest(cfg.villain_uri))
    return list({(m["cell"], m["stage"]): m for m in upstream}.values())


def run(cfg: Config, ctx) -> dict:
    from shared.reporting import reproducibility

    rows = cell_rows(cfg)
    villain = store.read_json(cfg.villain_uri) if cfg.villain_uri else None
    data = {"judges": {"primary": cfg.primary_judge, "alternate": cfg.alternate_judge}, "cells": rows,
            "classifier": classifier_facts(cfg),
            "reference_points": package_json("reference_points.json")["points"],
            "decisions": decisions(rows, villain, package_json("decision_rules.json"))}
    if villain:
        data["projection"] = {k: villain[k] for k in ("chosen_layer", "cohens_d", "pirate", "cells")}
    store.write_json(ctx.out("headline.json"), data)
    pareto_figure(data, ctx.out("pareto"))
    capacity_figure(data, ctx.out("capacity_curve"))
    store.write_text(ctx.out("report.md"), report(data))
    store.write_text(ctx.out("REPRODUCIBILITY.md"), reproducibility("#170", cfg.params, upstream_manifests(cfg)))
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
