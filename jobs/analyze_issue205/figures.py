"""Part 3 of ``analyze_issue205``: every figure, drawn from the results object alone."""

from __future__ import annotations

import numpy as np

from jobs.analyze_issue205.results import CONTROLS, GEOMETRY_TITLES

GEOMETRY_PANELS = {
    "M1": "M1 mean off-diagonal raw cosine",
    "M2": "M2 mean abs cos to the E0 EM axis (non-assistant personas)",
    "M3": "M3 held-out LDA accuracy",
}
INVARIANT_ROWS = {
    "M1_dispersion": "M1 between-persona dispersion (shift-invariant)",
    "M2_centred": "M2 on vectors centred on the non-assistant mean (E0 axis)",
}


def seed_values(data: dict, key: str, metric: str, checkpoint: str) -> list[float]:
    """The checkpoint's value of ``metric`` at ``key`` (``method/Llayer``) in every seed (base: the same each time)."""
    return [seeds["geometry"]["values"][key][metric].get(checkpoint, np.nan) for seeds in data["per_seed"].values()]


def bars_with_seeds(ax, x, per_seed: list[list[float]], width, color, label):
    """Bars at the mean over seeds, each seed's value a dot on its bar."""
    means = [float(np.nanmean(v)) if np.any(np.isfinite(v)) else np.nan for v in per_seed]
    ax.bar(x, means, width=width, color=color, label=label)
    for xi, values in zip(x, per_seed, strict=True):
        if len(values) > 1:
            ax.scatter(np.full(len(values), xi), values, s=9, color="black", zorder=3)
    return means


