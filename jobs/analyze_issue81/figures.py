"""Part 3 of ``analyze_issue81``: every figure, drawn from the results object alone."""

from __future__ import annotations

import itertools

import numpy as np

from jobs.analyze_issue81.results import _quietly

# ---------------------------------------------------------------------------------------------------------------
# part 3: figures, drawn from the results object alone. Leakage is the mean over the training seeds. Low-coherence
# cells are marked wherever a cell is drawn: hatched in the matrix panels, a black "x" on the line panels; line-panel
# means are over the coherent cells only. Each figure function returns the written URIs and ``marked``, the number
# of low-coherence cells it marked.

HATCH_NOTE = "hatched: low coherence"


def _flagged(data: dict, source: str) -> set[str]:
    """Bystanders marked low-coherence for ``source``: flagged under any of its seeds (the figures draw seed means)."""
    return set(data["seed_mean"]["flagged"].get(source, []))


def _seed_note(data: dict) -> str:
    return "one training seed" if data["n_seeds"] == 1 else f"mean over {data['n_seeds']} training seeds"


def _hatch(ax, x: float, y: float) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="xxx", edgecolor="#808080", linewidth=0))


def _cell_text(ax, x: float, y: float, value: float, digits: int = 2) -> None:
    text = "—" if not np.isfinite(value) else f"{value:.{digits}f}"
    ax.text(x, y, text, ha="center", va="center", fontsize=8,
            color="white" if np.isfinite(value) and abs(value) > 0.55 else "black")


def _short(bystander: str) -> str:
    return bystander.replace("A1__", "").replace("A2__", "A2 ").replace("__", " ")


def heatmap_figure(data: dict, uri: str) -> dict:
    from shared.analysis.figures import new_figure, save

    sources = [s["name"] for s in data["sources"]]
    ids = data["bystander_ids"]
    matrix = np.array([[data["seed_mean"]["base_subtracted"][s].get(b, np.nan) for b in ids] for s in sources])
    fig, ax = new_figure(width=max(6.0, 0.11 * len(ids) + 2), height=1.6 + 0.45 * len(sources))
    ax.grid(False)
    image = ax.imshow(matrix, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    marked = 0
    for i, s in enumerate(sources):
        for j, b in enumerate(ids):
            if b in _flagged(data, s):
                _hatch(ax, j, i)
                marked += 1
    # a thin line between the bystander nouns' blocks and before the pure-noun / QC columns
    prefixes = [b.split("__")[1] if b.startswith("A1__") else b.split("__")[0] for b in ids]
    for j in range(1, len(ids)):
        if prefixes[j] != prefixes[j - 1]:
            ax.axvline(j - 0.5, color="black", linewidth=0.6)
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xticks(range(len(ids)), [_short(b) for b in ids], rotation=90, fontsize=4)
    ax.set_xlabel("bystander (noun, Big-5 trait, level; then the pure nouns and the assistant QC)", fontsize=8)
    ax.set_ylabel("trained source")
    ax.set_title(f"{data['marker']} emission minus base model ({len(sources)} sources x {len(ids)} bystanders, "
                 f"{_seed_note(data)}; {HATCH_NOTE})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01, label="rate - base rate")
    return {**save(fig, uri), "marked": marked}


def _house_style():
    """pyplot with the house style applied (``new_figure`` sets it); for figures with several panels."""
    import matplotlib.pyplot as plt

    from shared.analysis.figures import new_figure

    plt.close(new_figure()[0])
    return plt


def _per_source_axes(n: int, width_each: float = 3.2, height: float = 3.0):
    fig, axes = _house_style().subplots(1, n, figsize=(width_each * n, height), squeeze=False, sharey=True)
    return fig, axes[0]


def _cube_of(data: dict, source: str, *, coherent_only: bool = False) -> np.ndarray:
    axes = data["axes"]
    sub = data["seed_mean"]["base_subtracted"][source]
    drop = _flagged(data, source) if coherent_only else set()
    return np.array([[[np.nan if f"A1__{n}__{t}__{lv}" in drop else sub.get(f"A1__{n}__{t}__{lv}", np.nan)
                       for lv in axes["levels"]] for t in axes["traits"]] for n in axes["nouns"]])


def _flag_cube(data: dict, source: str) -> np.ndarray:
    axes, drop = data["axes"], _flagged(data, source)
    return np.array([[[f"A1__{n}__{t}__{lv}" in drop for lv in axes["levels"]] for t in axes["traits"]]
                     for n in axes["nouns"]])


def _mark_legend(ax, marked: int) -> None:
    if marked:
        ax.plot([], [], "x", color="black", label="low coherence")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))


