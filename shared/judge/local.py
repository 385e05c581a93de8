"""A local causal LM as judge, for offline runs (the ``tiny`` profile) and anything without an API key.

Rather than sampling a reply and parsing it, the judge reads the model's distribution over the valid replies:
every candidate score s in [score_min, score_max] of the template's parse rule is written out as its decimal
string followed by the end-of-turn token, its log-likelihood after the judge prompt is computed, the candidates
are renormalised with a softmax, and the score is the expectation sum_s p(s) * s. This is a real number in the
score range, deterministic for fixed weights, and well defined even for a randomly initialised tiny model.
Sentinel words are not candidates: the local judge always scores.

All candidates are scored in one forward pass per item (prompt plus every candidate, with an attention mask
that keeps candidates apart; see ``_tree_logprobs``), or one pass per ``spec.candidate_batch_size`` candidates.
"""

from __future__ import annotations

import json
import logging
from functools import cached_property

from shared.judge.base import Judge, JudgeItem, Record, Verdict
from shared.judge.errors import JudgeConfigError

log = logging.getLogger(__name__)


class LocalJudge(Judge):
    @cached_property
    def _tokenizer(self):
        from shared import models

        return models.load_tokenizer(self.spec.model)

    @cached_property
    def _model(self):
        from shared import models

        model = models.load_model(self.spec.model, dtype=self.spec.dtype)
        attention = getattr(model.config, "_attn_implementation", None)
        if attention not in (None, "eager", "sdpa"):
            # the one-pass candidate scoring needs a custom attention mask, which flash attention cannot take
            raise JudgeConfigError(f"local judge: {self.spec.model!r} uses {attention} attention; need eager or sdpa")
        return model

    @cached_property
    def _candidates(self) -> tuple[list[int], list[list[int]]]:
        """The candidate scores and, for each, its token ids: the decimal string then end-of-turn."""
        rule = self.template.parse_rule
        end_of_turn = self._tokenizer.eos_token_id
        if end_of_turn is None:
            raise JudgeConfigError(f"local judge: the tokenizer of {self.spec.model!r} has no eos token to end a reply")
        scores = list(range(rule.score_min, rule.score_max + 1))
        ids = [self._tokenizer.encode(str(s), add_special_tokens=False) + [end_of_turn] for s in scores]
        return scores, ids

    def judgement_settings(self) -> dict:
        # bf16 and fp32 give slightly different candidate likelihoods (~0.1-0.5 nats on SmolLM2), so scores differ
        return {"dtype": self.spec.dtype} if self.spec.dtype else {}

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

        _, candidates = self._candidates
        step = self.spec.candidate_batch_size
        return torch.cat([
            self._tree_logprobs(prompt_ids, candidates[start : start + step])
            for start in range(0, len(candidates), step)
        ])

    def _tree_logprobs(self, prompt_ids: list[int], candidates: list[list[int]]):
        """Score many short continuations of one prompt in a single forward pass of batch size one.

        The sequence is the prompt followed by every candidate's tokens (all but its last, which is only
        predicted). A custom attention mask lets each candidate token see the whole prompt and the earlier tokens
        of its own candidate only, and position ids restart after the prompt for each candidate, so every
        candidate is computed exactly as if it were alone after the prompt.
        """
        import torch

        model = self._model
        device = model.device
        n_prompt = len(prompt_ids)
        tokens, positions, owners, starts = [], [], [], []
        for index, candidate in enumerate(candidates):
            starts.append(n_prompt + len(tokens))
            for offset, token in enumerate(candidate[:-1]):
                tokens.append(token)
                positions.append(n_prompt + offset)
                owners.append(index)
        total = n_prompt + len(tokens)

        allowed = torch.zeros((total, total), dtype=torch.bool)
        allowed[:, :n_prompt] = True
        allowed[:n_prompt, :n_prompt] = torch.ones((n_prompt, n_prompt), dtype=torch.bool).tril()
        owner = torch.tensor(owners)
        position = torch.tensor(positions)
        allowed[n_prompt:, n_prompt:] = (owner[:, None] == owner[None, :]) & (position[None, :] <= position[:, None])
        dtype = model.dtype if model.dtype.is_floating_point else torch.float32
        # an additive float mask: understood alike by the eager and SDPA attention paths
        mask = torch.zeros((total, total), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

        with torch.inference_mode():
            logits = model(
                input_ids=torch.tensor([prompt_ids + tokens], device=device),
                attention_mask=mask[None, None].to(device),
                position_ids=torch.tensor([list(range(n_prompt)) + positions], device=device),
            ).logits[0]
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()

        totals = torch.empty(len(candidates))
        for index, (candidate, start) in enumerate(zip(candidates, starts, strict=True)):
            # token 0 is predicted by the last prompt row; token k>0 by the row of the candidate's token k-1
            rows = [n_prompt - 1] + list(range(start, start + len(candidate) - 1))
            totals[index] = logprobs[rows, candidate].sum()
        return totals

    def _score(self, item: JudgeItem) -> Verdict:
        import torch

        scores, _ = self._candidates
        probs = torch.softmax(self.candidate_logprobs(self.prompt_ids(item)).double(), dim=0).cpu()
        values = torch.tensor(scores, dtype=torch.float64)
        expected = float((probs * values).sum())
        top = torch.topk(probs, k=min(5, len(scores)))
        raw = json.dumps({
            "method": "expected score over candidate replies",
            "top": [[scores[i], round(float(p), 6)] for p, i in zip(top.values, top.indices, strict=True)],
        })
        return Verdict(score=expected, raw=raw)
