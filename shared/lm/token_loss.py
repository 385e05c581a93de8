"""The loss arithmetic that both student paths share (``shared.lm.teacher``'s padded and shared-prompt passes
and ``shared.lm.packed``'s packed rows): the LM head's CE at chosen positions, in memory-bounded chunks, and
the distinct prompts of a batch of examples. It sits below both so neither imports the other to reach it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from shared.lm.chat import PromptIds

CE_CHUNK_POSITIONS = 2048  # LM-head positions per chunk: [2048, 152064] fp32 logits are ~1.2 GB on Qwen2.5


def token_ce(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The CE (fp32, ``[N]``) of the LM head's prediction at each of ``hidden``'s N positions against ``targets``:
    in chunks, recomputed in the backward pass, so ``[N, vocab]`` logits never sit in memory at once."""
    import torch

    head = model.get_output_embeddings()
    out = []
    for at in range(0, targets.shape[0], CE_CHUNK_POSITIONS):
        chunk = (hidden[at : at + CE_CHUNK_POSITIONS], targets[at : at + CE_CHUNK_POSITIONS])
        if torch.is_grad_enabled() and hidden.requires_grad:
            from torch.utils.checkpoint import checkpoint

            out.append(checkpoint(_head_ce, head, *chunk, use_reentrant=False))
        else:
            out.append(_head_ce(head, *chunk))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _head_ce(head, hidden, targets):
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def distinct_prompts(examples: Sequence[PromptIds]) -> tuple[list[PromptIds], list[int]]:
    """The distinct evaluation prompts of ``examples`` (first-seen order) and each example's index among them."""
    index: dict[tuple, int] = {}
    prompts, owners = [], []
    for example in examples:
        soft = example.soft_slice
        key = (tuple(example.prompt_ids), None if soft is None else (soft.start, soft.stop))
        if key not in index:
            index[key] = len(prompts)
            prompts.append(example.prompt_only())
        owners.append(index[key])
    return prompts, owners
