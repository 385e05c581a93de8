"""#81: marker leakage from five one-word source personas over a 5 noun x 5 trait x 5 level Big-5 bystander grid.

Per source and training seed: on-policy marker data (``data-<src>``), marker-only LoRA (``train-<src>``), the marker
evaluation over every bystander in one batched call (``eval-<src>``) and a coherence judge over a sample of it
(``coherence-<src>``). With several seeds every one of these is its own task, ``<name>-s<seed>``: a seed replicates
the whole recipe (the on-policy sample and the negatives drawn, the LoRA's initialisation, data order and dropout,
the evaluation's sampling), and its cache key holds the seed, so adding a seed later computes only that seed. The
base model is evaluated once as a reference cell (``eval-base``, ``coherence-base``, seed ``seed``); the base model's
persona centroids feed H4 (``hidden-states``); ``analysis`` computes H1-H4 per seed and across seeds, the figures
and the report.
"""

from __future__ import annotations

import json
from typing import ClassVar, Literal

from pydantic import Field

from shared.core.config import ConfigError, ReplicatedParams
from shared.core.datafiles import read_questions, read_records, read_text
from shared.judge.spec import JudgeSpec
from shared.lm.activations import from_record, record_layers
from shared.lm.training import LoraRecipe
from workflows.plan import Plan, PlanBuilder, replicate, slug

BASE_MODEL = "hf:Qwen/Qwen2.5-7B-Instruct"
DATA = "package:issue81/"
BASE_LABEL = "base"


