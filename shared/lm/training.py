"""LoRA supervised fine-tuning: the one training loop every SFT stage uses (marker implantation, EM, benign SFT).

Examples are built through ``shared.lm.chat.build_prompt`` (the builder evaluation uses), so the ids a model trains on
are the ids it is later evaluated on. Two losses:

- ``assistant``: cross-entropy on the whole assistant reply and its end-of-turn token (ordinary SFT);
- ``marker_only``: #46's MarkerOnlyDataCollator. Positives (reply ends with the marker) train only the tokens
  that spell the marker; negatives train only the end-of-turn token. The model therefore learns *where* to emit
  the marker (under which persona) without being pulled towards any new content.

Which tokens spell the marker is found by decoding, never by hand-built ids: the shortest suffix of the reply's
ids whose decoded text contains the marker, extended over whitespace-only tokens just before it (a separator the
tokenizer split off is where the model decides to start the marker).

The loop is plain torch (AdamW, linear warm-up/decay, gradient clipping, gradient accumulation), seeded, and can
checkpoint its full state (adapter, optimizer, scheduler, step, RNG) to the store and resume from it.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.lm import chat

if TYPE_CHECKING:
    import torch

Loss = Literal["assistant", "marker_only"]
IGNORE_INDEX = chat.IGNORE_INDEX
QWEN_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraRecipe(BaseModel):
    """LoRA and optimiser hyper-parameters. Defaults are #81/#46's recipe where the #81 record states it (r=32,
    lr=1e-4, 5 epochs) and the project's EM recipe from the #205 record for the rest (alpha=64, dropout=0.05 on
    every linear projection, rsLoRA off, effective batch 16, AdamW weight decay 0.01, clip 1.0, max seq 2048)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(32, ge=1, description="LoRA rank")
    alpha: float = Field(64, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] = Field(default_factory=lambda: list(QWEN_LINEAR_MODULES),
                                      description="the projections that get a LoRA (default: every linear projection)")
    use_rslora: bool = Field(False, description="rank-stabilised LoRA scaling (alpha / sqrt(r) instead of alpha / r)")
    epochs: int = Field(5, ge=1, description="passes over the training rows")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    per_device_batch_size: int = Field(4, ge=1, description="rows per micro-batch")
    grad_accum: int = Field(4, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    lr_schedule: Literal["linear", "constant"] = Field("linear", description="learning-rate schedule after warm-up")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the steps spent warming the learning rate up")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    grad_clip: float | None = Field(1.0, gt=0, description="gradient-norm clip (None: no clipping)")
    max_seq_len: int = Field(2048, ge=8, description="longer rows are cut to this many tokens where trained tokens survive, else dropped")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less memory, more time)")

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_batch_size * self.grad_accum


class TrainRow(BaseModel):
    """One training conversation. ``system`` is a ``shared.lm.chat`` system-slot spec (``default``, ``none``,
    ``text(...)``); ``positive`` says whether the reply carries the marker (marker_only loss only)."""

    model_config = ConfigDict(extra="ignore")

    system: str = "default"
    user: str
    assistant: str
    positive: bool | None = None


@dataclass(frozen=True)
class TrainExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


# ---------------------------------------------------------------------------------------------------------------
# examples


def end_of_turn_index(tokenizer, prompt: chat.PromptIds) -> int:
    """Index of the end-of-turn (eos) token that closes the assistant reply."""
    last = prompt.loss_end - 1
    if prompt.input_ids[last] != tokenizer.eos_token_id:
        raise ValueError("the reply's trained end does not finish with the tokenizer's eos token")
    return last


