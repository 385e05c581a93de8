"""Figure helpers: the trailing average and the per-step curves the reports draw, on inputs with known answers."""

from __future__ import annotations

import pytest

from shared.analysis.figures import moving_average, new_figure, step_curves, training_loss_figure
from shared.core import store


def test_the_trailing_average_averages_each_value_with_those_before_it():
    assert moving_average([2.0, 4.0, 6.0, 8.0], 2) == [2.0, 3.0, 5.0, 7.0]
    assert moving_average([1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]
    assert moving_average([3.0, 6.0, 9.0, 0.0], 3) == [3.0, 4.5, 6.0, 5.0]


def test_step_curves_draws_each_curve_over_the_points_that_have_the_key():
    fig, ax = new_figure()
    curves = {"short": [{"step": 0, "heldout_ce": 3.0}, {"step": 1, "train_ce": 2.5}, {"step": 2, "heldout_ce": 2.0}],
              "long": [{"step": s, "heldout_ce": 10.0 - s / 10} for s in range(1, 41)]}
    step_curves(ax, curves, "heldout_ce")
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert list(lines["short"].get_xdata()) == [0, 2] and list(lines["short"].get_ydata()) == [3.0, 2.0]
    # 40 points: a faint raw line and a trailing mean over 2 steps carrying the label
    assert len(ax.get_lines()) == 3
    assert list(lines["long"].get_ydata())[-1] == pytest.approx((6.0 + 6.1) / 2)
    assert [t.get_text() for t in ax.texts] == ["faint: each step; line: mean of the last 2 steps"]


def test_the_training_loss_figure_is_written_as_png_and_pdf(tmp_path):
    uri = store.join(store.from_path(tmp_path), "lora_loss")
    written = training_loss_figure({"cell": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]}, uri, title="t")
    assert set(written) == {"png", "pdf"} and store.read_bytes(written["png"]).startswith(b"\x89PNG")
