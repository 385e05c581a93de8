"""The one place where prompts become token ids; training and evaluation both call ``build_prompt``.

The system slot is always explicit (``SystemSlot``):

- ``default``  -- the chat template's own default system prompt (Qwen2.5: "You are Qwen, created by ..."),
  i.e. the conversation is rendered with no system message and the template decides;
- ``none``     -- no system block at all (Qwen's template cannot express this, so the block is cut out);
- ``text(s)``  -- the system message ``s``, verbatim;
- ``soft(K)``  -- K placeholder positions, later filled with learned embeddings (``inputs_embeds``);
- ``ids([..])``-- raw token ids (e.g. a GCG string), spliced verbatim and never re-tokenised.

How ids are made: the conversation is rendered to text by the tokenizer's own chat template, with a unique
sentinel standing in for each slot that is not text (soft/ids system content, a user suffix of ids, the
assistant reply). The text between sentinels is tokenised in one piece each, and ids or placeholders are spliced
at the sentinels. With no splice points the ids are therefore exactly ``apply_chat_template(..., tokenize=True)``,
and a training prompt is always the evaluation prompt followed by the reply's ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    TypeAdapter,
)

from shared.core.config import ConfigError, PlanCheck

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that cross-entropy skips

# Private-use code points: cannot collide with real text and pass through chat templates unchanged.
_SENTINEL = "\ue000eps-{}\ue001"
_SYSTEM_SLOT, _USER_SUFFIX, _ASSISTANT = (_SENTINEL.format(n) for n in ("system", "user-suffix", "assistant"))


# ---------------------------------------------------------------------------------------------------------------
# system slot modes


class _Slot(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DefaultSystem(_Slot):
    """The template's own default system prompt (rendered with no system message)."""

    kind: Literal["default"] = "default"

    def __str__(self) -> str:
        return "default"


class NoSystem(_Slot):
    """No system block at all."""

    kind: Literal["none"] = "none"

    def __str__(self) -> str:
        return "none"


class TextSystem(_Slot):
    kind: Literal["text"] = "text"
    text: str

    def __str__(self) -> str:
        return f"text({json.dumps(self.text, ensure_ascii=False)})"


class SoftSystem(_Slot):
    """K placeholder positions in the system slot, to be filled with learned embeddings."""

    kind: Literal["soft"] = "soft"
    k: PositiveInt

    def __str__(self) -> str:
        return f"soft({self.k})"


class IdsSystem(_Slot):
    """Raw token ids as the system content, spliced verbatim."""

    kind: Literal["ids"] = "ids"
    ids: Annotated[list[NonNegativeInt], Field(min_length=1)]

    def __str__(self) -> str:
        return f"ids({json.dumps(self.ids)})"


SystemSlotModel = Annotated[
    Union[DefaultSystem, NoSystem, TextSystem, SoftSystem, IdsSystem], Field(discriminator="kind")  # noqa: UP007
]


def _coerce_system(value: Any) -> Any:
    return parse_system(value) if isinstance(value, str) else value


# Use as a config field type: accepts "soft(64)", {"kind": "soft", "k": 64} or a slot object.
SystemSlot = Annotated[SystemSlotModel, BeforeValidator(_coerce_system)]
_SYSTEM_ADAPTER: TypeAdapter = TypeAdapter(SystemSlot)


