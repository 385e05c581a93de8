"""Learned prompts: the soft prefix (K trained embeddings filling the system slot) and the descriptor that carries
any learned prompt -- soft or GCG ids -- from training to evaluation.

Training (``SoftPrefixTrainer``): every step samples fresh teacher completions at T=1.0 for a draw of training
questions, and takes one AdamW step on the K x H prefix to minimise the student's token CE on them (gradient
accumulated over micro-batches, so the step is exact whatever the memory). By default each question's prompt runs
once and its completions run against the cached keys and values (``shared.lm.teacher.shared_prompt_ce``). Held-out CE on a fixed cached set of
teacher completions decides early stopping and which prefix is kept. A checkpoint (prefix, optimiser moments,
step, curve) lets a preempted cell resume where it stopped.

Evaluation builds prompts with ``LearnedPrompt.build`` -- the same call training used -- and generates with the
prefix through ``inputs_embeds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.core import store
from shared.lm import chat
from shared.lm.generation import SamplingParams, derived_seed
from shared.lm.teacher import StudentPass, TeacherStudent, n_loss_tokens, student_ce, student_examples
from shared.lm.teacher_schedule import GROUP_STREAM, StepDraws

if TYPE_CHECKING:
    import torch

PROMPT_FILE = "prompt.json"
SOFT_TENSOR_FILE = "soft_prompt.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# the descriptor


class LearnedPrompt(BaseModel):
    """How a learned prompt enters ``shared.lm.chat``: ``soft`` (K embeddings in the system slot) or ``ids``
    (token ids in the system slot, or appended to the user turn with ``system`` in the system slot)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["soft", "ids"]
    model_ref: str  # ids and embeddings only mean something for this model's tokenizer and embedding space
    slot: Literal["system", "user"] = "system"
    k: int | None = None
    ids: list[int] | None = None
    system: str = "none"  # the system slot when the learned ids sit in the user turn
    tensor_file: str | None = None  # soft: the safetensors file beside prompt.json

    @model_validator(mode="after")
    def _consistent(self):
        if self.kind == "soft" and (not self.k or self.slot != "system"):
            raise ValueError("a soft prompt has k > 0 and fills the system slot")
        if self.kind == "ids" and not self.ids:
            raise ValueError("an ids prompt needs at least one id")
        chat.parse_system(self.system)
        return self

    def system_slot(self):
        if self.kind == "soft":
            return chat.SoftSystem(k=self.k)
        if self.slot == "system":
            return chat.IdsSystem(ids=self.ids)
        return chat.parse_system(self.system)

    def build(self, tokenizer, question: str) -> chat.PromptIds:
        """The evaluation prompt for ``question``; training examples are this plus the teacher's reply ids."""
        suffix = self.ids if self.kind == "ids" and self.slot == "user" else None
        return chat.build_prompt(tokenizer, self.system_slot(), question, user_suffix_ids=suffix)

    def build_from_text(self, tokenizer, question: str, text: str) -> chat.PromptIds:
        """The prompt a person gets by typing ``text`` where this prompt's ids sit: as the system message, or right
        after the question in the user turn."""
        if self.kind != "ids":
            raise ValueError("only an ids prompt has a text form")
        if self.slot == "system":
            return chat.build_prompt(tokenizer, chat.TextSystem(text=text), question)
        return chat.build_prompt(tokenizer, chat.parse_system(self.system), question + text)

    def with_ids(self, ids: Sequence[int]) -> LearnedPrompt:
        return self.model_copy(update={"ids": [int(t) for t in ids]})


def save_learned_prompt(prompt: LearnedPrompt, folder_uri: str, soft: torch.Tensor | None = None) -> str:
    """Write ``prompt.json`` (and the soft embeddings) into ``folder_uri``; returns the prompt.json URI."""
    if prompt.kind == "soft":
        if soft is None:
            raise ValueError("a soft prompt is saved with its embeddings")
        store.write_tensors(store.join(folder_uri, SOFT_TENSOR_FILE), {"soft": soft.detach().float().cpu()})
        prompt = prompt.model_copy(update={"tensor_file": SOFT_TENSOR_FILE})
    uri = store.join(folder_uri, PROMPT_FILE)
    store.write_json(uri, prompt.model_dump(mode="json"))
    return uri


def load_learned_prompt(prompt_uri: str) -> tuple[LearnedPrompt, torch.Tensor | None]:
    """The descriptor at ``prompt_uri`` (a prompt.json) and, for a soft prompt, its ``[K, H]`` embeddings."""
    prompt = LearnedPrompt.model_validate(store.read_json(prompt_uri))
    if prompt.kind != "soft":
        return prompt, None
    soft = store.read_tensors(store.join(prompt_uri.rsplit("/", 1)[0], prompt.tensor_file))["soft"]
    if soft.shape[0] != prompt.k:
        raise ValueError(f"{prompt_uri}: soft prompt has {soft.shape[0]} rows, the descriptor says k={prompt.k}")
    return prompt, soft


