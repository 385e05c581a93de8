"""A local causal LM as judge, for offline runs (the ``tiny`` profile) and anything without an API key.

Rather than sampling a reply and parsing it, the judge reads the model's distribution over the valid replies:
every candidate score s in [score_min, score_max] of the template's parse rule is written out as its decimal
string followed by the end-of-turn token, its log-likelihood after the judge prompt is computed, the candidates
are renormalised with a softmax, and the score is the expectation sum_s p(s) * s. This is a real number in the
score range, deterministic for fixed weights, and well defined even for a randomly initialised tiny model.
Sentinel words are not candidates: the local judge always scores.

The prompt runs through the model once; its key/value cache is then repeated across a batch of candidates, so
judging costs one prompt pass plus one short pass per ``spec.candidate_batch_size`` candidates.
"""

from __future__ import annotations

import copy
import json
import logging
from functools import cached_property

from shared.judge.base import Judge, JudgeItem, Record, Verdict

log = logging.getLogger(__name__)


class LocalJudge(Judge):
    @cached_property
    def _tokenizer(self):
        from shared import models

        return models.load_tokenizer(self.spec.model)

    @cached_property
    def _model(self):
        from shared import models

        return models.load_model(self.spec.model)

    @cached_property
    def _candidates(self) -> tuple[list[int], list[list[int]]]:
        """The candidate scores and, for each, its token ids: the decimal string then end-of-turn."""
        rule = self.template.parse_rule
        end_of_turn = self._tokenizer.eos_token_id
        if end_of_turn is None:
            raise ValueError(f"tokenizer of {self.spec.model!r} has no eos token to end a candidate reply")
        scores = list(range(rule.score_min, rule.score_max + 1))
        ids = [self._tokenizer.encode(str(s), add_special_tokens=False) + [end_of_turn] for s in scores]
        return scores, ids

    def prompt_ids(self, item: JudgeItem) -> list[int]:
        from shared import chat

        prompt = chat.build_prompt(
            self._tokenizer,
            chat.TextSystem(text=self.template.system),
            self.template.render_user(item.question, item.answer),
        )
        return prompt.prompt_ids

    def _judge_uncached(self, todo: list[tuple[str, JudgeItem]], record: Record) -> None:
        for n, (key, item) in enumerate(todo, 1):
            record(key, self._score(item))
            if n % 50 == 0:
                log.info("local judge: %d/%d judged", n, len(todo))

    def candidate_logprobs(self, prompt_ids: list[int]):
        """Log-likelihood of every candidate reply after ``prompt_ids`` (a 1-D float tensor, candidate order)."""
        import torch

        model = self._model
        _, candidates = self._candidates
        device = model.device
        with torch.inference_mode():
            prompt = torch.tensor([prompt_ids], device=device)
            out = model(input_ids=prompt, use_cache=True)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            totals = []
            step = self.spec.candidate_batch_size
            for start in range(0, len(candidates), step):
                chunk = candidates[start : start + step]
                totals.append(self._chunk_logprobs(model, out.past_key_values, len(prompt_ids), first, chunk))
        return torch.cat(totals)

    @staticmethod
    def _chunk_logprobs(model, prompt_cache, prompt_len: int, first, chunk: list[list[int]]):
        import torch

        device = first.device
        n, width = len(chunk), max(len(c) for c in chunk) - 1
        # feed every candidate token but the last; the logits at position j score token j+1
        inputs = torch.zeros((n, width), dtype=torch.long, device=device)
        mask = torch.zeros((n, prompt_len + width), dtype=torch.long, device=device)
        mask[:, :prompt_len] = 1
        for i, cand in enumerate(chunk):
            inputs[i, : len(cand) - 1] = torch.tensor(cand[:-1], device=device)
            mask[i, prompt_len : prompt_len + len(cand) - 1] = 1
        cache = copy.deepcopy(prompt_cache)
        cache.batch_repeat_interleave(n)
        logprobs = torch.log_softmax(model(input_ids=inputs, attention_mask=mask, past_key_values=cache).logits.float(), -1)
        totals = torch.empty(n, device=device)
        for i, cand in enumerate(chunk):
            following = torch.tensor(cand[1:], device=device)
            totals[i] = first[cand[0]] + logprobs[i, : len(cand) - 1].gather(-1, following[:, None]).sum()
        return totals

    def _score(self, item: JudgeItem) -> Verdict:
        import torch

        scores, _ = self._candidates
        probs = torch.softmax(self.candidate_logprobs(self.prompt_ids(item)), dim=0).cpu().double()
        values = torch.tensor(scores, dtype=torch.float64)
        expected = float((probs * values).sum())
        top = torch.topk(probs, k=min(5, len(scores)))
        raw = json.dumps({
            "method": "expected score over candidate replies",
            "top": [[scores[i], round(float(p), 6)] for p, i in zip(top.values, top.indices, strict=True)],
        })
        return Verdict(score=expected, raw=raw)
