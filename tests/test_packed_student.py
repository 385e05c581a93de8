"""The packed student pass (each prompt packed with its replies into one unpadded row under an offset causal mask)
against the reference (every example run in full): the same summed CE and the same soft-prefix gradient.

The examples of tests/test_shared_prompt.py (three questions of different prompt lengths, replies stopped and cut);
rows that hold everything, that split a question's replies over several rows (its head again in each), and one
reply per row. On the tiny model and on SmolLM2-135M-Instruct in fp32. The CPU runs the mask as a dense tensor
(FlexAttention has no CPU backward); FlexAttention's forward is checked against that dense mask here, its
gradient on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from shared.lm import chat
from shared.lm.packed import allowed, pack, packed_ce_sum
from shared.lm.teacher import load_teacher_student, student_ce
from shared.search.soft_prompt import SoftPrefixTrainer, SoftTrainingSettings
from tests.test_shared_prompt import GRAD_ATOL, GRAD_RTOL, LOSS_RTOL, QUESTIONS, REPLIES, K, examples_of


def loss_and_grad(pair, examples, *, packed: bool, max_tokens: int):
    weight = pair.student_model.get_input_embeddings().weight
    soft = (weight[10:10 + K].detach().float() + 0.01).clone().requires_grad_(True)
    tokens = sum(e.loss_end - e.assistant_start for e in examples)
    result = student_ce(pair.student_model, examples, chat.soft_placeholder_id(pair.tokenizer), soft,
                        max_tokens=max_tokens, shared_prompt=packed, pack_replies=packed, backward_scale=1 / tokens)
    return result, soft.grad


def assert_same_loss_and_gradient(pair, examples, max_tokens: int) -> None:
    reference, reference_grad = loss_and_grad(pair, examples, packed=False, max_tokens=10**6)
    packed, packed_grad = loss_and_grad(pair, examples, packed=True, max_tokens=max_tokens)
    assert packed.ce_sum == pytest.approx(reference.ce_sum, rel=LOSS_RTOL)
    scale = float(reference_grad.abs().max())
    assert scale > 0
    torch.testing.assert_close(packed_grad / scale, reference_grad / scale, rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.fixture(scope="module")
def tiny():
    return load_teacher_student("tiny:qwen2")


def split_tokens(examples) -> int:
    """A row size that holds a head and its longest reply but not all of a question's replies."""
    return max(e.assistant_start - 1 for e in examples) + max(e.loss_end - e.assistant_start + 1 for e in examples)


@pytest.mark.parametrize("rows", ["all-in-one", "split-questions", "one-reply-each"])
def test_packed_pass_gives_the_reference_loss_and_gradient(tiny, rows):
    examples = examples_of(tiny)
    max_tokens = {"all-in-one": 10**6, "split-questions": split_tokens(examples), "one-reply-each": 1}[rows]
    assert_same_loss_and_gradient(tiny, examples, max_tokens)


def test_packing_keeps_every_reply_once_and_pads_nothing(tiny):
    examples = examples_of(tiny)
    rows = pack(examples, split_tokens(examples))
    assert sum(row.replies for row in rows) == len(examples)
    assert len(rows) > len(QUESTIONS)  # some question's replies were split over rows, its head in each
    heads = sum(row.heads for row in rows)
    head_tokens = sum(row.segments.count(0) for row in rows)
    reply_tokens = sum(e.loss_end - e.assistant_start + 1 for e in examples)
    assert sum(len(row) for row in rows) == head_tokens + reply_tokens
    assert heads > len(QUESTIONS)
    # every reply position but the last predicts the next reply token; the heads predict nothing
    targets = [t for row in rows for t in row.targets if t != chat.IGNORE_INDEX]
    assert len(targets) == sum(e.loss_end - e.assistant_start for e in examples)
    with torch.no_grad():
        result = student_ce(tiny.student_model, examples, 0, None, max_tokens=10**6, pack_replies=True)
    assert result.tokens == result.padded_tokens  # on the CPU rows are not aligned: no padding at all


def test_the_mask_sees_its_own_reply_and_its_questions_head_only():
    # question 0: head (2 tokens), reply 1 (2), reply 2 (2); question 1: head (1), reply 3 (2)
    docs = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1])
    segments = torch.tensor([0, 0, 1, 1, 2, 2, 0, 3, 3])
    at = torch.arange(9)
    mask = allowed(docs, segments, at[:, None], at[None, :]).int()
    assert mask[3].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]  # reply 1's second token: head and its own reply
    assert mask[5].tolist() == [1, 1, 0, 0, 1, 1, 0, 0, 0]  # reply 2 skips reply 1
    assert mask[8].tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]  # question 1 sees nothing of question 0
    assert mask[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0]  # the head is causal


def test_flex_attention_computes_what_the_dense_mask_does(tiny):
    examples = examples_of(tiny)
    row = pack(examples, 10**6)[0]
    weight = tiny.student_model.get_input_embeddings().weight
    soft = weight[10:10 + K].detach().float() + 0.01
    pad = chat.soft_placeholder_id(tiny.tokenizer)
    with torch.no_grad():
        dense = packed_ce_sum(tiny.student_model, row, pad, soft, attention="dense")
        flex = packed_ce_sum(tiny.student_model, row, pad, soft, attention="flex")
    assert float(flex) == pytest.approx(float(dense), rel=1e-5)


def test_a_training_step_is_the_same_packed_or_not(tiny):
    def one_step(packed: bool):
        settings = SoftTrainingSettings(k=K, lr=1e-2, steps=1, questions_per_step=2, completions_per_question=3,
                                        max_new_tokens=8, micro_batch_tokens=400, shared_prompt=packed,
                                        pack_replies=packed)
        trainer = SoftPrefixTrainer(tiny, settings, QUESTIONS, QUESTIONS[:1], seed=0, model_ref="tiny:qwen2")
        soft = trainer.initial_soft().requires_grad_(True)
        stats = trainer.train_step(0, soft, trainer.make_optimizer(soft))
        return stats, soft.detach()

    (packed, packed_soft), (reference, reference_soft) = one_step(True), one_step(False)
    assert packed.train_ce == pytest.approx(reference.train_ce, rel=LOSS_RTOL)
    assert packed.student_tokens < reference.student_tokens
    assert packed.padded_tokens < reference.padded_tokens
    torch.testing.assert_close(packed_soft, reference_soft)


def test_packed_pass_on_the_real_small_model_in_fp32():
    pair = load_teacher_student("smollm2:135m-instruct", dtype="float32")
    examples = examples_of(pair)
    assert len(REPLIES) > 1
    assert_same_loss_and_gradient(pair, examples, 10**6)  # one row holding every question (the tiny tests split)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA")
def test_packed_pass_with_flex_attention_on_cuda():
    pair = load_teacher_student("tiny:qwen2", dtype="float32", device="cuda")
    examples = examples_of(pair)
    assert_same_loss_and_gradient(pair, examples, split_tokens(examples))
