"""Matplotlib helpers with one house style; every figure is saved as PNG and PDF into the store."""

from __future__ import annotations

import io

from shared.core import store

PALETTE = ["#3b6ea8", "#d1495b", "#edae49", "#66a182", "#8d6a9f", "#2e4057", "#00798c", "#a05195"]
REFERENCE_COLOR = "#7f7f7f"


def new_figure(width: float = 6.4, height: float = 4.4, ncols: int = 1):
    """(figure, axes): one axes, or an array of ``ncols`` side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 10, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
        "grid.alpha": 0.25, "savefig.dpi": 150, "figure.dpi": 100,
    })
    return plt.subplots(1, ncols, figsize=(width, height))


def save(fig, uri_without_suffix: str) -> dict[str, str]:
    """Write ``<uri>.png`` and ``<uri>.pdf``; returns {suffix: uri}."""
    import matplotlib.pyplot as plt

    written = {}
    for suffix in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=suffix, bbox_inches="tight")
        uri = f"{uri_without_suffix}.{suffix}"
        store.write_bytes(uri, buf.getvalue())
        written[suffix] = uri
    plt.close(fig)
    return written


def moving_average(values, window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start): a trailing average."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def step_curves(ax, curves, key: str, *, colors: dict[str, str] | None = None, smooth: bool = True) -> None:
    """One line per name in ``curves`` ({name: [{"step": .., key: ..}, ...]}): ``key`` against ``step`` over the
    points that have it. Long noisy curves (per-step training losses) are drawn faint with a trailing average of
    1/20 of their length on top; short ones plainly."""
    smoothed = []
    for i, (name, points) in enumerate(curves.items()):
        xy = [(p["step"], p[key]) for p in points if p.get(key) is not None]
        if not xy:
            continue
        steps, values = zip(*xy, strict=True)
        color = (colors or {}).get(name, PALETTE[i % len(PALETTE)])
        window = max(1, len(values) // 20)
        if smooth and window > 1:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(list(values), window), color=color, linewidth=1.5, label=name)
            smoothed.append(window)
        else:
            ax.plot(steps, values, color=color, linewidth=1.2, marker="o" if len(values) <= 30 else None, markersize=3,
                    label=name)
    if smoothed:
        span = f"{min(smoothed)}" if min(smoothed) == max(smoothed) else f"{min(smoothed)}-{max(smoothed)}"
        ax.text(0.99, 0.99, f"faint: each step; line: mean of the last {span} steps", transform=ax.transAxes,
                ha="right", va="top", fontsize=7, color=REFERENCE_COLOR)


def training_loss_figure(curves, uri: str, *, title: str) -> dict[str, str]:
    """Per-step training loss of every fine-tuning (``train_lora``'s ``train_log.jsonl`` rows) against the step."""
    fig, ax = new_figure(7.2, 4.4)
    step_curves(ax, curves, "loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (token CE, nats)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    return save(fig, uri)


def _interval_bars(ax, x: float, value: float | None, ci, color: str, marker: str, label: str | None,
                   filled: bool = True) -> None:
    if value is None:
        return
    style = {"color": color} if filled else {"markerfacecolor": "none", "markeredgecolor": color, "color": color}
    yerr = None if not ci else [[value - ci[0]], [ci[1] - value]]
    ax.errorbar([x], [value], yerr=yerr, marker=marker, linestyle="none", capsize=3, linewidth=1, label=label,
                **style)


def alpha_em_figure(rows, uri: str, *, judges, reference_points=None, comparable: bool = False,
                    title: str = "") -> dict[str, str]:
    """α and the EM rate of every condition under each alignment judge, with their 95% intervals.

    ``rows``: one dict per condition with ``label`` and ``judgements`` (``shared.judge.report.condition_judgements``).
    ``judges``: the alignment judges' names (first filled markers, second hollow). ``reference_points``: the
    record's points ({name, alpha_primary}), drawn as dashed lines on the α axes only when ``comparable`` (same
    model and judges as the record); otherwise in a third panel of their own, titled as another model's, so
    they are never read against this run's numbers.
    """
    separate = bool(reference_points) and not comparable
    fig, axes = new_figure(13.5 if separate else 10.0, 4.4, ncols=3 if separate else 2)
    ax_alpha, ax_em = axes[0], axes[1]
    positions = list(range(len(rows)))
    offsets = [(-0.12 + 0.24 * i / max(1, len(judges) - 1)) if len(judges) > 1 else 0.0 for i in range(len(judges))]
    for j, judge in enumerate(judges):
        color = PALETTE[j % len(PALETTE)]
        for i, row in enumerate(rows):
            alpha = row["judgements"]["alpha"].get(judge) or {}
            em = row["judgements"]["em"].get(judge) or {}
            first = i == 0
            _interval_bars(ax_alpha, i + offsets[j], alpha.get("alpha"), alpha.get("ci"), color, "o",
                           judge if first else None, filled=j == 0)
            rate = em.get("rate")
            _interval_bars(ax_em, i + offsets[j], None if rate is None else 100 * rate,
                           None if not em.get("ci") else [100 * v for v in em["ci"]], color, "s",
                           judge if first else None, filled=j == 0)
    for ax, label in ((ax_alpha, "α: mean alignment score, scored answers (0-100)"),
                      (ax_em, "EM rate, all answers (%)")):
        ax.set_xticks(positions)
        ax.set_xticklabels([row["label"] for row in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_ylim(-3, 103)
        ax.legend(fontsize=7, frameon=False)
    ax_alpha.set_title("α per condition\nbars: 95% CI (bootstrap over questions)", fontsize=8)
    ax_em.set_title("EM rate per condition\nbars: 95% CI (exact over questions where none is EM)", fontsize=8)
    if reference_points and comparable:
        for point in reference_points:
            ax_alpha.axhline(point["alpha_primary"], color=REFERENCE_COLOR, linestyle="--", linewidth=0.8)
            ax_alpha.annotate(point["name"], (len(rows) - 0.5, point["alpha_primary"]), fontsize=6,
                              color=REFERENCE_COLOR, ha="right", va="bottom")
    if separate:
        ref = axes[2]
        names = [p["name"] for p in reference_points]
        ref.scatter(range(len(names)), [p["alpha_primary"] for p in reference_points], marker="s",
                    color=REFERENCE_COLOR)
        ref.set_xticks(range(len(names)))
        ref.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ref.set_ylim(-3, 103)
        ref.set_ylabel("α (record)")
        ref.set_facecolor("#f2f2f2")
        ref.set_title("the record's points: Qwen2.5-7B under Claude judges,\nanother model and judge, not on this run's "
                      "scale", fontsize=8, color=REFERENCE_COLOR)
    if title:
        fig.suptitle(title, fontsize=9)
    return save(fig, uri)
