"""Stage ``extract_persona_vectors``: per-question persona activations of one checkpoint (#205's geometry input).

For every (persona, question) of the evaluation grid and every requested decoder layer:

- Method A: the residual stream at the last prompt token (the token right before the reply), as
  ``scripts/extract_persona_vectors.py`` defines it;
- Method B: the mean residual stream over the reply tokens of the greedy completion (Chen et al. 2025). The reply
  ids are the generated ids themselves, never decoded and re-tokenised; an empty reply has no Method B vector
  and is marked invalid (the analysis intersects validity across checkpoints before any centroid is formed).

Layers follow the project's one convention (``shared.lm.activations``): layer L is ``hidden_states[L]``, the residual
stream after L decoder blocks, so layer 28 of Qwen2.5-7B is its last block's output (before the final norm). The
record's code hooked the output of block L (0-based), one less (``shared.lm.activations.RECORD_RULE``): its layers
7, 14, 20, 21, 27 are layers 8, 15, 21, 22, 28 here. Both methods read through ``shared.lm.activations.read_out``, at
the named positions ``last_prompt_token`` (A) and ``reply_mean`` (B), which the index file records. Prompts come only from ``shared.lm.chat`` and the adapter (if any) is merged into the weights before extraction.
Nothing is averaged here: centroids belong to the analysis.

Outputs: ``activations.safetensors`` (``A``/``B`` of shape [personas, questions, layers, hidden], ``B_valid``
[personas, questions]), ``index.json`` (the axes) and, for Method B, ``responses.jsonl``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from shared.contract.stage import Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig
from shared.lm.chat import SystemSpec

Method = Literal["A", "B"]


class Persona(BaseModel):
    name: str
    system: SystemSpec


class Question(BaseModel):
    id: str
    text: str


class Config(StageConfig):
    checkpoint: str  # base, E0..E4, benign: the name the analysis reports
    model_ref: str
    adapter_uri: str | None = None
    personas: list[Persona] = Field(min_length=2)
    questions: list[Question] = Field(min_length=1)
    layers: list[int] = Field(min_length=1)
    methods: list[Method] = ["A", "B"]
    max_new_tokens: int = 256  # Method B's greedy completions
    backend: Literal["hf", "vllm"] = "hf"  # generation backend for Method B
    vllm_options: dict = {}
    batch_size: int = 16
    dtype: str | None = None


def method_a(model, prompts, layers: list[int], *, pad_id: int, batch_size: int, progress) -> list:
    """Last-prompt-token activations (``shared.lm.activations.read_out`` at ``last_prompt_token``), one
    ``[n_layers, hidden]`` tensor per prompt."""
    from shared.lm import activations

    return list(activations.read_out(model, prompts, layers, "last_prompt_token", pad_id=pad_id, batch_size=batch_size,
                                     progress=progress))


def method_b(model, prompts, replies: list[list[int]], layers: list[int], *, pad_id: int, batch_size: int, progress):
    """Mean activations over each prompt's reply ids (``read_out`` at ``reply_mean``; None where the reply is empty)."""
    from shared.lm import activations

    out: list = [None] * len(prompts)
    filled = [i for i, reply in enumerate(replies) if reply]
    vectors = activations.read_out(model, [prompts[i] for i in filled], layers, "reply_mean", pad_id=pad_id,
                                   batch_size=batch_size, replies=[replies[i] for i in filled], progress=progress)
    for i, row in zip(filled, vectors, strict=True):
        out[i] = row
    return out


def greedy_replies(cfg: Config, prompts, model=None, tokenizer=None) -> list:
    """Greedy completions (temperature 0) for Method B. vLLM runs before the HF model is loaded and is released
    afterwards, so the two never hold the GPU at once; the HF backend reuses the already merged model."""
    import gc

    from shared.lm.generation import HFGenerator, SamplingParams, make_generator

    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    if cfg.backend == "hf":
        return [c[0] for c in HFGenerator(model, tokenizer, batch_size=cfg.batch_size).generate(prompts, params)]
    generator = make_generator("vllm", cfg.model_ref, adapter_uri=cfg.adapter_uri, dtype=cfg.dtype, **cfg.vllm_options)
    completions = [c[0] for c in generator.generate(prompts, params)]
    del generator
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return completions


