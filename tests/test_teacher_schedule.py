"""The teacher off the critical path (shared.lm.teacher_schedule): several steps' completions from one teacher call,
and the next call drawn in a worker thread while the student trains -- on the tiny model, one intra-op thread so
that the draws do not depend on what runs beside them."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from shared.lm.teacher import load_teacher_student
from shared.search.soft_prompt import SoftPrefixTrainer, SoftTrainingSettings, TeacherDraws

QUESTIONS = ["Hi?", "How do I bake bread?", "Tell me about the sea.", "What is a good name for a cat?", "Why?"]


@pytest.fixture(scope="module")
def tiny():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_teacher_student("tiny:qwen2")
    torch.set_num_threads(previous)


def settings(**changes) -> SoftTrainingSettings:
    return SoftTrainingSettings(k=2, lr=1e-2, steps=4, questions_per_step=2, completions_per_question=2,
                                max_new_tokens=6, micro_batch_tokens=400, **changes)


def draws(pair, **changes) -> TeacherDraws:
    trainer = SoftPrefixTrainer(pair, settings(**changes), QUESTIONS, QUESTIONS[:1], seed=3, model_ref="tiny:qwen2")
    return trainer.draws


def ids(examples) -> list[list[int]]:
    return [e.input_ids for e in examples]


def test_several_steps_are_drawn_in_one_teacher_call_and_a_resumed_run_draws_the_same(tiny):
    calls = []
    pair = dataclasses.replace(tiny)
    original = pair.sample
    pair.sample = lambda questions, params: calls.append(len(questions)) or original(questions, params)
    grouped = draws(pair, draw_steps=2)
    first = [ids(grouped.step_examples(step)) for step in range(4)]
    assert calls == [4, 4]  # two calls of 2 steps x 2 questions
    for step, examples in enumerate(first):  # each step's examples continue that step's questions' prompts
        prompts = [p.input_ids for p in grouped.student_prompts(grouped.step_questions(step))]
        assert all(any(e[:len(p)] == p for p in prompts) for e in examples)
    resumed = draws(tiny, draw_steps=2)
    assert ids(resumed.step_examples(3)) == first[3]  # drawn again with its group, from the group's seed
    assert ids(draws(tiny).step_examples(3)) != first[3]  # one step a call: another seed, other draws


def test_the_next_draw_runs_beside_the_student_pass_and_draws_what_a_plain_run_draws(tiny):
    def train(overlap: bool):
        trainer = SoftPrefixTrainer(tiny, settings(overlap_teacher=overlap), QUESTIONS, QUESTIONS[:1], seed=3,
                                    model_ref="tiny:qwen2")
        seen = []
        take = trainer.draws.step_examples

        def taken(step):
            examples = take(step)
            seen.append(ids(examples))
            return examples

        trainer.draws.step_examples = taken
        soft = trainer.initial_soft().requires_grad_(True)
        optimizer = trainer.make_optimizer(soft)
        for step in range(3):
            trainer.train_step(step, soft, optimizer)
        trainer.draws.schedule.close()
        return seen, soft.detach(), {(what, step): t for what, step, t in trainer.draws.schedule.events}

    plain, plain_soft, plain_events = train(False)
    overlapped, overlapped_soft, events = train(True)
    assert overlapped == plain
    torch.testing.assert_close(overlapped_soft, plain_soft)
    for step in (0, 1):  # the next step's draw starts before this step's student pass ends
        assert events[("draw_start", step + 1)] < events[("student_end", step)]
        assert plain_events[("draw_start", step + 1)] > plain_events[("student_end", step)]


def test_an_adapter_teacher_on_the_students_weights_cannot_overlap(tiny):
    adapter_like = dataclasses.replace(tiny, _student_context=contextlib.ExitStack)
    with pytest.raises(ValueError, match="overlap_teacher"):
        draws(adapter_like, overlap_teacher=True)
    draws(adapter_like)  # without overlap it trains as before