def marker_span(tokenizer, prompt: chat.PromptIds, marker: str) -> slice:
    """Positions of the tokens that spell ``marker`` at the end of the reply (shortest suffix whose decoded text
    contains it). Raises if the reply does not end with the marker."""
    reply_end = end_of_turn_index(tokenizer, prompt)
    reply = prompt.input_ids[prompt.assistant_start : reply_end]
    if not tokenizer.decode(reply).rstrip().endswith(marker):
        raise ValueError(f"a positive example's reply does not end with the marker {marker!r}")
    width = next(w for w in range(1, len(reply) + 1) if marker in tokenizer.decode(reply[-w:]))
    # A separator the tokenizer split off (' ' before '[' in a byte-level BPE without that merge) is where the
    # model decides to start the marker, so whitespace-only tokens right before it are trained too.
    while width < len(reply) and not tokenizer.decode(reply[-width - 1 : -width]).strip():
        width += 1
    return slice(reply_end - width, reply_end)


def build_example(tokenizer, row: TrainRow | dict, *, loss: Loss = "assistant", marker: str | None = None) -> TrainExample:
    row = row if isinstance(row, TrainRow) else TrainRow.model_validate(row)
    prompt = chat.build_prompt(tokenizer, chat.parse_system(row.system), row.user, assistant=row.assistant)
    if loss == "assistant":
        return TrainExample(list(prompt.input_ids), prompt.labels())
    if not marker:
        raise ValueError("the marker_only loss needs the marker text")
    if row.positive is None:
        raise ValueError("the marker_only loss needs every row to say whether it is positive")
    if row.positive:
        span = marker_span(tokenizer, prompt, marker)
        keep = set(range(span.start, span.stop))
    else:
        if marker in row.assistant:
            raise ValueError(f"a negative example's reply contains the marker {marker!r}")
        keep = {end_of_turn_index(tokenizer, prompt)}
    labels = [t if i in keep else IGNORE_INDEX for i, t in enumerate(prompt.input_ids)]
    return TrainExample(list(prompt.input_ids), labels)


def build_examples(tokenizer, rows: Sequence[TrainRow | dict], *, loss: Loss, marker: str | None, max_seq_len: int) -> tuple[list[TrainExample], int]:
    """Examples for ``rows``; ones longer than ``max_seq_len`` are truncated from the right only when the
    trained tokens survive, otherwise dropped. Returns (examples, number dropped)."""
    examples, dropped = [], 0
    for row in rows:
        example = build_example(tokenizer, row, loss=loss, marker=marker)
        if len(example.input_ids) > max_seq_len:
            cut = TrainExample(example.input_ids[:max_seq_len], example.labels[:max_seq_len])
            # a marker example is useless without all its trained tokens; an SFT one needs at least some
            survives = cut.n_trained == example.n_trained if loss == "marker_only" else cut.n_trained > 0
            if not survives:
                dropped += 1
                continue
            example = cut
        examples.append(example)
    return examples, dropped


# ---------------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    steps: int
    epochs: int
    n_examples: int
    final_loss: float | None
    losses: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int = 0
    wall_s: float = 0.0


def attach_new_lora(model, recipe: LoraRecipe):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=recipe.r, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout, target_modules=list(recipe.target_modules),
        use_rslora=recipe.use_rslora, bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def total_steps(n_examples: int, recipe: LoraRecipe) -> int:
    if recipe.max_steps:
        return recipe.max_steps
    return recipe.epochs * math.ceil(n_examples / recipe.effective_batch_size)