def run(cfg: Config, ctx) -> dict:
    import torch
    from transformers import AutoConfig

    from shared.lm import activations, chat, models

    names = [p.name for p in cfg.personas]
    if len(set(names)) != len(names):
        raise StageInputError("persona names must be distinct")
    if len({q.id for q in cfg.questions}) != len(cfg.questions):
        raise StageInputError("question ids must be distinct")
    n_blocks = AutoConfig.from_pretrained(models.local_path(cfg.model_ref)).num_hidden_layers
    bad = activations.missing_layers(cfg.layers, n_blocks)
    if bad:  # checked before any generation or weight loading
        raise StageInputError(f"layers {bad} do not exist: {cfg.model_ref} has layers 0..{n_blocks} (hidden_states indices)")
    tokenizer = models.load_tokenizer(cfg.model_ref)
    cells = [(p, q) for p in cfg.personas for q in cfg.questions]  # persona-major, as the output axes
    prompts = [chat.build_prompt(tokenizer, chat.parse_system(p.system), q.text) for p, q in cells]
    completions = greedy_replies(cfg, prompts) if "B" in cfg.methods and cfg.backend == "vllm" else None
    model = models.load_model(cfg.model_ref, dtype=cfg.dtype, adapter_uri=cfg.adapter_uri, merge=bool(cfg.adapter_uri))
    pad_id = chat.soft_placeholder_id(tokenizer)
    shape = (len(cfg.personas), len(cfg.questions), len(cfg.layers))
    ctx.log(f"{cfg.checkpoint}: {len(cfg.personas)} personas x {len(cfg.questions)} questions, layers {cfg.layers}, methods {cfg.methods}")

    tensors: dict[str, torch.Tensor] = {}
    if "A" in cfg.methods:
        vectors = method_a(model, prompts, cfg.layers, pad_id=pad_id, batch_size=cfg.batch_size, progress=ctx.progress)
        tensors["A"] = torch.stack(vectors).reshape(*shape, -1)
    metrics: dict = {}
    if "B" in cfg.methods:
        if completions is None:
            completions = greedy_replies(cfg, prompts, model, tokenizer)
        replies = [c.token_ids for c in completions]
        vectors = method_b(model, prompts, replies, cfg.layers, pad_id=pad_id, batch_size=cfg.batch_size, progress=ctx.progress)
        hidden = model.config.hidden_size
        tensors["B"] = torch.stack([v if v is not None else torch.zeros(len(cfg.layers), hidden) for v in vectors]).reshape(*shape, -1)
        tensors["B_valid"] = torch.tensor([v is not None for v in vectors]).reshape(shape[:2])
        store.write_jsonl(ctx.out("responses.jsonl"), [
            {"persona": p.name, "question_id": q.id, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
            for (p, q), c in zip(cells, completions, strict=True)
        ])  # fmt: skip
        metrics["method_b_empty_replies"] = int((~tensors["B_valid"]).sum())
    store.write_tensors(ctx.out("activations.safetensors"), tensors)
    store.write_json(ctx.out("index.json"), {
        "checkpoint": cfg.checkpoint, "model_ref": cfg.model_ref, "adapter_uri": cfg.adapter_uri,
        "personas": [p.model_dump() for p in cfg.personas], "questions": [q.id for q in cfg.questions],
        **activations.layer_record(cfg.layers), "methods": cfg.methods, "hidden_size": int(model.config.hidden_size),
        "readout": {"A": "last_prompt_token", "B": "reply_mean"},
        "prompt_ids": {f"{p.name}/{q.id}": prompt.input_ids for (p, q), prompt in zip(cells, prompts, strict=True)},
    })  # fmt: skip
    return {"n_personas": shape[0], "n_questions": shape[1], "n_layers": shape[2], **metrics}


SPEC = StageSpec(
    name="extract_persona_vectors", config=Config, run=run, image_kind="gpu",
    resources=Resources(gpu_class="h100", gpus=1, cpu=8, memory="64Gi", timeout_s=3 * 3600),
    description="Per-question persona activations (Method A last prompt token, Method B mean reply token) of one checkpoint.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
