"""Stage ``hidden_states``: base-model persona centroids for the cosine analysis (#81's H4, #66's recipe).

For every persona and question, the prompt (system persona + user question + assistant header, built by
``shared.lm.chat``) goes through the model once; the residual stream at the last prompt token (``read_out`` at
``last_prompt_token``, where #81's script read) is read at each requested layer, in the project's one convention
(``shared.lm.activations``: layer L is ``hidden_states[L]``, the residual stream after L blocks, 0 the embeddings). A
persona's centroid is the mean over the questions. Layers are a parameter: #81 hooked the outputs of blocks
{10, 15, 20, 25} of Qwen2.5-7B's 28, hidden_states {11, 16, 21, 26} (``shared.lm.activations.RECORD_RULE``); the tiny
model has 2, so the tiny profile asks for [1, 2].
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from shared.contract.stage import Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig
from shared.lm.chat import SystemText

READOUT = "last_prompt_token"  # where #81's script read (shared.lm.activations.RECORD_LAYERS["issue81"])


class Persona(BaseModel):
    id: str
    prompt: SystemText


class Question(BaseModel):
    id: str
    text: str


class Config(StageConfig):
    model_ref: str
    personas: list[Persona]
    questions: list[Question]
    layers: list[int] = Field(min_length=1)
    batch_size: int = 16
    dtype: str | None = None


def last_token_states(model, tokenizer, prompts, layers: list[int], batch_size: int):
    """``[len(prompts), len(layers), hidden]`` float32: the residual at each prompt's last token
    (``shared.lm.activations.read_out`` at ``last_prompt_token``)."""
    from shared.lm import activations, chat

    return activations.read_out(model, prompts, layers, READOUT, pad_id=chat.soft_placeholder_id(tokenizer),
                                batch_size=batch_size)


def run(cfg: Config, ctx) -> dict:
    from shared.lm import activations, chat, models

    model = models.load_model(cfg.model_ref, dtype=cfg.dtype)
    n_layers = activations.n_layers(model)
    bad = activations.missing_layers(cfg.layers, n_layers)
    if bad:
        raise StageInputError(f"layers {bad} do not exist: {cfg.model_ref} has layers 0..{n_layers} (hidden_states indices)")
    tokenizer = models.load_tokenizer(cfg.model_ref)
    prompts = [chat.build_prompt(tokenizer, chat.TextSystem(text=p.prompt), q.text) for p in cfg.personas for q in cfg.questions]
    ctx.log(f"{len(cfg.personas)} personas x {len(cfg.questions)} questions at layers {cfg.layers}")
    states = last_token_states(model, tokenizer, prompts, cfg.layers, cfg.batch_size)
    per_question = states.reshape(len(cfg.personas), len(cfg.questions), len(cfg.layers), -1)
    centroids = per_question.mean(dim=1).permute(1, 0, 2).contiguous()  # [layers, personas, hidden]
    store.write_npz(ctx.out("centroids.npz"), centroids=centroids.numpy(), layers=list(cfg.layers))
    store.write_json(ctx.out("personas.json"), {"persona_ids": [p.id for p in cfg.personas], **activations.layer_record(cfg.layers),
                                                "n_questions": len(cfg.questions), "readout": READOUT})
    return {"n_personas": len(cfg.personas), "n_layers": len(cfg.layers), "hidden": int(centroids.shape[-1])}


SPEC = StageSpec(
    name="hidden_states", config=Config, run=run, image_kind="gpu",
    resources=Resources(gpu_class="h100", gpus=1, cpu=8, memory="64Gi", timeout_s=2 * 3600),
    description="Base-model last-token residual centroids per persona at chosen layers.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
