"""The student pass with each prompt packed with its replies into one unpadded sequence (``pack_replies``).

The shared-prompt pass (``shared.lm.teacher.shared_prompt_ce``) runs each prompt once and the replies against
its cached keys and values; continuing a cache needs an explicit mask, which takes SDPA off its fused kernels.
Here a micro-batch is ONE row of tokens with no padding between examples: for each question its prompt's head
(all but the prompt's last token), then its replies, each led by the prompt's last token (whose position
predicts the reply's first token), at positions that continue the prompt. A token attends to the earlier
tokens of its own reply and to its question's head -- the offset causal mask -- through FlexAttention on CUDA
(a fused kernel that skips the blocks the mask rules out) and through SDPA with the same mask as a dense
tensor elsewhere (FlexAttention has no CPU backward). The soft prefix sits in the heads' embeddings, so its
gradient is plain autograd: no cache leaves.

The decoder layers are run here with the model's own modules (norms, projections -- LoRA layers included --,
rotary embedding, MLP), as ``shared.lm.decoding``'s prefill does; only the attention call is ours. Same loss
and prefix gradient as the reference path to float rounding (tests/test_packed_student.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from shared.lm import chat

if TYPE_CHECKING:
    import torch

    from shared.lm.chat import PromptIds

Attention = Literal["flex", "dense"]
ALIGN = 128  # a packed row is padded to a multiple of FlexAttention's block size (fewer distinct shapes)


@dataclass
class PackedRow:
    """One micro-batch as a single row: ids, the next-token target at each position (``IGNORE_INDEX`` where there
    is none), positions, and for the mask each token's question (``docs``) and segment (0: the question's head,
    r >= 1: its r-th reply in this row); ``soft_at`` lists the positions the soft prefix fills, K per head."""

    ids: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    docs: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    soft_at: list[int] = field(default_factory=list)
    heads: int = 0
    replies: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def add_head(self, prompt: PromptIds) -> None:
        end = prompt.assistant_start - 1
        if end < 1:
            raise ValueError("a packed prompt needs at least two tokens before the reply")
        soft = prompt.soft_slice
        if soft is not None and soft.stop > end:
            raise ValueError("a soft slot that reaches the prompt's last token cannot be packed before it")
        if soft is not None:
            self.soft_at += [len(self.ids) + i for i in range(soft.start, soft.stop)]
        self.heads += 1
        self._extend(prompt.input_ids[:end], [chat.IGNORE_INDEX] * end, 0, 0)

    def add_reply(self, example: PromptIds) -> None:
        start = example.assistant_start - 1  # the prompt's last token leads the reply
        ids = example.input_ids[start:example.loss_end]
        labels = example.labels()[start:example.loss_end]
        self.replies += 1
        self._extend(ids, labels[1:] + [chat.IGNORE_INDEX], start, self.replies)

    def _extend(self, ids, targets, first_position: int, segment: int) -> None:
        self.ids += ids
        self.targets += targets
        self.positions += range(first_position, first_position + len(ids))
        self.docs += [self.heads - 1] * len(ids)  # the question of the head last added
        self.segments += [segment] * len(ids)

    def padded_to(self, multiple: int, pad_id: int) -> PackedRow:
        """The row padded at the end to a multiple of ``multiple`` tokens; padding is its own document."""
        extra = -len(self.ids) % multiple
        return PackedRow(self.ids + [pad_id] * extra, self.targets + [chat.IGNORE_INDEX] * extra,
                         self.positions + [0] * extra, self.docs + [-1] * extra, self.segments + [-1] * extra,
                         self.soft_at, self.heads, self.replies)


def pack(examples: Sequence[PromptIds], max_tokens: int) -> list[PackedRow]:
    """The examples' distinct prompts, each with its replies, packed into rows of at most ``max_tokens`` tokens
    (at least one reply per row): a question whose replies do not fit continues in the next row, its head again."""
    from shared.lm.token_loss import distinct_prompts

    prompts, owners = distinct_prompts(examples)
    members: list[list[int]] = [[] for _ in prompts]
    for index, owner in enumerate(owners):
        members[owner].append(index)
    rows: list[PackedRow] = []
    row = PackedRow()
    for prompt, mine in zip(prompts, members, strict=True):
        head_in_row = False
        head = prompt.assistant_start - 1
        for index in mine:
            reply = examples[index].loss_end - head
            if row.replies and len(row) + reply + (0 if head_in_row else head) > max_tokens:
                rows.append(row)
                row, head_in_row = PackedRow(), False
            if not head_in_row:
                row.add_head(prompt)
                head_in_row = True
            row.add_reply(examples[index])
    if row.replies:
        rows.append(row)
    return rows


def allowed(docs: torch.Tensor, segments: torch.Tensor, q, kv):
    """The offset causal mask: ``q`` sees ``kv`` when it is not later, of the same question, and in ``q``'s own
    segment or in the question's head."""
    return (kv <= q) & (docs[q] == docs[kv]) & ((segments[kv] == 0) | (segments[kv] == segments[q]))


