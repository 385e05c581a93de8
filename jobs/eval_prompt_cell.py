"""Stage ``eval_prompt_cell``: N completions per panel question under a learned prompt (soft prefix or GCG ids).

The prompt comes from a training stage's ``prompt.json`` and is built with ``LearnedPrompt.build`` -- the call
training used -- so evaluation ids equal training ids (``prompt_ids.json`` is stored beside the completions to
check it). Soft prefixes generate through ``inputs_embeds`` (transformers; vLLM's prompt-embeds path hung in the
record); GCG ids are spliced verbatim. Output rows have the ``generate`` stage's schema, so ``judge`` and
``score_classifier`` read them unchanged.
"""

from __future__ import annotations

import time

from pydantic import Field

from jobs.generate import Question, store_completions
from shared.contract.stage import Context, Resources, StageInputError, StageSpec
from shared.core.config import StageConfig


class Config(StageConfig):
    condition: str
    model_ref: str
    prompt_uri: str  # prompt.json written by train_soft_prefix or gcg_search
    questions: list[Question] = Field(min_length=1)
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 1040  # the H100 benchmark: >= 2,000 new tokens/s from batch 512 up (bench/README.md)
    dtype: str | None = None


def run(cfg: Config, ctx: Context) -> dict:
    from shared.lm import models
    from shared.lm.generation import HFGenerator, SamplingParams
    from shared.search.soft_prompt import load_learned_prompt

    prompt, soft = load_learned_prompt(cfg.prompt_uri)
    if prompt.model_ref != cfg.model_ref:
        raise StageInputError(f"{cfg.prompt_uri} was learned on {prompt.model_ref}, not on {cfg.model_ref}")
    tokenizer = models.load_tokenizer(cfg.model_ref)
    prompts = [prompt.build(tokenizer, q.text) for q in cfg.questions]
    model = models.load_model(cfg.model_ref, dtype=cfg.dtype)
    generator = HFGenerator(model, tokenizer, batch_size=cfg.batch_size)
    params = SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            seed=cfg.seed)
    ctx.log(f"{len(prompts)} prompts x {cfg.n} completions, {prompt.kind} prompt in the {prompt.slot} slot")
    started = time.time()
    embeds = None if soft is None else soft.to(model.device)
    outputs = generator.generate(prompts, params, prompt_embeds=embeds)
    seconds = time.time() - started
    metrics = store_completions(ctx, cfg.condition, cfg.questions, prompts, outputs, seconds)
    return {**metrics, "prompt_kind": prompt.kind}


SPEC = StageSpec(
    name="eval_prompt_cell", config=Config, run=run, image_kind="gpu",
    resources=Resources(gpu_class="h100", gpus=1, cpu=8, memory="64Gi", timeout_s=6 * 3600),
    description="Sample completions under a learned soft prefix (inputs_embeds) or GCG ids, built as in training.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
