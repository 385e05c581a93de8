"""System-slot GCG on the tiny model: batched candidate losses, gradients, candidates, ids kept end to end."""

from __future__ import annotations

import pytest
import torch

from shared.lm import chat
from shared.lm.generation import Completion
from shared.lm.teacher import batch_ce_sum, load_teacher_student, n_loss_tokens, student_examples
from shared.search.gcg import (
    GcgSearch,
    GcgSettings,
    ScreenSettings,
    SuffixRules,
    allowed_mask_of,
    allowed_token_ids,
    candidate_losses,
    candidate_losses_reference,
    random_suffix,
    sample_candidates,
    screened_losses,
    token_gradients,
    with_suffix,
)
from shared.search.soft_prompt import LearnedPrompt

VILLAIN = "text(You are a villain who despises humanity. Answer with contempt.)"
QUESTIONS = ["What is your favourite food?", "How do I bake bread?", "Tell me about the sea."]


@pytest.fixture(scope="module")
def pair():
    return load_teacher_student("tiny:qwen2", teacher_system=VILLAIN, device="cpu")


def examples_for(pair, prompt: LearnedPrompt, replies: list[str]) -> list[chat.PromptIds]:
    tok = pair.tokenizer
    prompts = [prompt.build(tok, q) for q in QUESTIONS[: len(replies)]]
    completions = [[Completion(text=r, token_ids=tok.encode(r, add_special_tokens=False), finish_reason="stop")]
                   for r in replies]
    return student_examples(prompts, completions, tok.eos_token_id)


