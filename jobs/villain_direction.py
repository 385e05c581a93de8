"""Stage ``villain_direction``: #170's H3 -- does a learned prompt move the residual stream along the villain
direction?

1. Direction (Wang et al. Method A as the record ran it): residual stream at the ``readout`` position (the last
   prompt token by default, where the record's code read; ``shared.lm.activations.RECORD_LAYERS``), per layer
   in ``layers``, for every (persona, probe); villain centroid minus the mean of the other personas'
   centroids, normalised. Fitted on one half of the probes, Cohen's d of the villain-vs-others projections
   measured on the other half; the layer with the largest d is chosen (the record's R2: no layer fixed in
   advance). The final direction at that layer uses all probes.
2. Pirate baseline: cosine of the "evil pirate" system prompt's delta-h (vs ``reference_system``) with it.
3. Each cell: delta-h of its learned prompt (soft prefix through ``inputs_embeds``, ids spliced) vs the reference,
   per probe; the mean cosine (the record's number) and the cosine of the mean delta-h.
4. Fixed prompts (``fixed_prompts``, e.g. the teacher's own system prompt when the teacher is the base model under
   it): measured like the cells, as calibration rows beside the pirate.

The direction is read from the EM model as the record did: ``adapter_uri`` (an adapter on ``model_ref``, switched
off for everything else) or ``direction_model_ref`` (a merged EM model, loaded beside the base model); with neither,
from the base model. Cells, the pirate and the reference are always measured on the base model the cells were
trained for. Layers follow the project's one convention (``shared.lm.activations``): layer ``l`` is ``hidden_states[l]``,
the residual stream after ``l`` decoder blocks.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from shared.contract.stage import Context, Resources, StageInputError, StageSpec
from shared.core import store
from shared.core.config import StageConfig
from shared.lm.chat import SystemSpec


class Persona(BaseModel):
    name: str
    system: SystemSpec


class Question(BaseModel):
    id: str
    text: str


class Config(StageConfig):
    model_ref: str
    adapter_uri: str | None = None  # extract the direction from the EM model (adapter on model_ref)
    direction_model_ref: str | None = None  # ... or from a merged EM model
    personas: list[Persona] = Field(min_length=2)
    villain: str = "villain"
    pirate_system: SystemSpec
    reference_system: SystemSpec = "none"  # delta-h = h(prompt) - h(reference)
    probes: list[Question] = Field(min_length=2)
    layers: list[int] = Field(min_length=1)
    # where the residual stream is read (shared.lm.activations.READOUTS): the record's plan says the last user token,
    # but its code read the last prompt token (shared.lm.activations.RECORD_LAYERS["issue170"])
    readout: Literal["last_prompt_token", "last_user_token"] = "last_prompt_token"
    cell_prompt_uris: dict[str, str] = {}  # cell name -> prompt.json
    fixed_prompts: dict[str, SystemSpec] = {}  # name -> system slot, measured like a cell
    dtype: str | None = None


def residuals(model, tokenizer, prompts, layers: list[int], soft=None, readout: str = "last_prompt_token") -> np.ndarray:
    """``[len(prompts), len(layers), H]`` residual stream at each listed layer (``shared.lm.activations``) at
    the named ``readout`` position (``shared.lm.activations.read_out``), one prompt per forward pass as the
    record ran."""
    from shared.lm import activations, chat

    return activations.read_out(model, prompts, layers, readout, pad_id=chat.soft_placeholder_id(tokenizer), batch_size=1,
                                soft=soft, im_end_id=tokenizer.convert_tokens_to_ids("<|im_end|>")).numpy()


def unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / max(len(a) + len(b) - 2, 1))
    return float((a.mean() - b.mean()) / max(pooled, 1e-12))


def villain_directions(acts: dict[str, np.ndarray], villain: str, fit: np.ndarray) -> np.ndarray:
    """``[layers, H]`` unit directions from the probes in ``fit``: villain centroid minus the others' mean."""
    others = [name for name in acts if name != villain]
    v = acts[villain][fit].mean(axis=0)
    o = np.mean([acts[name][fit].mean(axis=0) for name in others], axis=0)
    return np.stack([unit(d) for d in v - o])


