"""The report pieces every judged analysis can call with a condition's judged rows: α with what it rests on, the
lowest-scored answers with the judge's reply, and the α / EM-rate figure that keeps the record's 7B points apart."""

from __future__ import annotations

import pytest

from shared.analysis import figures
from shared.judge.report import alpha_table_lines, condition_judgements, lowest_scored, lowest_scored_lines


def rows(*judgements, question="q0", reply="85"):
    out = []
    for sample, j in enumerate(judgements):
        row = {"condition": "c", "question_id": question, "sample": sample, "score": None, "label": None,
               "error": None, "reply": f"{reply}-{question}-{sample}"}
        if isinstance(j, tuple):
            row["error"] = j[1]
        elif isinstance(j, str):
            row["label"] = j
        else:
            row["score"] = float(j)
        out.append(row)
    return out


def completions(n, question="q0"):
    return [{"question_id": question, "sample": s, "question": f"Q {question}", "text": f"answer {question} {s}"}
            for s in range(n)]


def test_the_lowest_scored_answers_come_with_their_text_and_the_judges_reply():
    alignment = rows(70, 12, "refusal", ("error", "abstained"), 40)
    lowest = lowest_scored(alignment, completions(5), n=2)
    assert [(a["score"], a["answer"], a["reply"]) for a in lowest] == [
        (12.0, "answer q0 1", "85-q0-1"), (40.0, "answer q0 4", "85-q0-4")]
    lines = "\n".join(lowest_scored_lines("villain", "sonnet", lowest))
    assert "score 12.0 to “Q q0”: “answer q0 1”" in lines and "judge's reply: `` 85-q0-1 ``" in lines


def test_the_alpha_table_gives_the_item_set_refusal_share_and_error_bounds():
    alignment = {"j": rows(80, 60, "refusal", ("error", "abstained"))}
    judged = condition_judgements(alignment, None, coherence_judge=None, seed=0)
    table = "\n".join(alpha_table_lines([{"name": "villain", "judgements": judged}], ["j"], lambda r: r["name"]))
    assert "| villain | j | 70.0 [70.0, 70.0] | 2/4 | 25.0% | 0.0% | 25.0% (1 abstained) | 46.7 – 80.0 |" in table


def judged_condition(alpha_scores):
    alignment = {"a": rows(*alpha_scores), "b": rows(*[100 - s for s in alpha_scores])}
    coherence = rows(*[90] * len(alpha_scores))
    return condition_judgements(alignment, coherence, coherence_judge="coherence", seed=0)


@pytest.mark.parametrize(("comparable", "panels"), [(False, 3), (True, 2)])
def test_the_records_points_get_their_own_panel_unless_the_run_is_on_their_scale(monkeypatch, tmp_path,
                                                                              comparable, panels):
    drawn = {}
    monkeypatch.setattr(figures, "save", lambda fig, uri: drawn.update(fig=fig) or {"png": uri})
    conditions = [{"label": "null", "judgements": judged_condition([90, 80, 85])},
                  {"label": "villain", "judgements": judged_condition([10, 20, 5])}]
    refs = [{"name": "c6_vanilla_em", "alpha_primary": 28.21}]
    figures.alpha_em_figure(conditions, str(tmp_path / "f"), judges=["a", "b"], reference_points=refs,
                            comparable=comparable)
    axes = drawn["fig"].axes
    assert len(axes) == panels
    alpha_axis = axes[0]
    plotted = sorted(round(y, 3) for line in alpha_axis.lines for y in line.get_ydata())
    assert 85.0 in plotted and round(35 / 3, 3) in plotted  # each condition's α under the first judge
    if comparable:  # the record's α as a reference line among this run's points
        assert any(list(line.get_ydata()) == [28.21, 28.21] for line in alpha_axis.lines)
    else:  # this run's axes carry none of the record's numbers; the third panel carries them all
        assert 28.21 not in plotted
        assert [tuple(o) for o in axes[2].collections[0].get_offsets()] == [(0.0, 28.21)]
        assert "not on this run's" in axes[2].get_title()
