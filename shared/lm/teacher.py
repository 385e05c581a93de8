"""The EM teacher, its student, and the distillation objective both prompt optimisers minimise.

#170 trains a prompt for the base model (the student) so that its replies match the EM model (the teacher):
minimise the token cross-entropy of the student on completions the teacher samples fresh at T=1.0.

Weights: when the EM model is a LoRA adapter on the student's base model, teacher and student share ONE copy of
the base weights. The adapter is injected into the model once; sampling runs with it active and the student's
forward runs inside peft's ``disable_adapter()``. (The record kept two resident 7B models and ran out of memory.)
A merged EM model is a separate ``teacher_model_ref`` and is loaded beside the student. With neither, the teacher is
the student model itself under its own system slot (the tiny profile's stand-in: a villain system prompt).

Examples: a teacher completion becomes a student training example by appending its sampled token ids (and the
end-of-turn id when it stopped) to the student's prompt ids -- the text is never re-tokenised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from shared.lm import chat, models
from shared.lm.generation import Completion, HFGenerator, Sampler, SamplingParams
from shared.lm.token_loss import distinct_prompts, token_ce

if TYPE_CHECKING:
    import torch

    from shared.lm.chat import PromptIds


class TeacherSpec(BaseModel):
    """Where the EM teacher comes from (a stage config field): an adapter on the student's base model
    (``adapter_uri``: one copy of the weights), a separate merged model (``model_ref``), or neither (the student
    model itself under ``system``)."""

    model_config = ConfigDict(extra="forbid")

    adapter_uri: str | None = None
    model_ref: str | None = None
    system: chat.SystemSpec = "default"
    sampler: Sampler = "fast"  # "generate": transformers' model.generate, the slower reference

    def load(
        self, model_ref: str, *, dtype: str | None = None, sample_batch_size: int = 64
    ) -> TeacherStudent:
        return load_teacher_student(
            model_ref,
            teacher_adapter_uri=self.adapter_uri,
            teacher_model_ref=self.model_ref,
            teacher_system=self.system,
            dtype=dtype,
            sample_batch_size=sample_batch_size,
            sampler=self.sampler,
        )


@dataclass
class TeacherStudent:
    """A student model (frozen, base weights) and a teacher that samples from the EM model.

    ``shares_weights`` says whether teacher and student are one copy of the weights.
    """

    student_model: object
    tokenizer: object
    teacher_generator: HFGenerator
    teacher_system: str = "default"
    _student_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    shares_weights: bool = True

    @contextlib.contextmanager
    def student(self) -> Iterator[object]:
        """The student model, with the teacher's adapter (if any) switched off for the duration."""
        with self._student_context():
            yield self.student_model

    def teacher_prompts(self, questions: Sequence[str]) -> list[PromptIds]:
        system = chat.parse_system(self.teacher_system)
        return [chat.build_prompt(self.tokenizer, system, q) for q in questions]

    def sample(self, questions: Sequence[str], params: SamplingParams) -> list[list[Completion]]:
        """``params.n`` teacher completions per question (adapter active), in question order."""
        return self.teacher_generator.generate(self.teacher_prompts(questions), params)

    @property
    def switches_teacher(self) -> bool:
        """Whether the student context changes the teacher (an adapter on the shared weights switched off)."""
        return self._student_context is not contextlib.nullcontext

    @property
    def stop_id(self) -> int:
        return int(self.tokenizer.eos_token_id)


