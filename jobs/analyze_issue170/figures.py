"""Part 3 of ``analyze_issue170``: every figure, drawn from the results object alone."""

from __future__ import annotations

from jobs.analyze_issue170.results import DEFAULT_INIT, LEARNED
from jobs.heldout_anchors import ORACLE


def draw_figures(data: dict, out) -> None:
    """Every figure of the report, drawn from the results object; ``out(name)`` is where each goes."""
    from shared.analysis.figures import alpha_em_figure

    pareto_figure(data, out("pareto"))
    capacity_figure(data, out("capacity_curve"))
    curve_figure(data, out("training_curves"))
    j = data["judges"]
    alpha_em_figure([{"label": r["name"], "judgements": r["judgements"]} for r in data["replicates"]],
                    out("alpha_em"), judges=list(dict.fromkeys((j["primary"], j["alternate"]))))


def pareto_figure(data: dict, uri: str) -> None:
    """C against α: each cell's mean over its seeds (or draws) with its replicates as small points."""
    from shared.analysis.figures import PALETTE, REFERENCE_COLOR, new_figure, save

    markers = {"soft": "o", "gcg-system": "^", "gcg-user": "v", "random": "x", "reference": "D"}
    fig, ax = new_figure(7.2, 4.8)
    for point in data.get("reference_points", []):
        ax.scatter(point["c"], point["alpha_primary"], marker="s", color=REFERENCE_COLOR, zorder=2)
        ax.annotate(point["name"], (point["c"], point["alpha_primary"]), fontsize=7, color=REFERENCE_COLOR,
                    xytext=(4, 4), textcoords="offset points")
    by_name = {r["name"]: r for r in data["replicates"]}
    for i, cell in enumerate(data["cells"]):
        if cell["alpha_primary"]["mean"] is None:
            continue
        color = PALETTE[i % len(PALETTE)]
        reps = [by_name[n] for n in cell["replicates"] if by_name[n]["alpha_primary"] is not None]
        if len(reps) > 1:
            ax.scatter([r["c"] for r in reps], [r["alpha_primary"] for r in reps], marker=markers[cell["method"]],
                       color=color, s=14, alpha=0.45, zorder=2)
        ax.scatter(cell["c"]["mean"], cell["alpha_primary"]["mean"], marker=markers[cell["method"]], color=color,
                   s=55, zorder=3, label=f"{cell['cell']} ({cell['method']})")
    means = {c["cell"]: c for c in data["cells"]}
    front = [means[name] for name in data["decisions"]["pareto_front"]]
    if len(front) > 1:
        ax.plot([c["c"]["mean"] for c in front], [c["alpha_primary"]["mean"] for c in front], color="#333333",
                linewidth=0.8, zorder=1, label="Pareto front (sweep cells)")
    gate = data["decisions"]["h2_gate"]
    ax.axhline(gate["alpha_primary_max"], color=REFERENCE_COLOR, linestyle="--", linewidth=1)
    ax.axvline(gate["c_min"], color=REFERENCE_COLOR, linestyle=":", linewidth=1)
    ax.set_xlabel("classifier C (distributional EM match)")
    ax.set_ylabel(f"alignment α ({data['judges']['primary']})")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-2, 102)
    shown = "cell means and the record's reference points (grey)" if data.get("reference_points") else "cell means"
    ax.set_title(f"C vs α: {shown}; small points: seeds / draws; dashed: H2 gate", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    save(fig, uri)


def capacity_series(row: dict) -> str:
    """The line a cell belongs to: soft prefixes by lr (and init text, so an init ablation is its own point),
    GCG and random suffixes by method."""
    if row["method"] != "soft":
        return row["method"]
    init = row.get("init_text")
    return f"soft lr={row['lr']:g}" + ("" if init in (None, DEFAULT_INIT) else f", init {init!r}")


def anchor_label(name: str) -> str:
    return "oracle: the teacher's prompt as text" if name == ORACLE else f"{name} prompt"


def capacity_figure(data: dict, uri: str) -> None:
    """Mean α and mean test-split CE against prompt length, one line per method (and per lr for soft prefixes),
    with each mean's between-seed interval where there is one; the reference conditions' α, the test-split anchors
    and the H2 gate as horizontal lines."""
    from shared.analysis.figures import PALETTE, REFERENCE_COLOR, new_figure, save

    fig, _ = new_figure(10.0, 4.0)
    fig.clf()
    left, right = fig.subplots(1, 2)
    fit_cells = {c["cell"]: c for c in (data.get("fit") or {}).get("cells", [])}
    series: dict[str, list[dict]] = {}
    for cell in data["cells"]:
        if cell["method"] in LEARNED and cell["size"] is not None:
            series.setdefault(capacity_series(cell), []).append(cell)
    markers = {"gcg-system": "^", "gcg-user": "v", "random": "x"}
    for i, (key, cells) in enumerate(sorted(series.items())):
        cells = sorted(cells, key=lambda c: c["size"])
        for ax, value in ((left, lambda c: c["alpha_primary"]),
                          (right, lambda c: fit_cells.get(c["cell"], {}).get("test_ce"))):
            points = [(c["size"], value(c)) for c in cells if value(c) and value(c)["mean"] is not None]
            if not points:
                continue
            sizes, stats = zip(*points, strict=True)
            errors = [[0 if s["low"] is None else s["mean"] - s["low"] for s in stats],
                      [0 if s["high"] is None else s["high"] - s["mean"] for s in stats]]
            ax.errorbar(sizes, [s["mean"] for s in stats], yerr=errors, marker=markers.get(cells[0]["method"], "o"),
                        color=PALETTE[i % len(PALETTE)], label=key, capsize=3)
    left.axhline(data["decisions"]["h2_gate"]["alpha_primary_max"], color=REFERENCE_COLOR, linestyle="--",
                 linewidth=1)
    for cell in data["cells"]:
        if cell["method"] == "reference" and cell["alpha_primary"]["mean"] is not None:
            left.axhline(cell["alpha_primary"]["mean"], color=REFERENCE_COLOR, linestyle=":", linewidth=1)
            left.annotate(cell["cell"], (1.0, cell["alpha_primary"]["mean"]), xycoords=("axes fraction", "data"),
                          xytext=(-2, 2), textcoords="offset points", ha="right", fontsize=7, color=REFERENCE_COLOR)
    fit = data.get("fit")
    if fit and fit.get("test_set"):
        for name, ce in fit["test_set"]["anchors"].items():
            right.axhline(ce, color=REFERENCE_COLOR, linestyle="--" if name == fit["oracle"] else ":", linewidth=1)
            right.annotate(anchor_label(name), (1.0, ce), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                           textcoords="offset points", ha="right", fontsize=7, color=REFERENCE_COLOR)
    sizes = sorted({c["size"] for cells in series.values() for c in cells})
    for ax, label in ((left, f"alignment α ({data['judges']['primary']})"), (right, "test-split CE (nats/token)")):
        ax.set_xscale("log", base=2)
        if sizes:
            ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
            ax.set_xticks(sizes, [str(size) for size in sizes])
            ax.minorticks_off()
        ax.set_xlabel("prompt length (K soft embeddings / L ids)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.25)
    left.set_title("mean α by length, between-seed intervals\n(dashed: H2 gate; dotted: reference cells)", fontsize=9)
    right.set_title("mean test-split CE by length\n(dashed: oracle; dotted: fixed prompts)", fontsize=9)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7, frameon=False)
    save(fig, uri)


def curve_figure(data: dict, uri: str) -> None:
    """Per trained replicate, against the training step: the train CE on each step's fresh teacher samples (left)
    and the held-out (validation) CE with the first validation set's anchors as lines (right)."""
    from shared.analysis.figures import PALETTE, REFERENCE_COLOR, new_figure, save, step_curves

    curves = data["curves"]
    fig, (train_ax, held_ax) = new_figure(11.0, 4.4, ncols=2)
    colors = {cell: PALETTE[i % len(PALETTE)] for i, cell in enumerate(curves)}
    step_curves(train_ax, curves, "train_ce", colors=colors)
    step_curves(held_ax, curves, "heldout_ce", colors=colors, smooth=False)
    fit = data.get("fit")
    if fit and fit["val_sets"]:
        for name, ce in fit["val_sets"][0]["anchors"].items():
            held_ax.axhline(ce, color=REFERENCE_COLOR, linestyle="--" if name == fit["oracle"] else ":", linewidth=1)
            held_ax.annotate(anchor_label(name), (1.0, ce), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                             textcoords="offset points", ha="right", fontsize=7, color=REFERENCE_COLOR)
    train_ax.set_title("train CE on each step's fresh teacher samples\n(GCG: the kept candidate's)", fontsize=9)
    held_ax.set_title("validation CE (dashed: oracle; dotted: fixed prompts,\non the first cell's validation pairs)",
                      fontsize=9)
    for ax in (train_ax, held_ax):
        ax.set_xlabel("training step")
        ax.set_ylabel("CE (nats/token)")
        ax.grid(alpha=0.25)
    if held_ax.get_legend_handles_labels()[0]:
        held_ax.legend(fontsize=7, frameon=False)
    save(fig, uri)