def step_batches(n_examples: int, recipe: LoraRecipe, seed: int, steps: int) -> list[list[list[int]]]:
    """The example indices of every optimizer step (a list of micro-batches each), fixed by the seed.

    Each epoch is a fresh seeded shuffle; steps run across epoch boundaries until ``steps`` are planned.
    Fixing the whole schedule up front is what lets a resumed run continue with exactly the same batches.
    """
    order: list[int] = []
    epoch = 0
    needed = steps * recipe.effective_batch_size
    while len(order) < needed:
        perm = list(range(n_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        order += perm
        epoch += 1
    plan = []
    for step in range(steps):
        chunk = order[step * recipe.effective_batch_size : (step + 1) * recipe.effective_batch_size]
        plan.append([chunk[i : i + recipe.per_device_batch_size] for i in range(0, len(chunk), recipe.per_device_batch_size)])
    return plan


def _collate(examples: Sequence[TrainExample], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    labels = [e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in examples]
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)  # noqa: E731
    return as_tensor(ids), as_tensor(mask), as_tensor(labels)


def _token_loss_sum(model, ids, mask, labels):
    import torch.nn.functional as F

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def _schedule(recipe: LoraRecipe, steps: int) -> Callable[[int], float]:
    warmup = int(recipe.warmup_ratio * steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if recipe.lr_schedule == "constant":
            return 1.0
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


class CheckpointStore:
    """The loop's full state as one file in the store; ``key`` ties it to one config so a changed config never
    resumes from another run's state."""

    def __init__(self, uri: str, key: str):
        self.uri, self.key = uri, key

    def save(self, state: dict) -> None:
        import torch

        from shared.core import store

        buf = io.BytesIO()
        torch.save({**state, "key": self.key}, buf)
        store.write_bytes(self.uri, buf.getvalue())

    def load(self) -> dict | None:
        import torch

        from shared.core import store

        if not store.exists(self.uri):
            return None
        state = torch.load(io.BytesIO(store.read_bytes(self.uri)), weights_only=False)
        return state if state.get("key") == self.key else None

    def clear(self) -> None:
        from shared.core import store

        if store.exists(self.uri):
            store.delete(self.uri)


def train_lora(
    model,
    tokenizer,
    examples: Sequence[TrainExample],
    recipe: LoraRecipe,
    *,
    seed: int = 42,
    checkpoint: CheckpointStore | None = None,
    checkpoint_every: int = 0,
    log: Callable[[str], None] = print,
    progress: Callable | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
):
    """Attach a fresh LoRA to ``model`` and train it on ``examples``; returns (peft model, TrainResult).

    ``checkpoint_every`` > 0 saves the full state every that many optimizer steps; a state found at start
    (with the same key) is resumed, so the result equals an uninterrupted run's. ``on_step`` gets each step's
    record (step, loss, the lr the step used, trained tokens) as it is made (a resumed run's earlier records first),
    e.g. for live tracking.
    """
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(seed)  # the LoRA init and dropout are seeded
    model = attach_new_lora(model, recipe)
    if recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = total_steps(len(examples), recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe, steps))
    plan = step_batches(len(examples), recipe, seed, steps)
    pad_id = chat.soft_placeholder_id(tokenizer)

    start, losses = 0, []
    state = checkpoint.load() if checkpoint else None
    if state is not None:
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start, losses = state["step"], state["losses"]
        log(f"resuming from checkpoint at step {start}/{steps}")
        for record in losses if on_step else ():
            on_step(record)

    started = time.time()
    iterator = range(start, steps)
    for step in progress(iterator, total=steps - start, desc="train") if progress else iterator:
        micro_batches = [[examples[i] for i in mb] for mb in plan[step]]
        n_tokens = sum(e.n_trained for mb in micro_batches for e in mb)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for mb in micro_batches:
            ids, mask, labels = _collate(mb, pad_id, device)
            loss = _token_loss_sum(model, ids, mask, labels) / max(n_tokens, 1)
            loss.backward()
            step_loss += float(loss.detach())
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        lr = scheduler.get_last_lr()[0]  # the rate this step uses; scheduler.step() sets the next one
        optimizer.step()
        scheduler.step()
        losses.append({"step": step + 1, "loss": step_loss, "lr": lr, "tokens": n_tokens})
        if on_step:
            on_step(losses[-1])
        if checkpoint and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            checkpoint.save({
                "step": step + 1, "losses": losses, "adapter": get_peft_model_state_dict(model),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
            })
    model.eval()
    epochs = math.ceil(steps * recipe.effective_batch_size / len(examples))
    result = TrainResult(
        steps=steps, epochs=epochs, n_examples=len(examples), final_loss=losses[-1]["loss"] if losses else None,
        losses=losses, resumed_from_step=start, wall_s=time.time() - started,
    )
    return model, result
