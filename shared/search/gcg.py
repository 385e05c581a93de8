"""Greedy coordinate gradient (GCG) search for L token ids in the system slot (or appended to the user turn).

The objective is the one the soft prefix minimises (``shared.lm.teacher``): the student's token CE on fresh teacher
samples. One step:

1. sample teacher completions for a draw of questions (``pairs_per_step`` (question, completion) pairs);
2. gradient of the CE with respect to a one-hot encoding of the L suffix ids (``token_gradients``);
3. ``search_width`` candidates, each swapping one position to one of its ``topk`` best allowed tokens by gradient;
   duplicates (and copies of the current suffix) are dropped, and so is every candidate that is not text
   (``candidate_pool``, ``SuffixRules``);
4. the CE of the current suffix and of every remaining candidate on the same pairs, in large batched forwards
   (``candidate_losses``): for each pair, the candidates are rows of one batch of identical length -- no padding,
   no attention mask, so SDPA runs its causal flash kernel -- chunked to ``max_tokens_per_forward``. (The record
   did one forward per candidate: 226 s per step.) With the screen on (``screen_pairs``), every candidate is
   scored on a few randomly drawn pairs, and only the ``screen_keep`` best of them -- and always the current
   suffix -- on all pairs (``screened_losses``); every ``screen_check_every``-th step also scores all of them on
   all pairs and records whether the screen kept the same candidate;
5. keep the best candidate if it beats the current suffix on this step's pairs, else keep the current one: the
   step's loss never goes up.

Real text (the record's second evaluation bug: id 87233 became [29333, 36] once its text was re-tokenised).
By default a suffix is made of tokens that decode on their own to printable text and are neither special nor
added tokens (``allowed_token_ids``), and a candidate is kept only if its decoded text, typed into its slot and
built by ``shared.lm.chat``, gives back exactly its ids (``SuffixText``); the starting suffix is drawn the same way
(``SuffixRules.random_suffix``). So the ids the search optimises are a prompt a person could type.
``vocabulary="all"`` and ``round_trip=False`` lift both rules (the record's search).

Evaluation still splices the kept ids through ``chat.IdsSystem`` / ``user_suffix_ids``; their text is for reading
and for the round-trip check only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from shared.lm import chat
from shared.lm.generation import derived_seed
from shared.lm.teacher import TeacherStudent, completion_ce_sums, micro_batches, n_loss_tokens
from shared.search.soft_prompt import DrawSettings, LearnedPrompt, TeacherDraws

if TYPE_CHECKING:
    import torch


def suffix_slice(example: chat.PromptIds) -> slice:
    span = example.ids_slice or example.user_suffix_slice
    if span is None:
        raise ValueError("this prompt has no ids in the system slot or user suffix to optimise")
    return span


Vocabulary = Literal["printable", "ascii", "all"]


def allowed_token_ids(tokenizer, vocab_size: int, *, vocabulary: Vocabulary = "printable") -> list[int]:
    """Ids a suffix may use: real tokenizer entries (not the embedding matrix's spare rows), never a special token
    (a suffix must not be able to close its own turn).

    ``printable`` (the default) also leaves out every added token -- Qwen2.5's ``<tool_call>`` and ``<|fim_*|>``
    are added but not marked special -- and keeps only tokens whose own text is printable: no control characters
    or newlines, no fragment of a multi-byte character (those decode to U+FFFD). ``ascii``: printable and ASCII.
    ``all``: every other entry (the record's search)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    ids = [i for i in range(min(len(tokenizer), vocab_size)) if i not in special]
    if vocabulary == "all":
        return ids
    ids = [i for i in ids if i not in added and is_printable(token_text(tokenizer, [i]))]
    return [i for i in ids if token_text(tokenizer, [i]).isascii()] if vocabulary == "ascii" else ids


def token_text(tokenizer, ids: Sequence[int]) -> str:
    """What ids read as, exactly: special tokens kept, no clean-up of spaces before punctuation."""
    return tokenizer.decode([int(t) for t in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def is_printable(text: str) -> bool:
    return bool(text) and text.isprintable() and "\ufffd" not in text


class SuffixText:
    """Whether a suffix is a prompt a person could type: its text (``token_text``), put where its ids sit by
    ``shared.lm.chat`` (``LearnedPrompt.build_from_text``), gives back a prompt of exactly the same ids, for each of
    ``questions`` (a user-turn suffix can merge with the question's last characters; a system-slot suffix cannot,
    but is checked the same way)."""

    def __init__(self, tokenizer, questions: Sequence[str], *, slot: Literal["system", "user"] = "system",
                 system: str = "none"):
        if not questions:
            raise ValueError("the round-trip check needs at least one question to build the prompt around")
        self.tokenizer, self.questions = tokenizer, list(dict.fromkeys(questions))
        self.template = LearnedPrompt(kind="ids", model_ref="-", slot=slot, system=system, ids=[0])
        self._built: dict[tuple[str, int], chat.PromptIds] = {}  # ids prompts to splice a suffix into

    def text(self, ids: Sequence[int]) -> str:
        return token_text(self.tokenizer, ids)

    def round_trips_in(self, ids: Sequence[int], question: str) -> bool:
        key = (question, len(ids))
        if key not in self._built:
            self._built[key] = self.template.with_ids(ids).build(self.tokenizer, question)
        as_ids = splice(self._built[key], ids)
        try:
            typed = self.template.build_from_text(self.tokenizer, question, self.text(ids))
        except ValueError:  # text the prompt builder refuses (its reserved sentinel) is no prompt
            return False
        return typed.input_ids == as_ids.input_ids

    def count(self, ids: Sequence[int]) -> int:
        """In how many of the questions' prompts the suffix round-trips."""
        return sum(self.round_trips_in(ids, q) for q in self.questions)

    def __call__(self, ids: Sequence[int]) -> bool:
        return all(self.round_trips_in(ids, q) for q in self.questions)


@dataclass
class SuffixRules:
    """What a suffix may be: ids from ``allowed`` and, with ``text``, only ids that round-trip as text.

    ``text`` is the check every sampled candidate passes before it is scored; ``everywhere`` (when set) the check
    on every question the suffix is used with, which only a suffix about to be kept must pass (``gcg_step``'s
    ``confirm``): a typed-text check costs about a millisecond per question, too much for hundreds of candidates
    times a hundred questions in every step."""

    allowed: list[int]
    text: SuffixText | None
    everywhere: SuffixText | None = None

    @classmethod
    def of(cls, tokenizer, vocab_size: int, settings: GcgSettings, questions: Sequence[str], *,
           slot: Literal["system", "user"] = "system", system: str = "none",
           screen_questions: Sequence[str] | None = None) -> SuffixRules:
        """Rules checking the round trip on ``questions``; with ``screen_questions``, candidates are screened on
        those and only a suffix about to be kept is checked on all of ``questions``."""
        allowed = allowed_token_ids(tokenizer, vocab_size, vocabulary=settings.vocabulary)
        if not settings.round_trip:
            return cls(allowed, None)
        if screen_questions is None:
            return cls(allowed, SuffixText(tokenizer, questions, slot=slot, system=system))
        return cls(allowed, SuffixText(tokenizer, screen_questions, slot=slot, system=system),
                   SuffixText(tokenizer, [*screen_questions, *questions], slot=slot, system=system))

    def keeps(self, ids: Sequence[int]) -> bool:
        """Whether a suffix may be kept: round-trips on every question (the text checks pass)."""
        return all(check is None or check(ids) for check in (self.text, self.everywhere))

    def accepts(self, ids: Sequence[int]) -> bool:
        allowed = set(self.allowed)
        return all(int(t) in allowed for t in ids) and self.keeps(ids)

    def random_suffix(self, length: int, seed: int, max_draws_per_token: int = 100) -> list[int]:
        """The random-suffix baseline and a GCG start: ``length`` ids drawn uniformly from ``allowed``. With the
        round-trip check, ids are drawn one at a time and a draw is kept only if the suffix so far still
        round-trips, so the whole suffix does."""
        if self.text is None:
            return random_suffix(self.allowed, length, seed)
        rng = np.random.default_rng(seed)
        suffix: list[int] = []
        for _ in range(length * max_draws_per_token):
            candidate = [*suffix, int(self.allowed[rng.integers(0, len(self.allowed))])]
            if self.keeps(candidate):
                suffix = candidate
                if len(suffix) == length:
                    return suffix
        raise ValueError(f"no random suffix of {length} ids that round-trips as text after "
                         f"{length * max_draws_per_token} draws")


def random_suffix(allowed: Sequence[int], length: int, seed: int) -> list[int]:
    """The random-suffix baseline (and a GCG start): ``length`` ids drawn uniformly from ``allowed``."""
    rng = np.random.default_rng(seed)
    return [int(allowed[i]) for i in rng.integers(0, len(allowed), size=length)]


# ---------------------------------------------------------------------------------------------------------------
# gradient


def token_gradients(model, examples: Sequence[chat.PromptIds], suffix_ids: Sequence[int], pad_id: int,
                    micro_batch_tokens: int = 8192, *, by_length: bool = True) -> torch.Tensor:
    """d(token-mean CE)/d(one-hot suffix), ``[L, V]``, accumulated over micro-batches of the examples."""
    import torch

    embedding = model.get_input_embeddings()
    weight = embedding.weight
    device = weight.device
    one_hot = torch.zeros(len(suffix_ids), weight.shape[0], device=device, dtype=weight.dtype)
    one_hot[torch.arange(len(suffix_ids)), torch.tensor(list(suffix_ids), device=device)] = 1
    one_hot.requires_grad_(True)
    tokens = n_loss_tokens(examples)
    for group in micro_batches(examples, micro_batch_tokens, by_length=by_length):
        batch = chat.build_batch(group, pad_id=pad_id, padding_side="right").to(device)
        embeds = embedding(batch.input_ids)
        suffix_embeds = (one_hot @ weight).unsqueeze(0)
        rows = []
        for row, example in enumerate(group):
            span = suffix_slice(example)  # right padding: positions are the example's own
            rows.append(torch.cat([embeds[row, : span.start], suffix_embeds[0], embeds[row, span.stop:]]))
        loss = completion_ce_sums(model, batch.input_ids, batch.labels, torch.stack(rows)).sum() / tokens
        loss.backward()
    return one_hot.grad.detach()


def sample_candidates(suffix_ids: Sequence[int], grad: torch.Tensor, allowed_mask: torch.Tensor, *,
                      search_width: int, topk: int, generator: torch.Generator) -> torch.Tensor:
    """``[search_width, L]`` candidates, each the suffix with one position swapped to one of that position's
    ``topk`` lowest-gradient allowed tokens (position and token drawn uniformly, as in GCG)."""
    import torch

    length = len(suffix_ids)
    scores = grad.float().masked_fill(~allowed_mask.to(grad.device), float("inf"))
    top = (-scores).topk(min(topk, int(allowed_mask.sum())), dim=1).indices.cpu()  # [L, k]
    positions = torch.randint(0, length, (search_width,), generator=generator)
    choices = torch.randint(0, top.shape[1], (search_width,), generator=generator)
    candidates = torch.tensor(list(suffix_ids)).repeat(search_width, 1)
    candidates[torch.arange(search_width), positions] = top[positions, choices]
    return candidates


# ---------------------------------------------------------------------------------------------------------------
# candidate evaluation


@dataclass
class CandidateEval:
    losses: torch.Tensor  # [W] token-mean CE of each candidate over all pairs
    tokens: int  # tokens pushed through the model (rows x length, summed over forwards)
    forwards: int
    seconds: float
    rows: torch.Tensor | None = None  # the candidate rows ``losses`` belong to (None: every row, in order)

    def loss_of(self, row: int) -> float:
        """The CE over all pairs of candidate ``row`` (which must have been scored on all of them)."""
        at = row if self.rows is None else int((self.rows.to(self.losses.device) == row).nonzero()[0, 0])
        return float(self.losses[at])


def candidate_ce_sums(model, examples: Sequence[chat.PromptIds], candidates: torch.Tensor, *,
                      max_tokens_per_forward: int = 65536, forward: Literal["model", "fused"] = "model"
                      ) -> CandidateEval:
    """Each candidate's CE summed over the loss tokens of ``examples`` (``losses`` holds sums here), in batched
    forwards: for one example all candidates give rows of the same length and the same loss positions, so each
    forward is a dense ``[rows, T]`` block with no padding and no mask; the LM head runs only at the reply
    positions. ``forward="fused"`` runs the backbone as one compiled region per decoder layer on CUDA
    (``shared.lm.packed.causal_hidden``); ``"model"`` through the model's own forward, the reference."""
    import torch

    from shared.lm.packed import fused_completion_ce_sums

    ce_sums = fused_completion_ce_sums if forward == "fused" else completion_ce_sums

    device = model.get_input_embeddings().weight.device
    width = candidates.shape[0]
    cand = candidates.to(device)
    sums = torch.zeros(width, device=device, dtype=torch.float32)
    tokens = forwards = 0
    _sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        for example in examples:
            span = suffix_slice(example)
            base = torch.tensor(example.input_ids, device=device)
            labels = torch.tensor(example.labels(), device=device)
            rows_per_forward = max(1, max_tokens_per_forward // len(example))
            for start in range(0, width, rows_per_forward):
                chunk = cand[start:start + rows_per_forward]
                ids = base.repeat(chunk.shape[0], 1)
                ids[:, span] = chunk
                sums[start:start + chunk.shape[0]] += ce_sums(model, ids, labels.expand(chunk.shape[0], -1))
                tokens += ids.numel()
                forwards += 1
    _sync(device)
    return CandidateEval(sums, tokens, forwards, time.perf_counter() - started)


def candidate_losses(model, examples: Sequence[chat.PromptIds], candidates: torch.Tensor, *,
                     max_tokens_per_forward: int = 65536) -> CandidateEval:
    """The token-mean CE of every candidate suffix on ``examples`` (``candidate_ce_sums`` over the loss tokens)."""
    summed = candidate_ce_sums(model, examples, candidates, max_tokens_per_forward=max_tokens_per_forward)
    summed.losses = summed.losses / n_loss_tokens(examples)
    return summed


def candidate_losses_reference(model, examples: Sequence[chat.PromptIds], candidates: torch.Tensor) -> torch.Tensor:
    """The same numbers the slow, obvious way: one full forward per (candidate, example). Tests only."""
    import torch
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for candidate in candidates.tolist():
            total = 0.0
            for example in examples:
                span = suffix_slice(example)
                ids = list(example.input_ids)
                ids[span] = candidate
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
                labels = torch.tensor(example.labels()[1:])
                total += float(F.cross_entropy(logits, labels, ignore_index=chat.IGNORE_INDEX, reduction="sum"))
            out.append(total / n_loss_tokens(examples))
    return torch.tensor(out)


# ---------------------------------------------------------------------------------------------------------------
# one search step


@dataclass
class GcgStepStats:
    step: int
    loss: float  # the kept suffix's CE on all of this step's pairs (never above current_loss)
    current_loss: float | None  # the CE of the suffix the step started from, on the same pairs
    teacher_s: float
    gradient_s: float
    candidates_s: float
    candidate_tokens: int
    forwards: int
    screen: ScreenReport | None = None
    kept_current: bool = False  # no candidate beat the current suffix
    sampled: int = 0  # candidates drawn from the gradient
    duplicates: int = 0  # of another candidate or of the current suffix
    rejected: int = 0  # distinct candidates whose text does not give back their ids
    scored: int = 0  # distinct rows scored: the current suffix and every kept candidate
    filter_s: float = 0.0  # deduplication and the round-trip check


@dataclass
class ScreenReport:
    """What the screen did in one step, and -- on a checked step -- how its pick compares with the full evaluation's
    (every candidate on every pair)."""

    pairs: int  # pairs every candidate was scored on
    kept: int  # candidates then scored on all pairs
    checked: bool = False
    agreed: bool | None = None  # the screen kept the full evaluation's best candidate
    rank: int | None = None  # the screen's pick's rank in the full evaluation (0: the best)
    gap: float | None = None  # its CE minus the full evaluation's best CE
    screen_s: float = 0.0  # scoring every candidate on the screen's pairs
    kept_s: float = 0.0  # scoring the kept candidates on the other pairs
    check_s: float | None = None  # the check's extra time: the other candidates on the other pairs
    full_tokens: int | None = None  # tokens the full evaluation pushes through the model (checked steps)


@dataclass
class ScreenSettings:
    pairs: int | None  # None: no screen
    keep: int
    check: bool = False


def screened_losses(model, examples: Sequence[chat.PromptIds], candidates: torch.Tensor, screen: ScreenSettings,
                    generator: torch.Generator, *, max_tokens_per_forward: int = 65536, current: int | None = None
                    ) -> tuple[int, float, CandidateEval, ScreenReport | None]:
    """Pick a candidate: the lowest token-mean CE over all pairs, either of every candidate (no screen) or of the
    ``screen.keep`` candidates that score best on ``screen.pairs`` randomly drawn pairs.

    ``current`` (a row) is the suffix the step started from: it is always scored on all pairs, even when the screen
    would drop it, and it is picked unless another candidate's CE is lower.

    Returns the pick, its CE on all pairs, the evaluation (``losses`` over all pairs for its ``rows``) and the
    screen's report. A checked step also scores the other candidates on the remaining pairs (the full evaluation)
    but keeps the screen's pick, so a search's trajectory does not depend on which steps are checked."""
    import torch

    width = candidates.shape[0]
    active = screen.pairs is not None and screen.pairs < len(examples) and screen.keep < width
    if not active:
        full = candidate_losses(model, examples, candidates, max_tokens_per_forward=max_tokens_per_forward)
        full.rows = torch.arange(width)
        best = best_row(full, current)
        return best, full.loss_of(best), full, None
    order = torch.randperm(len(examples), generator=generator).tolist()
    screen_set = [examples[i] for i in sorted(order[: screen.pairs])]
    rest = [examples[i] for i in sorted(order[screen.pairs:])]
    tokens_all = n_loss_tokens(examples)
    cost = candidate_ce_sums(model, screen_set, candidates, max_tokens_per_forward=max_tokens_per_forward)
    screen_sums = cost.losses
    kept = kept_rows(screen_sums / n_loss_tokens(screen_set), screen.keep, current)
    kept_rest = candidate_ce_sums(model, rest, candidates[kept], max_tokens_per_forward=max_tokens_per_forward)
    kept_losses = (screen_sums[kept.to(screen_sums.device)] + kept_rest.losses) / tokens_all
    evaluation = CandidateEval(kept_losses, cost.tokens + kept_rest.tokens, cost.forwards + kept_rest.forwards,
                               cost.seconds + kept_rest.seconds, rows=kept)
    pick = best_row(evaluation, current)
    pick_loss = evaluation.loss_of(pick)
    report = ScreenReport(pairs=len(screen_set), kept=int(kept.numel()), screen_s=cost.seconds,
                          kept_s=kept_rest.seconds)
    if screen.check:
        others = candidate_ce_sums(model, rest, candidates, max_tokens_per_forward=max_tokens_per_forward)
        full = (screen_sums + others.losses) / tokens_all
        report.checked = True
        report.rank, report.gap = rank_in_full(full, pick)
        report.agreed = report.rank == 0
        report.check_s = others.seconds
        report.full_tokens = cost.tokens + others.tokens
    return pick, pick_loss, evaluation, report


def kept_rows(screen_losses: torch.Tensor, keep: int, current: int | None = None) -> torch.Tensor:
    """The rows the screen passes on to the full evaluation: the ``keep`` lowest screen losses (ties in row order),
    and ``current`` whatever its screen loss."""
    import torch

    kept = screen_losses.argsort(stable=True)[:keep].cpu()
    if current is not None and current not in kept.tolist():
        kept = torch.cat([kept, torch.tensor([current])])
    return kept


def rank_in_full(full_losses: torch.Tensor, pick: int) -> tuple[int, float]:
    """A pick's rank among every candidate's CE on all pairs (0: none is lower) and its CE above the lowest."""
    return int((full_losses < full_losses[pick]).sum()), float(full_losses[pick] - full_losses.min())


@dataclass
class ScreenOutcome:
    """What the screen would pick from one step's candidates, given the pairs it draws, against the full best."""

    pick: int
    best: int  # the full evaluation's pick (every candidate on every pair; the current suffix unless beaten)
    rank: int  # the screen's pick's rank in the full evaluation (0: no candidate is lower)
    gap: float  # its CE minus the lowest CE, on all pairs (nats/token)

    @property
    def agreed(self) -> bool:
        return self.pick == self.best


def screen_outcome(pair_sums: torch.Tensor, pair_tokens: Sequence[int], screen_pairs: Sequence[int], keep: int,
                   current: int | None = 0) -> ScreenOutcome:
    """The screen of ``screened_losses`` replayed on a full matrix of per-pair CE sums (``[rows, pairs]``,
    ``candidate_pair_ce_sums``): rank every row on ``screen_pairs``, keep ``keep`` (and ``current``), pick the
    lowest CE on all pairs among them. The same selection code as the stage's, so any screen setting can be
    measured against the full evaluation from one matrix, for every draw of screen pairs."""
    import torch

    sums = pair_sums.double()
    tokens = torch.as_tensor(list(pair_tokens), dtype=torch.float64)
    chosen = torch.as_tensor(list(screen_pairs), dtype=torch.long)
    full = sums.sum(dim=1) / tokens.sum()
    kept = kept_rows(sums[:, chosen].sum(dim=1) / tokens[chosen].sum(), keep, current)
    pick = best_row(CandidateEval(full[kept], 0, 0, 0.0, rows=kept), current)
    best = best_row(CandidateEval(full, 0, 0, 0.0), current)
    rank, gap = rank_in_full(full, pick)
    return ScreenOutcome(pick=pick, best=best, rank=rank, gap=gap)


def candidate_pair_ce_sums(model, examples: Sequence[chat.PromptIds], candidates: torch.Tensor, *,
                           max_tokens_per_forward: int = 65536) -> torch.Tensor:
    """``[rows, pairs]``: each candidate's CE summed over each example's loss tokens (the full evaluation, kept
    per pair so that a screen can be replayed on it)."""
    import torch

    return torch.stack([candidate_ce_sums(model, [example], candidates,
                                          max_tokens_per_forward=max_tokens_per_forward).losses.cpu()
                        for example in examples], dim=1)


def best_row(evaluation: CandidateEval, current: int | None = None) -> int:
    """The scored row with the lowest CE; ``current`` unless another row's CE is strictly lower."""
    rows = evaluation.rows.tolist() if evaluation.rows is not None else list(range(len(evaluation.losses)))
    best = rows[int(evaluation.losses.argmin())]
    if current is not None and evaluation.loss_of(current) <= evaluation.loss_of(best):
        return current
    return best


def with_suffix(prompt: LearnedPrompt, examples: Sequence[chat.PromptIds], suffix_ids: Sequence[int]):
    """Re-point examples at a new suffix without rebuilding them: the suffix has a fixed length and sits at the
    same positions, and only its ids change."""
    return [splice(example, suffix_ids) for example in examples]


def splice(example: chat.PromptIds, suffix_ids: Sequence[int]) -> chat.PromptIds:
    span = suffix_slice(example)
    if span.stop - span.start != len(suffix_ids):
        raise ValueError(f"a suffix of {len(suffix_ids)} ids cannot replace one of {span.stop - span.start}")
    ids = list(example.input_ids)
    ids[span] = [int(t) for t in suffix_ids]
    return chat.PromptIds(ids, example.assistant_start, example.loss_end, example.soft_slice, example.ids_slice,
                          example.user_suffix_slice)


@dataclass
class CandidatePool:
    """The rows a step scores: the current suffix first, then every distinct sampled candidate that is neither
    the current suffix nor rejected, once."""

    rows: torch.Tensor  # [1 + n, L]
    sampled: int  # candidates drawn from the gradient
    duplicates: int  # of another candidate or of the current suffix: not scored again
    rejected: int  # distinct candidates whose text does not give back their ids

    @property
    def scored(self) -> int:
        return self.rows.shape[0]


def candidate_pool(current: Sequence[int], sampled: torch.Tensor,
                   accept: Callable[[list[int]], bool] | None = None) -> CandidatePool:
    import torch

    first = tuple(int(t) for t in current)
    seen, rows, duplicates, rejected = {first}, [first], 0, 0
    for row in sampled.tolist():
        key = tuple(row)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        if accept is not None and not accept(row):
            rejected += 1
            continue
        rows.append(key)
    return CandidatePool(torch.tensor(rows, dtype=torch.long), sampled.shape[0], duplicates, rejected)


def gcg_step(model, examples: Sequence[chat.PromptIds], suffix_ids: Sequence[int], allowed_mask: torch.Tensor, *,
             pad_id: int, search_width: int, topk: int, generator: torch.Generator, step: int = 0,
             teacher_s: float = 0.0, max_tokens_per_forward: int = 65536,
             micro_batch_tokens: int = 8192, screen: ScreenSettings | None = None,
             by_length: bool = True, accept: Callable[[list[int]], bool] | None = None,
             confirm: Callable[[list[int]], bool] | None = None) -> tuple[list[int], GcgStepStats]:
    """One GCG step on pairs already sampled; returns the kept suffix and the step's timings. The current suffix
    is scored beside the candidates and kept unless one of them is better; each distinct candidate is scored once,
    and only if ``accept`` (default: every candidate) takes it. ``screen`` (default: none) scores all candidates
    on a few pairs first and only the best few on all pairs."""
    device = model.get_input_embeddings().weight.device
    _sync(device)
    started = time.perf_counter()
    grad = token_gradients(model, examples, suffix_ids, pad_id, micro_batch_tokens, by_length=by_length)
    _sync(device)
    graded = time.perf_counter()
    sampled = sample_candidates(suffix_ids, grad, allowed_mask, search_width=search_width, topk=topk,
                                generator=generator)
    pool = candidate_pool(suffix_ids, sampled, accept)
    filter_s = time.perf_counter() - graded
    best, loss, evaluated, report = screened_losses(
        model, examples, pool.rows, screen or ScreenSettings(pairs=None, keep=pool.scored), generator,
        max_tokens_per_forward=max_tokens_per_forward, current=0)
    confirmed = time.perf_counter()
    best, unconfirmed = confirmed_pick(evaluated, pool.rows, best, confirm)
    filter_s += time.perf_counter() - confirmed
    kept = [int(t) for t in pool.rows[best]]
    return kept, GcgStepStats(step, evaluated.loss_of(best), evaluated.loss_of(0), teacher_s, graded - started,
                              evaluated.seconds, evaluated.tokens, evaluated.forwards, report, kept_current=best == 0,
                              sampled=pool.sampled, duplicates=pool.duplicates, rejected=pool.rejected + unconfirmed,
                              scored=pool.scored, filter_s=filter_s)


def confirmed_pick(evaluated: CandidateEval, rows: torch.Tensor, pick: int,
                   confirm: Callable[[list[int]], bool] | None) -> tuple[int, int]:
    """The pick if ``confirm`` keeps it, else the scored row with the next lowest CE that it keeps (row 0, the
    current suffix, was kept before, so it always is); and how many picks ``confirm`` turned down."""
    if confirm is None or pick == 0:
        return pick, 0
    scored = evaluated.rows.tolist() if evaluated.rows is not None else list(range(len(evaluated.losses)))
    by_loss = [scored[i] for i in evaluated.losses.argsort(stable=True).tolist()]
    turned_down = 0
    for row in by_loss[by_loss.index(pick):]:
        if row == 0 or confirm([int(t) for t in rows[row]]):
            return row, turned_down
        turned_down += 1
    return 0, turned_down


def allowed_mask_of(allowed: Sequence[int], vocab_size: int) -> torch.Tensor:
    import torch

    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[torch.tensor(list(allowed))] = True
    return mask


def mean_ce_ids(model, examples: Sequence[chat.PromptIds], pad_id: int, micro_batch_tokens: int = 8192) -> float:
    """Token-mean CE of examples whose learned prompt is ids (held-out CE of a suffix)."""
    import torch

    from shared.lm.teacher import batch_ce_sum

    with torch.no_grad():
        total = sum(float(batch_ce_sum(model, g, pad_id)) for g in micro_batches(examples, micro_batch_tokens))
    return total / max(n_loss_tokens(examples), 1)


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# the search loop


class GcgSettings(DrawSettings):
    length: int
    steps: int
    search_width: int = 512
    topk: int = 256
    # which tokens a suffix may use (``allowed_token_ids``): printable text, printable ASCII, or any but special
    vocabulary: Vocabulary = "printable"
    # keep only candidates (and start from a suffix) whose text, typed into the slot, gives back the same ids
    round_trip: bool = True
    val_every: int = 25
    checkpoint_every: int = 25
    max_tokens_per_forward: int = 65536
    # the screen: every candidate is scored on `screen_pairs` of the step's pairs, the best `screen_keep` on all;
    # None (or as many pairs as the step has) scores every candidate on every pair
    screen_pairs: int | None = 4
    screen_keep: int = 32
    screen_check_every: int = 25  # every Nth step also runs the full evaluation to report the screen's agreement

    @property
    def screen_on(self) -> bool:
        return self.screen_pairs is not None and self.screen_pairs < self.pairs_per_step \
            and self.screen_keep < self.search_width

    @property
    def pairs_per_step(self) -> int:
        return self.questions_per_step * self.completions_per_question


@dataclass
class GcgState:
    """A resumable search: the current suffix, the best by held-out CE, and the curve so far."""

    step: int
    suffix: list[int]
    best_suffix: list[int]
    best_val: float = float("inf")
    curve: list[dict] = field(default_factory=list)


class GcgSearch:
    """GCG over the suffix of ``prompt`` (an ids LearnedPrompt; its ids are the starting suffix). ``rules`` (by
    default from the settings, with the round-trip checked on the validation questions) says which suffixes the
    search may keep; the start must be one of them."""

    def __init__(self, pair: TeacherStudent, prompt: LearnedPrompt, settings: GcgSettings,
                 train_questions: Sequence[str], val_questions: Sequence[str], *, seed: int,
                 rules: SuffixRules | None = None):
        if prompt.kind != "ids" or len(prompt.ids) != settings.length:
            raise ValueError(f"GCG needs an ids prompt of length {settings.length}")
        self.pair, self.prompt, self.settings, self.seed = pair, prompt, settings, seed
        self.draws = TeacherDraws(pair, prompt, settings, train_questions, val_questions, seed)
        self.pad_id = chat.soft_placeholder_id(pair.tokenizer)
        model = pair.student_model
        vocab = model.get_input_embeddings().weight.shape[0]
        self.rules = rules or SuffixRules.of(pair.tokenizer, vocab, settings, val_questions or train_questions,
                                             slot=prompt.slot, system=prompt.system)
        if not self.rules.accepts(prompt.ids):
            raise ValueError(f"the starting suffix {prompt.ids} is not one the search may keep (vocabulary "
                             f"{settings.vocabulary!r}, round trip {settings.round_trip})")
        self.allowed = self.rules.allowed
        self.allowed_mask = allowed_mask_of(self.allowed, vocab)
        self.val_examples: list[chat.PromptIds] = []

    def held_out_ce(self, suffix: Sequence[int]) -> float:
        with self.pair.student() as model:
            return mean_ce_ids(model, with_suffix(self.prompt, self.val_examples, suffix), self.pad_id,
                               self.settings.micro_batch_tokens)

    def step(self, step: int, suffix: Sequence[int]) -> tuple[list[int], GcgStepStats]:
        import torch

        started = time.perf_counter()
        examples = with_suffix(self.prompt, self.draws.step_examples(step), suffix)
        teacher_s = time.perf_counter() - started
        generator = torch.Generator().manual_seed(derived_seed(self.seed, step, 1))
        s = self.settings
        check = s.screen_check_every > 0 and (step + 1) % s.screen_check_every == 0
        screen = ScreenSettings(pairs=s.screen_pairs, keep=s.screen_keep, check=check)
        with self.pair.student() as model:
            return gcg_step(model, examples, suffix, self.allowed_mask, pad_id=self.pad_id,
                            search_width=s.search_width, topk=s.topk, generator=generator, step=step,
                            teacher_s=teacher_s, max_tokens_per_forward=s.max_tokens_per_forward,
                            micro_batch_tokens=s.micro_batch_tokens, screen=screen, by_length=s.bucket_by_length,
                            accept=self.rules.text, confirm=self.rules.everywhere)

    def new_state(self) -> GcgState:
        return GcgState(step=0, suffix=list(self.prompt.ids), best_suffix=list(self.prompt.ids))

    def run(self, state: GcgState, *, on_step=None, checkpoint=None) -> GcgState:
        s = self.settings
        if not self.val_examples:
            self.val_examples = self.draws.val_examples()
        if not state.curve:
            state.best_val = self.held_out_ce(state.suffix)
            state.curve.append({"step": 0, "heldout_ce": state.best_val})
        while state.step < s.steps:
            state.suffix, stats = self.step(state.step, state.suffix)
            state.step += 1
            point = {"step": state.step, "train_ce": stats.loss, "current_ce": stats.current_loss,
                     "kept_current": stats.kept_current, "teacher_s": stats.teacher_s,
                     "gradient_s": stats.gradient_s, "candidates_s": stats.candidates_s, "filter_s": stats.filter_s,
                     "candidate_tokens": stats.candidate_tokens, "candidates_sampled": stats.sampled,
                     "candidates_duplicate": stats.duplicates, "candidates_rejected": stats.rejected,
                     "candidates_scored": stats.scored}
            if stats.screen is not None:
                point |= {f"screen_{k}": v for k, v in asdict(stats.screen).items() if v is not None}
            if state.step % s.val_every == 0 or state.step == s.steps:
                point["heldout_ce"] = self.held_out_ce(state.suffix)
                if point["heldout_ce"] < state.best_val:
                    state.best_val, state.best_suffix = point["heldout_ce"], list(state.suffix)
            state.curve.append(point)
            if on_step:
                on_step(stats)
            if checkpoint and state.step % s.checkpoint_every == 0:
                checkpoint(state)
        return state
