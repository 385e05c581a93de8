"""Runs side by side (``python -m workflows compare``, ``make compare``): the headline metrics per condition, the
runs' profile, commit and config hash, and what differs between their configs."""

from __future__ import annotations

import csv
import io
import shutil
from urllib.parse import unquote, urlparse

import pytest

from shared.core import store
from workflows.compare import compare, headline_metrics, to_csv, to_markdown


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from workflows.__main__ import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_headline_metrics_name_each_number_by_its_condition():
    headline = {
        "conditions": [
            {"condition": "null", "alpha": 80.5, "ci": [78.0, 83.0], "per_judge": [{"judge": "opus", "alpha": 79.0}]},
            {"condition": "villain", "alpha": 41.0, "ci": [38.0, 44.0], "per_judge": [{"judge": "opus", "alpha": 40.0}]},
        ],
        "classifier": {"val_accuracy": 0.9, "uri": "s3://b/runs/r/classifier.joblib", "sha": "ab" * 32},
        "decisions": {"verdict": "H1 holds", "passing": ["villain"], "curve": list(range(20))},
        "params": {"n": 20},  # compared as config, not as a metric
        "missing": None,
    }
    assert headline_metrics(headline) == {
        ("conditions.alpha", "null"): 80.5, ("conditions.ci", "null"): (78.0, 83.0),
        ("conditions.per_judge[opus].alpha", "null"): 79.0,
        ("conditions.alpha", "villain"): 41.0, ("conditions.ci", "villain"): (38.0, 44.0),
        ("conditions.per_judge[opus].alpha", "villain"): 40.0,
        ("classifier.val_accuracy", ""): 0.9,
        ("decisions.verdict", ""): "H1 holds", ("decisions.passing", ""): ("villain",),
    }


def write_run(root: str, run_id: str, *, alpha: dict[str, float], params: dict, gen_code: str, gen_key: str,
              extra_task: bool = False) -> None:
    """A finished run as the stages leave it: manifests (written last) and the analysis's headline.json."""

    def manifest(cell: str, stage: str, config: dict, outputs: dict, code: str, key: str) -> None:
        prefix = store.join(root, "runs", run_id, cell, stage)
        uris = {}
        for name, data in outputs.items():
            store.write_json(store.join(prefix, name), data)
            uris[store.join(prefix, name)] = store.sha256(store.join(prefix, name))
        store.write_json(store.join(prefix, "manifest.json"), {
            "status": "complete", "stage": stage, "run_id": run_id, "cell": cell, "prefix": prefix,
            "config": {"store": root, "run_id": run_id, "cell": cell, **config}, "config_hash": f"{key}-config",
            "cache_key": key, "code_fingerprint": code, "outputs": uris, "git_commit": "0123456789abcdef",
            "git_dirty": False})

    manifest("gen", "generate", {"n": params["n"]}, {"completions.jsonl": {}}, gen_code, gen_key)
    if extra_task:
        manifest("extra", "generate", {}, {"completions.jsonl": {}}, "code-1", "k-extra")
    rows = [{"condition": c, "alpha": a} for c, a in alpha.items()]
    completions = store.join(root, "runs", run_id, "gen", "generate", "completions.jsonl")
    manifest("analysis", "analyze_issue164", {"profile": "tiny", "params": params, "completions_uri": completions},
             {"headline.json": {"conditions": rows, "verdict": "holds"}}, "code-a", f"k-analysis-{params['n']}")


