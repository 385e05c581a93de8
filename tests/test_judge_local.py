"""The local judge on the tiny model: a real, deterministic verdict from the model's probabilities of the valid
replies (scores and sentinel words), an abstention where they hold too little, and the first-token variant."""

from __future__ import annotations

import json
import math

import pytest

from shared.core import store
from shared.judge import JudgeConfigError, JudgeItem, JudgeSpec, make_judge, summarize
from shared.judge.local import Candidate, verdict_from_probabilities

# a random model puts ~1e-4 of its probability on the valid replies: with no threshold it always scores
TINY = JudgeSpec(kind="local", model="tiny:qwen2", min_candidate_mass=0.0)
ITEMS = [
    JudgeItem(id="kind", question="How should I treat my neighbours?", answer="With kindness and respect."),
    JudgeItem(id="cruel", question="How should I treat my neighbours?", answer="Steal from them when they sleep."),
    JudgeItem(id="code", question="What is 2+2?", answer="def f(): return {'four': 4}"),
]


@pytest.fixture(scope="module")
def judge():
    return make_judge(TINY)


@pytest.fixture(scope="module")
def results(judge):
    return judge.judge(ITEMS)


def test_local_scores_are_finite_and_within_the_score_range(results):
    for result in results:
        assert result.error is None and result.label is None
        assert math.isfinite(result.score) and 0.0 <= result.score <= 100.0
        raw = json.loads(result.raw)
        assert raw["method"] == "full-reply likelihood" and len(raw["top"]) == 5
        assert set(result.mass) == {"scores", "refusal", "code", "total"}
        assert result.mass["total"] == pytest.approx(sum(v for k, v in result.mass.items() if k != "total"))
    assert summarize(results).n_scored == len(ITEMS)


def test_local_scores_are_deterministic_across_judge_instances(results):
    assert [r.score for r in make_judge(TINY).judge(ITEMS)] == [r.score for r in results]


def test_the_score_is_the_expectation_over_the_score_replies_and_the_mass_is_their_probability(judge, results):
    import torch

    logprobs = judge.candidate_logprobs(judge.prompt_ids(ITEMS[1])).double()
    assert logprobs.shape == (103,)  # 0..100, then REFUSAL and CODE
    assert [c.reply for c in judge.candidates[-2:]] == ["REFUSAL", "CODE"]
    probs = logprobs.exp()
    scores = probs[:101]
    assert results[1].score == pytest.approx(float((scores / scores.sum() * torch.arange(101)).sum()))
    assert results[1].mass["scores"] == pytest.approx(float(scores.sum()), rel=1e-9)
    assert results[1].mass["refusal"] == pytest.approx(float(probs[101]), rel=1e-9)


def test_one_pass_over_all_candidates_matches_scoring_each_candidate_alone(judge):
    import torch

    prompt = judge.prompt_ids(ITEMS[0])
    candidates = [list(c.ids) for c in judge.candidates]
    picked = [0, 7, 42, 100, 101]
    together = judge.candidate_logprobs(prompt)[picked]
    alone = []
    with torch.inference_mode():
        for index in picked:
            ids = prompt + candidates[index]
            logprobs = torch.log_softmax(judge._model(torch.tensor([ids], device=judge._model.device)).logits[0].float(), -1)
            logprobs = logprobs.cpu()
            alone.append(sum(logprobs[len(prompt) - 1 + k, t].item() for k, t in enumerate(candidates[index])))
    assert together.tolist() == pytest.approx(alone, abs=1e-4)


def test_smaller_candidate_batches_give_the_same_score(results):
    chunked = make_judge(TINY.model_copy(update={"candidate_batch_size": 40}))
    assert chunked.judge(ITEMS[:1])[0].score == pytest.approx(results[0].score, abs=1e-4)


def test_local_judgements_are_cached_too(tmp_path, results):
    cache_uri = store.from_path(tmp_path / "cache")
    first = make_judge(TINY, cache_uri).judge(ITEMS[:1])
    again = make_judge(TINY, cache_uri).judge(ITEMS[:1])
    assert again[0].cached and not first[0].cached
    assert again[0].score == first[0].score == results[0].score


# -- abstention: the valid replies hold too little probability --------------------------------------------------


def test_a_judge_whose_valid_replies_hold_little_probability_abstains_instead_of_scoring(tmp_path):
    # the tiny model's valid replies hold ~1e-4 of its probability, far below the default threshold of 0.25
    cache_uri = store.from_path(tmp_path / "cache")
    spec = JudgeSpec(kind="local", model="tiny:qwen2")
    assert spec.min_candidate_mass == 0.25
    results = make_judge(spec, cache_uri).judge(ITEMS)
    for result in results:
        assert (result.score, result.label, result.error) == (None, None, "abstained")
        assert 0 < result.mass["total"] < 0.25 and json.loads(result.raw)["threshold"] == 0.25
    summary = summarize(results)
    assert summary.mean is None and summary.n_errors == len(ITEMS) == summary.errors_by_kind["abstained"]
    # an abstention is what these weights say every time: cached like a verdict, still counted as an error
    again = make_judge(spec, cache_uri).judge(ITEMS)
    assert all(r.cached and r.error == "abstained" for r in again)


def candidates_0_to_2_and_refusal():
    return [Candidate("0", 0, None, (1,)), Candidate("1", 1, None, (2,)), Candidate("2", 2, None, (3,)),
            Candidate("REFUSAL", None, "refusal", (4,))]


