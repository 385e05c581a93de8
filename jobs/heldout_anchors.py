"""Stage ``heldout_anchors``: the held-out CE of fixed system prompts on each learned cell's own held-out pairs.

A learned cell's held-out CE alone does not say how good it is. This stage puts it between anchors measured on
exactly the same (question, teacher completion) pairs -- the set the training stage cached before optimising
(``checkpoint/val_set.json``) -- with the same objective code (``shared.lm.teacher``'s CE, as the trainers' held-out
evaluation calls it):

- the oracle: the teacher's own system prompt given to the student as text, when the teacher is the student model
  under that prompt (a prompt known to reproduce the teacher: no prompt does better in expectation);
- the reference conditions' system prompts (the null/default prompt: where optimisation starts from).

Each stored pair is matched to its validation question by its prompt ids outside the learned span; its completion
ids (and stop token) are kept as they are, never re-tokenised. Cells whose pairs are identical share one set of
anchor numbers. The kept prompt of every cell is re-scored too (``kept_prompt_ce``): it must equal the training
stage's best held-out CE, which checks that cells and anchors were measured alike.

Per pair, the summed CE of every prompt and the pair's token count are stored as well (``completion_ce_sums``, the
per-row values inside that CE), so the analysis can put a paired bootstrap interval on a cell's distance to the
anchors.

The validation pairs chose the kept prompt (early stopping), so a cell's number there is optimistic. With
``test_questions`` (the third split, used for nothing else) the stage also samples the teacher once on those
questions (``test_draws``, seeded by the stage's seed: the same pairs for every cell and every training seed) and
measures every kept prompt and every anchor on them (``test_set``, each cell's ``test``): the numbers gap closed is
reported on.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field, PositiveInt, model_validator

from shared.contract.stage import Context, Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig, stable_hash
from shared.lm.chat import SystemSpec
from shared.lm.teacher import TeacherSpec

ORACLE = "oracle"  # the anchor of the teacher's own prompt given to the student as text (its name everywhere)
TEST_STREAM = 2_000_000_011  # the test pairs' sampling stream, apart from every training and held-out draw


class Question(BaseModel):
    id: str
    text: str


class Anchor(BaseModel):
    name: str
    system: SystemSpec  # a fixed prompt: default, none, text(...) or ids([...])


class LearnedCell(BaseModel):
    heldout_uri: str  # the training stage's cached held-out set: checkpoint/val_set.json
    prompt_uri: str  # its kept prompt: prompt.json


class TestDraws(BaseModel):
    """How the teacher's completions on the test questions are drawn (as the training stages draw theirs)."""

    completions_per_question: PositiveInt = 20
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: PositiveInt = 256


class Config(StageConfig):
    model_ref: str
    val_questions: list[Question] = Field(min_length=1)
    cells: dict[str, LearnedCell] = Field(min_length=1)
    anchors: list[Anchor] = Field(min_length=1)
    # the test split: None, no test set (the fit is then only on the validation pairs); a list is never empty
    test_questions: list[Question] | None = None
    teacher: TeacherSpec | None = None  # who answers the test questions (needed with test_questions)
    test_draws: TestDraws = TestDraws()
    micro_batch_tokens: int = 8192
    sample_batch_size: int = 64
    dtype: str | None = None

    @model_validator(mode="after")
    def _test_split_apart(self):
        if self.test_questions and self.teacher is None:
            raise ValueError("test_questions need the teacher that answers them")
        shared = {q.id for q in self.test_questions or []} & {q.id for q in self.val_questions}
        if shared:
            raise ValueError(f"questions {sorted(shared)[:3]} are both test and validation questions")
        return self


def masked_prompt(example) -> tuple[int, ...]:
    """An example's prompt ids with its learned span (soft slots, system ids or user-suffix ids) blanked out."""
    ids = list(example.prompt_ids)
    for span in (example.soft_slice, example.ids_slice, example.user_suffix_slice):
        if span is not None:
            ids[span] = [-1] * (span.stop - span.start)
    return tuple(ids)


def heldout_pairs(examples: Sequence, prompt, tokenizer, questions: Sequence[Question]) -> list[tuple[str, list[int]]]:
    """(question id, completion ids) of each stored held-out example, in stored order."""
    by_prompt = {masked_prompt(prompt.build(tokenizer, q.text)): q.id for q in questions}
    if len(by_prompt) != len(questions):
        raise StageInputError("two validation questions build the same prompt: held-out pairs would be ambiguous")
    pairs = []
    for n, example in enumerate(examples):
        question = by_prompt.get(masked_prompt(example))
        if question is None:
            raise StageInputError(f"held-out example {n} matches none of the {len(questions)} validation questions")
        pairs.append((question, list(example.input_ids[example.assistant_start:example.loss_end])))
    return pairs