def parse_system(spec: str | dict | _Slot) -> DefaultSystem | NoSystem | TextSystem | SoftSystem | IdsSystem:
    """Parse ``default``, ``none``, ``text(...)``, ``soft(K)`` or ``ids([...])``; ``str(slot)`` round-trips.

    ``text(...)`` takes everything between the first '(' and the last ')' verbatim, or a JSON string literal
    when it starts with a double quote (needed for newlines and exact whitespace).
    """
    if isinstance(spec, _Slot):
        return spec
    if isinstance(spec, dict):
        return _SYSTEM_ADAPTER.validate_python(spec)
    head, paren, rest = spec.strip().partition("(")
    if not paren:
        if head in ("default", "none"):
            return DefaultSystem() if head == "default" else NoSystem()
        raise ValueError(
            f"bad system slot {spec!r}: expected default, none, text(...), soft(K) or ids([...])"
        )
    if not rest.endswith(")"):
        raise ValueError(f"bad system slot {spec!r}: missing closing ')'")
    arg = rest[:-1]
    try:
        if head == "text":
            return TextSystem(text=_text_argument(arg))
        if head == "soft":
            return SoftSystem(k=int(arg))
        if head == "ids":
            values = json.loads(arg if arg.lstrip().startswith("[") else f"[{arg}]")
            return IdsSystem(ids=values)
    except (ValueError, TypeError) as err:
        raise ValueError(f"bad system slot {spec!r}: {_one_line(err)}") from None
    raise ValueError(f"bad system slot {spec!r}: unknown mode {head!r}")


def _text_argument(arg: str) -> str:
    if arg.startswith('"'):
        try:
            decoded = json.loads(arg)
            if isinstance(decoded, str):
                return decoded
        except json.JSONDecodeError:
            pass  # not a JSON literal: the text just starts with a quote
    return arg


def _one_line(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(map(str, first['loc'])) or 'value'}: {first['msg']}"
    return str(err).splitlines()[0]


# ---------------------------------------------------------------------------------------------------------------
# one prompt


@dataclass(frozen=True)
class PromptIds:
    """Token ids of one conversation, with the positions a trainer or generator needs.

    ``assistant_start`` is the index of the first assistant content token (== len(input_ids) for an evaluation
    prompt); ``loss_end`` is one past the last token to train on (the assistant content and its end-of-turn
    token), or None when there is no assistant turn.
    """

    input_ids: list[int]
    assistant_start: int
    loss_end: int | None = None
    soft_slice: slice | None = None
    ids_slice: slice | None = None
    user_suffix_slice: slice | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def has_assistant(self) -> bool:
        return self.loss_end is not None

    @property
    def prompt_ids(self) -> list[int]:
        """The ids a model sees before it writes the reply (the evaluation prompt)."""
        return self.input_ids[: self.assistant_start]

    def prompt_only(self) -> PromptIds:
        """The evaluation prompt of a training example (same ids, slots and positions, no reply)."""
        return PromptIds(
            self.prompt_ids,
            self.assistant_start,
            None,
            self.soft_slice,
            self.ids_slice,
            self.user_suffix_slice,
        )

    def loss_mask(self) -> list[bool]:
        if self.loss_end is None:
            raise ValueError("this prompt has no assistant turn to train on (build it with assistant=...)")
        return [self.assistant_start <= i < self.loss_end for i in range(len(self.input_ids))]

    def labels(self, ignore_index: int = IGNORE_INDEX) -> list[int]:
        """``input_ids`` with everything but the assistant reply set to ``ignore_index`` (no shift)."""
        return [t if keep else ignore_index for t, keep in zip(self.input_ids, self.loss_mask(), strict=True)]


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    system: str | dict | _Slot,
    user: str,
    *,
    user_suffix_ids: Sequence[int] | None = None,
    assistant: str | None = None,
    add_generation_prompt: bool = True,
) -> PromptIds:
    """Token ids for [system slot] + user turn (+ optional ids suffix) + assistant header (+ optional reply).

    With ``assistant`` the result is a training example whose ``prompt_ids`` equal the evaluation prompt built
    from the same arguments without it. ``add_generation_prompt=False`` (without ``assistant``) ends after the
    user turn.
    """
    slot = parse_system(system)
    if isinstance(slot, IdsSystem) and ids_outside_vocabulary(tokenizer, slot.ids):
        raise ConfigError(f"system slot {slot}: {slot_problem(tokenizer, slot, None)}")
    _check_no_sentinel(
        user,
        *([slot.text] if isinstance(slot, TextSystem) else []),
        *([assistant] if assistant is not None else []),
    )
    if assistant is not None and not add_generation_prompt:
        raise ValueError("a prompt with an assistant reply always includes the assistant header")

    messages = _messages(slot, user + (_USER_SUFFIX if user_suffix_ids else ""))
    text = _render(tokenizer, messages, add_generation_prompt)
    if isinstance(slot, NoSystem):
        text = _without_system_block(text)

    splices: dict[str, list[int]] = {}
    if isinstance(slot, SoftSystem):
        splices[_SYSTEM_SLOT] = [soft_placeholder_id(tokenizer)] * slot.k
    elif isinstance(slot, IdsSystem):
        splices[_SYSTEM_SLOT] = list(slot.ids)
    if user_suffix_ids:
        splices[_USER_SUFFIX] = [int(t) for t in user_suffix_ids]

    ids, spans = _tokenize_with_splices(tokenizer, text, splices)
    system_span = spans.get(_SYSTEM_SLOT)
    prompt = PromptIds(
        input_ids=ids,
        assistant_start=len(ids),
        soft_slice=system_span if isinstance(slot, SoftSystem) else None,
        ids_slice=system_span if isinstance(slot, IdsSystem) else None,
        user_suffix_slice=spans.get(_USER_SUFFIX),
    )
    return prompt if assistant is None else _with_reply(tokenizer, prompt, messages, assistant)


