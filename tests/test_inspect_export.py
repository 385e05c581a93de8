"""Every judged sample readable (issue 21): ``python -m workflows export-inspect RUN`` writes one inspect_ai eval log
per (condition, judge), and inspect_ai's own reader finds every sample with its score and the judge's reply."""

from __future__ import annotations

import pytest

from shared.core import store

pytest.importorskip("inspect_ai")
pytestmark = pytest.mark.slow


def test_every_judge_stage_becomes_one_log_that_inspect_ai_reads_back(issue164_tiny_run, tmp_path, capsys):
    from inspect_ai.log import read_eval_log

    from workflows.__main__ import main

    plan = issue164_tiny_run
    out = tmp_path / "logs"
    assert main(["export-inspect", plan.run_id, "--store", plan.store, "--out", str(out)]) == 0
    assert "inspect view --log-dir" in capsys.readouterr().out
    judge_tasks = [t for t in plan.tasks if t.stage == "judge"]
    assert sorted(p.name for p in out.glob("*.eval")) == sorted(f"{t.config['cell']}.eval" for t in judge_tasks)
    for task in judge_tasks:
        rows = store.read_jsonl(task.output_uri("scores.jsonl"))
        completions = {(c["question_id"], c["sample"]): c for c in store.read_jsonl(task.config["completions_uri"])}
        log = read_eval_log(str(out / f"{task.config['cell']}.eval"))
        assert log.status == "success" and len(log.samples) == len(rows) == log.results.total_samples
        assert log.eval.metadata["run"]["params"]["n_completions"] == 3 and log.eval.metadata["run"]["profile"] == "tiny"
        name = task.config["judge_name"]
        samples = {sample.id: sample for sample in log.samples}
        for row in rows:
            sample = samples[f"{row['question_id']}#{row['sample']}"]
            score = sample.scores[name]
            assert score.value == pytest.approx(row["score"]) and score.explanation == row["reply"]
            assert sample.output.completion == completions[(row["question_id"], row["sample"])]["text"]
            assert sample.metadata["condition"] == row["condition"]


def test_a_run_without_judged_samples_is_one_readable_error(tmp_path, capsys):
    from workflows.__main__ import main

    assert main(["export-inspect", "nothing-here", "--store", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no judged samples in run 'nothing-here'" in err
