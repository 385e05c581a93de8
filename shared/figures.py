"""Matplotlib helpers with one house style; every figure is saved as PNG and PDF into the store."""

from __future__ import annotations

import io

from shared import store

PALETTE = ["#3b6ea8", "#d1495b", "#edae49", "#66a182", "#8d6a9f", "#2e4057", "#00798c", "#a05195"]
REFERENCE_COLOR = "#7f7f7f"


def new_figure(width: float = 6.4, height: float = 4.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 10, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
        "grid.alpha": 0.25, "savefig.dpi": 150, "figure.dpi": 100,
    })
    return plt.subplots(figsize=(width, height))


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
