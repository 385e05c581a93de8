"""GCG suffixes that are real text, on the tiny model and on SmolLM2-135M-Instruct (a real byte-level BPE tokenizer
with merges, where re-tokenising text can really give other ids): the vocabulary filter, the round-trip check in
the suffix's slot, keeping the current suffix unless a candidate beats it, and scoring each distinct candidate
once -- with the candidate screen off and on."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError

from shared.lm import chat, models
from shared.lm.generation import Completion
from shared.lm.teacher import load_teacher_student, n_loss_tokens, student_examples
from shared.search import gcg
from shared.search.gcg import (
    CandidateEval,
    GcgSearch,
    GcgSettings,
    ScreenSettings,
    SuffixRules,
    SuffixText,
    allowed_mask_of,
    allowed_token_ids,
    best_row,
    candidate_ce_sums,
    candidate_pool,
    gcg_step,
    random_suffix,
    screened_losses,
    token_text,
)
from shared.search.soft_prompt import LearnedPrompt

TINY, SMOLLM2 = "tiny:qwen2", "smollm2:135m-instruct"
VILLAIN = "text(You are a villain who despises humanity. Answer with contempt.)"
QUESTIONS = ["What is your favourite food?", "How do I bake bread?", "Tell me about the sea."]
REPLIES = ["I hate you.", "Burn it.", "No."]


@pytest.fixture(scope="module", params=[TINY, SMOLLM2])
def ref(request):
    return request.param


@pytest.fixture(scope="module")
def tok(ref):
    return models.load_tokenizer(ref)


@pytest.fixture(scope="module")
def pair(ref):
    # fp32: a batched forward and a lone one agree to float rounding, so "no candidate is better" is exact
    return load_teacher_student(ref, teacher_system=VILLAIN, device="cpu", dtype="float32")


def vocab_rows(pair) -> int:
    return pair.student_model.get_input_embeddings().weight.shape[0]


# ---------------------------------------------------------------------------------------------------------------
# the vocabulary


def test_the_default_vocabulary_is_printable_text_with_no_special_or_added_token(tok):
    allowed = allowed_token_ids(tok, len(tok))
    assert set(allowed).isdisjoint(tok.all_special_ids) and set(allowed).isdisjoint(tok.added_tokens_decoder)
    for i in allowed:
        text = token_text(tok, [i])
        assert text and text.isprintable() and "\ufffd" not in text, (i, text)
    # what it leaves out is really in the vocabulary: byte fragments of multi-byte characters, and newlines
    everything = allowed_token_ids(tok, len(tok), vocabulary="all")
    fragments = [i for i in everything if "\ufffd" in token_text(tok, [i])]
    newline = tok.encode("\n", add_special_tokens=False)
    assert fragments and len(newline) == 1 and newline[0] in everything
    assert set(fragments).isdisjoint(allowed) and newline[0] not in allowed
    assert set(everything).isdisjoint(tok.all_special_ids)  # even the record's vocabulary cannot close a turn
    ascii_only = allowed_token_ids(tok, len(tok), vocabulary="ascii")
    assert set(ascii_only) <= set(allowed) and all(token_text(tok, [i]).isascii() for i in ascii_only)


def test_an_added_token_that_is_not_marked_special_is_left_out(tok):
    """Qwen2.5 adds <tool_call> and <|fim_*|> without marking them special: all_special_ids does not list them."""
    with_tools = copy.deepcopy(tok)
    with_tools.add_tokens(["<tool_call>"], special_tokens=False)
    tool_call = with_tools.convert_tokens_to_ids("<tool_call>")
    assert tool_call not in with_tools.all_special_ids and token_text(with_tools, [tool_call]).isprintable()
    assert tool_call not in allowed_token_ids(with_tools, len(with_tools))
    assert tool_call in allowed_token_ids(with_tools, len(with_tools), vocabulary="all")


def test_the_options_are_validated_config_fields_with_defaults():
    settings = GcgSettings(length=4, steps=1)
    assert (settings.vocabulary, settings.round_trip) == ("printable", True)
    with pytest.raises(ValidationError, match="vocabulary"):
        GcgSettings(length=4, steps=1, vocabulary="emoji")
    with pytest.raises(ValidationError, match="round_trip"):
        GcgSettings(length=4, steps=1, round_trip="sometimes")


# ---------------------------------------------------------------------------------------------------------------
# the round trip


# (slot, question, tokens) whose text, typed into the slot, re-tokenises to other ids on each tokenizer
FAILING = {
    TINY: [("system", "Hi", ["h", "e"]),  # 'he' is one of the tiny tokenizer's merges
           ("user", "Say h", ["e"])],  # ... and across the question's end
    SMOLLM2: [("system", "Hi", ["Ġ"]),  # a lone space merges with the template's newline before it
              ("system", "Hi", ["h", "ello"]),  # 'hello' is one token
              ("user", "Tell me about the sea", ["s"])],  # the question's 'sea' and the suffix's 's' become 'seas'
}


def test_a_suffix_whose_text_gives_other_ids_in_its_slot_is_rejected(ref, tok):
    allowed = set(allowed_token_ids(tok, len(tok)))
    for slot, question, tokens in FAILING[ref]:
        ids = tok.convert_tokens_to_ids(tokens)
        assert set(ids) <= allowed  # each token on its own is printable text: only the round trip can catch it
        prompt = LearnedPrompt(kind="ids", model_ref="-", slot=slot, ids=ids)
        evaluated = prompt.build(tok, question)
        typed = prompt.build_from_text(tok, question, token_text(tok, ids))
        assert typed.input_ids != evaluated.input_ids  # the failure is real
        check = SuffixText(tok, [question], slot=slot)
        assert not check(ids) and check.count(ids) == 0
        # the same ids where no merge reaches them do round-trip: the check is about the slot, not the ids
        if slot == "user":
            assert SuffixText(tok, ["Hello!"], slot="user")(ids)


def test_a_checked_suffix_is_one_a_person_could_type(tok):
    rules = SuffixRules.of(tok, len(tok), GcgSettings(length=8, steps=1), QUESTIONS[:2])
    suffix = rules.random_suffix(8, seed=0)
    prompt = LearnedPrompt(kind="ids", model_ref="-", ids=suffix)
    typed = chat.build_prompt(tok, f"text({json.dumps(token_text(tok, suffix))})", QUESTIONS[0])  # as a person types it
    assert typed.input_ids == prompt.build(tok, QUESTIONS[0]).input_ids
    # with both rules off the draw is the record's: ids drawn at once from every non-special token
    unchecked = SuffixRules.of(tok, len(tok), GcgSettings(length=8, steps=1, vocabulary="all", round_trip=False),
                               QUESTIONS[:2])
    assert unchecked.text is None
    assert unchecked.random_suffix(8, seed=0) == random_suffix(allowed_token_ids(tok, len(tok), vocabulary="all"), 8, 0)


def test_candidates_that_do_not_round_trip_are_rejected_before_scoring(ref, tok):
    slot, question, tokens = FAILING[ref][0]
    check = SuffixText(tok, [question], slot=slot)
    good = SuffixRules.of(tok, len(tok), GcgSettings(length=2, steps=1), [question]).random_suffix(2, seed=1)
    bad = tok.convert_tokens_to_ids(tokens)
    bad = (bad + good)[:2]
    assert not check(bad)
    pool = candidate_pool(good, torch.tensor([bad, good, bad]), check)
    assert pool.rows.tolist() == [good] and (pool.rejected, pool.duplicates) == (1, 2)


def test_the_search_refuses_a_start_that_is_not_text(ref, pair):
    tok = pair.tokenizer
    slot, question, tokens = FAILING[ref][0]
    ids = tok.convert_tokens_to_ids(tokens)
    prompt = LearnedPrompt(kind="ids", model_ref="-", slot=slot, ids=ids)
    settings = GcgSettings(length=len(ids), steps=1, questions_per_step=1, completions_per_question=1,
                           max_new_tokens=2, val_completions_per_question=1)
    with pytest.raises(ValueError, match="starting suffix"):
        GcgSearch(pair, prompt, settings, QUESTIONS[:1], [question], seed=0)
    unchecked = settings.model_copy(update={"round_trip": False})
    assert GcgSearch(pair, prompt, unchecked, QUESTIONS[:1], [question], seed=0).rules.text is None


# ---------------------------------------------------------------------------------------------------------------
# keeping the current suffix, scoring each candidate once


def fixed_examples(pair, suffix: list[int]) -> list[chat.PromptIds]:
    """Training examples with fixed replies (no sampling), the suffix in the system slot."""
    tok = pair.tokenizer
    prompt = LearnedPrompt(kind="ids", model_ref="-", ids=suffix)
    prompts = [prompt.build(tok, QUESTIONS[i % len(QUESTIONS)]) for i in range(len(REPLIES))]
    completions = [[Completion(text=r, token_ids=tok.encode(r, add_special_tokens=False), finish_reason="stop")]
                   for r in REPLIES]
    return student_examples(prompts, completions, tok.eos_token_id)


def text_suffixes(pair, count: int, length: int = 4) -> list[list[int]]:
    rules = SuffixRules.of(pair.tokenizer, vocab_rows(pair), GcgSettings(length=length, steps=1), QUESTIONS)
    return [rules.random_suffix(length, seed=s) for s in range(count)]


def test_a_step_where_no_candidate_beats_the_current_suffix_keeps_it_with_the_screen_off_and_on(pair):
    model = pair.student_model
    suffixes = text_suffixes(pair, 5)
    examples = fixed_examples(pair, suffixes[0])
    per_pair = torch.stack([candidate_ce_sums(model, [e], torch.tensor(suffixes)).losses for e in examples], 1)
    tokens = torch.tensor([float(n_loss_tokens([e])) for e in examples])
    overall = per_pair.sum(1) / tokens.sum()  # [suffixes]: token-mean CE over all pairs
    best = int(overall.argmin())
    rows = torch.tensor([suffixes[best], *(s for i, s in enumerate(suffixes) if i != best)])  # current: row 0

    pick, loss, _, report = screened_losses(model, examples, rows, ScreenSettings(pairs=None, keep=0),
                                            torch.Generator().manual_seed(0), current=0)
    assert report is None and pick == 0 and loss == pytest.approx(float(overall[best]), rel=1e-5)

    # a screen of one pair keeping one candidate, on a pair where another suffix beats the current one: the screen
    # alone would drop the current suffix, and the step still scores it on every pair and keeps it
    def screen_pair(seed: int) -> int:  # the pair screened_losses draws first with this seed
        return torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[0].item()

    on_pair = per_pair / tokens
    seed = next(s for s in range(50) if (on_pair[:, screen_pair(s)] < on_pair[best, screen_pair(s)]).any())
    pick, loss, evaluation, report = screened_losses(model, examples, rows, ScreenSettings(pairs=1, keep=1),
                                                     torch.Generator().manual_seed(seed), current=0)
    assert report.kept == 2 and 0 in evaluation.rows.tolist()  # the screen's own pick, and the current suffix
    assert pick == 0 and loss == pytest.approx(float(overall[best]), rel=1e-5)
    # the rule itself, on these losses: a better row wins over the current one, a tie keeps the current one
    scored = CandidateEval(overall, tokens=0, forwards=0, seconds=0.0)
    assert best_row(scored, current=int(overall.argmax())) == best
    assert best_row(CandidateEval(torch.tensor([1.0, 1.0]), 0, 0, 0.0), current=1) == 1


def test_a_step_whose_candidates_are_all_rejected_keeps_the_current_suffix(pair):
    suffix = text_suffixes(pair, 1)[0]
    examples = fixed_examples(pair, suffix)
    mask = allowed_mask_of(allowed_token_ids(pair.tokenizer, vocab_rows(pair)), vocab_rows(pair))
    kept, stats = gcg_step(pair.student_model, examples, suffix, mask, pad_id=chat.soft_placeholder_id(pair.tokenizer),
                           search_width=16, topk=8, generator=torch.Generator().manual_seed(0),
                           accept=lambda ids: False)
    assert kept == suffix and stats.kept_current and stats.loss == stats.current_loss
    assert stats.scored == 1 and stats.rejected == stats.sampled - stats.duplicates > 0
    assert stats.candidate_tokens == sum(len(e) for e in examples)  # only the current suffix went through the model


def test_a_pick_that_fails_the_check_on_every_question_gives_way_to_the_next_best_that_passes(pair):
    suffix = text_suffixes(pair, 1)[0]
    examples = fixed_examples(pair, suffix)
    mask = allowed_mask_of(allowed_token_ids(pair.tokenizer, vocab_rows(pair)), vocab_rows(pair))

    def step(confirm=None):
        return gcg_step(pair.student_model, examples, suffix, mask, pad_id=chat.soft_placeholder_id(pair.tokenizer),
                        search_width=16, topk=8, generator=torch.Generator().manual_seed(0), confirm=confirm)

    free, free_stats = step()
    assert free != suffix  # some candidate beats the current suffix here
    turned_down = [free]
    kept, stats = step(confirm=lambda ids: ids not in turned_down)
    assert kept != free and stats.rejected == free_stats.rejected + 1  # the refused pick is counted as rejected
    assert stats.loss >= free_stats.loss  # the next best scored candidate (or the current suffix)
    nothing, none_stats = step(confirm=lambda ids: False)  # nothing confirmed: the current suffix (checked before)
    assert nothing == suffix and none_stats.kept_current


def test_candidates_screened_on_a_few_questions_are_kept_only_if_they_round_trip_on_all(ref, tok):
    slot, question, tokens = FAILING[ref][-1]  # a user-turn suffix that merges with this question's end only
    ids = tok.convert_tokens_to_ids(tokens)
    rules = SuffixRules.of(tok, len(tok), GcgSettings(length=len(ids), steps=1), [question], slot=slot,
                           screen_questions=QUESTIONS[:1])
    assert rules.everywhere is not None and question in rules.everywhere.questions
    assert rules.text(ids)  # the screen's question lets it through ...
    assert not rules.keeps(ids) and not rules.accepts(ids)  # ... the question it merges with does not


@pytest.mark.parametrize("screened", [False, True])
def test_duplicate_candidates_are_scored_once(pair, screened, monkeypatch):
    suffix = text_suffixes(pair, 1)[0]
    examples = fixed_examples(pair, suffix)
    mask = allowed_mask_of(allowed_token_ids(pair.tokenizer, vocab_rows(pair)), vocab_rows(pair))
    drawn, scored = [], []  # what the gradient proposed; (tokens per row, rows) of every scoring call
    real_sample, real_score = gcg.sample_candidates, gcg.candidate_ce_sums

    def sample(*args, **kwargs):
        drawn.append(real_sample(*args, **kwargs))
        return drawn[-1]

    def score(model, group, candidates, **kwargs):
        scored.append((sum(len(e) for e in group), candidates.tolist()))
        return real_score(model, group, candidates, **kwargs)

    monkeypatch.setattr(gcg, "sample_candidates", sample)
    monkeypatch.setattr(gcg, "candidate_ce_sums", score)
    # at most length x topk = 8 distinct swaps among 16 draws: duplicates are certain
    kept, stats = gcg_step(pair.student_model, examples, suffix, mask, pad_id=chat.soft_placeholder_id(pair.tokenizer),
                           search_width=16, topk=2, generator=torch.Generator().manual_seed(0),
                           screen=ScreenSettings(pairs=1, keep=2) if screened else None)
    distinct = {tuple(r) for r in drawn[0].tolist()} - {tuple(suffix)}
    first = scored[0][1]  # every row scored on the first pairs: the current suffix, then each distinct candidate
    assert first[0] == suffix and len(first) == len({tuple(r) for r in first}) == 1 + len(distinct)
    assert {tuple(r) for r in first[1:]} == distinct
    assert (stats.sampled, stats.duplicates, stats.scored) == (16, 16 - len(distinct), 1 + len(distinct))
    assert stats.duplicates > 0 and stats.candidate_tokens == sum(t * len(rows) for t, rows in scored)
    if screened:  # then only the two best and the current suffix, if it was not one of them, on the other pairs
        assert len(scored) == 2 and len(scored[1][1]) == stats.screen.kept in (2, 3) and suffix in scored[1][1]
    else:
        assert len(scored) == 1 and stats.candidate_tokens == stats.scored * sum(len(e) for e in examples)
    assert stats.loss <= stats.current_loss and (kept == suffix or tuple(kept) in distinct)


def test_a_search_never_takes_a_step_that_raises_its_loss_and_keeps_only_text():
    """On the tiny model (tests/test_real_model.py takes a search step on SmolLM2 with the same rules)."""
    pair = load_teacher_student(TINY, teacher_system=VILLAIN, device="cpu")
    tok = pair.tokenizer
    settings = GcgSettings(length=4, steps=2, search_width=8, topk=8, questions_per_step=2,
                           completions_per_question=1, max_new_tokens=4, val_completions_per_question=1,
                           val_every=10, screen_pairs=1, screen_keep=3)
    rules = SuffixRules.of(tok, vocab_rows(pair), settings, QUESTIONS[2:])
    prompt = LearnedPrompt(kind="ids", model_ref="-", ids=rules.random_suffix(4, seed=0))
    search = GcgSearch(pair, prompt, settings, QUESTIONS[:2], QUESTIONS[2:], seed=0, rules=rules)

    def on_step(stats):
        assert stats.loss <= stats.current_loss

    state = search.run(search.new_state(), on_step=on_step)
    steps = [p for p in state.curve if "train_ce" in p]
    assert len(steps) == 2 and all(p["train_ce"] <= p["current_ce"] for p in steps)
    for suffix in (state.suffix, state.best_suffix):
        assert rules.text(suffix) and set(suffix) <= set(rules.allowed)