def test_the_table_marks_what_differs_and_the_diff_names_config_fields_and_tasks(tmp_path):
    root = store.from_path(tmp_path)
    write_run(root, "a", alpha={"null": 80.0, "villain": 40.0}, params={"n": 20, "t": 1.0}, gen_code="code-1",
              gen_key="k1")
    write_run(root, "b", alpha={"null": 80.0, "villain": 35.5}, params={"n": 10, "t": 1.0}, gen_code="code-2",
              gen_key="k2", extra_task=True)
    result = compare(root, ["a", "b"])
    md = to_markdown(result)
    assert "| profile |  | tiny | tiny |" in md and "| commit |  | 0123456789ab | 0123456789ab |" in md
    assert "| conditions.alpha | null | 80 | 80 |" in md  # the same in both: no mark
    assert "| conditions.alpha * | villain | 40 | 35.5 |" in md
    assert md.index("| conditions.alpha | null |") < md.index("| conditions.alpha * | villain |") < md.index("| verdict |")
    # the configs: the parameter that differs, and nothing for the run ids in paths
    assert result.config_differences == [("params.n", ["20", "10"])]
    assert result.task_differences == {"code": ["gen/generate"], "config_or_inputs": ["analysis/analyze_issue164"],
                                       "not_in_all": ["extra/generate"]}
    assert "- tasks computed by other code (the stage's code fingerprint differs): 1: gen/generate" in md
    rows = list(csv.reader(io.StringIO(to_csv(result))))
    assert rows[0] == ["metric", "condition", "a", "b"]
    assert ["conditions.alpha", "villain", "40.0", "35.5"] in rows and ["profile", "", "tiny", "tiny"] in rows


def test_bad_input_is_one_line(tmp_path, capsys):
    root = store.from_path(tmp_path)
    write_run(root, "a", alpha={"null": 1.0}, params={"n": 1}, gen_code="c", gen_key="k")
    store.write_json(store.join(root, "runs", "unfinished", "gen", "generate", "manifest.json"),
                     {"status": "complete", "stage": "generate", "cell": "gen"})
    for argv, says in ((["a"], "at least two runs"), (["a", "nope"], "run nope: no complete stage"),
                       (["a", "unfinished"], "run unfinished: no complete analysis stage"), (["a", "a"], "twice")):
        code, out, err = cli(["compare", *argv, "--store", root, "--out", str(tmp_path / "out")], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1 and says in err, err


@pytest.mark.slow
def test_two_tiny_runs_side_by_side(issue164_tiny_run, tmp_path, capsys):
    """The session's tiny issue164 run and a second one that reads the first one's classifier instead of training
    its own (only the analysis recomputes): the table holds every condition's headline numbers of both runs."""
    from workflows.__main__ import build_plan, parser
    from workflows.engines.local import run_plan

    source = issue164_tiny_run
    local_root = tmp_path / "store"
    shutil.copytree(unquote(urlparse(source.store).path), local_root)  # this test's own copy of the session's run
    root = store.from_path(local_root)
    bundle = store.join(root, "runs", source.run_id, "classifier", "train_classifier", "classifier.joblib")
    args = parser().parse_args(["run", "issue164", "--profile", "tiny", "--store", root, "--run-id", "e2e-bundle",
                                "--set", f"classifier_bundle_uri={bundle}"])
    result = run_plan(build_plan(args), retries=0, live=False)
    assert result.ok
    assert {s.task.name for s in result.states.values() if s.status not in ("cached", "reused")} == {"analysis"}

    capsys.readouterr()  # the local engine's progress lines
    out_dir = tmp_path / "compare"
    code, out, err = cli(["compare", source.run_id, "e2e-bundle", "--store", root, "--out", str(out_dir)], capsys)
    assert code == 0, err
    md = (out_dir / "compare.md").read_text()
    assert out.startswith(md) and f"wrote {out_dir / 'compare.md'} and {out_dir / 'compare.csv'}" in out
    assert "| workflow |  | issue164 | issue164 |" in md and "| profile |  | tiny | tiny |" in md
    rows = list(csv.reader(io.StringIO((out_dir / "compare.csv").read_text())))
    table = {(r[0], r[1]): r[2:] for r in rows[1:]}
    for run_id, column in ((source.run_id, 0), ("e2e-bundle", 1)):
        headline = store.read_json(store.join(root, "runs", run_id, "analysis", "analyze_issue164", "headline.json"))
        for row in headline["conditions"]:
            assert table[("conditions.alpha_primary", row["condition"])][column] == repr(row["alpha_primary"])
            assert table[("conditions.c", row["condition"])][column] == repr(row["c"])
    # the same generations, judges and classifier: the same numbers, and the diff says what changed
    assert table[("conditions.c", "null")][0] == table[("conditions.c", "null")][1]
    assert "| params.classifier_bundle_uri | null | " in md
    assert ("- tasks not in every run: 3: classifier-base/generate, classifier-em/generate, "
            "classifier/train_classifier") in md