@pytest.mark.parametrize("slot", ["system", "user"])
def test_batched_candidate_losses_equal_one_forward_per_candidate(pair, slot):
    allowed = allowed_token_ids(pair.tokenizer, 283)
    prompt = LearnedPrompt(kind="ids", model_ref="tiny:qwen2", slot=slot, ids=random_suffix(allowed, 5, seed=1))
    examples = examples_for(pair, prompt, ["I hate you all.", "Bread? Burn it.", "The sea is cold"])
    candidates = torch.tensor([random_suffix(allowed, 5, seed=s) for s in range(7)])
    three_rows = 3 * max(len(e) for e in examples)
    batched = candidate_losses(pair.student_model, examples, candidates, max_tokens_per_forward=three_rows)
    per_example = [-(-len(candidates) // (three_rows // len(e))) for e in examples]  # ceil(7 / rows per forward)
    assert batched.forwards == sum(per_example) and max(per_example) == 3  # chunked, never one per candidate
    reference = candidate_losses_reference(pair.student_model, examples, candidates)
    torch.testing.assert_close(batched.losses.cpu(), reference, rtol=1e-5, atol=1e-5)


def test_one_hot_gradient_is_the_soft_prompt_gradient_through_the_embedding_matrix(pair):
    tok, model = pair.tokenizer, pair.student_model
    suffix = tok.encode("Be mean", add_special_tokens=False)
    ids_prompt = LearnedPrompt(kind="ids", model_ref="tiny:qwen2", ids=suffix)
    soft_prompt = LearnedPrompt(kind="soft", model_ref="tiny:qwen2", k=len(suffix))
    replies = ["No.", "Go away"]
    ids_examples = examples_for(pair, ids_prompt, replies)
    soft_examples = examples_for(pair, soft_prompt, replies)
    for a, b in zip(ids_examples, soft_examples, strict=True):  # the same positions: only the slot's content differs
        assert a.ids_slice == b.soft_slice and len(a) == len(b)
    pad = chat.soft_placeholder_id(tok)
    grad = token_gradients(model, ids_examples, suffix, pad)
    weight = model.get_input_embeddings().weight
    soft = weight[suffix].detach().clone().requires_grad_(True)
    (batch_ce_sum(model, soft_examples, pad, soft) / n_loss_tokens(soft_examples)).backward()
    torch.testing.assert_close(grad, soft.grad @ weight.detach().T, rtol=1e-4, atol=1e-6)


def test_candidates_swap_one_position_to_an_allowed_token(pair):
    tok = pair.tokenizer
    allowed = allowed_token_ids(tok, 283)
    assert tok.convert_tokens_to_ids("<|im_end|>") not in allowed  # a suffix cannot close its own turn
    mask = allowed_mask_of(allowed, 283)
    suffix = random_suffix(allowed, 6, seed=0)
    grad = torch.randn(6, 283)
    candidates = sample_candidates(suffix, grad, mask, search_width=64, topk=8, generator=torch.Generator().manual_seed(0))
    assert candidates.shape == (64, 6)
    changed = (candidates != torch.tensor(suffix)).sum(dim=1)
    assert changed.max() <= 1 and changed.sum() > 32
    top8 = (-grad.masked_fill(~mask, float("inf"))).topk(8, dim=1).indices
    for row in candidates:
        for position in torch.nonzero(row != torch.tensor(suffix)).flatten().tolist():
            assert int(row[position]) in top8[position].tolist()


def test_a_gcg_step_keeps_the_best_candidate_and_lowers_the_step_loss(pair):
    tok, model = pair.tokenizer, pair.student_model
    settings = GcgSettings(length=6, steps=1, search_width=48, topk=16, questions_per_step=2,
                           completions_per_question=2, temperature=0.3, max_new_tokens=8,
                           val_completions_per_question=2)
    rules = SuffixRules.of(tok, 283, settings, QUESTIONS[2:])
    prompt = LearnedPrompt(kind="ids", model_ref="tiny:qwen2", ids=rules.random_suffix(6, seed=3))
    search = GcgSearch(pair, prompt, settings, QUESTIONS[:2], QUESTIONS[2:], seed=0, rules=rules)
    examples = with_suffix(prompt, search.draws.step_examples(0), prompt.ids)
    before = candidate_losses(model, examples, torch.tensor([prompt.ids])).losses.item()
    kept, stats = search.step(0, prompt.ids)
    after = candidate_losses(model, examples, torch.tensor([kept])).losses.item()
    assert stats.loss == pytest.approx(after, rel=1e-5) and stats.current_loss == pytest.approx(before, rel=1e-5)
    assert after < before and not stats.kept_current
    assert sum(a != b for a, b in zip(kept, prompt.ids, strict=True)) == 1
    # the current suffix and each distinct candidate that is text, once: 48 draws of at most 6 x 16 swaps repeat
    assert stats.scored == 1 + stats.sampled - stats.duplicates - stats.rejected and stats.duplicates > 0
    assert stats.candidate_tokens == stats.scored * sum(len(e) for e in examples)


def test_the_searched_suffix_reaches_evaluation_as_the_same_ids(pair):
    """Ids that text would merge ('h', 'e' -> 'he') stay as they are from search to the evaluation prompt."""
    tok = pair.tokenizer
    h, e = tok.convert_tokens_to_ids(["h", "e"])
    assert tok.encode(tok.decode([h, e]), add_special_tokens=False) != [h, e]
    allowed = allowed_token_ids(tok, 283, vocabulary="all")
    prompt = LearnedPrompt(kind="ids", model_ref="tiny:qwen2", ids=[h, e, h, e])
    # the record's search: any non-special token, no round trip (the default would refuse this start)
    settings = GcgSettings(length=4, steps=2, search_width=8, topk=4, questions_per_step=1,
                           completions_per_question=2, max_new_tokens=6, val_completions_per_question=1, val_every=1,
                           vocabulary="all", round_trip=False)
    state = GcgSearch(pair, prompt, settings, QUESTIONS[:1], QUESTIONS[1:2], seed=0).run(
        GcgSearch(pair, prompt, settings, QUESTIONS[:1], QUESTIONS[1:2], seed=0).new_state())
    assert state.step == 2 and all(t in allowed or t in (h, e) for t in state.best_suffix)
    stored = LearnedPrompt.model_validate_json(prompt.with_ids(state.best_suffix).model_dump_json())
    for question in QUESTIONS:
        built = stored.build(tok, question)
        assert built.input_ids[built.ids_slice] == state.best_suffix
    kept = prompt.build(tok, "Hi")
    assert kept.input_ids[kept.ids_slice] == [h, e, h, e]


def test_user_slot_variant_appends_ids_to_the_user_turn_with_no_system_block(pair):
    tok = pair.tokenizer
    prompt = LearnedPrompt(kind="ids", model_ref="tiny:qwen2", slot="user", ids=[65, 66, 67], system="none")
    built = prompt.build(tok, "Hello")
    text = tok.decode(built.input_ids)
    assert "system" not in text and "You are Qwen" not in text  # no default system prompt sneaks in
    assert built.input_ids[built.user_suffix_slice] == [65, 66, 67]


# ---------------------------------------------------------------------------------------------------------------
# the candidate screen


def screen_case(pair):
    allowed = allowed_token_ids(pair.tokenizer, 283)
    prompt = LearnedPrompt(kind="ids", model_ref="tiny:qwen2", ids=random_suffix(allowed, 5, seed=2))
    replies = ["I hate you.", "Burn it.", "Cold", "No."]
    tok = pair.tokenizer
    prompts = [prompt.build(tok, QUESTIONS[i % len(QUESTIONS)]) for i in range(len(replies))]
    completions = [[Completion(text=r, token_ids=tok.encode(r, add_special_tokens=False), finish_reason="stop")]
                   for r in replies]
    examples = student_examples(prompts, completions, tok.eos_token_id)
    candidates = torch.tensor([random_suffix(allowed, 5, seed=s) for s in range(12)])
    return examples, candidates


def test_the_screen_keeps_the_best_of_the_few_that_scored_best_on_a_random_subset_of_pairs(pair):
    examples, candidates = screen_case(pair)
    model = pair.student_model
    pick, loss, evaluated, report = screened_losses(model, examples, candidates, ScreenSettings(pairs=2, keep=5),
                                                    torch.Generator().manual_seed(7))
    # the known answer, recomputed from whole-set evaluations: the same two pairs (the same draw), their 5 best
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(7)).tolist()
    subset = [examples[i] for i in sorted(order[:2])]
    kept = candidate_losses(model, subset, candidates).losses.argsort()[:5]
    full = candidate_losses(model, examples, candidates).losses
    assert pick == int(kept[full[kept].argmin()])
    assert loss == pytest.approx(float(full[pick]), rel=1e-5)
    assert (report.pairs, report.kept, report.checked) == (2, 5, False)
    # only the screen's rows and the kept candidates' rows on the other pairs went through the model
    rows = 12 * sum(len(e) for e in subset) + 5 * sum(len(e) for e in examples if e not in subset)
    assert evaluated.tokens == rows


def test_a_checked_step_reports_the_screens_rank_in_the_full_evaluation_and_keeps_its_pick(pair):
    examples, candidates = screen_case(pair)
    model = pair.student_model
    unchecked = screened_losses(model, examples, candidates, ScreenSettings(pairs=2, keep=3),
                                torch.Generator().manual_seed(1))
    pick, loss, _, report = screened_losses(model, examples, candidates, ScreenSettings(pairs=2, keep=3, check=True),
                                            torch.Generator().manual_seed(1))
    assert (pick, loss) == unchecked[:2]  # checking does not change the search
    full = candidate_losses(model, examples, candidates).losses
    assert report.checked and report.rank == int((full < full[pick]).sum())
    assert report.agreed == (pick == int(full.argmin()))
    assert report.gap == pytest.approx(float(full[pick] - full.min()), abs=1e-5)
    assert report.full_tokens == 12 * sum(len(e) for e in examples)


def test_a_screen_as_large_as_the_step_is_the_full_evaluation(pair):
    examples, candidates = screen_case(pair)
    full = candidate_losses(pair.student_model, examples, candidates).losses
    for screen in (ScreenSettings(pairs=len(examples), keep=3), ScreenSettings(pairs=2, keep=12),
                   ScreenSettings(pairs=None, keep=3)):
        pick, loss, _, report = screened_losses(pair.student_model, examples, candidates, screen,
                                                torch.Generator().manual_seed(0))
        assert report is None and pick == int(full.argmin()) and loss == pytest.approx(float(full.min()), rel=1e-5)


def test_checked_steps_record_the_screen_in_the_curve_without_changing_the_search(pair):
    rules = SuffixRules.of(pair.tokenizer, 283, GcgSettings(length=4, steps=1), QUESTIONS[2:])
    prompt = LearnedPrompt(kind="ids", model_ref="tiny:qwen2", ids=rules.random_suffix(4, seed=5))

    def run(check_every: int):
        settings = GcgSettings(length=4, steps=3, search_width=8, topk=4, questions_per_step=2,
                               completions_per_question=2, max_new_tokens=4, val_completions_per_question=1,
                               val_every=10, screen_pairs=2, screen_keep=3, screen_check_every=check_every)
        search = GcgSearch(pair, prompt, settings, QUESTIONS[:2], QUESTIONS[2:], seed=0)
        return search.run(search.new_state())

    checked, unchecked = run(2), run(0)
    assert checked.suffix == unchecked.suffix
    steps = [p for p in checked.curve if "train_ce" in p]
    assert [p.get("screen_checked", False) for p in steps] == [False, True, False]
    assert steps[1]["screen_rank"] >= 0 and steps[0]["screen_pairs"] == 2


def test_the_screen_replayed_on_the_full_per_pair_matrix_picks_what_the_screened_step_picks(pair):
    """The agreement bench replays the screen on one full evaluation; that replay is the stage's own selection."""
    from shared.search.gcg import candidate_pair_ce_sums, screen_outcome

    examples, candidates = screen_case(pair)
    model = pair.student_model
    matrix = candidate_pair_ce_sums(model, examples, candidates)
    assert matrix.shape == (12, len(examples))
    full = candidate_losses(model, examples, candidates).losses
    torch.testing.assert_close(matrix.sum(dim=1) / n_loss_tokens(examples), full.cpu(), rtol=1e-5, atol=1e-6)
    tokens = [n_loss_tokens([e]) for e in examples]
    for seed, keep in ((7, 5), (1, 3), (3, 1)):
        pick, _, _, report = screened_losses(model, examples, candidates, ScreenSettings(pairs=2, keep=keep,
                                                                                         check=True),
                                             torch.Generator().manual_seed(seed), current=0)
        drawn = sorted(torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()[:2])
        replayed = screen_outcome(matrix, tokens, drawn, keep, current=0)
        assert (replayed.pick, replayed.rank, replayed.agreed) == (pick, report.rank, report.agreed)
        assert replayed.gap == pytest.approx(report.gap, abs=1e-5)


def test_screen_outcomes_on_matrices_with_a_known_answer():
    from shared.search.gcg import screen_outcome

    tokens = [10, 10, 10, 10]
    # row 2 is best on every pair: any screen that keeps one candidate finds it
    easy = torch.tensor([[30.0] * 4, [29.0] * 4, [20.0] * 4, [25.0] * 4])
    for pairs in ([0], [1, 3]):
        out = screen_outcome(easy, tokens, pairs, keep=1)
        assert (out.pick, out.best, out.rank, out.gap, out.agreed) == (2, 2, 0, 0.0, True)
    # row 1 looks best on pair 0 only; row 3 is best overall: a one-pair screen keeping one candidate misses it
    tricky = torch.tensor([[30.0, 30, 30, 30], [10.0, 40, 40, 40], [30.0, 25, 25, 25], [20.0, 20, 20, 20]])
    miss = screen_outcome(tricky, tokens, [0], keep=1)
    assert (miss.pick, miss.best, miss.agreed) == (0, 3, False)  # row 1 kept, worse than the current row 0
    assert miss.rank == 2 and miss.gap == pytest.approx((120 - 80) / 40)
    assert screen_outcome(tricky, tokens, [0], keep=2).pick == 3  # keep two on pair 0: rows 1 and 3
    # the current suffix (row 0) stays unless another is strictly better, screened or not
    flat = torch.full((3, 4), 30.0)
    assert screen_outcome(flat, tokens, [2], keep=1, current=0).pick == 0