def noun_isolation_figure(data: dict, uri: str) -> dict:
    from shared.analysis.figures import PALETTE, save

    axes, sources = data["axes"], [s["name"] for s in data["sources"]]
    fig, panels = _per_source_axes(len(sources))
    x = np.arange(len(axes["nouns"]))
    marked = 0
    for ax, source in zip(panels, sources, strict=True):
        cube, flags = _cube_of(data, source), _flag_cube(data, source)
        for j, trait in enumerate(axes["traits"]):
            for k in range(len(axes["levels"])):
                ax.plot(x, cube[:, j, k], color=PALETTE[j % len(PALETTE)], alpha=0.45, linewidth=0.8,
                        label=trait if k == 0 else None)
                ax.plot(x[flags[:, j, k]], cube[flags[:, j, k], j, k], "x", color="black", markersize=5)
                marked += int(flags[:, j, k].sum())
        coherent = _cube_of(data, source, coherent_only=True)
        ax.plot(x, _quietly(np.nanmean, coherent.reshape(len(x), -1), axis=1), color="black", linewidth=2,
                label="mean (coherent cells)")
        ax.set_xticks(x, axes["nouns"], rotation=45)
        ax.set_xlabel("bystander noun")
        ax.set_title(f"source: {source}", fontsize=9)
    panels[0].set_ylabel("emission - base\n(one line per trait x level; noun swept)")
    _mark_legend(panels[-1], marked)
    fig.suptitle(f"Label isolation: trait and level fixed, the noun swept ({_seed_note(data)})", fontsize=10)
    fig.tight_layout()
    return {**save(fig, uri), "marked": marked}


def trait_gradation_figure(data: dict, uri: str) -> dict:
    from shared.analysis.figures import PALETTE, save

    axes, sources = data["axes"], [s["name"] for s in data["sources"]]
    fig, panels = _per_source_axes(len(sources))
    x = np.arange(1, len(axes["levels"]) + 1)
    marked = 0
    for ax, source in zip(panels, sources, strict=True):
        coherent, flags = _cube_of(data, source, coherent_only=True), _flag_cube(data, source)
        for j, trait in enumerate(axes["traits"]):
            mean = _quietly(np.nanmean, coherent[:, j, :], axis=0)
            ax.plot(x, mean, marker="o", color=PALETTE[j % len(PALETTE)], label=trait)
            some = flags[:, j, :].any(axis=0) & np.isfinite(mean)
            ax.plot(x[some], mean[some], "x", color="black", markersize=7)
            marked += int(flags[:, j, :].sum())
        ax.set_xticks(x, axes["levels"])
        ax.set_xlabel("gradation level (L1 very low ... L5 very high)", fontsize=8)
        ax.set_title(f"source: {source}", fontsize=9)
    panels[0].set_ylabel("emission - base\n(mean over the coherent nouns)")
    _mark_legend(panels[-1], marked)
    fig.suptitle(f"Trait gradation: the noun fixed, trait and level swept ({_seed_note(data)}; x: a low-coherence "
                 "noun left out)",
                 fontsize=10)
    fig.tight_layout()
    return {**save(fig, uri), "marked": marked}