def examples_under(tokenizer, build, pairs: Sequence[tuple[str, list[int]]], texts: dict[str, str]) -> list:
    """Training examples for ``pairs`` with the prompt ``build(tokenizer, question)``; completion ids as stored."""
    from shared.lm.teacher import with_reply_ids

    prompts = {qid: build(tokenizer, text) for qid, text in texts.items()}
    return [with_reply_ids(prompts[qid], reply, None) for qid, reply in pairs]


def pair_ce_sums(model, examples: Sequence, pad_id: int, micro_batch_tokens: int, soft=None) -> list[float]:
    """Each example's summed completion CE: the rows ``batch_ce_sum`` adds up, in example order."""
    import torch

    from shared.lm import chat
    from shared.lm.teacher import completion_ce_sums, micro_batches

    out: list[float] = []
    with torch.no_grad():
        for group in micro_batches(examples, micro_batch_tokens):
            batch = chat.build_batch(group, pad_id=pad_id, padding_side="right").to(model.device)
            embeds = None if soft is None else chat.inputs_embeds(batch, model.get_input_embeddings(), soft)
            out += [float(v) for v in completion_ce_sums(model, batch.input_ids, batch.labels, embeds)]
    return out


def scored(model, examples: Sequence, pad_id: int, micro_batch_tokens: int, soft=None) -> dict:
    """The per-pair CE sums and the token-mean CE over them (the trainers' held-out number), from one pass."""
    from shared.lm.teacher import n_loss_tokens

    sums = pair_ce_sums(model, examples, pad_id, micro_batch_tokens, soft)
    return {"ce": sum(sums) / max(n_loss_tokens(examples), 1), "pair_ce_sums": sums}


def teacher_test_pairs(pair, cfg: Config) -> list[tuple[str, list[int]]]:
    """(question id, completion ids) of the teacher's answers to the test questions, question-major: the reply ids
    as sampled, with the stop token where the teacher stopped (as the trainers' examples hold them)."""
    from shared.lm import chat
    from shared.lm.generation import SamplingParams, derived_seed
    from shared.lm.teacher import student_examples

    d = cfg.test_draws
    params = SamplingParams(n=d.completions_per_question, temperature=d.temperature, top_p=d.top_p,
                            max_new_tokens=d.max_new_tokens, seed=derived_seed(cfg.seed, TEST_STREAM))
    texts = [q.text for q in cfg.test_questions]
    completions = pair.sample(texts, params)
    pairs = []
    for question, samples in zip(cfg.test_questions, completions, strict=True):
        prompt = chat.build_prompt(pair.tokenizer, "none", question.text)
        for example in student_examples([prompt], [samples], pair.stop_id):
            pairs.append((question.id, list(example.input_ids[example.assistant_start:example.loss_end])))
    if not pairs:
        raise StageInputError("the teacher gave no completion with a token on any test question")
    return pairs


def run(cfg: Config, ctx: Context) -> dict:
    from shared.lm import models

    if not cfg.test_questions:
        model = models.load_model(cfg.model_ref, dtype=cfg.dtype)
        model.requires_grad_(False)
        return measure(cfg, ctx, model, models.load_tokenizer(cfg.model_ref), [])
    pair = cfg.teacher.load(cfg.model_ref, dtype=cfg.dtype, sample_batch_size=cfg.sample_batch_size)
    tested = teacher_test_pairs(pair, cfg)
    with pair.student() as model:  # a teacher adapter on the same weights is off while the student is measured
        return measure(cfg, ctx, model, pair.tokenizer, tested)