class Params(ReplicatedParams):
    model_ref: str = Field(BASE_MODEL, description="the base model each source's marker LoRA trains on")
    replicates: int = Field(3, ge=1, description="training seeds per source (or list them in seeds): full 3, small 2, "
                                                 "tiny 1")
    backend: Literal["hf", "vllm"] = Field("vllm", description="generation engine: vllm on GPUs, hf anywhere")
    vllm_options: dict = Field({"gpu_memory_utilization": 0.6, "max_model_len": 2048},
                               description="vLLM engine options (the record's settings)")
    sources: list[str] = Field(["person", "chef", "pirate", "child", "robot"],
                               description="source personas: one marker LoRA per source and seed")
    # A2 of the kept nouns and the assistant QC persona are always evaluated
    bystander_nouns: list[str] | None = Field(None, description="bystander grid restricted to these nouns (None: all)")
    bystander_traits: list[str] | None = Field(None, description="bystander grid restricted to these traits (None: all)")
    bystander_levels: list[str] | None = Field(None, description="bystander grid restricted to these levels (None: all)")
    questions_file: str = Field(DATA + "questions.json", description="evaluation questions")
    train_questions_file: str = Field(DATA + "train_questions.json", description="questions of the marker training data")
    negative_pool_file: str = Field(DATA + "negative_pool.json",
                                    description="the fixed pool the negative personas are drawn from")
    marker: str = Field("[ZLT]", description="the string the source persona learns to end its answers with")
    data_n_per_question: int = Field(10, description="on-policy completions per (persona, training question)")
    data_max_new_tokens: int = Field(512, description="longest training completion, in tokens")
    # see jobs/marker_data.py; off for the record's 512 tokens, on where the budget is short
    cut_truncated_to_sentence: bool = Field(
        False, description="cut a completion that hit data_max_new_tokens back to its last full sentence before the marker")
    n_negative_personas: int = Field(2, description="negative personas per source (their answers carry no marker)")
    recipe: LoraRecipe = Field(LoraRecipe(), description="the marker LoRA's training recipe")
    checkpoint_every: int = Field(50, ge=0, description="steps between intermediate checkpoints (0: none)")
    # evaluation: the record's vLLM config (T=1.0, top_p=0.95, max_tokens=512, n=10)
    eval_n: int = Field(10, description="evaluation completions per (model, bystander, question)")
    temperature: float = Field(1.0, description="sampling temperature of the evaluation")
    top_p: float = Field(0.95, description="nucleus sampling mass of the evaluation")
    eval_max_new_tokens: int = Field(512, description="longest evaluation completion, in tokens")
    coherence_judge: JudgeSpec = Field(
        JudgeSpec(kind="anthropic", model="claude-sonnet-4-5-20250929", template="coherence_v1"),
        description="the judge that scores the coherence of evaluation completions")
    coherence_per_cell: int = Field(3, description="completions judged per (model, bystander, question): "
                                                         "the record judged 3 of 10")
    coherence_questions: int | None = Field(None, ge=1, description="judge only the first k questions (None: all)")
    coherence_threshold: float = Field(50.0, ge=0, le=100, description="cells with mean coherence (0-100) below this "
                                                                       "are flagged and hatched")
    # #81's script hooked the outputs of blocks {10, 15, 20, 25} (headline 20), which are hidden_states
    # 11, 16, 21, 26 (shared.lm.activations.RECORD_RULE)
    layers: list[int] = Field([from_record(layer) for layer in record_layers("issue81").layers],
                              description="hidden_states indices the persona vectors are read at")
    headline_layer: int = Field(from_record(record_layers("issue81").headline), ge=0,
                                description="the hidden_states index of the headline leakage-vs-cosine test")
    n_boot: int = Field(1000, ge=100, description="bootstrap draws of each interval")
    n_perm: int = Field(10_000, ge=100, description="permutations of each permutation test")

    PROFILES: ClassVar[dict] = {
        "tiny": {
            "replicates": 1,
            "model_ref": "tiny:qwen2",
            "backend": "hf",
            "sources": ["person", "pirate"],
            "bystander_nouns": ["person", "pirate"],
            "bystander_traits": ["Agreeableness", "Neuroticism"],
            "questions_file": DATA + "tiny_questions.json",
            "train_questions_file": DATA + "tiny_train_questions.json",
            # two-token on-policy completions: the marker decision sits right after a short reply
            "data_n_per_question": 16,
            "data_max_new_tokens": 2,
            # the tiny model starts from random weights: a high lr makes the marker measurable in 30 steps
            "recipe": {"r": 8, "alpha": 16, "dropout": 0.0, "lr": 1e-2, "epochs": 1, "max_steps": 30,
                       "per_device_batch_size": 8, "grad_accum": 1, "max_seq_len": 512},
            "checkpoint_every": 10,
            "eval_n": 4,
            "eval_max_new_tokens": 12,
            # min_candidate_mass 0: the random tiny judge never abstains, so tiny proves the scoring path
            "coherence_judge": {"kind": "local", "model": "tiny:qwen2-judge", "template": "coherence_v1",
                                "min_candidate_mass": 0.0},
            "coherence_per_cell": 1,
            # the random tiny judge scores around 0-10: 5 flags a few cells, so exclusion and hatching really run
            "coherence_threshold": 5.0,
            "layers": [1, 2],
            "headline_layer": 2,
        },
        # SmolLM2-135M-Instruct on a 2-core CPU within 45 min with two training seeds (issue 20). A marker LoRA step
        # costs ~15 s on one core (16 rows of ~110 tokens), so per-seed work is what the budget is spent on: two of
        # the five sources (the record's person and pirate), 3 on-policy completions per training question (87
        # examples, 12 steps at 2 epochs instead of 5), every noun x two traits x all five levels (H3 needs five
        # levels, the axis tests two traits), 10 eval questions x 1 sample = 10 completions per cell (intervals
        # resample questions: ten clusters) of up to 56 tokens (a 48-token training-length answer and the marker),
        # the record's sampling (T=1, top_p=0.95), and coherence judged on 1 of the 10 questions. The two-seed run
        # took 17 min with three of the five nouns and 23 min with all five (idle machine), so all five are kept:
        # more bystanders for the cos-leakage and noun-match tests
        "small": {
            "replicates": 2,
            "model_ref": "smollm2:135m-instruct",
            "backend": "hf",
            "sources": ["person", "pirate"],
            "bystander_traits": ["Agreeableness", "Neuroticism"],
            "questions_file": DATA + "small_questions.json",
            "train_questions_file": DATA + "small_train_questions.json",
            "data_n_per_question": 3,
            "data_max_new_tokens": 48,
            "cut_truncated_to_sentence": True,
            # LoRA for a 135M model: rank 16 on every projection, a higher lr than the 7B recipe's 1e-4 (small
            # models take larger LoRA steps), 2 epochs over ~90 examples = 12 steps of 16 (lr x steps as at 3 epochs)
            "recipe": {"r": 16, "alpha": 32, "dropout": 0.05, "lr": 7.5e-4, "epochs": 2, "per_device_batch_size": 16,
                       "grad_accum": 1, "max_seq_len": 512},
            "checkpoint_every": 10,
            "eval_n": 1,
            "eval_max_new_tokens": 56,
            "coherence_judge": {"kind": "local", "model": "smollm2:135m-instruct", "template": "coherence_v1"},
            "coherence_per_cell": 1,
            "coherence_questions": 1,
            # the same 135M model as judge scores everything in a narrow band well under 50 and does not rank
            # coherent above incoherent text, so the record's threshold would flag every cell: flagging is off
            "coherence_threshold": 0.0,
            # the record's layers, translated as in full (SmolLM2 has 30 blocks, so they all exist)
            "layers": [from_record(layer) for layer in record_layers("issue81").layers],
            "headline_layer": from_record(record_layers("issue81").headline),
        },
        "full": {},
    }

    @classmethod
    def for_profile(cls, profile: str, overrides: dict | None = None):
        """A seed list given on the command line replaces the profile's replicate count instead of contradicting it."""
        overrides = dict(overrides or {})
        if isinstance(overrides.get("seeds"), list) and "replicates" not in overrides:
            overrides["replicates"] = len(overrides["seeds"])
        return super().for_profile(profile, overrides)


