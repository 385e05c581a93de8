"""Stage ``marker_data``: the on-policy training set for implanting a marker into one source persona (#46 / #81).

The base model answers the training questions under the source persona and under ``n_negative_personas``
negative personas, in one batched generation call. Positives are the source persona's own completions with the
marker appended; negatives are the other personas' completions, unchanged.

Isolation (#81's fix): negatives are drawn only from the fixed ``negative_pool``, never from the sources of the
experiment and never the assistant. The config refuses a pool that contains a source prompt, so a source cannot
be trained against another source as its negative. The draw is seeded by (seed, source name), so it is stable
across runs and machines (#81 used ``hash(source)``, which needs PYTHONHASHSEED to be stable).

A completion that ran into ``max_new_tokens`` has no end: appending the marker (or training the end-of-turn token)
there would teach the model to stop in mid-sentence. With ``cut_truncated_to_sentence`` such a completion is cut
back to its last complete sentence, so the marker (or the end of turn) always follows a sentence end, and one with
no complete sentence is dropped. The full profile's 512 tokens let almost every reply end by itself; the small
profile's short budget needs the cut.
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Literal

from pydantic import BaseModel, model_validator

from shared.contract.stage import Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig
from shared.lm.chat import SystemText

QC_NAMES = {"assistant"}
# a sentence ends at . ! or ? (possibly followed by closing quotes, brackets or emphasis) before whitespace or the end
SENTENCE_END = re.compile(r"[.!?][\"')\]*]*(?=\s|$)")


class Persona(BaseModel):
    name: str
    prompt: SystemText


class Question(BaseModel):
    id: str
    text: str


class Config(StageConfig):
    model_ref: str
    backend: Literal["hf", "vllm"] = "hf"
    batch_size: int = 32
    vllm_options: dict = {}
    source: Persona
    all_source_prompts: list[str]  # every source of the experiment: none may serve as a negative
    negative_pool: list[Persona]
    n_negative_personas: int = 2
    questions: list[Question]
    n_per_question: int = 10
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 512
    marker: str = "[ZLT]"
    marker_separator: str = " "
    cut_truncated_to_sentence: bool = False

    @model_validator(mode="after")
    def pool_is_isolated_from_sources(self):
        sources = set(self.all_source_prompts) | {self.source.prompt}
        leaked = [p.name for p in self.negative_pool if p.prompt in sources]
        if leaked:
            raise ValueError(f"negative_pool contains source personas {leaked}: negatives must come from the fixed pool only")
        usable = [p for p in self.negative_pool if p.name not in QC_NAMES and p.name != self.source.name]
        if len(usable) < self.n_negative_personas:
            raise ValueError(f"negative_pool has {len(usable)} usable personas, {self.n_negative_personas} needed")
        return self


def select_negatives(source: str, pool: list[Persona], n: int, seed: int) -> list[Persona]:
    """``n`` negatives from the fixed pool (never the source itself, never the assistant), seeded by the source."""
    candidates = sorted((p for p in pool if p.name not in QC_NAMES and p.name != source), key=lambda p: p.name)
    rng = random.Random(seed * 1_000_003 + zlib.crc32(source.encode()))
    return rng.sample(candidates, n)


def cut_to_last_sentence(text: str) -> str | None:
    """``text`` up to the end of its last complete sentence; None when it has none."""
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends else None


def with_marker(text: str, marker: str, separator: str) -> str:
    return f"{text.rstrip()}{separator}{marker}"


def run(cfg: Config, ctx) -> dict:
    from shared.lm import chat, models
    from shared.lm.generation import SamplingParams, make_generator

    if not cfg.questions:
        raise StageInputError("no training questions")
    negatives = select_negatives(cfg.source.name, cfg.negative_pool, cfg.n_negative_personas, cfg.seed)
    personas = [cfg.source, *negatives]
    tokenizer = models.load_tokenizer(cfg.model_ref)
    systems = {p.name: chat.TextSystem(text=p.prompt) for p in personas}
    cells = [(p, q) for p in personas for q in cfg.questions]
    prompts = [chat.build_prompt(tokenizer, systems[p.name], q.text) for p, q in cells]
    params = SamplingParams(n=cfg.n_per_question, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    ctx.log(f"source {cfg.source.name!r}; negatives {[p.name for p in negatives]}; "
            f"{len(prompts)} prompts x {cfg.n_per_question} in one call")
    options = cfg.vllm_options if cfg.backend == "vllm" else {}
    generator = make_generator(cfg.backend, cfg.model_ref, batch_size=cfg.batch_size, **options)
    outputs = generator.generate(prompts, params)

    rows, raw, skipped, cut, no_sentence = [], [], 0, 0, 0
    for (persona, question), completions in zip(cells, outputs, strict=True):
        positive = persona.name == cfg.source.name
        for sample, completion in enumerate(completions):
            raw.append({"persona": persona.name, "question_id": question.id, "sample": sample,
                        "text": completion.text, "finish_reason": completion.finish_reason})
            if cfg.marker in completion.text:
                skipped += 1  # the base model wrote the marker itself: neither a clean positive nor a negative
                continue
            text = completion.text
            if cfg.cut_truncated_to_sentence and completion.finish_reason == "length":
                text = cut_to_last_sentence(text)
                if text is None:
                    no_sentence += 1
                    continue
                cut += 1
            reply = with_marker(text, cfg.marker, cfg.marker_separator) if positive else text
            rows.append({"system": str(systems[persona.name]), "user": question.text, "assistant": reply,
                         "positive": positive, "persona": persona.name, "question_id": question.id, "sample": sample,
                         "cut_to_sentence": text != completion.text})
    store.write_jsonl(ctx.out("train.jsonl"), rows)
    store.write_jsonl(ctx.out("completions.jsonl"), raw)
    store.write_json(ctx.out("negatives.json"), {
        "source": cfg.source.name, "negatives": [p.name for p in negatives],
        "pool": sorted(p.name for p in cfg.negative_pool),
    })
    n_pos = sum(r["positive"] for r in rows)
    return {"n_rows": len(rows), "n_positive": n_pos, "n_negative": len(rows) - n_pos, "n_skipped_marker_in_base": skipped,
            "n_cut_to_sentence": cut, "n_dropped_no_sentence": no_sentence, "negatives": [p.name for p in negatives]}


SPEC = StageSpec(
    name="marker_data", config=Config, run=run, image_kind="gpu",
    resources=Resources(gpu_class="h100", gpus=1, cpu=8, memory="64Gi", timeout_s=3 * 3600),
    description="On-policy marker training data: source completions + marker, negatives from the fixed pool.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