def soft_placeholder_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id standing in at soft positions until embeddings replace it, and the id batches are padded with.

    The pad token, unless it is the end-of-turn token (SmolLM2 pads with <|im_end|>, which a real prompt holds
    twice): then the unknown token, so a placeholder never looks like a turn boundary.
    """
    pad, eos, unk = tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id
    if pad is not None and pad != eos:
        return int(pad)
    if unk is not None and unk != eos:
        return int(unk)
    return int(pad if pad is not None else eos)


def _messages(slot: _Slot, user_content: str) -> list[dict[str, str]]:
    user = {"role": "user", "content": user_content}
    if isinstance(slot, DefaultSystem):
        return [user]
    content = slot.text if isinstance(slot, TextSystem) else _SYSTEM_SLOT
    return [{"role": "system", "content": content}, user]


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _check_no_sentinel(*texts: str) -> None:
    for text in texts:
        if "\ue000eps-" in text:
            raise ValueError("prompt text contains the reserved code point U+E000 followed by 'eps-'")


def _without_system_block(text: str) -> str:
    # ChatML: the block runs from the <|im_start|> before the system content up to the next <|im_start|>.
    at = text.find(_SYSTEM_SLOT)
    start = text.rfind("<|im_start|>", 0, at)
    end = text.find("<|im_start|>", at)
    if at < 0 or start < 0 or end < 0:
        raise ValueError("system slot 'none' needs a ChatML chat template (<|im_start|>role ... <|im_end|>)")
    return text[:start] + text[end:]


def _tokenize_with_splices(
    tokenizer, text: str, splices: dict[str, list[int]]
) -> tuple[list[int], dict[str, slice]]:
    """Tokenise the text between sentinels piecewise and splice each sentinel's ids in its place."""
    pieces = [(text.find(s), s) for s in splices]
    for at, sentinel in pieces:
        if at < 0 or text.count(sentinel) != 1:
            raise ValueError(
                "the chat template dropped or repeated a prompt slot; it cannot be spliced safely"
            )
    ids: list[int] = []
    spans: dict[str, slice] = {}
    cursor = 0
    for at, sentinel in sorted(pieces):
        ids += _encode(tokenizer, text[cursor:at])
        spans[sentinel] = slice(len(ids), len(ids) + len(splices[sentinel]))
        ids += splices[sentinel]
        cursor = at + len(sentinel)
    ids += _encode(tokenizer, text[cursor:])
    return ids, spans


