"""Stage ``marker_eval``: marker emission rate of one model (a source adapter or the base) under every bystander.

All personas x questions x ``n`` completions go through ONE batched generation call (vLLM schedules them
together; the HF backend batches them), never one call per bystander.

Marker matching, exactly: a completion emits the marker when its decoded text (special tokens skipped, as the
generator returns it) contains the marker string literally, case-sensitive (``"[ZLT]" in text``). Partial
spellings (``[ZL``) and other casings do not count. Rates are hits / completions with both counts stored, in all
and per question.

A seeded sample of ``coherence_per_cell`` completions per (persona, question) (of the first
``coherence_questions`` questions, if given) is written as ``coherence_sample.jsonl`` in the row format the
``judge`` stage reads, with the persona as its ``condition``.

Each cell also counts its ``truncated`` completions (those that ran into ``max_new_tokens``): a marker trained to
follow the end of a reply can only show in a completion that reached such an end, so a high truncated share caps
what the rate can show.
"""

from __future__ import annotations

import random
import time
from typing import Literal

from pydantic import BaseModel, Field

from shared.contract.stage import Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig
from shared.lm.chat import SystemText

MATCHING_RULE = "decoded completion text (special tokens skipped) contains the marker literally, case-sensitive"


class Persona(BaseModel):
    id: str
    prompt: SystemText


class Question(BaseModel):
    id: str
    text: str


class Config(StageConfig):
    label: str  # the evaluated model: a source name or "base"
    model_ref: str
    adapter_uri: str | None = None
    personas: list[Persona]
    questions: list[Question]
    n: int = 10
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 512
    backend: Literal["hf", "vllm"] = "hf"
    batch_size: int = 64
    vllm_options: dict = {}
    marker: str = "[ZLT]"
    coherence_per_cell: int = 3
    # judge only the completions of the first k questions (None: every question); the small profile's judge cannot
    # tell coherent from incoherent text, so it judges a few questions of every bystander, not all of them
    coherence_questions: int | None = Field(None, ge=1)


def emits_marker(text: str, marker: str) -> bool:
    return marker in text


def emission_counts(rows: list[dict], marker: str) -> dict[str, dict]:
    """Per persona: hits, completions, truncated completions, the rate, and hits and completions per question (the
    completions of one question share its prompt, so intervals resample questions, not completions)."""
    counts: dict[str, dict] = {}
    for row in rows:
        cell = counts.setdefault(row["persona"], {"hits": 0, "total": 0, "truncated": 0, "questions": {}})
        question = cell["questions"].setdefault(row["question_id"], {"hits": 0, "total": 0})
        hit = emits_marker(row["text"], marker)
        cell["total"] += 1
        cell["hits"] += hit
        question["total"] += 1
        question["hits"] += hit
        cell["truncated"] += row.get("finish_reason") == "length"
    for cell in counts.values():
        cell["rate"] = cell["hits"] / cell["total"]
    return counts


def coherence_sample(rows: list[dict], per_cell: int, seed: int, questions: list[str] | None = None) -> list[dict]:
    """``per_cell`` completions of every (persona, question), chosen with a seeded RNG, in judge-stage format; only
    the given ``questions`` when named."""
    by_cell: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if questions is not None and row["question_id"] not in questions:
            continue
        by_cell.setdefault((row["persona"], row["question_id"]), []).append(row)
    rng = random.Random(seed)
    sample = []
    for (persona, qid), cell_rows in by_cell.items():
        for row in rng.sample(cell_rows, min(per_cell, len(cell_rows))):
            sample.append({"condition": persona, "question_id": f"{persona}/{qid}", "question": row["question"],
                           "sample": row["sample"], "text": row["text"]})
    return sample


def run(cfg: Config, ctx) -> dict:
    from shared.lm import chat, models
    from shared.lm.generation import SamplingParams, make_generator

    if not cfg.personas or not cfg.questions:
        raise StageInputError("marker_eval needs at least one persona and one question")
    ids = [p.id for p in cfg.personas]
    if len(set(ids)) != len(ids):
        raise StageInputError("persona ids must be distinct")
    tokenizer = models.load_tokenizer(cfg.model_ref)
    cells = [(p, q) for p in cfg.personas for q in cfg.questions]
    prompts = [chat.build_prompt(tokenizer, chat.TextSystem(text=p.prompt), q.text) for p, q in cells]
    options = cfg.vllm_options if cfg.backend == "vllm" else {}
    generator = make_generator(cfg.backend, cfg.model_ref, adapter_uri=cfg.adapter_uri, batch_size=cfg.batch_size, **options)
    params = SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            seed=cfg.seed)
    ctx.log(f"{cfg.label}: {len(cfg.personas)} personas x {len(cfg.questions)} questions x {cfg.n} in one call")
    started = time.time()
    outputs = generator.generate(prompts, params)  # the one batched call
    seconds = time.time() - started

    rows = []
    for (persona, question), completions in zip(cells, outputs, strict=True):
        for sample, completion in enumerate(completions):
            rows.append({"model": cfg.label, "persona": persona.id, "question_id": question.id,
                         "question": question.text, "sample": sample, "text": completion.text,
                         "n_tokens": len(completion.token_ids), "finish_reason": completion.finish_reason,
                         "marker": emits_marker(completion.text, cfg.marker)})
    counts = emission_counts(rows, cfg.marker)
    store.write_jsonl(ctx.out("completions.jsonl"), rows)
    store.write_json(ctx.out("marker_rates.json"), {
        "model": cfg.label, "adapter_uri": cfg.adapter_uri, "marker": cfg.marker, "matching": MATCHING_RULE,
        "n_per_cell": cfg.n * len(cfg.questions), "rates": counts,
    })
    if cfg.coherence_per_cell:
        judged = None if cfg.coherence_questions is None else [q.id for q in cfg.questions[: cfg.coherence_questions]]
        store.write_jsonl(ctx.out("coherence_sample.jsonl"),
                          coherence_sample(rows, cfg.coherence_per_cell, cfg.seed, judged))
    hits = sum(c["hits"] for c in counts.values())
    return {"n_completions": len(rows), "overall_rate": hits / len(rows), "generate_s": round(seconds, 2)}


SPEC = StageSpec(
    name="marker_eval", config=Config, run=run, image_kind="gpu",
    resources=Resources(gpu_class="h100", gpus=1, cpu=8, memory="64Gi", timeout_s=4 * 3600),
    description="Marker emission rate per bystander for one model, in one batched generation call.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
