"""Part 3 of ``analyze_issue164``: every figure, drawn from the results object alone."""

from __future__ import annotations


def figures(data: dict, out) -> dict:
    """Every figure of the report, drawn from the results object only; ``out(name)`` is where one goes."""
    from shared.analysis.figures import alpha_em_figure

    labelled = [{"label": condition_label(data)(r["condition"]), "judgements": r["judgements"]}
                for r in data["conditions"]]
    return {
        "c_vs_alpha": c_vs_alpha_figure(data, out("c_vs_alpha")),
        "alpha_em": alpha_em_figure(labelled, out("alpha_em"),
                                    judges=[data["judges"]["primary"], data["judges"]["alternate"]],
                                    reference_points=data["reference_points"],
                                    comparable=data["comparable_with_record"]),
    }


def c_vs_alpha_figure(data: dict, uri: str) -> dict:
    """Left: the record's reference points on the full scales, with this run's conditions only where the run is on
    the record's scale (full profile, Claude judges); otherwise alone, titled as another model's. Right: this run's
    conditions, both judges, with 95% CIs over questions."""
    from shared.analysis.figures import PALETTE, REFERENCE_COLOR, new_figure, save

    fig, ax = new_figure(12.5, 4.6)
    grid = fig.add_gridspec(1, 2, wspace=0.25)
    ax.set_subplotspec(grid[0])
    zoom = fig.add_subplot(grid[1])
    comparable = data["comparable_with_record"]
    for point in data["reference_points"]:
        ax.scatter(point["c"], point["alpha_primary"], marker="s", color=REFERENCE_COLOR, zorder=2)
        right_edge = point["c"] > 0.7  # label to the left so it stays inside the axes
        ax.annotate(point["name"], (point["c"], point["alpha_primary"]), fontsize=7, color=REFERENCE_COLOR,
                    xytext=(-4 if right_edge else 4, 4), textcoords="offset points",
                    ha="right" if right_edge else "left")
    ax.axhline(data["decisions"]["em_target_alpha"], color=REFERENCE_COLOR, linestyle="--", linewidth=1)
    for i, row in enumerate(data["conditions"]):
        color = PALETTE[i % len(PALETTE)]
        marker, size = ("*", 120) if row["role"] == "em_reference" else ("o", 50)
        for judge, filled in (("primary", True), ("alternate", False)):
            alpha = row[f"alpha_{judge}"]
            if alpha is None:
                continue
            style = {"color": color} if filled else {"facecolors": "none", "edgecolors": color}
            if comparable:
                ax.scatter(row["c"], alpha, s=size, marker=marker, zorder=3, **style)
            zoom.scatter(row["c"], alpha, s=size, marker=marker, zorder=3, **style,
                         label=f"{row['condition']} ({data['judges'][judge]})")
            c_ci, a_ci = row.get("c_ci"), row.get(f"alpha_{judge}_ci")
            if c_ci and a_ci:
                zoom.errorbar(row["c"], alpha, xerr=[[row["c"] - c_ci[0]], [c_ci[1] - row["c"]]],
                              yerr=[[alpha - a_ci[0]], [a_ci[1] - alpha]], color=color, linewidth=0.8, capsize=2,
                              linestyle="none" if filled else ":", alpha=1.0 if filled else 0.6, zorder=2)
    for axis in (ax, zoom):
        axis.set_xlabel("classifier C (distributional EM match)")
        axis.set_ylabel("alignment score α (0-100)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-2, 102)
    if comparable:
        ax.set_title("full scales: this run among the record's reference points (grey squares;\n"
                     "dashed line: EM target)", fontsize=8)
    else:
        ax.set_facecolor("#f2f2f2")
        ax.set_title("the record's points only: Qwen2.5-7B under Claude judges, another model\nand judge than "
                     "this run (not on its scale; this run is on the right)", fontsize=8, color=REFERENCE_COLOR)
    zoom.set_title("this run: filled primary, hollow alternate judge, star EM reference;\n"
                   "bars: 95% CIs from a bootstrap over questions", fontsize=8)
    if zoom.get_legend_handles_labels()[0]:
        zoom.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:  # every condition's α is missing: say why instead of an empty plot
        zoom.text(0.5, 0.5, "no α in this run: the judges scored no answer\n(see the report's α section)",
                  transform=zoom.transAxes, ha="center", va="center", fontsize=9, color=REFERENCE_COLOR)
    return save(fig, uri)


def condition_label(data: dict):
    """How the report names a condition: the EM reference says that it is one."""
    em_reference = {r["condition"] for r in data["conditions"] if r["role"] == "em_reference"}
    return lambda name: f"{name} (EM reference)" if name in em_reference else name
