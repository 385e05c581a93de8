"""Matplotlib helpers with one house style; every figure is saved as PNG and PDF into the store."""

from __future__ import annotations

import io

from shared import store

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
