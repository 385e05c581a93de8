"""The one layer convention for every stage that reads activations (issue81's ``hidden_states``, issue170's
``villain_direction``, issue205's ``extract_persona_vectors``), the one rule that translates the records' layer
numbers into it (``RECORD_RULE``, ``RECORD_LAYERS``), and the one function that reads a named position
(``read_out``).

Layer ``L`` is ``hidden_states[L]`` in Hugging Face's numbering, the index Chen et al. (2025) and most of the
literature use: the residual stream after ``L`` decoder blocks. ``L = 0`` is the input to the first block (the token
embeddings, or the ``inputs_embeds`` a soft prompt is spliced into) and ``L = n_layers`` is the last block's output.
No final norm is applied at any ``L``. transformers itself overwrites the last entry of its ``hidden_states`` with
the final-normed ``last_hidden_state`` (Llama and Qwen2, pinned by ``tests/test_activations.py`` on the installed
version), which puts that one entry in a different space from every other layer; so this module reads the last
block's output directly, by a forward hook, as it reads every other layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

LAYER_CONVENTION = (
    "hidden_states[L]: the residual stream after L decoder blocks (L=0 the input embeddings, L=n_layers the last "
    "block's output; no final norm at any L)"
)


def n_layers(model) -> int:
    """Decoder blocks of a causal LM (a PEFT-wrapped model answers for its base)."""
    return int(model.config.num_hidden_layers)


def missing_layers(layers: Sequence[int], n_blocks: int) -> list[int]:
    """The requested layers a model with ``n_blocks`` blocks does not have (valid: 0..n_blocks)."""
    return [layer for layer in layers if not 0 <= layer <= n_blocks]


def layer_record(layers: Sequence[int]) -> dict:
    """What every activation artifact's index file says about its layer axis."""
    return {"layer_convention": LAYER_CONVENTION, "layers": [int(layer) for layer in layers]}


def decoder(model):
    """The decoder stack (embeddings, blocks, final norm) without the LM head; LoRA layers stay in place."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return inner


class _Deepest(Exception):
    """Raised by the deepest requested layer's hook: the blocks after it are never run."""


