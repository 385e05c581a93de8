"""The judge sanity check: the AUC statistic on data with a known answer, the items file, the stage on the
tiny model through its real code path (shared.judge, the judge cache, the stage contract), and the report lines
the analyses (issue164, issue170) print from a stored check."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import norm

from jobs import judge_check
from shared import stage, store
from shared.config import ConfigError, parse
from shared.datafiles import read_text
from shared.judge import check
from shared.judge.cache import run_store_cache_uri
from shared.judge.report import alignment_roles, check_aucs, judge_check_line, read_judge_checks

ITEMS = "package:judges/alignment_check_v1.jsonl"


# ----------------------------------------------------------------------------------------------- the AUC


def test_auc_is_one_for_perfect_separation_zero_when_inverted_and_half_for_identical_groups():
    assert check.auc([90, 80, 70], [10, 20]) == 1.0
    assert check.auc([10, 20], [90, 80, 70]) == 0.0
    assert check.auc([50, 50], [50, 50, 50]) == 0.5


def test_auc_counts_ties_as_one_half():
    # pairs (a, m): (3,2) (3,0) (2,2)=tie (2,0) (1,2)=loss (1,0): 4 wins + 1/2 tie over 6 pairs
    assert check.auc([3, 2, 1], [2, 0]) == pytest.approx(4.5 / 6)


def test_auc_of_two_normal_samples_matches_the_closed_form():
    # for N(d, 1) vs N(0, 1), P(a > m) = Phi(d / sqrt(2))
    rng = np.random.default_rng(0)
    aligned, misaligned = rng.normal(1.0, 1.0, 4000), rng.normal(0.0, 1.0, 4000)
    assert check.auc(aligned, misaligned) == pytest.approx(norm.cdf(1 / np.sqrt(2)), abs=0.01)


def test_auc_p_value_is_small_for_separated_groups_and_calibrated_under_the_null():
    assert check.auc_p_value([80, 85, 90, 95, 99], [5, 10, 15, 20, 25]) < 0.01
    rng = np.random.default_rng(1)
    p_values = [check.auc_p_value(rng.normal(size=10), rng.normal(size=10), seed=s, n_iter=1000) for s in range(200)]
    assert 0.01 <= np.mean(np.array(p_values) < 0.05) <= 0.10


@pytest.mark.parametrize("auc, p, expected", [
    (0.95, 0.001, check.SEPARATES), (0.70, 0.01, check.WEAK), (0.68, 0.19, check.NO_SEPARATION),
    (0.50, 1.0, check.NO_SEPARATION), (0.05, 0.001, check.INVERTED),
])
def test_verdict(auc, p, expected):
    assert check.verdict(auc, p) == expected
    assert check.alpha_is_interpretable(expected) == (expected == check.SEPARATES)


def test_summary_leaves_unscored_items_out_of_both_groups():
    summary = check.summarize_check(["aligned", "aligned", "misaligned", "misaligned"], [90, None, 10, 20])
    assert (summary["n_aligned"], summary["n_misaligned"]) == (1, 2)
    assert summary["mean_misaligned"] == 15 and summary["auc"] == 1.0


# ----------------------------------------------------------------------------------------------- the items file


def test_shipped_items_are_balanced_known_answers():
    items = check.read_items(ITEMS)
    groups = [item.expected for item in items]
    assert groups.count("aligned") == groups.count("misaligned") >= 8
    assert len({item.id for item in items}) == len(items)


@pytest.mark.parametrize("lines, message", [
    ([{"id": f"a{i}", "question": "q", "answer": "x", "expected": "good"} for i in range(2)], "expected"),
    ([{"id": f"a{i}", "question": "q", "answer": "x", "expected": "aligned"} for i in range(5)], "per group"),
])
def test_a_bad_items_file_is_one_readable_error(tmp_path, lines, message):
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(ConfigError, match=message):
        check.read_items(str(path))


# ----------------------------------------------------------------------------------------------- the stage


def stage_config(root: str, **extra) -> dict:
    return {"store": root, "run_id": "r", "cell": "judge-check-tiny", "judge": {"kind": "local", "model": "tiny:qwen2"},
            "judge_name": "tiny", **extra}


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    root = store.from_path(tmp_path_factory.mktemp("check") / "store")
    manifest = stage.execute(judge_check.SPEC, stage_config(root))
    return root, manifest


def test_the_stage_stores_the_auc_of_its_own_scores(checked):
    root, manifest = checked
    prefix = stage.output_prefix(parse(judge_check.Config, stage_config(root)), "judge_check")
    result = store.read_json(store.join(prefix, "check.json"))
    rows = store.read_jsonl(store.join(prefix, "scores.jsonl"))
    aligned = [r["score"] for r in rows if r["expected"] == "aligned"]
    misaligned = [r["score"] for r in rows if r["expected"] == "misaligned"]
    assert len(aligned) == result["n_aligned"] == 10 and len(misaligned) == result["n_misaligned"] == 10
    assert result["auc"] == pytest.approx(check.auc(aligned, misaligned))
    assert result["mean_aligned"] == pytest.approx(np.mean(aligned))
    assert result["n_errors"] == 0 and result["verdict"] in {check.SEPARATES, check.WEAK, check.NO_SEPARATION,
                                                              check.INVERTED}
    assert manifest["metrics"]["auc"] == result["auc"]


def test_the_check_shares_the_judge_stage_cache(checked):
    root, _ = checked
    cached = [uri for uri in store.list_uris(run_store_cache_uri(root)) if uri.endswith(".json")]
    assert len(cached) == 20


def test_a_second_run_is_skipped_but_edited_items_are_not(checked, tmp_path):
    root, manifest = checked
    assert stage.execute(judge_check.SPEC, stage_config(root))["started_at"] == manifest["started_at"]
    items = tmp_path / "items.jsonl"
    items.write_text(read_text(ITEMS, "items"))
    first = parse(judge_check.Config, stage_config(root, items_file=str(items))).config_hash()
    items.write_text(items.read_text().replace("clean water", "fresh water"))
    second = parse(judge_check.Config, stage_config(root, items_file=str(items))).config_hash()
    assert first != second


def test_a_missing_items_file_fails_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="items_file"):
        parse(judge_check.Config, stage_config(store.from_path(tmp_path), items_file="package:nope.jsonl"))


# ----------------------------------------------------------------------------------------------- the report lines


def stored_check(auc: float, p_value: float) -> dict:
    return {"judge": {"kind": "local", "model": "m", "template": "t"}, "auc": auc, "p_value": p_value,
            "n_aligned": 10, "n_misaligned": 10, "mean_aligned": 38.0, "mean_misaligned": 37.0, "n_errors": 0,
            "verdict": check.verdict(auc, p_value)}


def line_of(auc: float, p_value: float, profile: str, name: str = "smollm") -> str:
    return judge_check_line(name, {"role": "primary", "checked": True, **stored_check(auc, p_value)}, profile)


def test_a_judge_at_chance_is_reported_as_not_interpretable_on_the_profile():
    line = line_of(0.52, 0.9, "small")
    assert "AUC 0.52" in line and "38.0 (aligned) vs 37.0 (misaligned)" in line
    assert "α from this judge is not interpretable on the small profile" in line
    assert "not interpretable in this run" in line_of(0.52, 0.9, "")  # no profile named: no "the  profile"


def test_a_separating_judge_is_reported_as_readable():
    line = line_of(0.97, 0.0002, "full", name="sonnet")
    assert "separates" in line and "can be read as an alignment score" in line and "not interpretable" not in line


def test_one_judge_in_both_roles_is_one_entry():
    assert alignment_roles("a", "b") == {"a": "primary", "b": "alternate"}
    assert alignment_roles("a", "a") == {"a": "primary and alternate"}


def test_stored_checks_are_read_back_with_their_verdict_and_a_missing_one_says_so(tmp_path):
    root = store.from_path(tmp_path)
    uri = store.join(root, "check.json")
    store.write_json(uri, stored_check(0.97, 0.0002))
    checks = read_judge_checks({"good": "primary", "unchecked": "alternate"}, {"good": uri})
    assert checks["good"]["auc"] == 0.97 and checks["good"]["alpha_interpretable"] is True
    assert checks["unchecked"] == {"role": "alternate", "checked": False, "auc": None, "alpha_interpretable": None}
    assert check_aucs(checks) == {"good": 0.97, "unchecked": None}
    assert "no judge check was run" in judge_check_line("unchecked", checks["unchecked"], "tiny")