def measure(cfg: Config, ctx: Context, model, tokenizer, tested: list[tuple[str, list[int]]]) -> dict:
    """Every cell's kept prompt and every anchor on the cells' held-out pairs and on the test pairs."""
    from shared.lm import chat
    from shared.lm.teacher import n_loss_tokens
    from shared.search.soft_prompt import examples_from_json, load_learned_prompt

    pad_id = chat.soft_placeholder_id(tokenizer)
    test_texts = {q.id: q.text for q in cfg.test_questions or []}
    texts = {q.id: q.text for q in cfg.val_questions}
    sets: list[dict] = []
    cells: dict[str, dict] = {}
    for name, cell in cfg.cells.items():
        prompt, soft = load_learned_prompt(cell.prompt_uri)
        if prompt.model_ref != cfg.model_ref:
            raise StageInputError(f"cell {name} was learned on {prompt.model_ref}, not on {cfg.model_ref}")
        stored = examples_from_json(store.read_json(cell.heldout_uri))
        if not stored:
            raise StageInputError(f"cell {name}: no held-out examples in {cell.heldout_uri}")
        pairs = heldout_pairs(stored, prompt, tokenizer, cfg.val_questions)
        key = stable_hash(pairs)
        index = next((i for i, s in enumerate(sets) if s["key"] == key), None)
        if index is None:
            index = len(sets)
            sets.append({"key": key, "pairs": pairs})
        soft = None if soft is None else soft.to(model.device)
        kept = scored(model, examples_under(tokenizer, prompt.build, pairs, texts), pad_id, cfg.micro_batch_tokens,
                      soft)
        cells[name] = {"held_out_set": index, "kept_prompt_ce": kept["ce"], "pair_ce_sums": kept["pair_ce_sums"]}
        if tested:
            on_test = scored(model, examples_under(tokenizer, prompt.build, tested, test_texts), pad_id,
                             cfg.micro_batch_tokens, soft)
            cells[name]["test"] = {"ce": on_test["ce"], "pair_ce_sums": on_test["pair_ce_sums"]}
        ctx.log(f"cell {name} ({len(cells)} of {len(cfg.cells)}): kept prompt CE {kept['ce']:.4f} held out"
                + (f", {cells[name]['test']['ce']:.4f} on the test pairs" if tested else ""))
    for s in sets:
        pairs = s.pop("pairs")
        s["n_pairs"], s["questions"] = len(pairs), sorted({qid for qid, _ in pairs})
        s["pair_question_ids"], s["pair_tokens"] = [qid for qid, _ in pairs], [len(reply) for _, reply in pairs]
        s["anchors"], s["anchor_pair_ce_sums"] = {}, {}
        for anchor in cfg.anchors:
            examples = examples_under(tokenizer, lambda tok, q, a=anchor: chat.build_prompt(tok, a.system, q),
                                      pairs, texts)
            s["n_loss_tokens"] = n_loss_tokens(examples)
            result = scored(model, examples, pad_id, cfg.micro_batch_tokens)
            s["anchors"][anchor.name], s["anchor_pair_ce_sums"][anchor.name] = result["ce"], result["pair_ce_sums"]
        ctx.log(f"held-out set {s['key'][:8]} ({s['n_pairs']} pairs, {s['n_loss_tokens']} tokens): "
                + ", ".join(f"{a} {ce:.4f}" for a, ce in s["anchors"].items()))
    for cell in cells.values():
        cell["anchors"] = sets[cell["held_out_set"]]["anchors"]
    result = {"anchors": [a.model_dump() for a in cfg.anchors], "held_out_sets": sets, "cells": cells}
    metrics = {"held_out_sets": len(sets), **{f"{a.name}_ce": sets[0]["anchors"][a.name] for a in cfg.anchors}}
    if tested:
        result["test_set"] = measure_test_set(model, tokenizer, pad_id, cfg, tested, test_texts)
        metrics |= {f"test_{name}_ce": ce for name, ce in result["test_set"]["anchors"].items()}
        ctx.log(f"test set ({result['test_set']['n_pairs']} pairs on {len(cfg.test_questions)} questions): "
                + ", ".join(f"{a} {ce:.4f}" for a, ce in result["test_set"]["anchors"].items()))
    store.write_json(ctx.out("anchors.json"), result)
    return metrics


def measure_test_set(model, tokenizer, pad_id: int, cfg: Config, pairs: list[tuple[str, list[int]]],
             texts: dict[str, str]) -> dict:
    """The anchors on the test pairs, with what the analysis needs to resample them by question."""
    from shared.lm import chat
    from shared.lm.teacher import n_loss_tokens

    out = {"questions": sorted(texts), "n_pairs": len(pairs), "pair_question_ids": [qid for qid, _ in pairs],
           "pair_tokens": [len(reply) for _, reply in pairs], "anchors": {}, "anchor_pair_ce_sums": {},
           "draws": cfg.test_draws.model_dump()}
    for anchor in cfg.anchors:
        examples = examples_under(tokenizer, lambda tok, q, a=anchor: chat.build_prompt(tok, a.system, q), pairs, texts)
        out["n_loss_tokens"] = n_loss_tokens(examples)
        result = scored(model, examples, pad_id, cfg.micro_batch_tokens)
        out["anchors"][anchor.name], out["anchor_pair_ce_sums"][anchor.name] = result["ce"], result["pair_ce_sums"]
    return out


SPEC = StageSpec(
    name="heldout_anchors", config=Config, run=run, image_kind="gpu",
    resources=Resources(gpu_class="h100", gpus=1, cpu=8, memory="64Gi", timeout_s=2 * 3600),
    description="Held-out CE of fixed prompts (the teacher's own prompt as text, the null prompt) on each learned "
                "cell's own held-out pairs, with the trainers' CE code.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
