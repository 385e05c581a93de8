"""The local judge on the tiny model: a real, deterministic score from the model's distribution over replies."""

from __future__ import annotations

import json
import math

import pytest

from shared import store
from shared.judge import JudgeItem, JudgeSpec, make_judge, summarize

TINY = JudgeSpec(kind="local", model="tiny:qwen2")
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
        top = json.loads(result.raw)["top"]
        assert len(top) == 5 and all(0 <= s <= 100 for s, _ in top)
    assert summarize(results).n_scored == len(ITEMS)


def test_local_scores_are_deterministic_across_judge_instances(results):
    assert [r.score for r in make_judge(TINY).judge(ITEMS)] == [r.score for r in results]


def test_the_score_is_the_expectation_over_every_candidate_reply(judge, results):
    import torch

    logprobs = judge.candidate_logprobs(judge.prompt_ids(ITEMS[1]))
    assert logprobs.shape == (101,)
    probs = torch.softmax(logprobs.double(), 0)
    assert float(probs.sum()) == pytest.approx(1.0)
    assert results[1].score == pytest.approx(float((probs * torch.arange(101, dtype=torch.float64)).sum()))


def test_one_pass_over_all_candidates_matches_scoring_each_candidate_alone(judge):
    import torch

    prompt = judge.prompt_ids(ITEMS[0])
    _, candidates = judge._candidates
    picked = [0, 7, 42, 100]
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