def _encode(tokenizer, text: str) -> list[int]:
    # As apply_chat_template(tokenize=True) does: the template already wrote every special token it wants.
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _with_reply(tokenizer, prompt: PromptIds, messages: list[dict[str, str]], assistant: str) -> PromptIds:
    """Append the reply and the template's end-of-turn text; the loss covers the reply and its end token."""
    end_of_turn = _end_of_turn_text(tokenizer, messages)
    reply_ids = _encode(tokenizer, assistant)
    end_ids = _encode(tokenizer, end_of_turn)
    eos = tokenizer.eos_token_id
    trained_end = end_ids[: end_ids.index(eos) + 1] if eos in end_ids else end_ids
    ids = prompt.input_ids + reply_ids + end_ids
    loss_end = prompt.assistant_start + len(reply_ids) + len(trained_end)
    return PromptIds(
        ids, prompt.assistant_start, loss_end, prompt.soft_slice, prompt.ids_slice, prompt.user_suffix_slice
    )


def _end_of_turn_text(tokenizer, messages: list[dict[str, str]]) -> str:
    """What the template writes after an assistant reply (ChatML: '<|im_end|>\\n')."""
    with_reply = _render(tokenizer, [*messages, {"role": "assistant", "content": _ASSISTANT}], False)
    header = _render(tokenizer, messages, True)
    at = with_reply.find(_ASSISTANT)
    if at < 0 or with_reply[:at] != header:
        raise ValueError("this chat template does not render a reply right after its generation prompt")
    return with_reply[at + len(_ASSISTANT) :]


# ---------------------------------------------------------------------------------------------------------------
# batches


@dataclass
class Batch:
    """Padded tensors for a list of prompts. ``labels`` is set when every prompt has an assistant reply;
    ``soft_slices`` are the soft positions in padded coordinates."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    soft_slices: list[slice | None] = field(default_factory=list)
    pad_lengths: list[int] = field(default_factory=list)

    def to(self, device: str | torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            None if self.labels is None else self.labels.to(device),
            self.soft_slices,
            self.pad_lengths,
        )


def build_batch(
    prompts: Sequence[PromptIds], *, pad_id: int, padding_side: Literal["left", "right"] = "left"
) -> Batch:
    """Pad to the longest prompt. Left padding (the default) is what generation needs; training may use right."""
    import torch

    if not prompts:
        raise ValueError("build_batch needs at least one prompt")
    width = max(len(p) for p in prompts)
    with_labels = all(p.has_assistant for p in prompts)
    if not with_labels and any(p.has_assistant for p in prompts):
        raise ValueError("a batch mixes training examples (with a reply) and evaluation prompts")
    rows, masks, labels, soft_slices, pad_lengths = [], [], [], [], []
    for prompt in prompts:
        pad = width - len(prompt)
        left = pad if padding_side == "left" else 0
        rows.append(_pad(prompt.input_ids, pad, pad_id, padding_side))
        masks.append(_pad([1] * len(prompt), pad, 0, padding_side))
        if with_labels:
            labels.append(_pad(prompt.labels(), pad, IGNORE_INDEX, padding_side))
        soft = prompt.soft_slice
        soft_slices.append(None if soft is None else slice(soft.start + left, soft.stop + left))
        pad_lengths.append(pad)
    return Batch(
        input_ids=torch.tensor(rows, dtype=torch.long),
        attention_mask=torch.tensor(masks, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long) if with_labels else None,
        soft_slices=soft_slices,
        pad_lengths=pad_lengths,
    )


def _pad(values: list[int], count: int, fill: int, side: str) -> list[int]:
    return [fill] * count + values if side == "left" else values + [fill] * count


def inputs_embeds(batch: Batch, embedding: torch.nn.Module, soft: torch.Tensor) -> torch.Tensor:
    """Token embeddings of ``batch`` with each row's soft positions replaced by ``soft``.

    ``soft`` is ``[K, H]`` (one soft prompt for every row) or ``[B, K, H]`` (one per row); gradients flow into it.
    Rows without a soft slot keep their token embeddings.
    """
    import torch

    if all(span is None for span in batch.soft_slices):
        raise ValueError("soft embeddings given, but no prompt in the batch has a soft(K) system slot")
    rows = len(batch.soft_slices)
    per_row = soft if soft.dim() == 3 else soft.unsqueeze(0).expand(rows, -1, -1)
    if per_row.shape[0] != rows:
        raise ValueError(f"soft embeddings for {per_row.shape[0]} rows, the batch has {rows}")
    embeds = embedding(batch.input_ids)
    out = []
    for row, span in enumerate(batch.soft_slices):
        if span is None:
            out.append(embeds[row])
            continue
        if span.stop - span.start != per_row.shape[1]:
            raise ValueError(
                f"soft slot has {span.stop - span.start} positions, embeddings have {per_row.shape[1]}"
            )
        filled = per_row[row].to(embeds.dtype)
        out.append(torch.cat([embeds[row, : span.start], filled, embeds[row, span.stop :]]))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------
# system slots in stage configs: checked against the model's tokenizer before anything runs


@dataclass(frozen=True)
class SlotField:
    """Field metadata: the field holds a system slot for the model the stage config's ``model_field`` names
    (``text_only``: the text of a ``text(...)`` slot, as persona prompts are). ``check_slots`` finds every such
    field of a stage config, at any depth, and checks its value against that model's tokenizer (the one every
    prompt of the stage is built with, a separate teacher's included)."""

    text_only: bool = False
    model_field: str = "model_ref"