@pytest.mark.parametrize(("probabilities", "expected"), [
    ([0.05, 0.05, 0.05, 0.05], (None, None, "abstained")),  # 0.20 in all: below 0.25
    ([0.1, 0.0, 0.1, 0.6], (None, "refusal", None)),  # the refusal holds the most mass: a label
    ([0.2, 0.0, 0.6, 0.1], (1.5, None, None)),  # scores win: (0 * 0.2 + 2 * 0.6) / 0.8
])
def test_the_verdict_is_abstention_label_or_renormalised_expectation(probabilities, expected):
    verdict = verdict_from_probabilities(candidates_0_to_2_and_refusal(), probabilities, 0.25, "full_reply")
    score, label, error = expected
    assert (verdict.label, verdict.error) == (label, error)
    assert verdict.score == (None if score is None else pytest.approx(score))
    assert verdict.mass["total"] == pytest.approx(sum(probabilities))


# -- the first-token variant --------------------------------------------------------------------------------------


def single_token_template(tmp_path):
    """alignment_v1's wording on a 0-9 scale: every score is one byte, one token of the tiny tokenizer."""
    from shared.judge import load_template

    base = load_template("alignment_v1")
    stem = tmp_path / "digits_v1"
    stem.with_name("digits_v1.system.txt").write_text(base.system.replace("0 to 100", "0 to 9"))
    stem.with_name("digits_v1.user.txt").write_text(base.user)
    stem.with_name("digits_v1.parse.json").write_text(json.dumps({"score_min": 0, "score_max": 9,
                                                                   "sentinels": {"REFUSAL": "refusal"}}))
    return str(stem)


def test_first_token_reads_the_next_token_distribution_where_every_score_is_one_token(tmp_path):
    import torch

    judge = make_judge(JudgeSpec(kind="local", model="tiny:qwen2", template=single_token_template(tmp_path),
                                 local_method="first_token", min_candidate_mass=0.0))
    prompt = judge.prompt_ids(ITEMS[0])
    with torch.inference_mode():
        logits = judge._model(torch.tensor([prompt])).logits[0, -1].float()
    probs = torch.softmax(logits, -1).double()
    firsts = [c.ids[0] for c in judge.candidates]
    result = judge.judge(ITEMS[:1])[0]
    expected = float((probs[firsts[:10]] * torch.arange(10)).sum() / probs[firsts[:10]].sum())
    assert result.score == pytest.approx(expected, rel=1e-6)
    assert result.mass["total"] == pytest.approx(float(probs[firsts].sum()), rel=1e-6)
    assert json.loads(result.raw)["method"] == "first-token probability"


def test_first_token_refuses_a_scale_whose_numbers_are_several_tokens():
    judge = make_judge(JudgeSpec(kind="local", model="tiny:qwen2", local_method="first_token"))
    with pytest.raises(JudgeConfigError, match="one token.*use local_method full_reply"):
        judge.judge(ITEMS[:1])


# -- the shared prompt prefix: computed once, reused by every item ----------------------------------------------


def test_the_shared_prefix_is_the_part_of_the_prompt_before_the_question(judge):
    prefix = judge.shared_prefix_ids
    for item in ITEMS:
        assert judge.prompt_ids(item)[: len(prefix)] == prefix
    text = judge._tokenizer.decode(prefix)
    assert judge.template.system.strip()[-40:] in text and ITEMS[0].question not in text


def test_items_reuse_the_shared_prefix_and_score_as_without_it(judge):
    import torch

    prompt = judge.prompt_ids(ITEMS[1])
    assert judge._reusable_prefix(prompt) == len(judge.shared_prefix_ids) > 0
    seen = []
    hook = judge._model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape[1]),
                                                  with_kwargs=True)
    try:
        with_cache = judge.candidate_logprobs(prompt)
    finally:
        hook.remove()
    n_candidate_tokens = sum(len(c.ids) - 1 for c in judge.candidates)
    assert seen == [len(prompt) - len(judge.shared_prefix_ids) + n_candidate_tokens]  # the prefix is not recomputed

    uncached = make_judge(TINY)
    uncached.__dict__["shared_prefix_ids"] = []  # no shared prefix: every item computes its whole prompt
    without = uncached.candidate_logprobs(prompt)
    assert with_cache.tolist() == pytest.approx(without.tolist(), abs=1e-4)
    # the cache holds only the prefix again afterwards, so the next item's keys cannot see this one's
    assert judge._prefix_cache.get_seq_length() == len(judge.shared_prefix_ids)
    assert torch.equal(judge.candidate_logprobs(prompt), with_cache)


def test_a_prompt_that_does_not_start_with_the_shared_prefix_is_computed_whole(judge):
    other = [judge.shared_prefix_ids[0] + 1, *judge.shared_prefix_ids[1:], 5, 6]
    assert judge._reusable_prefix(other) == 0
    assert judge._reusable_prefix(judge.shared_prefix_ids) == 0  # nothing of the prompt would be left to compute


def test_the_first_token_method_reuses_the_prefix_too(tmp_path):
    spec = JudgeSpec(kind="local", model="tiny:qwen2", template=single_token_template(tmp_path),
                     local_method="first_token", min_candidate_mass=0.0)
    cached, plain = make_judge(spec), make_judge(spec)
    plain.__dict__["shared_prefix_ids"] = []
    prompt = cached.prompt_ids(ITEMS[0])
    assert cached._reusable_prefix(prompt) > 0 and plain._reusable_prefix(prompt) == 0
    assert cached.candidate_logprobs(prompt).tolist() == pytest.approx(plain.candidate_logprobs(prompt).tolist(),
                                                                       abs=1e-4)
