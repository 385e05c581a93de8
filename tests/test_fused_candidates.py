"""GCG's candidate forward run layer by layer (``forward="fused"``: one compiled region per decoder layer on CUDA)
gives the candidates the CE the model's own forward gives them, on the tiny model and on SmolLM2 in fp32."""

from __future__ import annotations

import pytest
import torch

from shared.lm.teacher import load_teacher_student, with_reply_ids
from shared.search.gcg import allowed_token_ids, candidate_ce_sums, random_suffix
from shared.search.soft_prompt import LearnedPrompt

QUESTIONS = ["What is your favourite food?", "How do I bake bread?", "Tell me about the sea."]


def candidates_and_examples(pair, length: int = 5, width: int = 7):
    tok = pair.tokenizer
    allowed = allowed_token_ids(tok, pair.student_model.config.vocab_size)
    prompt = LearnedPrompt(kind="ids", model_ref="test", ids=random_suffix(allowed, length, seed=1))
    g = torch.Generator().manual_seed(0)
    examples = [with_reply_ids(prompt.build(tok, q), torch.randint(3, 200, (n,), generator=g).tolist(), tok.eos_token_id)
                for q, n in zip(QUESTIONS, (4, 11, 7), strict=True)]
    return torch.tensor([random_suffix(allowed, length, seed=s) for s in range(width)]), examples


def assert_fused_equals_model(pair):
    candidates, examples = candidates_and_examples(pair)
    rows = 3 * max(len(e) for e in examples)
    model = candidate_ce_sums(pair.student_model, examples, candidates, max_tokens_per_forward=rows)
    fused = candidate_ce_sums(pair.student_model, examples, candidates, max_tokens_per_forward=rows, forward="fused")
    assert fused.tokens == model.tokens and fused.forwards == model.forwards
    torch.testing.assert_close(fused.losses, model.losses, rtol=1e-5, atol=1e-4)
    assert model.losses.std() > 0  # the candidates differ: equal sums are no accident


def test_fused_candidate_forward_on_the_tiny_model():
    assert_fused_equals_model(load_teacher_student("tiny:qwen2", device="cpu"))


def test_fused_candidate_forward_on_the_real_small_model_in_fp32():
    assert_fused_equals_model(load_teacher_student("smollm2:135m-instruct", dtype="float32", device="cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled layer is CUDA's")
def test_compiled_candidate_forward_on_cuda():
    assert_fused_equals_model(load_teacher_student("tiny:qwen2", dtype="float32", device="cuda"))