def interaction_figure(data: dict, uri: str) -> dict:
    from shared.analysis.figures import save

    axes, sources = data["axes"], [s["name"] for s in data["sources"]]
    fig, panels = _per_source_axes(len(sources), height=3.2)
    marked = 0
    for ax, source, info in zip(panels, sources, data["sources"], strict=True):
        ax.grid(False)
        effect = np.array(data["seed_mean"]["noun_effect"].get(source) or
                          np.full((len(axes["traits"]), len(axes["levels"])), np.nan), dtype=float)
        image = ax.imshow(effect, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        flags = _flag_cube(data, source)
        own = axes["nouns"].index(info["noun"]) if info["noun"] in axes["nouns"] else None
        for j, k in itertools.product(range(len(axes["traits"])), range(len(axes["levels"]))):
            if (own is not None and flags[own, j, k]) or not np.isfinite(effect[j, k]):
                _hatch(ax, k, j)
                marked += 1
        ax.set_xticks(range(len(axes["levels"])), axes["levels"])
        ax.set_yticks(range(len(axes["traits"])), axes["traits"], fontsize=7)
        ax.set_title(f"noun effect, source: {source}", fontsize=9)
    fig.colorbar(image, ax=list(panels), fraction=0.03, label="median |Δ| over noun swaps")
    fig.suptitle(f"Interaction: the noun effect per trait x level ({HATCH_NOTE} / not computable)", fontsize=10,
                 y=1.04)
    return {**save(fig, uri), "marked": marked}


def _head_to_head_bars(ax, data: dict, metric: str, ylabel: str, title: str) -> None:
    from shared.analysis.figures import PALETTE

    traits = list(data["head_to_head"])
    x = np.arange(len(traits))
    adj = [data["head_to_head"][t].get(f"adjective_{metric}") or 0 for t in traits]
    swap = [data["head_to_head"][t].get(f"noun_swap_{metric}") or 0 for t in traits]
    ax.bar(x - 0.2, adj, 0.4, color=PALETTE[0], label="adjective (with vs without)")
    ax.bar(x + 0.2, swap, 0.4, color=PALETTE[1], label="noun swap")
    ax.set_xticks(x, traits, rotation=30, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)


def hero_figure(data: dict, uri: str) -> dict:
    from shared.analysis.figures import PALETTE, REFERENCE_COLOR, save

    sources = [s["name"] for s in data["sources"]]
    nouns = [n for n in data["axes"]["nouns"] if f"A2__{n}" in data["bystander_ids"]]
    geometry = data["geometry"]
    fig, grid = _house_style().subplots(2, 2, figsize=(12, 8.4))
    (matrix_ax, scatter_ax), (leak_ax, cos_ax) = grid
    matrix = np.array([[data["seed_mean"]["base_subtracted"][s].get(f"A2__{n}", np.nan) for n in nouns] for s in sources])
    matrix_ax.grid(False)
    image = matrix_ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    marked = 0
    for i, s in enumerate(sources):
        for j, n in enumerate(nouns):
            _cell_text(matrix_ax, j, i, matrix[i, j])
            if f"A2__{n}" in _flagged(data, s):
                _hatch(matrix_ax, j, i)
                marked += 1
    matrix_ax.set_xticks(range(len(nouns)), [f"You are a {n}." for n in nouns], rotation=30, fontsize=8)
    matrix_ax.set_yticks(range(len(sources)), sources)
    matrix_ax.set_ylabel("trained source")
    matrix_ax.set_title(f"source x pure-noun bystander: emission - base ({_seed_note(data)}; {HATCH_NOTE})", fontsize=9)
    fig.colorbar(image, ax=matrix_ax, fraction=0.046, pad=0.04)

    h4 = geometry.get("h4")
    if h4:
        cos, leak = np.array(h4["cos"], dtype=float), np.array(h4["leak"], dtype=float)
        for i, info in enumerate(data["sources"]):
            for j, n in enumerate(h4["nouns"]):
                same = info["noun"] == n
                scatter_ax.scatter(cos[i, j], leak[i, j], color=REFERENCE_COLOR if same else PALETTE[i % len(PALETTE)],
                                   marker="s" if same else "o", s=36, label=None if same else info["name"])
        scatter_ax.scatter([], [], color=REFERENCE_COLOR, marker="s", label="own noun (diagonal)")
        rho = h4["off_diagonal"].get("rho")
        scatter_ax.set_title(f"H4: base-model cos (layer {geometry['headline_layer']}) vs leakage"
                             + (f", off-diagonal ρ={rho:.2f} (n={h4['off_diagonal']['n']})" if rho is not None else ""),
                             fontsize=9)
        scatter_ax.set_xlabel("cos(source, pure-noun bystander)")
        scatter_ax.set_ylabel("emission - base")
        handles, labels = scatter_ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        scatter_ax.legend(unique.values(), unique.keys(), fontsize=7, frameon=False, title="source", title_fontsize=7)
    else:
        scatter_ax.set_axis_off()
        scatter_ax.text(0.5, 0.5, "H4: no base-model centroids", ha="center", va="center")

    _head_to_head_bars(leak_ax, data, "leak", "mean |Δ emission - base|", "adjective vs noun effect on leakage, per Big-5 axis")
    if geometry.get("available"):
        _head_to_head_bars(cos_ax, data, "cos", f"mean |Δ cos to source| (layer {geometry['headline_layer']})",
                           "adjective vs noun effect on base-model cosine, per Big-5 axis")
    else:
        cos_ax.set_axis_off()
    fig.tight_layout()
    return {**save(fig, uri), "marked": marked}


def cosine_leakage_figure(data: dict, uri: str) -> dict:
    """Per source, every bystander: base-model cosine to the source (headline layer) against emission - base.

    Colour is the bystander's noun; squares are the pure nouns, the star the source's own pure noun (cos = 1 by
    construction: it is the source's prompt), the diamond the assistant QC; a black x marks a low-coherence cell.
    The title's ρ is H4's per-source Spearman over the coherent bystanders other than the source's own."""
    from shared.analysis.figures import PALETTE, REFERENCE_COLOR, save

    geometry, sources = data["geometry"], data["sources"]
    fig, panels = _per_source_axes(len(sources), width_each=3.6, height=3.4)
    if not geometry.get("available"):
        for ax in panels:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no base-model centroids", ha="center", va="center")
        return {**save(fig, uri), "marked": 0}
    nouns = data["axes"]["nouns"]
    colour = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(nouns)}
    marked = 0
    for ax, info in zip(panels, sources, strict=True):
        source, cos, leak = info["name"], geometry["cos_to_source"][info["name"]], data["seed_mean"]["base_subtracted"][info["name"]]
        flagged = _flagged(data, source)
        for b in data["bystander_ids"]:
            x, y = cos.get(b), leak.get(b)
            if x is None or y is None or not np.isfinite(x):
                continue
            kind, noun = (b.split("__") + [None])[:2] if b.startswith(("A1__", "A2__")) else ("QC", None)
            if kind == "A2" and noun == info["noun"]:
                ax.scatter(x, y, marker="*", s=140, color=colour.get(noun, REFERENCE_COLOR), edgecolor="black",
                           linewidth=0.6, zorder=3)
            elif kind == "A2":
                ax.scatter(x, y, marker="s", s=40, color=colour.get(noun, REFERENCE_COLOR), edgecolor="black",
                           linewidth=0.6, zorder=3)
            elif kind == "QC":
                ax.scatter(x, y, marker="D", s=40, color=REFERENCE_COLOR, edgecolor="black", linewidth=0.6, zorder=3)
            else:
                ax.scatter(x, y, marker="o", s=16, color=colour.get(noun, REFERENCE_COLOR), alpha=0.75, linewidth=0)
            if b in flagged:
                ax.plot(x, y, "x", color="black", markersize=7, zorder=4)
                marked += 1
        fit = geometry["h4"]["cos_vs_leak_all_bystanders"].get(source, {})
        rho = "" if fit.get("rho") is None else f"\nρ={fit['rho']:.2f}, p={fit['p_value']:.3g}, n={fit['n']}"
        ax.set_title(f"source: {source}{rho}", fontsize=9)
        ax.set_xlabel(f"cos(source, bystander), layer {geometry['headline_layer']}", fontsize=8)
    panels[0].set_ylabel(f"{data['marker']} emission - base")
    for noun in nouns:
        panels[-1].scatter([], [], marker="o", color=colour[noun], label=f"{noun} (A1)")
    panels[-1].scatter([], [], marker="s", color="white", edgecolor="black", label="pure noun (A2)")
    panels[-1].scatter([], [], marker="*", s=100, color="white", edgecolor="black", label="source's own noun")
    panels[-1].scatter([], [], marker="D", color=REFERENCE_COLOR, edgecolor="black", label="assistant (QC)")
    _mark_legend(panels[-1], marked)
    fig.suptitle(f"Leakage against base-model cosine to the source, every bystander ({len(data['bystander_ids'])} "
                 f"per source; {_seed_note(data)})", fontsize=10)
    fig.tight_layout()
    return {**save(fig, uri), "marked": marked}