def hero_figure(data: dict, uri: str) -> dict:
    """Top row: the three geometry metrics per checkpoint at the headline layer (both methods; bars: mean over seeds,
    dots: each seed); bottom row: behaviour per EM condition (mean bystander leakage beside the base and benign
    controls, H3's trend, H1's self vs bystander)."""
    from shared.analysis.figures import PALETTE, new_figure, save

    layer, ckpts = data["headline_layer"], data["checkpoints"]
    first = next(iter(data["per_seed"].values()))
    fig, _ = new_figure(13, 7)
    fig.clf()
    grid = fig.subplots(2, 3)
    width = 0.8 / len(data["methods"])
    for col, (metric, title) in enumerate(GEOMETRY_PANELS.items()):
        ax = grid[0, col]
        shown = []
        for mi, method in enumerate(data["methods"]):
            per_seed = [seed_values(data, f"{method}/L{layer}", metric, c) for c in ckpts]
            shown += [v for values in per_seed for v in values if np.isfinite(v)]
            bars_with_seeds(ax, np.arange(len(ckpts)) + mi * width, per_seed, width, PALETTE[mi], f"Method {method}")
        ax.set_xticks(np.arange(len(ckpts)) + 0.4 - width / 2, ckpts, fontsize=8)
        ax.set_title(f"{title} (L{layer})", fontsize=8)
        if metric != "M3" and shown:  # cosines of persona vectors sit close together: zoom onto their range
            spread = max(max(shown) - min(shown), 1e-4)
            ax.set_ylim(max(0.0, min(shown) - 0.5 * spread), min(1.0, max(shown) + 0.3 * spread))
    chance = first["geometry"]["m3_base"][f"{data['methods'][0]}/L{layer}"]["chance"]
    grid[0, 2].axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    for ax in grid[0]:
        ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    behaviours = [s["behaviour"] for s in data["per_seed"].values() if s["behaviour"]]
    if behaviours:
        conds = [c["cond"] for c in behaviours[0]["conditions"]]
        x = np.arange(len(conds))
        em = [[b["conditions"][i]["mean_bystander"] for b in behaviours] for i in range(len(conds))]
        bars_with_seeds(grid[1, 0], x - 0.27, em, 0.27, PALETTE[2], "EM condition")
        for k, control in enumerate(CONTROLS):
            values = [[b["conditions"][i]["controls"].get(control, np.nan) for b in behaviours] for i in range(len(conds))]
            bars_with_seeds(grid[1, 0], x + 0.27 * k, values, 0.27, PALETTE[4 + k], f"{control} (same bystanders)")
        grid[1, 0].set_xticks(x, conds)
        grid[1, 0].set_title("mean bystander leakage per EM condition, beside base and benign", fontsize=8)
        grid[1, 0].legend(fontsize=6, frameon=False)
        cos = [c["cos_to_assistant"] for c in behaviours[0]["conditions"]]
        for b, color in zip(behaviours, PALETTE, strict=False):
            grid[1, 1].scatter(cos, [c["mean_bystander"] for c in b["conditions"]], color=color, s=14)
        for c in behaviours[0]["conditions"]:
            grid[1, 1].annotate(c["cond"], (c["cos_to_assistant"], c["mean_bystander"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        grid[1, 1].set_xlabel("cos(induction persona, assistant)")
        grid[1, 1].set_title("H3: mean bystander leakage vs cos (one colour per seed)", fontsize=8)
        self_rates = [[b["conditions"][i]["per_persona"].get(b["conditions"][i]["persona"], np.nan) for b in behaviours] for i in range(len(conds))]
        bars_with_seeds(grid[1, 2], x, self_rates, 0.4, PALETTE[3], "induction persona")
        bars_with_seeds(grid[1, 2], x + 0.4, em, 0.4, PALETTE[2], "other bystanders")
        grid[1, 2].set_xticks(x + 0.2, conds)
        grid[1, 2].set_title("H1: induction persona vs other bystanders", fontsize=8)
        grid[1, 2].legend(fontsize=7, frameon=False)
        for ax in grid[1]:
            ax.set_ylabel(f"{data['marker']} rate", fontsize=8)
    else:
        for ax in grid[1]:
            ax.set_axis_off()
        grid[1, 1].text(0.5, 0.5, "no behavioural artifacts", ha="center")
    fig.tight_layout()
    return save(fig, uri)


def m1_bars_figure(data: dict, uri: str) -> dict:
    """Raw M1 of every checkpoint at every (method, layer): bars at the mean over seeds, a dot per seed."""
    from shared.analysis.figures import PALETTE, new_figure, save

    methods, layers, ckpts = data["methods"], data["layers"], data["checkpoints"]
    fig, _ = new_figure(2.6 * len(layers), 2.4 * len(methods))
    fig.clf()
    grid = np.atleast_2d(fig.subplots(len(methods), len(layers), squeeze=False))
    for mi, method in enumerate(methods):
        for li, layer in enumerate(layers):
            ax = grid[mi, li]
            per_seed = [seed_values(data, f"{method}/L{layer}", "M1", c) for c in ckpts]
            for i, values in enumerate(per_seed):
                bars_with_seeds(ax, [i], [values], 0.8, PALETTE[i % len(PALETTE)], None)
            shown = [v for values in per_seed for v in values]
            ax.set_xticks(range(len(ckpts)), ckpts, rotation=45, fontsize=7)
            spread = max(max(shown) - min(shown), 1e-4)  # raw cosines of a real model sit within a few thousandths of 1
            ax.set_ylim(max(-1.0, min(shown) - 0.5 * spread), min(1.0, max(shown) + 1.5 * spread))
            ax.set_title(f"Method {method}, L{layer}", fontsize=8)
    fig.suptitle("M1: mean off-diagonal raw persona cosine per checkpoint (bars: mean over seeds, dots: seeds; y zoomed)", fontsize=10)
    fig.tight_layout()
    return save(fig, uri)


def seeds_figure(data: dict, uri: str) -> dict:
    """Per-seed change from base at the headline layer of each EM condition and of benign SFT, for every metric of both
    geometries (methods side by side): the between-seed spread the seed-level tests use."""
    from shared.analysis.figures import PALETTE, new_figure, save

    layer = data["headline_layer"]
    panels = [("raw", "M1"), ("shift_invariant", "M1"), ("raw", "M2"), ("shift_invariant", "M2"), ("raw", "M3")]
    fig, _ = new_figure(7.5, 2.0 * len(panels))
    fig.clf()
    grid = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    names = [*data["em_conditions"], "benign"]
    offsets = np.linspace(-0.2, 0.2, len(data["methods"]))
    for ax, (kind, metric) in zip(grid, panels, strict=True):
        for mi, method in enumerate(data["methods"]):
            for i, name in enumerate(names):
                part = "benign_vs_base" if name == "benign" else "cells"
                values = [next(c["delta"] for c in s["geometry"]["families"][kind][part]
                               if (c["metric"], c["method"], c["layer"], c["condition"]) == (metric, method, layer, name))
                          for s in data["per_seed"].values()]
                ax.scatter(np.full(len(values), i + offsets[mi]), values, color=PALETTE[mi], s=14,
                           label=f"Method {method}" if i == 0 else None)
                if np.any(np.isfinite(values)):
                    ax.hlines(np.nanmean(values), i + offsets[mi] - 0.08, i + offsets[mi] + 0.08, color="black", linewidth=1)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"{metric} ({GEOMETRY_TITLES[kind]}), L{layer}: change from base", fontsize=8)
        ax.legend(fontsize=6, frameon=False)
    fig.suptitle("Change from base per training seed (dots) and its mean over seeds (line)", fontsize=9)
    fig.tight_layout()
    return save(fig, uri)


def shared_shift_figure(data: dict, seed: str, uri: str) -> dict:
    """One seed: M1 and M2 change from base at the headline layer per condition, raw beside shift-invariant, with
    bootstrap CIs (the two geometries' M1 are different statistics: mean cosine vs log dispersion ratio)."""
    from shared.analysis.figures import PALETTE, new_figure, save

    layer, methods = data["headline_layer"], data["methods"]
    conds = [*data["em_conditions"], "benign"]
    families = data["per_seed"][seed]["geometry"]["families"]
    fig, _ = new_figure(4.2 * len(methods), 5.6)
    fig.clf()
    grid = fig.subplots(2, len(methods), squeeze=False)
    for mi, method in enumerate(methods):
        for row, metric in enumerate(("M1", "M2")):
            ax = grid[row, mi]
            for k, kind in enumerate(("raw", "shift_invariant")):
                cells = {c["condition"]: c for c in families[kind]["cells"] + families[kind]["benign_vs_base"]
                         if (c["metric"], c["method"], c["layer"]) == (metric, method, layer)}
                x = np.arange(len(conds)) + (k - 0.5) * 0.38
                delta = np.array([cells[c]["delta"] for c in conds], dtype=float)
                low = np.array([cells[c].get("ci_low", np.nan) for c in conds], dtype=float)
                high = np.array([cells[c].get("ci_high", np.nan) for c in conds], dtype=float)
                ax.bar(x, delta, width=0.38, color=PALETTE[k], label=GEOMETRY_TITLES[kind])
                errors = np.nan_to_num(np.stack([delta - low, high - delta]), nan=0.0)
                ax.errorbar(x, delta, yerr=np.clip(errors, 0, None), fmt="none", ecolor="black", linewidth=0.8, capsize=2)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_xticks(np.arange(len(conds)), conds, fontsize=8)
            ax.set_title(f"{metric} change from base, Method {method}, L{layer}", fontsize=9)
            ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"Seed {seed}: raw vs shift-invariant geometry (bars: change from base; whiskers: {data['ci_level']:.0%} bootstrap CI over "
                 "questions; M1 shift-invariant = log dispersion ratio)", fontsize=8)
    fig.tight_layout()
    return save(fig, uri)


def cosine_matrix_figure(data: dict, seed: str, method: str, uri: str) -> dict:
    """One seed: persona-by-persona cosines of every checkpoint at the headline layer: raw (top), centred over
    personas (middle; the common component removed) and the centred change from base (bottom)."""
    from shared.analysis.figures import new_figure, save
    from shared.analysis.geometry import off_diagonal

    layer, ckpts, personas = data["headline_layer"], data["checkpoints"], data["personas"]
    matrices = data["per_seed"][seed]["geometry"]["cosine_matrices"][f"{method}/L{layer}"]
    mats = {c: {k: np.array(v) for k, v in m.items()} for c, m in matrices.items()}
    raw_low = min(off_diagonal(m["raw"]).min() for m in mats.values())
    change = {c: mats[c]["centred"] - mats["base"]["centred"] for c in ckpts}
    change_max = max(1e-6, max(np.abs(v).max() for v in change.values()))
    panels = [("raw cosine", lambda c: mats[c]["raw"], raw_low, 1.0, "viridis"),
              ("centred cosine", lambda c: mats[c]["centred"], -1.0, 1.0, "RdBu_r"),
              ("centred, change from base", lambda c: change[c], -change_max, change_max, "PuOr_r")]
    fig, _ = new_figure(1.9 * len(ckpts) + 1.5, 6.6)
    fig.clf()
    # fixed margins and one colour-bar axis per row: a layout engine costs more than the drawing here
    fig.subplots_adjust(left=0.09, right=0.9, bottom=0.16, top=0.9, wspace=0.08, hspace=0.12)
    grid = fig.subplots(len(panels), len(ckpts), squeeze=False)
    for row, (label, matrix_of, vmin, vmax, cmap) in enumerate(panels):
        for col, ckpt in enumerate(ckpts):
            ax = grid[row, col]
            ax.grid(False)
            image = ax.imshow(matrix_of(ckpt), vmin=vmin, vmax=vmax, cmap=cmap)
            ax.set_xticks(range(len(personas)), personas if row == len(panels) - 1 else [], rotation=90, fontsize=6)
            ax.set_yticks(range(len(personas)), personas if col == 0 else [], fontsize=6)
            if row == 0:
                ax.set_title(ckpt, fontsize=9)
        box = grid[row, -1].get_position()
        fig.colorbar(image, cax=fig.add_axes((0.915, box.y0, 0.012, box.height)), label=label)
    fig.suptitle(f"Seed {seed}: persona-by-persona cosine of the persona vectors, Method {method}, layer {layer}", fontsize=10)
    return save(fig, uri)


def leakage_heatmap(data: dict, uri: str) -> dict:
    """Marker rate per persona: a row per EM condition and seed, then the base and benign controls."""
    from matplotlib.patches import Rectangle

    from shared.analysis.figures import new_figure, save

    personas = data["personas"]
    rows, labels, own = [], [], []
    for seed, result in data["per_seed"].items():
        beh = result["behaviour"]
        if not beh:
            continue
        for c in beh["conditions"]:
            rows.append([c["per_persona"][p] for p in personas])
            labels.append(f"{c['cond']} s{seed}")
            own.append(c["persona"])
    matrix = np.array(rows)
    fig, ax = new_figure(1 + 0.7 * len(personas), 1 + 0.4 * len(rows))
    ax.grid(False)
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(personas)), personas, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for (r, col), value in np.ndenumerate(matrix):
        ax.text(col, r, f"{value:.2f}", ha="center", va="center", fontsize=5, color="white" if value < 0.5 else "black")
    for r, persona in enumerate(own):  # the condition's own induction persona (H1), where the grid has it
        if persona in personas:
            ax.add_patch(Rectangle((personas.index(persona) - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    fig.colorbar(image, ax=ax, label=f"{data['marker']} rate")
    ax.set_title("marker leakage per persona (rows: EM-induction condition and seed; red: its induction persona)", fontsize=9)
    return save(fig, uri)


def figures(data: dict, out, trainings: dict | None = None) -> list[str]:
    """Every figure of the report, drawn from the results object; ``out(name)`` gives a figure's URI prefix and
    ``trainings`` the per-step losses (``train_log.jsonl`` rows) by fine-tuning label. Returns the names drawn."""
    from shared.analysis.figures import training_loss_figure

    drawn = ["hero_issue205", "m1_bars", "seeds"]
    hero_figure(data, out("hero_issue205"))
    m1_bars_figure(data, out("m1_bars"))
    seeds_figure(data, out("seeds"))
    for seed in data["per_seed"]:
        shared_shift_figure(data, seed, out(f"shared_shift_s{seed}"))
        drawn.append(f"shared_shift_s{seed}")
    first = next(iter(data["per_seed"]))  # the matrices of the other seeds are summarised in the report's table
    for method in data["methods"]:
        cosine_matrix_figure(data, first, method, out(f"cosine_matrices_{method}_s{first}"))
        drawn.append(f"cosine_matrices_{method}_s{first}")
    if any(s["behaviour"] for s in data["per_seed"].values()):
        leakage_heatmap(data, out("leakage_heatmap"))
        drawn.append("leakage_heatmap")
    if trainings:
        training_loss_figure(trainings, out("lora_loss"), title="LoRA training loss per fine-tuning and seed")
        drawn.append("lora_loss")
    return drawn