def residual_stream(model, layers: Sequence[int], **inputs) -> dict:
    """``{L: [batch, seq, hidden]}``: the residual stream after ``L`` blocks, from one forward pass.

    ``inputs`` are the decoder's (``input_ids`` or ``inputs_embeds``, ``attention_mask``). Layer 0 is caught on its way
    into block 0, layer ``L >= 1`` on its way out of block ``L - 1``; the pass stops after the deepest requested block,
    and the LM head never runs.
    """
    import torch

    stack = decoder(model)
    blocks = stack.layers
    bad = missing_layers(layers, len(blocks))
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has layers 0..{len(blocks)} (hidden_states indices)")
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def keep(layer: int, hidden: torch.Tensor) -> None:
        captured[layer] = hidden.detach()
        if layer == deepest:
            raise _Deepest

    hooks = []
    if 0 in layers:
        hooks.append(blocks[0].register_forward_pre_hook(
            lambda _m, args, kwargs: keep(0, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
    for layer in sorted({layer for layer in layers if layer > 0}):
        hooks.append(blocks[layer - 1].register_forward_hook(
            lambda _m, _i, output, layer=layer: keep(layer, output[0] if isinstance(output, tuple) else output)))
    try:
        with torch.inference_mode():
            stack(**inputs, use_cache=False)
    except _Deepest:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: captured[layer] for layer in layers}


# ---------------------------------------------------------------------------------------------------------------
# the records' layer numbers: one translation rule

RECORD_RULE = (
    "The records' extraction code hooks model.model.layers[L] (0-based) and keeps that block's output: the residual "
    "stream after L + 1 blocks. Record layer L is therefore hidden_states[L + 1] here (Qwen2.5-7B: record 27, its last "
    "block, is layer 28)."
)


def from_record(layer: int) -> int:
    """The platform's ``hidden_states`` index of a record's layer number (``RECORD_RULE``)."""
    if layer < 0:
        raise ValueError(f"a record's layer is a 0-based block index, got {layer}")
    return layer + 1


@dataclass(frozen=True)
class RecordLayers:
    """What one record says about its layers and where it reads, with the evidence (the code that ran)."""

    workflow: str
    layers: tuple[int, ...]  # as the record writes them (0-based block indices)
    headline: int | None  # the record's headline layer, if it names one
    readout: str  # the read-out position its code used (a key of READOUTS)
    evidence: str

    def table(self) -> list[dict]:
        return [{"record_layer": layer, "platform_index": from_record(layer), "evidence": self.evidence}
                for layer in self.layers]


RECORD_LAYERS: dict[str, RecordLayers] = {
    "issue205": RecordLayers(
        "issue205", (7, 14, 20, 21, 27), 20, "last_prompt_token",
        "scripts/extract_persona_vectors.py at 241e508 (the commit the record's hot-fix ran): "
        "model.model.layers[layer_idx].register_forward_hook keeps output[0]; Method A reads position "
        "input_ids.shape[1] - 1 of the chat template with add_generation_prompt=True; its DEFAULT_LAYERS [7, 14, 21, 27] "
        "are commented '(28 layers, 0-indexed)'"),
    "issue170": RecordLayers(
        "issue170", (8, 10, 12, 14), 14, "last_prompt_token",
        "scripts/compute_villain_direction.py at b18a7cb, through src/explore_persona_space/axis/prompt_search/"
        "analysis.py: model.model.layers[layer_idx].register_forward_hook, layers '0-indexed transformer block indices "
        "(Qwen-2.5-7B has 28 layers, indices 0..27)'; the read-out is attention_mask.sum(-1) - 1 of a prompt rendered "
        "with add_generation_prompt=True, the last prompt token (the plan's text says 'last user token'; the code that "
        "produced the record's numbers did not read there)"),
    "issue81": RecordLayers(
        "issue81", (10, 15, 20, 25), 20, "last_prompt_token",
        "scripts/extract_hidden_states_i81.py at 3ab94ab (named in the record): model.model.layers[L]."
        "register_forward_hook with 0 <= L < n_layers; the last non-pad token of the chat template with "
        "add_generation_prompt=True"),
}


def record_layers(workflow: str) -> RecordLayers:
    if workflow not in RECORD_LAYERS:
        raise KeyError(f"no record layers for {workflow!r}; known: {sorted(RECORD_LAYERS)}")
    return RECORD_LAYERS[workflow]


def translation_markdown(workflow: str) -> str:
    """The table a data README and a report print: record layer, platform index, evidence."""
    record = record_layers(workflow)
    lines = ["| record layer | platform index (hidden_states) | evidence |", "| ---: | ---: | :--- |"]
    lines += [f"| {row['record_layer']} | {row['platform_index']} | {row['evidence']} |" for row in record.table()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# the read-out position: a named parameter of one function

Readout = Literal["last_prompt_token", "last_user_token", "reply_mean"]
READOUTS: dict[str, str] = {
    "last_prompt_token": "the last token of the prompt, after the assistant header (the token the reply follows)",
    "last_user_token": "the last token of the user's message (the one before the user turn's closing <|im_end|>)",
    "reply_mean": "the mean over the reply's tokens (the ids as generated, never re-tokenised)",
}


def readout_positions(prompt, position: Readout, *, im_end_id: int | None = None, reply_length: int = 0) -> list[int]:
    """The positions of ``prompt`` (a ``shared.lm.chat.PromptIds``, followed by ``reply_length`` reply ids for
    ``reply_mean``) that ``position`` reads."""
    n = len(prompt.input_ids)
    if position == "last_prompt_token":
        return [n - 1]
    if position == "last_user_token":
        if im_end_id is None:
            raise ValueError("last_user_token needs the <|im_end|> id")
        closes = [i for i, t in enumerate(prompt.input_ids) if t == im_end_id]
        if not closes:
            raise ValueError("the prompt has no <|im_end|>: not a ChatML prompt")
        return [closes[-1] - 1]
    if position == "reply_mean":
        if reply_length < 1:
            raise ValueError("reply_mean needs a non-empty reply")
        return list(range(n, n + reply_length))
    raise ValueError(f"unknown read-out position {position!r}; known: {sorted(READOUTS)}")


def read_out(
    model,
    prompts: Sequence,
    layers: Sequence[int],
    position: Readout,
    *,
    pad_id: int,
    batch_size: int = 16,
    replies: Sequence[Sequence[int]] | None = None,
    soft=None,
    im_end_id: int | None = None,
    progress=None,
):
    """``[len(prompts), len(layers), hidden]`` float32: the residual stream (``residual_stream``) of each prompt at
    the named read-out ``position``, one forward pass per batch of ``batch_size``.

    Rows are right-padded, so every real token keeps its position and attention (the causal mask hides the pads).
    ``replies`` (token ids, one list per prompt) are appended for ``reply_mean``; ``soft`` (``[K, hidden]``) fills
    the prompts' soft system slot through ``inputs_embeds``. Every stage that reads activations calls this with the
    position it uses, by name.
    """
    import torch

    from shared.lm import chat

    if position == "reply_mean" and (replies is None or len(replies) != len(prompts)):
        raise ValueError("reply_mean needs one reply per prompt")
    chunks = [list(range(at, min(at + batch_size, len(prompts)))) for at in range(0, len(prompts), batch_size)]
    out = []
    for chunk in (progress(chunks, desc=position) if progress else chunks):
        sequences = [prompts[i] if position != "reply_mean" else
                     chat.PromptIds(list(prompts[i].input_ids) + list(replies[i]), len(prompts[i]) + len(replies[i]),
                                    soft_slice=prompts[i].soft_slice)
                     for i in chunk]  # fmt: skip
        batch = chat.build_batch(sequences, pad_id=pad_id, padding_side="right").to(model.device)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if soft is not None:
            with torch.no_grad():
                inputs = {"inputs_embeds": chat.inputs_embeds(batch, model.get_input_embeddings(), soft.to(model.device)),
                          "attention_mask": batch.attention_mask}
        captured = residual_stream(model, layers, **inputs)
        for row, i in enumerate(chunk):
            at = readout_positions(prompts[i], position, im_end_id=im_end_id,
                                   reply_length=len(replies[i]) if replies is not None else 0)
            out.append(torch.stack([captured[layer][row, at].float().mean(dim=0).cpu() for layer in layers]))
    return torch.stack(out) if out else torch.empty(0, len(layers), 0)
