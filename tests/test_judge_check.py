"""The judge sanity check: the AUC statistic on data with a known answer, the items file, the stage on the
tiny model through its real code path (shared.judge, the judge cache, the stage contract), and the report lines
the analyses (issue164, issue170) print from a stored check."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import norm

from jobs import judge_check
from shared.contract import stage
from shared.core import store
from shared.core.config import ConfigError, parse
from shared.core.datafiles import read_text
from shared.judge import check
from shared.judge.cache import run_store_cache_uri
from shared.judge.report import alignment_roles, check_aucs, judge_check_line, read_judge_checks

ITEMS = "package:judges/alignment_check_v2.jsonl"
COHERENCE_ITEMS = "package:judges/coherence_check_v1.jsonl"


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
    assert (summary["n_high"], summary["n_low"]) == (1, 2) and summary["groups"] == ["aligned", "misaligned"]
    assert summary["mean_low"] == 15 and summary["auc"] == 1.0


def test_a_coherence_check_compares_coherent_over_incoherent_answers():
    summary = check.summarize_check(["coherent", "incoherent", "coherent", "incoherent"], [80, 20, 70, 90])
    assert summary["kind"] == "coherence" and summary["groups"] == ["coherent", "incoherent"]
    assert summary["auc"] == 0.5 and (summary["mean_high"], summary["mean_low"]) == (75, 55)


def test_graded_anchors_in_order_give_the_largest_rho_ties_allow_and_reversed_the_smallest():
    anchors = [30, 30, 50, 50, 70, 70]
    # with two answers per anchor the anchors tie, so perfect order reaches rho = corr(midranks, 1..6) = 0.956
    best = float(np.corrcoef([1.5, 1.5, 3.5, 3.5, 5.5, 5.5], np.arange(6))[0, 1])
    ordered = check.graded_check(anchors, [25, 35, 45, 55, 65, 80], n_iter=2000)
    assert ordered["rho"] == pytest.approx(best) and ordered["ordered"] and ordered["p_value"] < 0.05
    assert ordered["levels"] == {"30": 30.0, "50": 50.0, "70": 72.5}
    assert ordered["mean_abs_error"] == pytest.approx((5 + 5 + 5 + 5 + 5 + 10) / 6)
    reversed_ = check.graded_check(anchors, [80, 65, 55, 45, 35, 25], n_iter=2000)
    assert reversed_["rho"] == pytest.approx(-best) and not reversed_["ordered"]
    flat = check.graded_check(anchors, [50] * 6)
    assert flat["rho"] is None and not flat["ordered"]  # a judge that scores everything alike orders nothing
    assert check.graded_check([30, 50], [10, None]) is None  # too few scored


def test_the_graded_p_value_is_calibrated_when_scores_ignore_the_anchors():
    rng = np.random.default_rng(3)
    anchors = [30, 30, 30, 50, 50, 50, 70, 70, 70]
    p_values = [check.graded_check(anchors, rng.normal(size=9), seed=s, n_iter=300)["p_value"] for s in range(150)]
    assert 0.01 <= np.mean(np.array(p_values) < 0.05) <= 0.11


# ----------------------------------------------------------------------------------------------- the items file


@pytest.mark.parametrize(("ref", "high", "low"), [(ITEMS, "aligned", "misaligned"),
                                                  (COHERENCE_ITEMS, "coherent", "incoherent")])
def test_shipped_items_are_balanced_known_answers_with_graded_anchors(ref, high, low):
    items = check.read_items(ref)
    groups = [item.expected for item in items]
    assert groups.count(high) == groups.count(low) >= 8
    assert sorted(item.anchor for item in items if item.expected == "graded") == [30] * 3 + [50] * 3 + [70] * 3
    assert len({item.id for item in items}) == len(items)


@pytest.mark.parametrize("lines, message", [
    ([{"id": f"a{i}", "question": "q", "answer": "x", "expected": "good"} for i in range(2)], "expected"),
    ([{"id": f"a{i}", "question": "q", "answer": "x", "expected": "aligned"} for i in range(5)], "per group"),
    ([{"id": f"a{i}", "question": "q", "answer": "x", "expected": e} for i, e in
      enumerate(["aligned"] * 3 + ["coherent"] * 3 + ["misaligned"] * 3)], "one kind"),
    ([{"id": "g", "question": "q", "answer": "x", "expected": "graded"},
      {"id": "h", "question": "q", "answer": "x", "expected": "aligned"}], "anchor"),
    ([{"id": "g", "question": "q", "answer": "x", "expected": "aligned", "anchor": 50},
      {"id": "h", "question": "q", "answer": "x", "expected": "aligned"}], "anchor"),
])
def test_a_bad_items_file_is_one_readable_error(tmp_path, lines, message):
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(ConfigError, match=message):
        check.read_items(str(path))


# ----------------------------------------------------------------------------------------------- the stage


def stage_config(root: str, **extra) -> dict:
    return {"store": root, "run_id": "r", "cell": "judge-check-tiny",
            "judge": {"kind": "local", "model": "tiny:qwen2", "min_candidate_mass": 0.0}, "judge_name": "tiny", **extra}


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
    assert len(aligned) == result["n_high"] == 10 and len(misaligned) == result["n_low"] == 10
    assert result["auc"] == pytest.approx(check.auc(aligned, misaligned))
    assert result["mean_high"] == pytest.approx(np.mean(aligned))
    graded = [r for r in rows if r["expected"] == "graded"]
    assert result["graded"]["n"] == len(graded) == 9 and all(r["reply"] and r["mass"] for r in rows)
    assert result["n_errors"] == 0 and result["verdict"] in {check.SEPARATES, check.WEAK, check.NO_SEPARATION,
                                                              check.INVERTED}
    assert manifest["metrics"]["auc"] == result["auc"]


def test_the_check_shares_the_judge_stage_cache(checked):
    root, _ = checked
    cached = [uri for uri in store.list_uris(run_store_cache_uri(root)) if uri.endswith(".json")]
    assert len(cached) == 29


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
            "kind": "alignment", "groups": ["aligned", "misaligned"],
            "n_high": 10, "n_low": 10, "mean_high": 38.0, "mean_low": 37.0, "n_errors": 0,
            "verdict": check.verdict(auc, p_value)}


def line_of(auc: float, p_value: float, profile: str, name: str = "smollm") -> str:
    return judge_check_line(name, {"role": "primary", "checked": True, **stored_check(auc, p_value)}, profile)


def test_a_judge_at_chance_is_reported_as_not_interpretable_on_the_profile():
    line = line_of(0.52, 0.9, "small")
    assert "AUC 0.52" in line and "38.0 (aligned) vs 37.0 (misaligned)" in line
    assert "α from this judge is not interpretable on the small profile" in line
    assert "not interpretable in this run" in line_of(0.52, 0.9, "")  # no profile named: no "the  profile"


def test_a_separating_judge_is_reported_as_passing_a_gross_failure_check_and_no_more():
    line = line_of(0.97, 0.0002, "full", name="sonnet")
    assert "passes a gross-failure check" in line and "does not show its scale is calibrated" in line
    assert "not interpretable" not in line and "can be read as an alignment score" not in line


def test_a_check_line_reports_abstentions_and_the_graded_anchors():
    stored = {**stored_check(0.9, 0.001), "n_errors": 4, "errors_by_kind": {"abstained": 4},
              "graded": {"n": 9, "levels": {"30": 35.0, "50": 48.0, "70": 61.0}, "ordered": True, "rho": 0.81,
                         "p_value": 0.01, "mean_abs_error": 6.0}}
    line = judge_check_line("j", {"role": "primary", "checked": True, **stored}, "small")
    assert "4 errors (4 abstentions)" in line
    assert "mean score 35.0 at 30, 48.0 at 50, 61.0 at 70, in the anchors' order; Spearman ρ = 0.81" in line


def test_a_coherence_judge_that_fails_its_check_makes_the_em_rate_uninterpretable():
    from shared.judge.report import coherence_check_lines

    stored = {**stored_check(0.5, 0.9), "kind": "coherence", "groups": ["coherent", "incoherent"]}
    (line,) = coherence_check_lines(stored, "coherence", "small")
    assert "known-coherent" in line
    assert "Coherence scores from this judge, and so the EM rate, are not interpretable on the small profile" in line
    assert "no judge check was run" in coherence_check_lines(None, "coherence", "small")[0]


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
