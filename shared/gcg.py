"""Greedy coordinate gradient (GCG) search for L token ids in the system slot (or appended to the user turn).

The objective is the one the soft prefix minimises (``shared.teacher``): the student's token CE on fresh teacher
samples. One step:

1. sample teacher completions for a draw of questions (``pairs_per_step`` (question, completion) pairs);
2. gradient of the CE with respect to a one-hot encoding of the L suffix ids (``token_gradients``);
3. ``search_width`` candidates, each swapping one position to one of its ``topk`` best tokens by gradient;
4. the CE of every candidate on the same pairs, in large batched forwards (``candidate_losses``): for each pair,
   the candidates are rows of one batch of identical length -- no padding, no attention mask, so SDPA runs its
   causal flash kernel -- chunked to ``max_tokens_per_forward``. (The record did one forward per candidate:
   226 s per step.) With the screen on (``screen_pairs``), every candidate is scored on a few randomly drawn
   pairs, and only the ``screen_keep`` best of them on all pairs (``screened_losses``); every
   ``screen_check_every``-th step also scores all of them on all pairs and records whether the screen kept the
   same candidate;
5. keep the best candidate.

The suffix is ids from start to finish: candidates are id tensors, the kept suffix is written as ids, and
evaluation splices those ids through ``chat.IdsSystem`` / ``user_suffix_ids``. Nothing is decoded and
re-tokenised (the record's second evaluation bug).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from shared import chat
from shared.generation import derived_seed
from shared.soft_prompt import DrawSettings, LearnedPrompt, TeacherDraws
from shared.teacher import TeacherStudent, completion_ce_sums, micro_batches, n_loss_tokens

if TYPE_CHECKING:
    import torch


def suffix_slice(example: chat.PromptIds) -> slice:
    span = example.ids_slice or example.user_suffix_slice
    if span is None:
        raise ValueError("this prompt has no ids in the system slot or user suffix to optimise")
    return span


def allowed_token_ids(tokenizer, vocab_size: int, *, ascii_only: bool = False) -> list[int]:
    """Ids a suffix may use: real tokenizer entries (not the embedding matrix's spare rows), no special tokens
    (a suffix must not be able to close its own turn), optionally only those decoding to printable ASCII."""
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    ids = [i for i in range(min(len(tokenizer), vocab_size)) if i not in special]
    if ascii_only:
        ids = [i for i in ids if (text := tokenizer.decode([i])).isascii() and text.isprintable()]
    return ids


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


def candidate_ce_sums(model, examples: Sequence[chat.PromptIds], candidates: torch.Tensor, *,
                      max_tokens_per_forward: int = 65536) -> CandidateEval:
    """Each candidate's CE summed over the loss tokens of ``examples`` (``losses`` holds sums here), in batched
    forwards: for one example all candidates give rows of the same length and the same loss positions, so each
    forward is a dense ``[rows, T]`` block with no padding and no mask; the LM head runs only at the reply
    positions."""
    import torch

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
                sums[start:start + chunk.shape[0]] += completion_ce_sums(
                    model, ids, labels.expand(chunk.shape[0], -1))
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
    loss: float  # the kept candidate's CE on all of this step's pairs
    current_loss: float | None
    teacher_s: float
    gradient_s: float
    candidates_s: float
    candidate_tokens: int
    forwards: int
    screen: ScreenReport | None = None


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
                    generator: torch.Generator, *, max_tokens_per_forward: int = 65536
                    ) -> tuple[int, float, CandidateEval, ScreenReport | None]:
    """Pick a candidate: the lowest token-mean CE over all pairs, either of every candidate (no screen) or of the
    ``screen.keep`` candidates that score best on ``screen.pairs`` randomly drawn pairs.

    Returns the pick, its CE on all pairs, the evaluation's cost and the screen's report. A checked step also scores
    the other candidates on the remaining pairs (the full evaluation) but keeps the screen's pick, so a search's
    trajectory does not depend on which steps are checked."""
    import torch

    width = candidates.shape[0]
    active = screen.pairs is not None and screen.pairs < len(examples) and screen.keep < width
    if not active:
        full = candidate_losses(model, examples, candidates, max_tokens_per_forward=max_tokens_per_forward)
        best = int(full.losses.argmin())
        return best, float(full.losses[best]), full, None
    order = torch.randperm(len(examples), generator=generator).tolist()
    screen_set = [examples[i] for i in sorted(order[: screen.pairs])]
    rest = [examples[i] for i in sorted(order[screen.pairs:])]
    tokens_all = n_loss_tokens(examples)
    cost = candidate_ce_sums(model, screen_set, candidates, max_tokens_per_forward=max_tokens_per_forward)
    screen_sums = cost.losses
    kept = (screen_sums / n_loss_tokens(screen_set)).argsort()[: screen.keep]
    kept_rest = candidate_ce_sums(model, rest, candidates[kept.cpu()], max_tokens_per_forward=max_tokens_per_forward)
    kept_losses = (screen_sums[kept] + kept_rest.losses) / tokens_all
    pick = int(kept[int(kept_losses.argmin())])
    pick_loss = float(kept_losses.min())
    evaluation = CandidateEval(kept_losses, cost.tokens + kept_rest.tokens, cost.forwards + kept_rest.forwards,
                               cost.seconds + kept_rest.seconds)
    report = ScreenReport(pairs=len(screen_set), kept=int(kept.numel()), screen_s=cost.seconds,
                          kept_s=kept_rest.seconds)
    if screen.check:
        others = candidate_ce_sums(model, rest, candidates, max_tokens_per_forward=max_tokens_per_forward)
        full = (screen_sums + others.losses) / tokens_all
        report.checked = True
        report.rank = int((full < full[pick]).sum())
        report.agreed = report.rank == 0
        report.gap = float(full[pick] - full.min())
        report.check_s = others.seconds
        report.full_tokens = cost.tokens + others.tokens
    return pick, pick_loss, evaluation, report


def with_suffix(prompt: LearnedPrompt, examples: Sequence[chat.PromptIds], suffix_ids: Sequence[int]):
    """Re-point examples at a new suffix without rebuilding them: the suffix has a fixed length and sits at the
    same positions, and only its ids change."""
    out = []
    for example in examples:
        span = suffix_slice(example)
        ids = list(example.input_ids)
        ids[span] = list(suffix_ids)
        out.append(chat.PromptIds(ids, example.assistant_start, example.loss_end, example.soft_slice,
                                  example.ids_slice, example.user_suffix_slice))
    return out


def gcg_step(model, examples: Sequence[chat.PromptIds], suffix_ids: Sequence[int], allowed_mask: torch.Tensor, *,
             pad_id: int, search_width: int, topk: int, generator: torch.Generator, step: int = 0,
             teacher_s: float = 0.0, max_tokens_per_forward: int = 65536,
             micro_batch_tokens: int = 8192, screen: ScreenSettings | None = None,
             by_length: bool = True) -> tuple[list[int], GcgStepStats]:
    """One GCG step on pairs already sampled; returns the kept suffix and the step's timings. ``screen`` (default:
    none) scores all candidates on a few pairs first and only the best few on all pairs."""
    device = model.get_input_embeddings().weight.device
    _sync(device)
    started = time.perf_counter()
    grad = token_gradients(model, examples, suffix_ids, pad_id, micro_batch_tokens, by_length=by_length)
    _sync(device)
    graded = time.perf_counter()
    candidates = sample_candidates(suffix_ids, grad, allowed_mask, search_width=search_width, topk=topk,
                                   generator=generator)
    best, loss, evaluated, report = screened_losses(
        model, examples, candidates, screen or ScreenSettings(pairs=None, keep=search_width), generator,
        max_tokens_per_forward=max_tokens_per_forward)
    kept = [int(t) for t in candidates[best]]
    return kept, GcgStepStats(step, loss, None, teacher_s, graded - started, evaluated.seconds, evaluated.tokens,
                              evaluated.forwards, report)


def allowed_mask_of(allowed: Sequence[int], vocab_size: int) -> torch.Tensor:
    import torch

    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[torch.tensor(list(allowed))] = True
    return mask


def mean_ce_ids(model, examples: Sequence[chat.PromptIds], pad_id: int, micro_batch_tokens: int = 8192) -> float:
    """Token-mean CE of examples whose learned prompt is ids (held-out CE of a suffix)."""
    import torch

    from shared.teacher import batch_ce_sum

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
    ascii_only: bool = False
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
    """GCG over the suffix of ``prompt`` (an ids LearnedPrompt; its ids are the starting suffix)."""

    def __init__(self, pair: TeacherStudent, prompt: LearnedPrompt, settings: GcgSettings,
                 train_questions: Sequence[str], val_questions: Sequence[str], *, seed: int):
        if prompt.kind != "ids" or len(prompt.ids) != settings.length:
            raise ValueError(f"GCG needs an ids prompt of length {settings.length}")
        self.pair, self.prompt, self.settings, self.seed = pair, prompt, settings, seed
        self.draws = TeacherDraws(pair, prompt, settings, train_questions, val_questions, seed)
        self.pad_id = chat.soft_placeholder_id(pair.tokenizer)
        model = pair.student_model
        vocab = model.get_input_embeddings().weight.shape[0]
        self.allowed = allowed_token_ids(pair.tokenizer, vocab, ascii_only=settings.ascii_only)
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
                            micro_batch_tokens=s.micro_batch_tokens, screen=screen, by_length=s.bucket_by_length)

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
            point = {"step": state.step, "train_ce": stats.loss, "teacher_s": stats.teacher_s,
                     "gradient_s": stats.gradient_s, "candidates_s": stats.candidates_s,
                     "candidate_tokens": stats.candidate_tokens}
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