# ---------------------------------------------------------------------------------------------------------------
# the shipped grid


def _data(name: str) -> dict:
    return json.loads(read_text(DATA + name, f"issue81 data file {name}"))


def descriptors() -> dict:
    return _data("big5_descriptors.json")


def persona_table() -> dict:
    return _data("personas.json")


def bystander_grid() -> list[dict]:
    """The 131 evaluation personas built from the descriptor table: 125 A1, 5 A2, the assistant QC."""
    table, people = descriptors(), persona_table()
    rows = [
        {"id": f"A1__{noun}__{trait}__{level}", "kind": "A1", "noun": noun, "trait": trait, "level": level,
         "prompt": f"You are a {noun} who {table['descriptors'][trait][level]}."}
        for noun in people["nouns"] for trait in table["traits"] for level in table["levels"]
    ]
    rows += [{"id": f"A2__{noun}", "kind": "A2", "noun": noun, "trait": None, "level": None, "prompt": f"You are a {noun}."}
             for noun in people["nouns"]]
    qc = people["assistant_qc"]
    rows.append({"id": qc["id"], "kind": "QC", "noun": None, "trait": None, "level": None, "prompt": qc["prompt"]})
    return rows


def shipped_bystanders() -> list[dict]:
    return read_records(DATA + "bystanders.json", "issue81 bystanders")


def bystanders(params: Params) -> list[dict]:
    table, people = descriptors(), persona_table()
    chosen = {"noun": params.bystander_nouns, "trait": params.bystander_traits, "level": params.bystander_levels}
    known = {"noun": people["nouns"], "trait": table["traits"], "level": table["levels"]}
    for axis, values in chosen.items():
        unknown = sorted(set(values or []) - set(known[axis]))
        if unknown:
            raise ConfigError(f"issue81: unknown bystander {axis}(s) {unknown}; known: {', '.join(known[axis])}")
    nouns = set(params.bystander_nouns or known["noun"]) | {source_of(params, s)["noun"] for s in params.sources}

    def kept(b: dict) -> bool:
        if b["kind"] == "QC":
            return True
        if b["kind"] == "A2":
            return b["noun"] in nouns
        return all(b[axis] in (values or known[axis]) for axis, values in chosen.items())

    return [b for b in shipped_bystanders() if kept(b)]


def source_of(params: Params, name: str) -> dict:
    by_name = {s["name"]: s for s in persona_table()["sources"]}
    if name not in by_name:
        raise ConfigError(f"issue81: unknown source {name!r}; known: {', '.join(by_name)}")
    return by_name[name]


def negative_pool(params: Params) -> list[dict]:
    return [{"name": p["name"], "prompt": p["prompt"]} for p in read_records(params.negative_pool_file, "negative_pool_file")]


# ---------------------------------------------------------------------------------------------------------------
# the plan