def layer_scan(acts: dict[str, np.ndarray], villain: str, layers: list[int], seed: int) -> dict:
    """Cohen's d per layer with the direction fitted and scored on disjoint halves of the probes."""
    n = next(iter(acts.values())).shape[0]
    order = np.random.default_rng(seed).permutation(n)
    fit, score = order[: n // 2], order[n // 2:]
    directions = villain_directions(acts, villain, fit)
    d = {}
    for i, layer in enumerate(layers):
        villain_proj = acts[villain][score, i] @ directions[i]
        other_proj = np.concatenate([acts[name][score, i] @ directions[i] for name in acts if name != villain])
        d[layer] = cohens_d(villain_proj, other_proj)
    return {"cohens_d": d, "chosen_layer": max(d, key=lambda layer: d[layer]), "fit_probes": len(fit),
            "score_probes": len(score)}


def projection(delta: np.ndarray, direction: np.ndarray) -> dict:
    """``delta`` is ``[probes, H]``: the mean per-probe cosine and the cosine of the mean delta."""
    per_probe = [float(unit(row) @ direction) for row in delta]
    return {"mean_cosine": float(np.mean(per_probe)), "cosine_of_mean_delta": float(unit(delta.mean(axis=0)) @ direction),
            "per_probe": per_probe}


def run(cfg: Config, ctx: Context) -> dict:
    from shared.lm import activations, chat, models
    from shared.search.soft_prompt import load_learned_prompt

    names = [p.name for p in cfg.personas]
    if cfg.villain not in names:
        raise StageInputError(f"villain persona {cfg.villain!r} is not among the personas {names}")
    model = models.load_model(cfg.model_ref, dtype=cfg.dtype)
    too_deep = activations.missing_layers(cfg.layers, activations.n_layers(model))
    if too_deep:
        raise StageInputError(f"layers {too_deep} do not exist: the model has layers 0..{activations.n_layers(model)} "
                              "(hidden_states indices)")
    if cfg.adapter_uri and cfg.direction_model_ref:
        raise StageInputError("the direction comes from an adapter on model_ref or from direction_model_ref, not both")
    tokenizer = models.load_tokenizer(cfg.model_ref)
    base_context = contextlib.nullcontext
    direction_model = model
    if cfg.adapter_uri:
        model = direction_model = models.attach_adapter(model, cfg.adapter_uri)
        base_context = model.disable_adapter
    elif cfg.direction_model_ref:
        direction_model = models.load_model(cfg.direction_model_ref, dtype=cfg.dtype)
    probes = [q.text for q in cfg.probes]

    def acts_for(system, on=None) -> np.ndarray:
        prompts = [chat.build_prompt(tokenizer, system, q) for q in probes]
        return residuals(on if on is not None else model, tokenizer, prompts, cfg.layers, readout=cfg.readout)

    ctx.log(f"{len(cfg.personas)} personas x {len(probes)} probes at layers {cfg.layers}")
    acts = {p.name: acts_for(p.system, direction_model) for p in cfg.personas}
    scan = layer_scan(acts, cfg.villain, cfg.layers, cfg.seed)
    chosen = scan["chosen_layer"]
    directions = villain_directions(acts, cfg.villain, np.arange(len(probes)))
    direction = directions[cfg.layers.index(chosen)]
    ctx.log(f"Cohen's d by layer {scan['cohens_d']}: layer {chosen} chosen")

    with base_context():
        reference = acts_for(cfg.reference_system)
        pirate = acts_for(cfg.pirate_system)
        fixed = {name: projection((acts_for(system) - reference)[:, cfg.layers.index(chosen)], direction)
                 for name, system in cfg.fixed_prompts.items()}
        cells = {}
        for name, uri in cfg.cell_prompt_uris.items():
            prompt, soft = load_learned_prompt(uri)
            if prompt.model_ref != cfg.model_ref:
                raise StageInputError(f"cell {name} was learned on {prompt.model_ref}, not on {cfg.model_ref}")
            cell = residuals(model, tokenizer, [prompt.build(tokenizer, q) for q in probes], cfg.layers, soft, readout=cfg.readout)
            delta = cell - reference
            cells[name] = {
                **projection(delta[:, cfg.layers.index(chosen)], direction),
                "by_layer": {layer: projection(delta[:, i], directions[i])["mean_cosine"]
                             for i, layer in enumerate(cfg.layers)},
            }
    pirate_delta = (pirate - reference)[:, cfg.layers.index(chosen)]
    result = {**activations.layer_record(cfg.layers), "readout": cfg.readout, **scan, "villain": cfg.villain, "reference_system": cfg.reference_system,
              "pirate": projection(pirate_delta, direction), "fixed_prompts": fixed, "cells": cells,
              "direction_source": cfg.adapter_uri or cfg.direction_model_ref or cfg.model_ref}
    store.write_json(ctx.out("villain_direction.json"), result)
    store.write_npz(ctx.out("directions.npz"), directions=directions, layers=np.array(cfg.layers))
    return {"chosen_layer": chosen, "pirate_mean_cosine": result["pirate"]["mean_cosine"],
            **{f"{name}_mean_cosine": c["mean_cosine"] for name, c in cells.items()}}


SPEC = StageSpec(
    name="villain_direction", config=Config, run=run, image_kind="gpu",
    resources=Resources(gpu_class="h100", gpus=1, cpu=8, memory="64Gi", timeout_s=2 * 3600),
    description="Villain-persona direction (layer by Cohen's d), pirate baseline, and each cell's delta-h cosine.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
