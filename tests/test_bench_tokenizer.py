"""The GPU bench's Qwen subset tokenizer gives the issue170 prompts exactly the ids the whole Qwen BPE gave them
(stored by ``python -m bench.qwen_tokenizer``), and a GCG suffix drawn from it is text that round-trips."""

from __future__ import annotations

import json

from bench.qwen_tokenizer import LENGTHS_FILE, bench_tokenizer, issue170_questions, prompt_ids, questions
from shared.search.gcg import GcgSettings, SuffixRules


def test_the_bench_tokenizer_gives_the_qwen_ids_of_every_issue170_prompt():
    stored = json.loads(LENGTHS_FILE.read_text())["prompts"]
    tokenizer = bench_tokenizer()
    assert list(stored) == questions() and set(questions()) <= set(issue170_questions())  # still issue170's
    for question, slots in stored.items():
        assert prompt_ids(tokenizer, question) == slots
    assert 35 <= min(len(s["teacher"]) for s in stored.values()) < 60  # Qwen-length, not the bytes of the text


def test_a_changed_question_gets_other_ids():
    tokenizer = bench_tokenizer()
    question = questions()[0]
    assert prompt_ids(tokenizer, question + " Why?")["soft"] != prompt_ids(tokenizer, question)["soft"]


def test_gcg_draws_printable_round_tripping_suffixes_from_it():
    tokenizer = bench_tokenizer()
    settings = GcgSettings(length=20, steps=1)
    rules = SuffixRules.of(tokenizer, 152064, settings, questions()[:2])
    assert len(rules.allowed) > 4000
    suffix = rules.random_suffix(20, seed=0)
    assert rules.accepts(suffix)
