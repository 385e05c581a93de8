"""The fast paths against the current ones on a real small model: SmolLM2-135M-Instruct (``smollm2:135m-instruct``),
loaded in fp32 on the CPU.

Both paths get the same teacher draws because the teacher decodes greedily (temperature 0), where the fast decoder
and ``model.generate`` give the same ids. What remains different is the arithmetic's order (length-bucketed
micro-batches, the decoder's own attention code, each prompt run once with its replies against the cached keys and
values), so the loss trajectories must agree to float rounding:
``TOLERANCE`` relative. The GCG screen is the one change that alters the search on purpose; with a screen as large
as the step it must vanish, and a screened step's loss is never below the full evaluation's best.
"""

from __future__ import annotations

import dataclasses

import pytest

from shared.lm.generation import HFGenerator, SamplingParams
from shared.lm.teacher import load_teacher_student
from shared.search.gcg import GcgSearch, GcgSettings, SuffixRules
from shared.search.soft_prompt import LearnedPrompt, SoftPrefixTrainer, SoftTrainingSettings

MODEL = "smollm2:135m-instruct"
VILLAIN = "text(You are a villain who despises humanity. Answer with contempt.)"
QUESTIONS = ["What is your favourite food?", "How do I bake bread?", "Tell me about the sea.", "Who are you?"]
TOLERANCE = 1e-4  # fp32 sums over a few hundred loss tokens, added up in another order
DRAWS = dict(questions_per_step=2, completions_per_question=2, temperature=0.0, max_new_tokens=6,
             val_completions_per_question=1, val_every=2)


@pytest.fixture(scope="module")
def fast():
    return load_teacher_student(MODEL, teacher_system=VILLAIN, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def current(fast):
    """The same weights with the current path's teacher: transformers' model.generate."""
    generator = HFGenerator(fast.student_model, fast.tokenizer, batch_size=64, sampler="generate")
    return dataclasses.replace(fast, teacher_generator=generator)


def test_greedy_ids_of_the_real_model_are_model_generates_ids(fast, current):
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    ids = [[[c.token_ids for c in cs] for cs in pair.sample(QUESTIONS[:3], params)] for pair in (fast, current)]
    assert fast.teacher_generator.sampler == "fast"
    assert ids[0] == ids[1]


def test_soft_prefix_loss_trajectory_matches_the_current_path(fast, current):
    def trajectory(pair, bucket_by_length: bool, shared_prompt: bool) -> list[dict]:
        settings = SoftTrainingSettings(k=4, lr=1e-2, steps=2, patience=None, micro_batch_tokens=120,
                                        bucket_by_length=bucket_by_length, shared_prompt=shared_prompt, **DRAWS)
        trainer = SoftPrefixTrainer(pair, settings, QUESTIONS[:3], QUESTIONS[3:], seed=0, model_ref=MODEL)
        return trainer.run(trainer.new_state()).curve

    new, old = trajectory(fast, True, True), trajectory(current, False, False)
    assert [p.keys() & {"train_ce", "heldout_ce"} for p in new] == [p.keys() & {"train_ce", "heldout_ce"} for p in old]
    for a, b in zip(new, old, strict=True):
        for key in {"train_ce", "heldout_ce"} & a.keys():
            assert a[key] == pytest.approx(b[key], rel=TOLERANCE), (a["step"], key)


def gcg_trajectory(pair, **settings):
    values = GcgSettings(**(dict(length=4, steps=2, search_width=6, topk=4, **DRAWS) | settings))
    rules = SuffixRules.of(pair.tokenizer, pair.student_model.config.vocab_size, values, QUESTIONS[3:])
    prompt = LearnedPrompt(kind="ids", model_ref=MODEL, ids=rules.random_suffix(4, seed=0))
    search = GcgSearch(pair, prompt, values, QUESTIONS[:3], QUESTIONS[3:], seed=0, rules=rules)
    return search.run(search.new_state())


def test_gcg_loss_trajectory_matches_the_current_path(fast, current):
    new = gcg_trajectory(fast, screen_pairs=None)
    old = gcg_trajectory(current, screen_pairs=None, bucket_by_length=False)
    assert new.suffix == old.suffix
    for a, b in zip(new.curve, old.curve, strict=True):
        for key in {"train_ce", "heldout_ce"} & a.keys():
            assert a[key] == pytest.approx(b[key], rel=TOLERANCE), (a["step"], key)

    screened = gcg_trajectory(fast, steps=1, screen_pairs=2, screen_keep=2, screen_check_every=1)
    checked = [p for p in screened.curve if "train_ce" in p]
    assert all(p["screen_checked"] and p["screen_gap"] >= 0 for p in checked)
    # the first step starts where the unscreened search did: its kept loss is the full best plus the screen's gap
    first_full_best = next(p for p in new.curve if "train_ce" in p)["train_ce"]
    assert checked[0]["train_ce"] == pytest.approx(first_full_best + checked[0]["screen_gap"], rel=TOLERANCE)