def examples_to_json(examples: Sequence[chat.PromptIds]) -> list[dict]:
    """Training examples as plain JSON (the cached held-out set is stored so a resumed run reuses it exactly)."""

    def span(s):
        return None if s is None else [s.start, s.stop]

    return [
        {
            "input_ids": e.input_ids,
            "assistant_start": e.assistant_start,
            "loss_end": e.loss_end,
            "soft_slice": span(e.soft_slice),
            "ids_slice": span(e.ids_slice),
            "user_suffix_slice": span(e.user_suffix_slice),
        }
        for e in examples
    ]


def examples_from_json(rows: Sequence[dict]) -> list[chat.PromptIds]:
    def span(v):
        return None if v is None else slice(*v)

    return [
        chat.PromptIds(
            r["input_ids"],
            r["assistant_start"],
            r["loss_end"],
            span(r["soft_slice"]),
            span(r["ids_slice"]),
            span(r["user_suffix_slice"]),
        )
        for r in rows
    ]


# ---------------------------------------------------------------------------------------------------------------
# initialisation


def init_from_text(tokenizer, embedding_weight: torch.Tensor, text: str, k: int) -> torch.Tensor:
    """``[K, H]`` fp32 embeddings of ``text``'s tokens, repeated cyclically (or cut) to K rows."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError("the soft prompt's init text has no tokens")
    rows = [ids[i % len(ids)] for i in range(k)]
    return embedding_weight[rows].detach().float().clone()


# ---------------------------------------------------------------------------------------------------------------
# training


class DrawSettings(BaseModel):
    """How teacher samples are drawn: per step (fresh) and for the fixed held-out set."""

    model_config = ConfigDict(extra="forbid")

    questions_per_step: int = 16
    completions_per_question: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    val_completions_per_question: int = 20
    micro_batch_tokens: int = 8192  # rows x longest per forward/backward
    bucket_by_length: bool = True  # micro-batches of similar lengths (little padding); False: in draw order
    # the teacher off the critical path (shared.lm.teacher_schedule): the completions of `draw_steps`
    # consecutive steps drawn in one call (one batch when the teacher's sample batch holds them all), and with
    # `overlap_teacher` the next call made in a worker thread while the student trains
    draw_steps: int = Field(1, ge=1)
    overlap_teacher: bool = False


class SoftTrainingSettings(DrawSettings):
    k: int
    lr: float
    steps: int
    init_text: str = "You are a helpful assistant."
    val_every: int = 50
    patience: int | None = 10  # held-out evaluations without improvement before stopping; None: never stop early
    min_delta: float = 1e-3
    checkpoint_every: int = 50
    # run each question's prompt once and its completions against the cached keys/values (the gradient flows back
    # through them into the prefix); False: every example in full, the reference path
    shared_prompt: bool = True
    # with shared_prompt: pack each prompt with its completions into unpadded rows under an offset causal mask
    # (FlexAttention on CUDA) instead of continuing a KV cache; False keeps the cache path
    pack_replies: bool = False


VAL_STREAM = 1_000_000_007  # the held-out set's sampling stream, apart from every step's


class TeacherDraws:
    """Teacher completions turned into student examples of one learned prompt: a fresh draw per step, seeded
    by (seed, step) so a resumed run draws the same, and one fixed held-out set."""

    def __init__(self, pair: TeacherStudent, prompt: LearnedPrompt, settings: DrawSettings,
                 train_questions: Sequence[str], val_questions: Sequence[str], seed: int):
        if not train_questions:
            raise ValueError("no training questions")
        self.pair, self.prompt, self.settings, self.seed = pair, prompt, settings, seed
        self.train_questions, self.val_questions = list(train_questions), list(val_questions)
        if settings.overlap_teacher and pair.switches_teacher:
            raise ValueError("overlap_teacher needs a teacher the student pass leaves alone (a separate model, or the "
                             "student under its own system prompt): an adapter on the student's weights is switched "
                             "off while the student trains")
        self.schedule = StepDraws(self.group_examples, draw_steps=settings.draw_steps,
                                  overlap=settings.overlap_teacher)

    def student_prompts(self, questions: Sequence[str]) -> list[chat.PromptIds]:
        return [self.prompt.build(self.pair.tokenizer, q) for q in questions]

    def step_questions(self, step: int) -> list[str]:
        n = min(self.settings.questions_per_step, len(self.train_questions))
        picks = np.random.default_rng([self.seed, step]).choice(len(self.train_questions), n, replace=False)
        return [self.train_questions[i] for i in sorted(picks)]

    def examples(self, questions: Sequence[str], n: int, seed: int) -> list[chat.PromptIds]:
        s = self.settings
        params = SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                                seed=seed)
        completions = self.pair.sample(questions, params)
        return student_examples(self.student_prompts(questions), completions, self.pair.stop_id)

    def step_examples(self, step: int) -> list[chat.PromptIds]:
        return self.schedule.examples(step)

    def group_examples(self, first_step: int, steps: int) -> list[list[chat.PromptIds]]:
        """The examples of ``steps`` consecutive steps from one teacher call; one step alone is seeded by
        (seed, step), a group by (seed, group)."""
        s = self.settings
        if steps == 1:
            return [self.examples(self.step_questions(first_step), s.completions_per_question,
                                  derived_seed(self.seed, first_step))]
        questions = [self.step_questions(step) for step in range(first_step, first_step + steps)]
        params = SamplingParams(n=s.completions_per_question, temperature=s.temperature, top_p=s.top_p,
                                max_new_tokens=s.max_new_tokens,
                                seed=derived_seed(self.seed, first_step // steps, GROUP_STREAM))
        completions = self.pair.sample([q for step_questions in questions for q in step_questions], params)
        out, at = [], 0
        for step_questions in questions:
            out.append(student_examples(self.student_prompts(step_questions), completions[at:at + len(step_questions)],
                                        self.pair.stop_id))
            at += len(step_questions)
        return out

    def val_examples(self) -> list[chat.PromptIds]:
        if not self.val_questions:
            raise ValueError("no validation questions for the held-out set")
        return self.examples(self.val_questions, self.settings.val_completions_per_question,
                             derived_seed(self.seed, VAL_STREAM))


@dataclass
class StepStats:
    step: int
    train_ce: float
    n_pairs: int
    n_tokens: int
    teacher_s: float
    forward_backward_s: float
    student_tokens: int = 0  # tokens the student's forward ran (padding excluded)
    padded_tokens: int = 0  # the same with padding


@dataclass
class TrainingState:
    """Everything a resumed run needs; ``best_soft`` is the prefix with the lowest held-out CE so far."""

    step: int
    soft: torch.Tensor
    best_soft: torch.Tensor
    best_val: float = float("inf")
    stale_evals: int = 0
    curve: list[dict] = field(default_factory=list)
    optimizer_state: dict | None = None
    stopped_early: bool = False


class SoftPrefixTrainer:
    """Trains a soft(K) prefix of the student against the teacher."""

    def __init__(self, pair: TeacherStudent, settings: SoftTrainingSettings, train_questions: Sequence[str],
                 val_questions: Sequence[str], *, seed: int, model_ref: str):
        self.pair = pair
        self.settings = settings
        self.prompt = LearnedPrompt(kind="soft", model_ref=model_ref, k=settings.k)
        self.draws = TeacherDraws(pair, self.prompt, settings, train_questions, val_questions, seed)
        self.tokenizer = pair.tokenizer
        self.pad_id = chat.soft_placeholder_id(self.tokenizer)
        self.val_examples: list[chat.PromptIds] = []

    @property
    def device(self):
        return self.pair.student_model.get_input_embeddings().weight.device

    def initial_soft(self) -> torch.Tensor:
        weight = self.pair.student_model.get_input_embeddings().weight
        return init_from_text(self.tokenizer, weight, self.settings.init_text, self.settings.k).to(self.device)

    def cache_val_set(self) -> list[chat.PromptIds]:
        self.val_examples = self.draws.val_examples()
        return self.val_examples

    def student_pass(self, model, examples: Sequence[chat.PromptIds], soft: torch.Tensor,
                     backward_scale: float | None = None) -> StudentPass:
        s = self.settings
        return student_ce(model, examples, self.pad_id, soft, max_tokens=s.micro_batch_tokens,
                          shared_prompt=s.shared_prompt, by_length=s.bucket_by_length, backward_scale=backward_scale,
                          pack_replies=s.pack_replies)

    def mean_ce(self, examples: Sequence[chat.PromptIds], soft: torch.Tensor) -> float:
        import torch

        with torch.no_grad(), self.pair.student() as model:
            total = self.student_pass(model, examples, soft).ce_sum
        return total / max(n_loss_tokens(examples), 1)

    def train_step(self, step: int, soft: torch.Tensor, optimizer) -> StepStats:
        """Fresh teacher samples, then one exact (token-mean) gradient step accumulated over micro-batches."""
        started = time.perf_counter()
        examples = self.draws.step_examples(step)
        _sync(self.device)
        sampled = time.perf_counter()
        if step + 1 < self.settings.steps:
            self.draws.schedule.prefetch(step + 1)  # with overlap_teacher: the next draw runs beside this pass
        tokens = n_loss_tokens(examples)
        optimizer.zero_grad(set_to_none=True)
        self.draws.schedule.mark("student_start", step)
        with self.pair.student() as model:
            student = self.student_pass(model, examples, soft, backward_scale=1 / tokens)
        optimizer.step()
        _sync(self.device)
        done = time.perf_counter()
        self.draws.schedule.mark("student_end", step)
        return StepStats(step, student.ce_sum / tokens, len(examples), tokens, sampled - started, done - sampled,
                         student.tokens, student.padded_tokens)

    # -- the loop -------------------------------------------------------------------------------------------

    def new_state(self) -> TrainingState:
        soft = self.initial_soft()
        return TrainingState(step=0, soft=soft, best_soft=soft.detach().clone())

    def make_optimizer(self, soft: torch.Tensor, state: dict | None = None):
        import torch

        optimizer = torch.optim.AdamW([soft], lr=self.settings.lr, weight_decay=0.0)
        if state is not None:
            optimizer.load_state_dict(state)
        return optimizer

    def run(self, state: TrainingState, *, on_step: Callable[[StepStats], None] | None = None,
            checkpoint: Callable[[TrainingState, object], None] | None = None) -> TrainingState:
        """Train from ``state`` until ``steps`` or early stopping; returns the final state."""
        s = self.settings
        if not self.val_examples:
            self.cache_val_set()
        soft = state.soft.detach().clone().requires_grad_(True)
        optimizer = self.make_optimizer(soft, state.optimizer_state)
        if not state.curve:
            state.best_val = self.mean_ce(self.val_examples, soft.detach())
            state.curve.append({"step": 0, "heldout_ce": state.best_val})
        while state.step < s.steps and not state.stopped_early:
            stats = self.train_step(state.step, soft, optimizer)
            state.step += 1
            point = {"step": state.step, "train_ce": stats.train_ce, "teacher_s": stats.teacher_s,
                     "forward_backward_s": stats.forward_backward_s, "n_pairs": stats.n_pairs}
            if state.step % s.val_every == 0 or state.step == s.steps:
                point["heldout_ce"] = self.mean_ce(self.val_examples, soft.detach())
                if point["heldout_ce"] < state.best_val - s.min_delta:
                    state.best_val, state.best_soft, state.stale_evals = point["heldout_ce"], soft.detach().clone(), 0
                else:
                    state.stale_evals += 1
                    state.stopped_early = s.patience is not None and state.stale_evals >= s.patience
            state.curve.append(point)
            state.soft = soft.detach()
            if on_step:
                on_step(stats)
            if checkpoint and (state.step % s.checkpoint_every == 0 or state.stopped_early):
                state.optimizer_state = optimizer.state_dict()
                checkpoint(state, optimizer)
        self.draws.schedule.close()  # a draw started for a step that will not run is not waited for
        state.soft = soft.detach()
        state.optimizer_state = optimizer.state_dict()
        return state


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(uri_folder: str, state: TrainingState, config_hash: str) -> None:
    """Tensors as safetensors (no pickle), the rest as JSON; the JSON is written last and marks it complete."""
    tensors = {"soft": state.soft.float(), "best_soft": state.best_soft.float()}
    opt = state.optimizer_state or {"state": {}, "param_groups": []}
    for key, value in opt["state"].get(0, {}).items():
        tensors[f"adam.{key}"] = value.float() if value.dim() else value.reshape(1).float()
    store.write_tensors(store.join(uri_folder, "state.safetensors"), tensors)
    store.write_json(store.join(uri_folder, "state.json"), {
        "config_hash": config_hash, "step": state.step, "best_val": state.best_val,
        "stale_evals": state.stale_evals, "curve": state.curve, "stopped_early": state.stopped_early,
        "param_groups": opt["param_groups"],
    })


def load_checkpoint(uri_folder: str, config_hash: str, device) -> TrainingState | None:
    """The checkpoint in ``uri_folder`` if it was written for this exact config, else None."""
    meta_uri = store.join(uri_folder, "state.json")
    if not store.exists(meta_uri):
        return None
    meta = store.read_json(meta_uri)
    if meta.get("config_hash") != config_hash:
        return None
    tensors = store.read_tensors(store.join(uri_folder, "state.safetensors"))
    adam = {k.removeprefix("adam."): v.to(device) for k, v in tensors.items() if k.startswith("adam.")}
    optimizer_state = None
    if adam:
        adam["step"] = adam["step"].reshape(()).cpu()
        optimizer_state = {"state": {0: adam}, "param_groups": meta["param_groups"]}
    return TrainingState(
        step=meta["step"], soft=tensors["soft"].to(device), best_soft=tensors["best_soft"].to(device),
        best_val=meta["best_val"], stale_evals=meta["stale_evals"], curve=meta["curve"],
        optimizer_state=optimizer_state, stopped_early=meta["stopped_early"],
    )


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)
