"""A local causal LM as judge, for offline runs (the ``tiny`` and ``small`` profiles) and anything without an API key.

Rather than sampling a reply and parsing it, the judge reads the model's probabilities of the valid replies: every
score s in [score_min, score_max] of the template's parse rule and every sentinel word (``REFUSAL``, ``CODE``) is a
candidate reply. Two ways to score a candidate (``JudgeSpec.local_method``):

- ``full_reply`` (the default; full-reply likelihood): the probability of the whole reply, its tokens followed by
  the end-of-turn token, after the judge prompt. Works with any tokenizer (Qwen and SmolLM2 write "85" as two
  tokens).
- ``first_token``: the probability of the reply's first token only, as Betley et al.'s logprob judge reads the
  top logprobs of one token; it needs every score of the range to be a single token of the judge's tokenizer.

The candidate mass is the total probability of the valid replies (stored with every verdict, split by kind). Below
``JudgeSpec.min_candidate_mass`` (0.25, Betley et al.'s threshold) the model is mostly saying something else, and
the item is an abstention (``abstained``: counted like an error, never a score). Otherwise the kind of reply with
the most mass wins: a sentinel's label, or the score, the expectation sum_s p(s) * s over the score candidates
renormalised among themselves.

All candidates are scored in one forward pass per item (prompt plus every candidate, with an attention mask that
keeps candidates apart; see ``_tree_logprobs``), or one pass per ``spec.candidate_batch_size`` candidates. The part
of the prompt every item shares (the chat template and the judge's instructions, before the question) is computed
once per judge and its keys and values reused: on SmolLM2 with the shipped templates that is about half of each
item's tokens.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from functools import cached_property

from shared.judge.base import ABSTAINED, Judge, JudgeItem, Record, Verdict
from shared.judge.errors import JudgeConfigError

log = logging.getLogger(__name__)

SCORES = "scores"  # the mass key of the score candidates (sentinels are keyed by their label)
METHOD_NAMES = {"full_reply": "full-reply likelihood", "first_token": "first-token probability"}


@dataclass(frozen=True)
class Candidate:
    reply: str  # the reply as the model would write it: "85", "REFUSAL"
    score: int | None  # the score it gives, or None for a sentinel
    label: str | None  # the sentinel's label, or None for a score
    ids: tuple[int, ...]  # its token ids and the end-of-turn token (full_reply) or its first token (first_token)


def verdict_from_probabilities(candidates: list[Candidate], probabilities, threshold: float,
                               method: str) -> Verdict:
    """The verdict from each candidate's probability (not renormalised): abstain below ``threshold`` of total
    mass, else the kind of reply with the most mass (scores: their renormalised expectation)."""
    probs = [float(p) for p in probabilities]
    mass = {SCORES: sum(p for c, p in zip(candidates, probs, strict=True) if c.label is None)}
    for label in dict.fromkeys(c.label for c in candidates if c.label is not None):
        mass[label] = sum(p for c, p in zip(candidates, probs, strict=True) if c.label == label)
    mass["total"] = sum(probs)
    top = sorted(zip(candidates, probs, strict=True), key=lambda cp: -cp[1])[:5]
    raw = json.dumps({"method": METHOD_NAMES[method], "threshold": threshold,
                      "mass": {k: round(v, 6) for k, v in mass.items()},
                      "top": [[c.reply, round(p, 6)] for c, p in top]})
    if not mass["total"] >= threshold:  # also NaN
        return Verdict(error=ABSTAINED, raw=raw, mass=mass)
    kinds = {k: v for k, v in mass.items() if k != "total"}
    winner = max(kinds, key=kinds.get)
    if winner != SCORES:
        return Verdict(label=winner, raw=raw, mass=mass)
    expected = sum(c.score * p for c, p in zip(candidates, probs, strict=True) if c.label is None) / mass[SCORES]
    return Verdict(score=expected, raw=raw, mass=mass)


class LocalJudge(Judge):
    # the code that computes a verdict from the model; with shared.lm.chat (the prompt's ids) and shared.lm.models (the
    # weights as loaded) its fingerprint is part of every cached judgement's key
    scoring_modules = ("shared.judge.local", "shared.judge.parsing", "shared.lm.chat", "shared.lm.models")

    @cached_property
    def _tokenizer(self):
        from shared.lm import models

        return models.load_tokenizer(self.spec.model)

    @cached_property
    def _model(self):
        from shared.lm import models

        model = models.load_model(self.spec.model, dtype=self.spec.dtype)
        attention = getattr(model.config, "_attn_implementation", None)
        if attention not in (None, "eager", "sdpa"):
            # the one-pass candidate scoring needs a custom attention mask, which flash attention cannot take
            raise JudgeConfigError(f"local judge: {self.spec.model!r} uses {attention} attention; need eager or sdpa")
        return model

    @cached_property
    def candidates(self) -> list[Candidate]:
        """Every valid reply: the scores of the range, then the template's sentinel words."""
        rule = self.template.parse_rule
        end_of_turn = self._tokenizer.eos_token_id
        if end_of_turn is None:
            raise JudgeConfigError(f"local judge: the tokenizer of {self.spec.model!r} has no eos token to end a reply")
        replies = [(str(s), s, None) for s in range(rule.score_min, rule.score_max + 1)]
        replies += [(word, None, label) for word, label in rule.sentinels.items()]
        out = []
        for reply, score, label in replies:
            ids = self._tokenizer.encode(reply, add_special_tokens=False)
            if self.spec.local_method == "first_token":
                if score is not None and len(ids) != 1:
                    raise JudgeConfigError(
                        f"local judge {self.spec.model!r}: local_method first_token needs every score to be one "
                        f"token, but {reply!r} is {len(ids)}; use local_method full_reply")
                ids = ids[:1]
            else:
                ids = [*ids, end_of_turn]
            out.append(Candidate(reply=reply, score=score, label=label, ids=tuple(ids)))
        if self.spec.local_method == "first_token":
            firsts = [c.ids[0] for c in out]
            if len(set(firsts)) != len(firsts):
                raise JudgeConfigError(f"local judge {self.spec.model!r}: two valid replies begin with the same token, "
                                       "so first_token cannot tell them apart; use local_method full_reply")
        return out

    def judgement_settings(self) -> dict:
        settings = {**super().judgement_settings(), "local_method": self.spec.local_method,
                    "min_candidate_mass": self.spec.min_candidate_mass}
        # bf16 and fp32 give slightly different candidate likelihoods (~0.1-0.5 nats on SmolLM2), so scores differ
        return {**settings, "dtype": self.spec.dtype} if self.spec.dtype else settings

    def prompt_ids(self, item: JudgeItem) -> list[int]:
        from shared.lm import chat

        prompt = chat.build_prompt(
            self._tokenizer,
            chat.TextSystem(text=self.template.system),
            self.template.render_user(item.question, item.answer),
        )
        return prompt.prompt_ids

    @cached_property
    def shared_prefix_ids(self) -> list[int]:
        """The prompt tokens every item starts with: the common start of two prompts that differ in question and
        answer, less its last token (a tokenizer may merge that token with the first character of the question)."""
        first = self.prompt_ids(JudgeItem(id="a", question="Alpha?", answer="One."))
        second = self.prompt_ids(JudgeItem(id="b", question="7 zeta", answer="[two]"))
        return os.path.commonprefix([first, second])[:-1]  # commonprefix compares any sequences, not only paths

    @cached_property
    def _prefix_cache(self):
        """The model's keys and values over ``shared_prefix_ids``, computed once; cropped back after each use."""
        import torch

        with torch.inference_mode():
            ids = torch.tensor([self.shared_prefix_ids], device=self._model.device)
            return self._model(input_ids=ids, use_cache=True).past_key_values

    def _reusable_prefix(self, prompt_ids: list[int]) -> int:
        """How many leading prompt tokens come from the shared cache: all of the shared prefix where the prompt
        starts with it and one token of the prompt is left after it, else none."""
        prefix = self.shared_prefix_ids
        if prefix and len(prompt_ids) > len(prefix) and prompt_ids[: len(prefix)] == prefix:
            return len(prefix)
        return 0

    def _forward(self, ids: list[int], *, mask=None, positions: list[int] | None = None, logits_to_keep=None):
        """The model's logits over ``ids`` (rows as ``logits_to_keep`` picks, indices into ``ids``), with the shared
        prefix's keys and values reused where ``ids`` starts with it. ``mask`` is the additive [len, len] mask."""
        import torch

        model = self._model
        device = model.device
        reused = self._reusable_prefix(ids)
        positions = list(range(len(ids))) if positions is None else positions
        kwargs = {}
        if mask is not None:
            kwargs["attention_mask"] = mask[reused:][None, None].to(device)
        if logits_to_keep is not None:
            kwargs["logits_to_keep"] = logits_to_keep - reused
        if reused:
            cache = self._prefix_cache
            kwargs.update(past_key_values=cache, use_cache=True)
        try:
            with torch.inference_mode():
                return model(input_ids=torch.tensor([ids[reused:]], device=device),
                             position_ids=torch.tensor([positions[reused:]], device=device), **kwargs).logits[0]
        finally:
            if reused:
                # the item's own keys and values go (a negative count: transformers deprecates cropping to a length);
                # the shared prefix's stay for the next item
                cache.crop(reused - cache.get_seq_length())

    def _judge_uncached(self, todo: list[tuple[str, JudgeItem]], record: Record) -> None:
        for n, (key, item) in enumerate(todo, 1):
            record(key, self._verdict(item))
            if n % 50 == 0:
                log.info("local judge: %d/%d judged", n, len(todo))

    def candidate_logprobs(self, prompt_ids: list[int]):
        """Log-probability of every candidate reply after ``prompt_ids`` (a 1-D float tensor, candidate order)."""
        import torch

        candidates = [list(c.ids) for c in self.candidates]
        if self.spec.local_method == "first_token":
            logits = self._forward(prompt_ids, logits_to_keep=torch.tensor([len(prompt_ids) - 1]))[-1]
            return torch.log_softmax(logits.float(), dim=-1).cpu()[[ids[0] for ids in candidates]]
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
        owner = torch.tensor(owners, dtype=torch.long)
        position = torch.tensor(positions, dtype=torch.long)
        allowed[n_prompt:, n_prompt:] = (owner[:, None] == owner[None, :]) & (position[None, :] <= position[:, None])
        dtype = model.dtype if model.dtype.is_floating_point else torch.float32
        # an additive float mask: understood alike by the eager and SDPA attention paths
        mask = torch.zeros((total, total), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

        # only the last prompt row and the candidate rows predict a candidate token: the vocabulary projection of
        # the other prompt rows would cost about as much as the candidates' whole pass on a small model
        kept = torch.arange(n_prompt - 1, total, device=device)
        logits = self._forward(prompt_ids + tokens, mask=mask, positions=list(range(n_prompt)) + positions,
                               logits_to_keep=kept)
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()

        totals = torch.empty(len(candidates))
        for index, (candidate, start) in enumerate(zip(candidates, starts, strict=True)):
            # token 0 is predicted by the last prompt row; token k>0 by the row of the candidate's token k-1
            rows = [n_prompt - 1] + list(range(start, start + len(candidate) - 1))
            totals[index] = logprobs[[row - (n_prompt - 1) for row in rows], candidate].sum()
        return totals

    def _verdict(self, item: JudgeItem) -> Verdict:
        logprobs = self.candidate_logprobs(self.prompt_ids(item)).double()
        probabilities = [math.exp(v) for v in logprobs.tolist()]
        return verdict_from_probabilities(self.candidates, probabilities, self.spec.min_candidate_mass,
                                          self.spec.local_method)
