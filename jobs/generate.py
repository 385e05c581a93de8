"""Stage ``generate``: N sampled completions per question under one system-slot condition.

Prompts become ids only through ``shared.lm.chat``; the exact prompt ids are stored beside the completions so
an evaluation can be checked against the ids a training stage used.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel

from shared.contract.stage import Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig
from shared.lm.chat import SystemSpec


class Question(BaseModel):
    id: str
    text: str


class Config(StageConfig):
    condition: str
    model_ref: str
    adapter_uri: str | None = None
    system: SystemSpec = "default"  # checked at plan time against model_ref's tokenizer
    questions: list[Question]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    backend: Literal["hf", "vllm"] = "hf"
    dtype: str | None = None  # None: the checkpoint's own (float32 runs faster on CPUs without bf16 units)
    batch_size: int = 32


def run(cfg: Config, ctx) -> dict:
    from shared.lm import chat, models
    from shared.lm.generation import SamplingParams, make_generator

    if not cfg.questions:
        raise StageInputError("no questions to generate for")
    system = chat.parse_system(cfg.system)
    tokenizer = models.load_tokenizer(cfg.model_ref)
    prompts = [chat.build_prompt(tokenizer, system, q.text) for q in cfg.questions]
    generator = make_generator(cfg.backend, cfg.model_ref, adapter_uri=cfg.adapter_uri, batch_size=cfg.batch_size,
                               dtype=cfg.dtype)
    params = SamplingParams(
        n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed
    )
    ctx.log(f"{len(prompts)} prompts x {cfg.n} completions with {cfg.backend} ({cfg.model_ref}, system={cfg.system[:40]!r})")
    started = time.time()
    outputs = generator.generate(prompts, params)
    seconds = time.time() - started
    return store_completions(ctx, cfg.condition, cfg.questions, prompts, outputs, seconds)


def store_completions(ctx, condition: str, questions: list[Question], prompts, outputs, seconds: float) -> dict:
    """Write ``completions.jsonl`` and the exact ``prompt_ids.json``; return the generation metrics."""
    rows, new_tokens = [], 0
    for question, completions in zip(questions, outputs, strict=True):
        for sample, completion in enumerate(completions):
            new_tokens += len(completion.token_ids)
            rows.append({
                "condition": condition, "question_id": question.id, "question": question.text,
                "sample": sample, "text": completion.text, "n_tokens": len(completion.token_ids),
                "finish_reason": completion.finish_reason,
            })
    store.write_jsonl(ctx.out("completions.jsonl"), rows)
    store.write_json(ctx.out("prompt_ids.json"), {q.id: p.input_ids for q, p in zip(questions, prompts, strict=True)})
    return {
        "n_completions": len(rows),
        "new_tokens": new_tokens,
        "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
    }


SPEC = StageSpec(
    name="generate", config=Config, run=run, image_kind="gpu",
    resources=Resources(gpu_class="h100", gpus=1, cpu=8, memory="64Gi", timeout_s=4 * 3600),
    description="Sample N completions per question under one system-slot condition.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
