"""The one layer convention for every stage that reads activations (issue81's ``hidden_states``, issue170's
``villain_direction``, issue205's ``extract_persona_vectors``).

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
