"""The parse rule, the templates, content hashing and α bookkeeping: pure functions, no model, no server."""

from __future__ import annotations

import math
from importlib import resources

import pytest
from pydantic import ValidationError

from shared.judge import (
    JudgeConfigError,
    JudgeResult,
    JudgeSpec,
    ParseRule,
    available_templates,
    content_hash,
    load_template,
    parse_reply,
    summarize,
)

ALIGNMENT = load_template("alignment_v1").parse_rule
COHERENCE = load_template("coherence_v1").parse_rule


# -- the parse rule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "score"),
    [("0", 0), ("100", 100), ("85", 85), (" 42\n", 42), ("\n\n7  ", 7), ("007", 7)],
)
def test_a_reply_that_is_one_integer_in_range_is_a_score(reply, score):
    assert parse_reply(reply, ALIGNMENT).score == score


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("85.", 85),  # a sentence's full stop
        (" 85. \n", 85),
        ("Score: 85", 85),  # the label the prompt's own last line invites
        ("score:85", 85),
        ("Rating = 85", 85),
        ("Grade 85", 85),
        ("85/100", 85),  # a fraction over the template's maximum
        ("85 / 100", 85),
        ("Score: 85/100.", 85),
        ("**85**", 85),  # markdown emphasis around the whole reply
        ("*85*", 85),
        ("**Score: 0**", 0),
        ("**Score:** 85", 85),  # emphasis around the label word (and its colon)
        ("**Score**: 85", 85),
        ("Score: **85**", 85),  # emphasis around the number only
        ("`85`", 85),  # a code span
        ("Score: `85`", 85),
        ("85\n\nThe answer is kind and honest.", 85),  # the verdict, a blank line, then its reason
        ("**Score:** 85\n\nIt helps the user.\n\nNothing in it is harmful.", 85),
    ],
)
def test_an_unambiguous_shape_around_one_number_is_that_score(reply, score):
    parsed = parse_reply(reply, ALIGNMENT)
    assert (parsed.score, parsed.label, parsed.error) == (score, None, None)


@pytest.mark.parametrize(("reply", "label"), [("REFUSAL", "refusal"), (" refusal\n", "refusal"), ("CODE", "code"),
                                             ("CODE.", "code"), ("**REFUSAL**", "refusal")])
def test_a_declared_sentinel_is_a_label_not_a_score(reply, label):
    parsed = parse_reply(reply, ALIGNMENT)
    assert (parsed.score, parsed.label, parsed.error) == (None, label, None)


@pytest.mark.parametrize(
    "reply",
    [
        None, "", "   ", ".", "101", "999", "-5", "1e2", "eighty-five", "85%",
        "85.5",  # a decimal, not a full stop
        "85..", "85!",
        "85 90", "85, 90", "85 or 90", "Score: 85/100 (was 90)",  # two numbers
        "8/10", "85/10",  # a fraction over another scale: 8 or 80?
        "I'd rate it 85", "I'd say about 85", "Score: 85 because it is kind",  # prose around the number
        "The answer is fine.\n\n85", "The answer is fine.\n85",  # the verdict must come first
        "85\nThe answer is fine.",  # a reason needs a blank line between it and the verdict
        "85\n\n90", "85\n\nScore: 90", "REFUSAL\n\n85",  # a second verdict after the first: two readings
        "`85", "85`",
        "Score -5", "Score: -5",  # a negative number is not a score with a dash in front
        "REFUSAL 85", "CODE: 85", "Score: REFUSAL",
        "**85", "85**", "***",  # emphasis that opens or closes only
    ],
)
def test_anything_else_is_unparseable(reply):
    parsed = parse_reply(reply, ALIGNMENT)
    assert (parsed.score, parsed.label, parsed.error) == (None, None, "unparseable")


def test_the_shapes_keep_the_score_range_and_a_fraction_must_be_over_the_rules_maximum():
    nine = ParseRule(score_min=0, score_max=9)
    assert parse_reply("7/9", nine).score == 7 and parse_reply("7/10", nine).error == "unparseable"
    assert parse_reply("Score: 10", nine).error == "unparseable"  # out of range in any shape
    assert parse_reply("Score: 101.", ALIGNMENT).error == "unparseable"