def packed_ce_sum(model, row: PackedRow, pad_id: int, soft=None, *, attention: Attention | None = None
                  ) -> torch.Tensor:
    """The summed next-token CE of a packed row (a scalar), with ``soft`` ([K, H]) filling every head's soft slot."""
    import torch

    from shared.lm.token_loss import token_ce

    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    attention = attention or ("flex" if device.type == "cuda" else "dense")
    row = row.padded_to(ALIGN, pad_id) if attention == "flex" else row
    ids = torch.tensor(row.ids, device=device)
    embeds = embedding(ids)
    if soft is not None and row.soft_at:
        at = torch.tensor(row.soft_at, device=device)
        embeds = embeds.index_put((at,), soft.to(embeds.dtype).repeat(row.heads, 1))
    docs = torch.tensor(row.docs, device=device)
    segments = torch.tensor(row.segments, device=device)
    positions = torch.tensor(row.positions, device=device)
    hidden = packed_hidden(model, embeds.unsqueeze(0), positions.unsqueeze(0),
                           _mask(docs, segments, attention))[0]
    targets = torch.tensor(row.targets, device=device)
    keep = targets != chat.IGNORE_INDEX
    return token_ce(model, hidden[keep], targets[keep]).sum()


def _mask(docs, segments, attention: Attention):
    import torch

    length = docs.shape[0]
    if attention == "dense":
        at = torch.arange(length, device=docs.device)
        return allowed(docs, segments, at[:, None], at[None, :])[None, None]
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return allowed(docs, segments, q, kv)

    return create_block_mask(mask_mod, None, None, length, length, device=docs.device)


def packed_hidden(model, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, mask) -> torch.Tensor:
    """The backbone's final hidden states (after its norm) for ``inputs_embeds`` [1, T, H] under ``mask``: a
    FlexAttention ``BlockMask`` or a dense boolean ``[1, 1, T, T]``."""
    import torch.nn.functional as F

    from shared.lm.decoding import _causal_lm, _rotate, attention_without_cudnn, unsupported_reason

    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"the packed student pass cannot run this model: {reason}")
    backbone = _causal_lm(model).get_decoder()
    hidden = inputs_embeds
    cos, sin = backbone.rotary_emb(hidden, position_ids)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    flex = not hasattr(mask, "dtype")
    for layer in backbone.layers:
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:2], -1, attn.head_dim)
        q = _rotate(attn.q_proj(x).view(shape).transpose(1, 2), cos, sin)
        k = _rotate(attn.k_proj(x).view(shape).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        gqa = q.shape[1] != k.shape[1]
        if flex:
            o = _flex_attention()(q, k, v, block_mask=mask, scale=attn.scaling, enable_gqa=gqa)
        else:
            with attention_without_cudnn():
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=gqa)
        hidden = hidden + attn.o_proj(o.transpose(1, 2).reshape(*x.shape[:2], -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return backbone.norm(hidden)


_COMPILED: dict = {}


def _flex_attention():
    """FlexAttention, compiled once per process on CUDA (uncompiled it materialises the scores); as it is
    elsewhere (forward only: the CPU has no FlexAttention backward)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.cuda.is_available():
        return flex_attention
    if "flex" not in _COMPILED:
        # rows differ in length: after the first recompile the length is symbolic, so a step compiles at most twice
        _COMPILED["flex"] = torch.compile(flex_attention)
    return _COMPILED["flex"]


# ---------------------------------------------------------------------------------------------------------------
# GCG's candidate forward: dense causal rows, each decoder layer one compiled region


def fused_completion_ce_sums(model, input_ids: torch.Tensor, labels: torch.Tensor, *,
                             compiled: bool | None = None) -> torch.Tensor:
    """``shared.lm.teacher.completion_ce_sums`` for unpadded rows of equal length (GCG's candidate blocks): per-row
    summed CE at the labelled positions, the backbone run by ``causal_hidden``."""
    import torch

    from shared.lm.token_loss import token_ce

    hidden = causal_hidden(model, input_ids, compiled=compiled)
    targets = labels[:, 1:]
    keep = targets != chat.IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[keep]
    ce = token_ce(model, hidden[:, :-1][keep], targets[keep])
    return torch.zeros(labels.shape[0], device=ce.device, dtype=ce.dtype).index_add_(0, rows, ce)


def causal_hidden(model, input_ids: torch.Tensor, *, compiled: bool | None = None) -> torch.Tensor:
    """The backbone's final hidden states for unpadded rows ``[R, T]`` under the plain causal mask (SDPA's fused
    causal kernel), each decoder layer one compiled region on CUDA (``compiled``, default: on CUDA) so its norms,
    rotary embedding, activation and residual adds are fused; the same code for every layer, compiled once."""
    import torch

    from shared.lm.decoding import _causal_lm, unsupported_reason

    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"the fused candidate forward cannot run this model: {reason}")
    backbone = _causal_lm(model).get_decoder()
    hidden = backbone.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], -1)
    cos, sin = backbone.rotary_emb(hidden, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    compiled = input_ids.device.type == "cuda" if compiled is None else compiled
    step = _compiled_causal_layer() if compiled else _causal_layer
    for layer in backbone.layers:
        hidden = step(layer, hidden, cos, sin)
    return backbone.norm(hidden)


def _causal_layer(layer, hidden, cos, sin):
    import torch.nn.functional as F

    from shared.lm.decoding import _rotate

    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:2], -1, attn.head_dim)
    q = _rotate(attn.q_proj(x).view(shape).transpose(1, 2), cos, sin)
    k = _rotate(attn.k_proj(x).view(shape).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling,
                                       enable_gqa=q.shape[1] != k.shape[1])
    hidden = hidden + attn.o_proj(o.transpose(1, 2).reshape(*x.shape[:2], -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _compiled_causal_layer():
    if "causal_layer" not in _COMPILED:
        import torch

        _COMPILED["causal_layer"] = torch.compile(_causal_layer, dynamic=True)
    return _COMPILED["causal_layer"]