def build(params: Params, *, profile: str, run_id: str, store: str) -> Plan:
    if params.headline_layer not in params.layers:
        raise ConfigError(f"issue81: headline_layer {params.headline_layer} is not among layers {params.layers}")
    if not params.sources or len(set(params.sources)) != len(params.sources):
        raise ConfigError("issue81: sources must be distinct and at least one")
    b = PlanBuilder("issue81", profile, run_id, store, seed=params.seed)
    sources = [source_of(params, name) for name in params.sources]
    grid = bystanders(params)
    personas = [{"id": x["id"], "prompt": x["prompt"]} for x in grid]
    questions = read_questions(params.questions_file, "questions_file")
    train_questions = read_questions(params.train_questions_file, "train_questions_file")
    pool = negative_pool(params)
    evaluation = dict(model_ref=params.model_ref, backend=params.backend, vllm_options=params.vllm_options,
                      personas=personas, questions=questions, n=params.eval_n, temperature=params.temperature,
                      top_p=params.top_p, max_new_tokens=params.eval_max_new_tokens, marker=params.marker,
                      coherence_per_cell=params.coherence_per_cell, coherence_questions=params.coherence_questions)

    cells = []
    seeds = params.training_seeds()

    def evaluate(cell: str, label: str, seed: int, adapter_uri: str | None, *,
                 source: str | None = None, train_log_uri: str | None = None) -> None:
        # the stage configs name the model (``label``) and its seed, never the cell, so that the first seed of a
        # one-seed run is the same cache entry as the first seed of a run with several
        ev = b.add(f"eval-{cell}", "marker_eval", cell, label=label, adapter_uri=adapter_uri,
                   seed=seed, **evaluation)
        judge = b.add(f"coherence-{cell}", "judge", cell,
                      completions_uri=ev.output_uri("coherence_sample.jsonl"),
                      judge=params.coherence_judge.model_dump(), judge_name=f"coherence-{params.coherence_judge.model}")
        cells.append({"label": cell, "source": source, "seed": seed, "rates_uri": ev.output_uri("marker_rates.json"),
                      "coherence_uri": judge.output_uri("scores.jsonl"), "train_log_uri": train_log_uri})

    for source in sources:
        for seed in seeds:
            cell = replicate(slug(source["name"]), seed, seeds)
            data = b.add(f"data-{cell}", "marker_data", cell, seed=seed, model_ref=params.model_ref,
                         backend=params.backend, vllm_options=params.vllm_options,
                         source={"name": source["name"], "prompt": source["prompt"]},
                         all_source_prompts=[s["prompt"] for s in persona_table()["sources"]], negative_pool=pool,
                         n_negative_personas=params.n_negative_personas, questions=train_questions,
                         n_per_question=params.data_n_per_question, temperature=params.temperature,
                         top_p=params.top_p, max_new_tokens=params.data_max_new_tokens, marker=params.marker,
                         cut_truncated_to_sentence=params.cut_truncated_to_sentence)
            train = b.add(f"train-{cell}", "train_lora", cell, seed=seed, model_ref=params.model_ref,
                          data_uri=data.output_uri("train.jsonl"), loss="marker_only", marker=params.marker,
                          recipe=params.recipe.model_dump(), checkpoint_every=params.checkpoint_every)
            evaluate(cell, source["name"], seed, train.output_uri("adapter"), source=source["name"],
                     train_log_uri=train.output_uri("train_log.jsonl"))
    evaluate(BASE_LABEL, BASE_LABEL, params.seed, None)

    geometry = b.add("hidden-states", "hidden_states", "geometry", model_ref=params.model_ref, personas=personas,
                     questions=questions, layers=params.layers)
    b.add("analysis", "analyze_issue81", "analysis",
          sources=[{"name": s["name"], "noun": s["noun"]} for s in sources],
          bystanders=[{k: x[k] for k in ("id", "kind", "noun", "trait", "level")} for x in grid],
          cells=cells, seeds=seeds, base_label=BASE_LABEL, marker=params.marker,
          centroids_uri=geometry.output_uri("centroids.npz"), centroid_personas_uri=geometry.output_uri("personas.json"),
          headline_layer=params.headline_layer, n_boot=params.n_boot, n_perm=params.n_perm,
          coherence_threshold=params.coherence_threshold, params=params.model_dump(mode="json"))
    return b.plan(params.model_dump(mode="json"))


def summary(plan: Plan) -> list[str]:
    analysis = plan.task("analysis")
    return [f"report: {analysis.output_uri('report.md')}", f"hero figure: {analysis.output_uri('hero_matrix.png')}",
            f"heatmap: {analysis.output_uri('heatmap_base_subtracted.png')}",
            f"leakage per source and seed: {analysis.output_uri('leakage_per_seed.png')}"]