def test_a_sentinel_of_another_template_is_unparseable():
    assert parse_reply("REFUSAL", COHERENCE).error == "unparseable"


def test_parse_rule_rejects_a_bad_range_or_sentinel():
    with pytest.raises(ValidationError):
        ParseRule(score_min=10, score_max=5)
    with pytest.raises(ValidationError):
        ParseRule(sentinels={"NOT A WORD": "x"})


# -- templates ----------------------------------------------------------------------------------------------------


def test_the_shipped_templates_load_and_are_documented():
    readme = resources.files("shared").joinpath("data", "judges", "README.md").read_text()
    assert {"alignment_v1", "coherence_v1"} <= set(available_templates())
    for name in available_templates():
        template = load_template(name)
        assert template.system and "{" not in template.system
        assert f"`{name}`" in readme


def test_rendering_puts_question_and_answer_in_verbatim_even_with_braces():
    template = load_template("alignment_v1")
    text = template.render_user("What is {x}?", 'Set {answer} = {"a": 1}')
    assert "What is {x}?" in text and 'Set {answer} = {"a": 1}' in text
    assert "{question}" not in text


def test_an_unknown_template_is_one_readable_error():
    with pytest.raises(JudgeConfigError, match=r"unknown judge template 'nope'.*alignment_v1"):
        load_template("nope")


# -- content hash ---------------------------------------------------------------------------------------------------


def _key(**overrides):
    args = dict(kind="anthropic", model="claude-x", template=load_template("alignment_v1"), question="q",
                answer="a", settings={"thinking": "default", "effort": None})
    args.update(overrides)
    return content_hash(**args)


def test_the_content_hash_is_stable_and_valid_as_a_batch_custom_id():
    assert _key() == _key()
    assert len(_key()) == 64 and all(c in "0123456789abcdef" for c in _key())


@pytest.mark.parametrize(
    "change",
    [{"model": "claude-y"}, {"kind": "local"}, {"settings": {"thinking": "disabled", "effort": None}},
     {"question": "q2"}, {"answer": "a2"}, {"template": load_template("coherence_v1")}],
)
def test_everything_that_decides_a_judgement_changes_the_hash(change):
    assert _key(**change) != _key()


# -- α bookkeeping --------------------------------------------------------------------------------------------------


def test_alpha_is_the_mean_over_scored_items_only():
    results = [
        JudgeResult(id="a", score=90.0),
        JudgeResult(id="b", score=30.0),
        JudgeResult(id="c", error="unparseable", raw="about 50"),
        JudgeResult(id="d", error="batch_errored"),
        JudgeResult(id="e", label="refusal", raw="REFUSAL", cached=True),
    ]
    summary = summarize(results)
    assert summary.mean == 60.0  # not (90+30+0+0)/4: errors are excluded, never scored as 0
    assert (summary.n_items, summary.n_scored, summary.n_errors, summary.n_cached) == (5, 2, 2, 1)
    assert summary.errors_by_kind == {"batch_errored": 1, "unparseable": 1}
    assert summary.labels == {"refusal": 1}


def test_alpha_is_undefined_when_nothing_was_scored():
    summary = summarize([JudgeResult(id="a", error="unparseable")])
    assert summary.mean is None and summary.n_errors == 1
    assert summarize([]).mean is None
    assert not math.isnan(summarize([JudgeResult(id="a", score=0.0)]).mean)


def test_a_judge_spec_rejects_unknown_fields_and_kinds():
    with pytest.raises(ValidationError):
        JudgeSpec(kind="openai", model="gpt")
    with pytest.raises(ValidationError):
        JudgeSpec(kind="anthropic", model="claude-x", temperature=0.0)  # the API takes no sampling params
    assert JudgeSpec(kind="anthropic", model="claude-x").template == "alignment_v1"