def _fixed_slot(value: str) -> str:
    if isinstance(parse_system(value), SoftSystem):
        raise ValueError(f"{value}: soft(K) needs learned embeddings, which only the soft-prefix cells have "
                         "(train_soft_prefix, then eval_prompt_cell); this field takes default, none, text(...) or "
                         "ids([...])")
    return value


# A config field holding a system slot whose content is fixed before the stage runs: default, none, text(...) or
# ids([...]). soft(K) is refused when the config is parsed (at plan time): no stage that takes a slot spec has
# embeddings to fill it with.
SystemSpec = Annotated[str, AfterValidator(_fixed_slot), SlotField()]
# A config field holding the text of a text(...) system slot (a persona's prompt).
SystemText = Annotated[str, SlotField(text_only=True)]

# A tokenizer gives at most one token per UTF-8 byte and a chat template adds far fewer than TEMPLATE_ALLOWANCE
# tokens, so a text slot shorter than MIN_CONTEXT - TEMPLATE_ALLOWANCE bytes fits any model with a context of
# MIN_CONTEXT tokens or more (every model this project runs: tiny 4096, SmolLM2 8192, Qwen2.5 32768) and is not
# measured: a plan of short prompts loads no tokenizer.
MIN_CONTEXT = 2048
TEMPLATE_ALLOWANCE = 512


def slot_problem(tokenizer: PreTrainedTokenizerBase, slot: str | dict | _Slot, context: int | None) -> str | None:
    """Why this system slot cannot be used with the model of this tokenizer (and context length), or None: raw ids
    outside its vocabulary, or a prompt of the slot alone (an empty user turn) that fills the whole context."""
    slot = parse_system(slot)
    if isinstance(slot, IdsSystem):
        outside = ids_outside_vocabulary(tokenizer, slot.ids)
        if outside:
            return (f"ids([...]) holds {len(outside)} id(s) outside the model's vocabulary of {len(tokenizer)} "
                    f"tokens (first: {outside[0]})")
    if context is not None:
        with _no_length_warning():
            length = len(build_prompt(tokenizer, slot, ""))
        if length >= context:
            return (f"the prompt of this system slot alone is {length} tokens, and the model's context is {context}: "
                    "nothing is left for the question and the reply")
    return None