def load_teacher_student(
    model_ref: str,
    *,
    teacher_adapter_uri: str | None = None,
    teacher_model_ref: str | None = None,
    teacher_system: str = "default",
    dtype: str | None = None,
    device: str | None = None,
    sample_batch_size: int = 64,
    sampler: Sampler = "fast",
) -> TeacherStudent:
    """Load the student (``model_ref``) and the teacher: an adapter on the same weights, a separate model, or
    the student model itself (then only ``teacher_system`` makes it a teacher)."""
    if teacher_adapter_uri and teacher_model_ref and teacher_model_ref != model_ref:
        raise ValueError("the teacher is either an adapter on the student's base model or a separate model, not both")
    chat.parse_system(teacher_system)
    tokenizer = models.load_tokenizer(model_ref)
    base = models.load_model(model_ref, dtype=dtype, device=device)
    base.requires_grad_(False)  # only the prompt is trained; no weight gradients, no optimiser state
    if teacher_adapter_uri:
        peft_model = models.attach_adapter(base, teacher_adapter_uri)
        inner = peft_model.get_base_model()  # LoRA layers injected in place, active by default
        generator = HFGenerator(inner, tokenizer, batch_size=sample_batch_size, sampler=sampler)
        return TeacherStudent(inner, tokenizer, generator, teacher_system, peft_model.disable_adapter, True)
    if teacher_model_ref and teacher_model_ref != model_ref:
        teacher_tokenizer = models.load_tokenizer(teacher_model_ref)
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            # the teacher's sampled ids become the student's training targets as they are
            raise ValueError(f"the teacher {teacher_model_ref} does not share the vocabulary of the student {model_ref}")
        teacher = models.load_model(teacher_model_ref, dtype=dtype, device=device)
        teacher.requires_grad_(False)
        generator = HFGenerator(teacher, teacher_tokenizer, batch_size=sample_batch_size, sampler=sampler)
        return TeacherStudent(base, tokenizer, generator, teacher_system, contextlib.nullcontext, False)
    generator = HFGenerator(base, tokenizer, batch_size=sample_batch_size, sampler=sampler)
    return TeacherStudent(base, tokenizer, generator, teacher_system, contextlib.nullcontext, True)


# ---------------------------------------------------------------------------------------------------------------
# teacher samples -> student examples


def with_reply_ids(prompt: PromptIds, reply_ids: Sequence[int], stop_id: int | None) -> PromptIds:
    """A training example: the student's evaluation prompt followed by the teacher's sampled ids.

    The loss covers the reply and, when the teacher stopped, the stop token (so the student learns to stop too).
    """
    reply = [int(t) for t in reply_ids] + ([int(stop_id)] if stop_id is not None else [])
    if not reply:
        raise ValueError("an empty reply that never stopped has nothing to train on")
    ids = list(prompt.input_ids) + reply
    return chat.PromptIds(
        ids, prompt.assistant_start, len(ids), prompt.soft_slice, prompt.ids_slice, prompt.user_suffix_slice
    )


def student_examples(
    student_prompts: Sequence[PromptIds], completions: Sequence[Sequence[Completion]], stop_id: int
) -> list[PromptIds]:
    """One example per (question, completion), question-major; prompts[i] is question i's student prompt.

    A completion that stopped ends with the stop token the teacher ended on (``stop_id`` when it is not known).
    """
    out = []
    for prompt, samples in zip(student_prompts, completions, strict=True):
        for completion in samples:
            stop = None
            if completion.finish_reason == "stop":
                stop = stop_id if completion.stop_token_id is None else completion.stop_token_id
            if completion.token_ids or stop is not None:
                out.append(with_reply_ids(prompt, completion.token_ids, stop))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the objective