# ---------------------------------------------------------------------------------------------------------------


LEAKAGE_PANELS = {"own": "own pure noun (implantation)", "others": "every other bystander, minus base",
                  "assistant": "assistant QC, minus base"}


def leakage_per_seed_figure(data: dict, uri: str) -> dict:
    """Per source: each seed's leakage with its question-clustered interval, and the mean over seeds with the
    between-seed t interval (seeds as the unit; none with one seed)."""
    from shared.analysis.figures import PALETTE, save

    sources, seeds = [s["name"] for s in data["sources"]], data["seeds"]
    fig, panels = _house_style().subplots(1, len(LEAKAGE_PANELS), figsize=(4.2 * len(LEAKAGE_PANELS), 3.4),
                                          squeeze=False)
    offsets = np.linspace(-0.25, 0.25, len(seeds) + 1)
    for ax, (key, title) in zip(panels[0], LEAKAGE_PANELS.items(), strict=True):
        for i, source in enumerate(sources):
            rows = data["leakage"][source]
            for j, seed in enumerate(seeds):
                row = rows["per_seed"][str(seed)].get(key)
                if row and row["estimate"] is not None:
                    ax.errorbar(i + offsets[j], row["estimate"],
                                yerr=[[row["estimate"] - row["low"]], [row["high"] - row["estimate"]]], fmt="o",
                                color=PALETTE[j % len(PALETTE)], markersize=4, capsize=2,
                                label=f"seed {seed}" if i == 0 else None)
            between = rows["between_seeds"].get(key)
            if between and len(seeds) > 1:
                low, high = between["low"], between["high"]
                ax.errorbar(i + offsets[-1], between["mean"],
                            yerr=None if low is None else [[between["mean"] - low], [high - between["mean"]]],
                            fmt="s", color="black", markersize=5, capsize=3, label="mean over seeds" if i == 0 else None)
        ax.axhline(0, color="#808080", linewidth=0.6)
        ax.set_xticks(range(len(sources)), sources)
        ax.set_title(title, fontsize=9)
    panels[0][0].set_ylabel(f"{data['marker']} rate")
    panels[0][-1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"Leakage per source: each seed with its {data['settings']['confidence_pct']:g}% question-clustered "
                 "interval; the mean with the between-seed t interval", fontsize=10)
    fig.tight_layout()
    return {**save(fig, uri), "marked": 0}


FIGURES = {"hero_matrix": hero_figure, "heatmap_base_subtracted": heatmap_figure, "noun_isolation": noun_isolation_figure,
           "trait_gradation": trait_gradation_figure, "interaction": interaction_figure,
           "cosine_leakage": cosine_leakage_figure, "leakage_per_seed": leakage_per_seed_figure}


def draw_figures(res: dict, out) -> dict:
    """Every figure of the report from the results object; ``out(name)`` is where a figure's files go. Returns, per
    figure, its files and the number of low-coherence cells it marked (which the report prints)."""
    from shared.analysis.figures import training_loss_figure

    drawn = {name: draw(res, out(name)) for name, draw in FIGURES.items()}
    figures = {name: {"png": f["png"], "pdf": f["pdf"], "low_coherence_marked": f["marked"]} for name, f in drawn.items()}
    if res["training"]:
        written = training_loss_figure(res["training_curves"], out("lora_loss"),
                                       title="marker-only LoRA training loss per source and seed")
        figures["lora_loss"] = {"png": written["png"], "pdf": written["pdf"], "low_coherence_marked": 0}
    return figures