@contextmanager
def _no_length_warning():
    """transformers' own "longer than the maximum sequence length" warning off while a slot is measured: the
    measuring is for saying that, in the one error line of the plan."""
    log = logging.getLogger("transformers.tokenization_utils_base")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def ids_outside_vocabulary(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[int]:
    """The ids no token of the tokenizer has (an embedding row past the vocabulary is padding, not a token)."""
    return [int(i) for i in ids if not 0 <= int(i) < len(tokenizer)]


def _needs_measuring(slot: _Slot) -> bool:
    if isinstance(slot, IdsSystem):
        return True
    return isinstance(slot, TextSystem) and len(slot.text.encode()) >= MIN_CONTEXT - TEMPLATE_ALLOWANCE


def _member_for(annotation: Any, value: Any) -> tuple[Any, list[Any]]:
    """The bare type of ``annotation`` that ``value`` was validated as, and the metadata on the way there (a union
    member chosen by the value's type; ``Annotated`` unwrapped)."""
    import types
    import typing

    metadata: list[Any] = []
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation, *extra = typing.get_args(annotation)
            metadata += extra
        elif origin in (Union, types.UnionType):
            members = [m for m in typing.get_args(annotation) if _fits(m, value)]
            if not members:
                return Any, metadata
            annotation = members[0]
        else:
            return annotation, metadata


def _fits(annotation: Any, value: Any) -> bool:
    import typing

    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    bare = typing.get_origin(annotation) or annotation
    return isinstance(bare, type) and isinstance(value, bare)


def slot_fields(cfg: BaseModel) -> list[tuple[str, SlotField, str, str | None]]:
    """Every system slot a stage config holds, at any depth: ``(field path, marker, value, model ref)``."""
    import typing

    found: list[tuple[str, SlotField, str, str | None]] = []

    def walk(value: Any, annotation: Any, metadata: list[Any], path: str) -> None:
        annotation, more = _member_for(annotation, value)
        marker = next((m for m in [*metadata, *more] if isinstance(m, SlotField)), None)
        if marker is not None and isinstance(value, str):
            found.append((path, marker, value, getattr(cfg, marker.model_field, None)))
        elif isinstance(value, BaseModel):
            for name, info in type(value).model_fields.items():
                walk(getattr(value, name), info.annotation, list(info.metadata), f"{path}.{name}" if path else name)
        elif isinstance(value, (list, tuple, dict)):
            args = typing.get_args(annotation)
            inner = (args[-1] if isinstance(value, dict) else args[0]) if args else Any
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                walk(item, inner, [], f"{path}[{key!r}]" if isinstance(value, dict) else f"{path}[{key}]")

    walk(cfg, type(cfg), [], "")
    return found


def check_slots(cfg: BaseModel, *, fetch: bool) -> PlanCheck:
    """Check every system slot of a stage config against its model's tokenizer (``slot_problem``).

    ``fetch=False`` (a plan): tokenizers only from disk (``shared.lm.models.folder_on_disk``); a slot whose model is
    not there is counted as unchecked, with the reason. ``fetch=True`` (the stage, before it computes): the model
    as the stage resolves it. Short text slots need no measuring (see ``MIN_CONTEXT``) and load nothing.
    """
    from shared.lm import models

    result = PlanCheck()
    for path, marker, value, ref in slot_fields(cfg):
        slot = TextSystem(text=value) if marker.text_only else parse_system(value)
        if not _needs_measuring(slot) or ref is None:
            continue
        try:
            info = models.tokenizer_info(ref, fetch=fetch)
        except models.NotOnDisk as err:
            result.unchecked.append((ref, str(err)))
            continue
        problem = slot_problem(info.tokenizer, slot, info.context)
        if problem:
            result.problems.append(f"{path} ({ref}): {problem}")
    return result
