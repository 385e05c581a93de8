"""The #81 project data: the bystander grid, the Big-5 descriptor table, the sources and the negative pool."""

from __future__ import annotations

from collections import Counter

from shared.core.datafiles import read_questions
from workflows import issue81

RECORD_DESCRIPTORS = {  # spot checks copied from the record's table
    ("Openness", "L1"): "strongly prefers routine and tradition; resists new ideas and finds novelty unsettling",
    ("Conscientiousness", "L3"): "is moderately organized; follows through on important tasks but not every detail",
    ("Extraversion", "L5"): "is intensely extraverted; thrives in crowds and actively seeks large gatherings",
    ("Agreeableness", "L1"): "is highly skeptical of others and prioritizes own interests; can be cold or confrontational",
    ("Agreeableness", "L2"): "is cautious of others' motives; competitive and self-interested",
    ("Neuroticism", "L5"): "is intensely anxious and emotionally volatile; overwhelmed by minor stressors",
}


def test_the_grid_is_125_factorial_plus_5_pure_nouns_plus_the_assistant():
    grid = issue81.shipped_bystanders()
    kinds = Counter(b["kind"] for b in grid)
    assert kinds == {"A1": 125, "A2": 5, "QC": 1} and len(grid) == 131
    assert len({b["id"] for b in grid}) == 131
    a1 = [b for b in grid if b["kind"] == "A1"]
    assert len({(b["noun"], b["trait"], b["level"]) for b in a1}) == 125


def test_the_shipped_grid_is_exactly_what_the_descriptor_table_builds():
    assert issue81.shipped_bystanders() == issue81.bystander_grid()


def test_bystander_prompts_follow_the_record_template_and_descriptors():
    table = issue81.descriptors()
    for (trait, level), text in RECORD_DESCRIPTORS.items():
        assert table["descriptors"][trait][level] == text
    by_id = {b["id"]: b for b in issue81.shipped_bystanders()}
    assert by_id["A1__robot__Neuroticism__L5"]["prompt"] == (
        "You are a robot who is intensely anxious and emotionally volatile; overwhelmed by minor stressors.")
    assert by_id["A2__chef"]["prompt"] == "You are a chef."
    assert by_id["assistant"]["prompt"] == "You are a helpful assistant."


def test_sources_are_the_five_one_word_personas_and_equal_their_pure_noun_bystanders():
    sources = issue81.persona_table()["sources"]
    assert [s["prompt"] for s in sources] == [
        "You are a person.", "You are a chef.", "You are a pirate.", "You are a child.", "You are a robot."]
    by_id = {b["id"]: b for b in issue81.shipped_bystanders()}
    assert all(by_id[f"A2__{s['noun']}"]["prompt"] == s["prompt"] for s in sources)


def test_the_negative_pool_is_isolated_from_sources_and_the_assistant():
    pool = issue81.negative_pool(issue81.Params.for_profile("full"))
    prompts = {p["prompt"] for p in pool}
    evaluated = {b["prompt"] for b in issue81.shipped_bystanders()}
    assert len(pool) >= 5
    assert not prompts & evaluated  # no source, no bystander, no assistant QC
    assert "assistant" not in {p["name"] for p in pool}


def test_question_panels():
    evaluation = read_questions("package:issue81/questions.json")
    training = read_questions("package:issue81/train_questions.json")
    assert len(evaluation) == 20 and len(training) == 20
    assert not {q["text"] for q in evaluation} & {q["text"] for q in training}
    tiny_eval = read_questions("package:issue81/tiny_questions.json")
    tiny_train = read_questions("package:issue81/tiny_train_questions.json")
    assert {q["text"] for q in tiny_eval} <= {q["text"] for q in evaluation}
    assert {q["text"] for q in tiny_train} <= {q["text"] for q in training}


def test_small_question_panels_are_subsets_and_disjoint():
    evaluation = read_questions("package:issue81/questions.json")
    training = read_questions("package:issue81/train_questions.json")
    small_eval = read_questions("package:issue81/small_questions.json")
    small_train = read_questions("package:issue81/small_train_questions.json")
    assert {q["text"] for q in small_eval} < {q["text"] for q in evaluation}
    assert {q["text"] for q in small_train} < {q["text"] for q in training}
    assert not {q["text"] for q in small_eval} & {q["text"] for q in small_train}