def completion_ce_sums(model, input_ids: torch.Tensor, labels: torch.Tensor, inputs_embeds=None, *,
                       past_key_values=None, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions, per row (``[B]``).

    Rows are right-padded, so no attention mask is needed: under causal attention a real token never sees the
    padding after it, and the padded positions carry no label. The LM head runs only at labelled positions and in
    chunks (recomputed in the backward pass), so ``[tokens, vocab]`` logits never sit in memory at once.

    With ``past_key_values`` the rows continue cached prompts (the shared-prompt path): ``attention_mask`` then
    spans cache + rows and ``position_ids`` start where each row's prompt ends.
    """
    import torch

    from shared.lm.decoding import attention_without_cudnn

    backbone = model.get_decoder()
    cached = {} if past_key_values is None else {_cache_argument(backbone): past_key_values, "use_cache": True}
    with attention_without_cudnn():  # lengths vary from step to step: no per-shape plan building
        hidden = backbone(
            input_ids=None if inputs_embeds is not None else input_ids, inputs_embeds=inputs_embeds,
            attention_mask=attention_mask, position_ids=position_ids, **cached,
        ).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != chat.IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[keep]
    ce = token_ce(model, hidden[:, :-1][keep], targets[keep])
    return torch.zeros(labels.shape[0], device=ce.device, dtype=ce.dtype).index_add_(0, rows, ce)


def _cache_argument(backbone) -> str:
    """The name this transformers version gives a forward's KV cache (``past_key_values``, ``cache`` from 5.2x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def n_loss_tokens(examples: Sequence[PromptIds]) -> int:
    return sum(p.loss_end - p.assistant_start for p in examples)


def micro_batches(examples: Sequence[PromptIds], max_tokens: int, *, by_length: bool = True) -> list[list[PromptIds]]:
    """Groups whose padded size (rows x longest) stays within ``max_tokens`` (at least one row).

    ``by_length`` (the default) groups the examples longest first, so rows of a group have nearly the same length and
    hardly any compute goes to padding; otherwise the groups are consecutive runs in the given order."""
    groups = length_groups([len(e) for e in examples], max_tokens, by_length=by_length)
    return [[examples[i] for i in group] for group in groups]


def length_groups(lengths: Sequence[int], max_tokens: int, *, by_length: bool = True) -> list[list[int]]:
    """Indices of rows grouped so that rows x longest stays within ``max_tokens`` (at least one row per group);
    longest first when ``by_length`` (ties keep their order), else consecutive runs in the given order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if by_length else list(range(len(lengths)))
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        wider = max(longest, lengths[index])
        if current and wider * (len(current) + 1) > max_tokens:
            groups.append(current)
            current, wider = [], lengths[index]
        current.append(index)
        longest = wider
    if current:
        groups.append(current)
    return groups


def batch_ce_sum(model, examples: Sequence[PromptIds], pad_id: int, soft=None, device=None) -> torch.Tensor:
    """Summed CE of a group of examples (a scalar), with ``soft`` filling their soft(K) slots when given."""
    batch = chat.build_batch(examples, pad_id=pad_id, padding_side="right").to(device or model.device)
    embeds = None
    if soft is not None:
        embeds = chat.inputs_embeds(batch, model.get_input_embeddings(), soft)
    return completion_ce_sums(model, batch.input_ids, batch.labels, embeds).sum()


# ---------------------------------------------------------------------------------------------------------------
# the objective with each prompt run once (the shared-prompt path)


@dataclass
class StudentPass:
    """What one pass of the student over a set of examples computed: the summed CE, and the tokens its backbone
    ran (``tokens`` without padding, ``padded_tokens`` with it)."""

    ce_sum: float
    tokens: int
    padded_tokens: int


def student_ce(model, examples: Sequence[PromptIds], pad_id: int, soft=None, *, max_tokens: int,
               shared_prompt: bool = True, by_length: bool = True, backward_scale: float | None = None,
               pack_replies: bool = False) -> StudentPass:
    """The summed CE of ``examples`` (``soft`` filling their soft(K) slots), in micro-batches of at most
    ``max_tokens`` padded tokens. With ``backward_scale`` each micro-batch's ``backward_scale x CE`` is
    backpropagated, so ``.grad`` accumulates the gradient of ``backward_scale x`` the summed CE exactly, whatever
    the micro-batch size.

    ``shared_prompt``: run each distinct prompt once and every reply against its cached keys and values
    (``shared_prompt_ce``), or with ``pack_replies`` too, each prompt packed with its replies into unpadded rows of
    at most ``max_tokens`` tokens under an offset causal mask (``packed_prompt_ce``); otherwise every example in
    full (``batch_ce_sum``), the reference."""
    if shared_prompt and pack_replies:
        return packed_prompt_ce(model, examples, pad_id, soft, max_tokens=max_tokens, backward_scale=backward_scale)
    if shared_prompt:
        return shared_prompt_ce(model, examples, pad_id, soft, max_tokens=max_tokens, backward_scale=backward_scale)
    total, padded = 0.0, 0
    for group in micro_batches(examples, max_tokens, by_length=by_length):
        ce = batch_ce_sum(model, group, pad_id, soft)
        if backward_scale is not None:
            (ce * backward_scale).backward()
        total += float(ce.detach())
        padded += len(group) * max(len(e) for e in group)
    return StudentPass(total, sum(len(e) for e in examples), padded)


def shared_prompt_ce(model, examples: Sequence[PromptIds], pad_id: int, soft=None, *, max_tokens: int,
                     backward_scale: float | None = None) -> StudentPass:
    """``student_ce`` with each distinct prompt run once: the 20 completions of a question repeat its prompt (the
    soft prefix, template and question: a quarter of the tokens at the record's setting).

    1. The distinct prompts, each but its last token, run in one right-padded forward that fills a KV cache. Its
       keys and values become leaves: every reply's gradient collects there, however the replies are grouped.
    2. The replies, each led by its prompt's last token (whose position predicts the first reply token), grouped
       longest first into micro-batches of at most ``max_tokens`` (rows x longest), any mix of prompts: each row
       attends to its own prompt's cached keys (a mask hides the cache's padding) at positions that continue it.
    3. The leaves' accumulated gradient goes back through the prompts' forward into ``soft``.

    Same loss and gradient as the reference up to float rounding (tests/test_shared_prompt.py)."""
    import torch

    prompts, owners = distinct_prompts(examples)
    grad = backward_scale is not None and torch.is_grad_enabled()
    cache = PromptCache.run(model, prompts, pad_id, soft, keep_graph=grad)
    tails = [_reply_tail(example) for example in examples]
    total, padded = 0.0, cache.padded_tokens
    for group in length_groups([len(ids) for ids, _ in tails], max_tokens):
        width = max(len(tails[i][0]) for i in group)
        ids = torch.tensor([_pad(tails[i][0], width, pad_id) for i in group], device=cache.device)
        labels = torch.tensor([_pad(tails[i][1], width, chat.IGNORE_INDEX) for i in group], device=cache.device)
        past, mask, positions = cache.for_rows([owners[i] for i in group], width)
        ce = completion_ce_sums(model, ids, labels, past_key_values=past, attention_mask=mask,
                                position_ids=positions).sum()
        if grad:
            (ce * backward_scale).backward()
        total += float(ce.detach())
        padded += len(group) * width
    if grad:
        cache.backward()
    real = sum(len(p) - 1 for p in prompts) + sum(len(ids) for ids, _ in tails)
    return StudentPass(total, real, padded)


def packed_prompt_ce(model, examples: Sequence[PromptIds], pad_id: int, soft=None, *, max_tokens: int,
                     backward_scale: float | None = None) -> StudentPass:
    """``student_ce`` with each distinct prompt packed with its replies (``shared.lm.packed``): no padding, no
    KV cache, the prefix's gradient through plain autograd. ``padded_tokens`` counts the rows' alignment
    padding."""
    import torch

    from shared.lm.packed import ALIGN, pack, packed_ce_sum

    grad = backward_scale is not None and torch.is_grad_enabled()
    on_cuda = model.get_input_embeddings().weight.device.type == "cuda"
    total, real, padded = 0.0, 0, 0
    for row in pack(examples, max_tokens):
        ce = packed_ce_sum(model, row, pad_id, soft)
        if grad:
            (ce * backward_scale).backward()
        total += float(ce.detach())
        real += len(row)
        padded += len(row) + (-len(row) % ALIGN if on_cuda else 0)
    return StudentPass(total, real, padded)


def _reply_tail(example: PromptIds) -> tuple[list[int], list[int]]:
    """The ids a reply's rows run (the prompt's last token, then the reply) and their labels (unshifted)."""
    start = example.assistant_start - 1
    if start < 1:
        raise ValueError("a shared prompt needs at least two tokens before the reply")
    return example.input_ids[start:example.loss_end], example.labels()[start:example.loss_end]


def _pad(values: list[int], width: int, fill: int) -> list[int]:
    return values + [fill] * (width - len(values))


@dataclass
class PromptCache:
    """Keys and values of distinct prompts (all but each prompt's last token), per layer ``[prompts, kv heads,
    longest, head dim]``, right-padded; ``lengths`` says how much of each row is real."""

    keys: list
    values: list
    lengths: torch.Tensor
    padded_tokens: int
    graph: list  # the forward's own keys and values, still attached to it (empty when no gradient is wanted)

    @property
    def device(self):
        return self.lengths.device

    @classmethod
    def run(cls, model, prompts: Sequence[PromptIds], pad_id: int, soft=None, *, keep_graph: bool) -> PromptCache:
        import torch

        from shared.lm.decoding import attention_without_cudnn

        heads = []
        for prompt in prompts:
            end = prompt.assistant_start - 1
            if prompt.soft_slice is not None and prompt.soft_slice.stop > end:
                raise ValueError("a soft slot that reaches the prompt's last token cannot be cached before it")
            heads.append(chat.PromptIds(prompt.input_ids[:end], end, None, prompt.soft_slice, None, None))
        device = model.get_input_embeddings().weight.device
        batch = chat.build_batch(heads, pad_id=pad_id, padding_side="right").to(device)
        embedding = model.get_input_embeddings()
        embeds = embedding(batch.input_ids) if soft is None else chat.inputs_embeds(batch, embedding, soft)
        with attention_without_cudnn():  # right padding: causal attention keeps it out of every real position
            out = model.get_decoder()(inputs_embeds=embeds, use_cache=True)
        cache = out.cache if "cache" in out else out.past_key_values
        graph = [t for layer in cache.layers for t in (layer.keys, layer.values)] if keep_graph else []

        def leaf(t):
            return t.detach().requires_grad_(keep_graph)

        lengths = torch.tensor([len(h) for h in heads], device=device)
        return cls([leaf(layer.keys) for layer in cache.layers], [leaf(layer.values) for layer in cache.layers],
                   lengths, batch.input_ids.numel(), graph)

    def for_rows(self, owners: Sequence[int], width: int):
        """A cache for rows continuing prompts ``owners``, the 2-D attention mask over cache + ``width`` new
        positions, and the new positions' ids."""
        import torch
        from transformers import DynamicCache

        rows = len(owners)
        owner = torch.tensor(owners, device=self.device)
        lengths = self.lengths[owner]
        cached = int(lengths.max())
        if len(set(owners)) == 1:  # one prompt: a view of it for every row
            def take(t):
                return t[owners[0]:owners[0] + 1, :, :cached].expand(rows, -1, -1, -1)
        else:
            def take(t):
                return t[owner, :, :cached]
        # DynamicCache copies what it is given (its update concatenates), so the view costs one copy per group
        past = DynamicCache(ddp_cache_data=[(take(k), take(v)) for k, v in zip(self.keys, self.values, strict=True)])
        prompt_mask = torch.arange(cached, device=self.device)[None, :] < lengths[:, None]
        mask = torch.cat([prompt_mask, torch.ones(rows, width, dtype=torch.bool, device=self.device)], dim=1)
        positions = lengths[:, None] + torch.arange(width, device=self.device)[None, :]
        return past, mask.long(), positions

    def backward(self) -> None:
        """Carry the gradient the replies left on the cached keys and values into the prompts' forward."""
        import torch

        leaves = [t for pair in zip(self.keys, self.values, strict=True) for t in pair]
        pairs = [(out, leaf.grad) for out, leaf in zip(self.graph, leaves, strict=True) if leaf.grad is not None]
        if pairs and pairs[0][0].requires_grad:
            torch.autograd.backward([out for out, _ in pairs], [g for _, g in pairs])
        self.graph = []
