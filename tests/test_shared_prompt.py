"""The shared-prompt student pass (each distinct prompt run once, every reply against its cached keys and values)
against the reference (every example run in full): the same summed CE and the same soft-prefix gradient.

Examples: three questions of different prompt lengths, replies of different lengths, stopped (the loss covers the
stop token) and cut at the length limit; micro-batches that hold everything (one forward mixing all prompts), that
split a question's completions over several forwards, and one row each. On the tiny model and on
SmolLM2-135M-Instruct in fp32, on whatever device the model loads to. The two paths compute the same sums in a
different order and shape (prompt and reply in two forwards instead of one), so they agree to fp32 rounding:
``LOSS_RTOL`` on the summed CE, ``GRAD_RTOL``/``GRAD_ATOL`` (relative to the gradient's largest entry) on the
gradient.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shared.lm import chat
from shared.lm.teacher import distinct_prompts, load_teacher_student, student_ce, with_reply_ids
from shared.search.soft_prompt import LearnedPrompt, SoftPrefixTrainer, SoftTrainingSettings

QUESTIONS = ["Hi?", "How do I bake a loaf of bread at home?", "Tell me, in a few words, about the sea."]
REPLIES = [(1, True), (9, False), (14, True), (4, True)]  # (reply tokens, stopped) for each question's completions
K = 4
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5


def examples_of(pair, k: int = K) -> list[chat.PromptIds]:
    tok = pair.tokenizer
    prompt = LearnedPrompt(kind="soft", model_ref="test", k=k)
    g = torch.Generator().manual_seed(0)
    out = []
    for question in QUESTIONS:
        for length, stopped in REPLIES:
            reply = torch.randint(3, len(tok) - 3, (length,), generator=g).tolist()
            out.append(with_reply_ids(prompt.build(tok, question), reply, tok.eos_token_id if stopped else None))
    return out


def loss_and_grad(pair, examples, *, shared_prompt: bool, max_tokens: int):
    model = pair.student_model
    weight = model.get_input_embeddings().weight
    soft = (weight[10:10 + K].detach().float() + 0.01).clone().requires_grad_(True)
    tokens = sum(e.loss_end - e.assistant_start for e in examples)
    result = student_ce(model, examples, chat.soft_placeholder_id(pair.tokenizer), soft, max_tokens=max_tokens,
                        shared_prompt=shared_prompt, backward_scale=1 / tokens)
    return result, soft.grad


def assert_same_loss_and_gradient(pair, examples, max_tokens: int) -> None:
    reference, reference_grad = loss_and_grad(pair, examples, shared_prompt=False, max_tokens=10**6)
    shared, shared_grad = loss_and_grad(pair, examples, shared_prompt=True, max_tokens=max_tokens)
    assert shared.ce_sum == pytest.approx(reference.ce_sum, rel=LOSS_RTOL)
    assert reference_grad.abs().max() > 0
    scale = float(reference_grad.abs().max())
    torch.testing.assert_close(shared_grad / scale, reference_grad / scale, rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.fixture(scope="module")
def tiny():
    return load_teacher_student("tiny:qwen2")


def longest_tail(examples) -> int:
    return max(e.loss_end - e.assistant_start + 1 for e in examples)


@pytest.mark.parametrize("rows_per_forward", [100, 3, 1], ids=["all-prompts-in-one", "split-questions", "one-row"])
def test_shared_prompt_pass_gives_the_reference_loss_and_gradient(tiny, rows_per_forward):
    examples = examples_of(tiny)
    assert_same_loss_and_gradient(tiny, examples, rows_per_forward * longest_tail(examples))


def test_each_distinct_prompt_runs_once(tiny):
    examples = examples_of(tiny)
    prompts, owners = distinct_prompts(examples)
    assert len(prompts) == len(QUESTIONS)
    assert owners == [q for q in range(len(QUESTIONS)) for _ in REPLIES]
    with torch.no_grad():
        reference = student_ce(tiny.student_model, examples, 0, None, max_tokens=10**6, shared_prompt=False)
        shared = student_ce(tiny.student_model, examples, 0, None, max_tokens=10**6, shared_prompt=True)
    prompt_tokens = [e.assistant_start for e in examples]
    # the reference runs every example's prompt; the shared pass each prompt once (its last token with each reply)
    assert reference.tokens - shared.tokens == sum(prompt_tokens) - sum(p.assistant_start for p in prompts) \
        - len(examples) + len(prompts)
    assert shared.ce_sum == pytest.approx(reference.ce_sum, rel=LOSS_RTOL)


def test_a_training_step_is_the_same_on_either_path(tiny):
    """One AdamW step from the same prefix on the same fresh teacher draws: the same loss and the same prefix."""

    def one_step(shared_prompt: bool):
        settings = SoftTrainingSettings(k=K, lr=1e-2, steps=1, questions_per_step=2, completions_per_question=3,
                                        max_new_tokens=8, micro_batch_tokens=40, shared_prompt=shared_prompt)
        trainer = SoftPrefixTrainer(tiny, settings, QUESTIONS, QUESTIONS[:1], seed=0, model_ref="tiny:qwen2")
        soft = trainer.initial_soft().requires_grad_(True)
        stats = trainer.train_step(0, soft, trainer.make_optimizer(soft))
        return stats, soft.detach()

    (shared, shared_soft), (reference, reference_soft) = one_step(True), one_step(False)
    assert shared.n_tokens == reference.n_tokens
    assert shared.train_ce == pytest.approx(reference.train_ce, rel=LOSS_RTOL)
    assert shared.student_tokens < reference.student_tokens
    torch.testing.assert_close(shared_soft, reference_soft)


def test_a_soft_slot_must_end_before_the_prompts_last_token(tiny):
    example = examples_of(tiny)[0]
    broken = dataclasses.replace(example, soft_slice=slice(example.assistant_start - 2, example.assistant_start))
    with pytest.raises(ValueError, match="last token"):
        student_ce(tiny.student_model, [broken], 0, torch.zeros(2, tiny.student_model.config.hidden_size),
                   max_tokens=1000, shared_prompt=True)


def test_shared_prompt_pass_on_the_real_small_model_in_fp32():
    pair = load_teacher_student("smollm2:135m-instruct", dtype="float32")
    examples = examples_of(pair)
    assert_same_loss_and_gradient(pair, examples, 3 * longest_tail(examples))  # groups mix and split questions
