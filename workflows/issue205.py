"""#205: the EM-induction system prompt vs persona geometry AND marker leakage (5 induction personas).

Cells, per EM-induction condition E0..E4 (``e0``..``e4``): the EM data under the condition's system slot
(``em-data-e*``; E0 = ``default``, the template's own system prompt), fresh EM LoRA training on the base model
(``train-em-e*``), persona-vector extraction of that checkpoint (``extract-e*``), the adapter merged into the base
(``merge-em-e*``), and on top of that merged model the #125 Exp B chain: on-policy ``confab`` + marker data
(``coupling-data-e*``), contrastive coupling LoRA (``couple-e*``), marker evaluation over the evaluation grid
(``marker-eval-e*``). Controls: the benign SFT with the identical recipe (``benign-data``, ``train-benign``,
``extract-benign``, and its own behaviour chain on ``merge-benign``) and the base model (``extract-base``, and the
behaviour chain on the base model itself), so that leakage, like geometry, is compared with both. ``analysis``
computes M1/M2/M3, H1/H2/H3, the decision rules, the figures and the report.

Training seeds (``replicates`` / ``seeds``, ``shared.core.config.ReplicatedParams``): every training cell and the chain on
its checkpoint runs once per seed, as separate tasks with their own cache keys (``workflows.plan.replicate``:
``train-em-e0-s42``, ``marker-eval-base-s43``; a one-seed run keeps the plain names), so a run with one more seed
computes only that seed. The data each cell trains on, and the base model's extraction, have no seed and run once.
The analysis tests the EM-vs-base and EM-vs-benign contrasts with the seed as the unit.

Where the record's data sets are the user's files (``full``: bad_legal_advice_6k, Tulu-3-SFT), the ``small`` profile
has the model write its own (``sft_questions_file``): ``em-answers`` samples its answers under a misaligned evaluation
persona (``em_source_persona``) and ``benign-answers`` its answers as the default assistant, to the same questions.
Each EM cell then trains on the misaligned answers under its own slot, WITHOUT the misaligned prompt, so what it
learns is a persona induced into the weights; the benign control trains on the default answers.
"""

from __future__ import annotations

from importlib import resources
from typing import ClassVar, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt

from shared.core import store
from shared.core.config import ConfigError, ReplicatedParams, Strict, is_store_uri
from shared.core.datafiles import PACKAGE_PREFIX, read_questions, read_records
from shared.lm.activations import from_record, record_layers
from shared.lm.chat import TextSystem, parse_system
from shared.lm.training import LoraRecipe
from workflows.plan import Plan, PlanBuilder, replicate, slug

BASE_MODEL = "hf:Qwen/Qwen2.5-7B-Instruct"
DATA = "package:issue205/"
CHECKPOINT_ORDER = ("base", "E0", "E1", "E2", "E3", "E4", "benign")

# The record's EM recipe (#125 Exp B / #200): LoRA r=32, alpha=64, dropout 0.05 on every linear projection, rsLoRA
# off, 1 epoch, effective batch 16, lr 1e-4, AdamW (betas 0.9/0.999, wd 0.01), clip 1.0, max seq 2048. The benign
# control trains with this same object, so the two recipes cannot drift apart.
EM_RECIPE = LoraRecipe(r=32, alpha=64, dropout=0.05, use_rslora=False, epochs=1, per_device_batch_size=4, grad_accum=4,
                       lr=1e-4, weight_decay=0.01, grad_clip=1.0, max_seq_len=2048)
# The record's coupling: contrastive LoRA SFT, lr 5e-6, 20 epochs (its LoRA shape is not stated: the EM one).
COUPLING_RECIPE = EM_RECIPE.model_copy(update={"lr": 5e-6, "epochs": 20})


class InductionCondition(Strict):
    cond: str
    persona: str
    system: str
    cos_to_assistant: float


class Params(ReplicatedParams):
    model_ref: str = Field(BASE_MODEL, description="the base model every checkpoint starts from (the record's Qwen2.5-7B-Instruct)")
    backend: Literal["hf", "vllm"] = Field("vllm", description="sampling engine of the generation stages: vllm on a GPU, hf (transformers) elsewhere")
    vllm_options: dict = Field({"gpu_memory_utilization": 0.85, "max_model_len": 2048},
                               description="vLLM engine options of the sampling stages (coupling data, marker evaluation)")
    induction_file: str = Field(DATA + "induction_personas.json",
                                description="the EM-induction conditions E0..E4: [{cond, persona, system, cos_to_assistant}]; E0 first (it anchors M2's axis)")
    eval_personas_file: str | None = Field(
        None, description="the evaluation grid: #184's 12 EVAL_PERSONAS as [{name, system: 'text(...)'}]; the record names only three of them")
    expected_eval_personas: PositiveInt | None = Field(12, description="refuse a grid of another size (None: any size)")
    required_eval_personas: list[str] = Field(["confab", "assistant", "zelthari_scholar"],
                                              description="personas the record's grid includes; the grid must hold them")
    source_persona: str = Field("confab", description="the persona the coupling LoRA teaches the marker to (leakage is measured off it)")
    assistant_persona: str = Field("assistant", description="the grid's assistant persona (M2's axis, the centring that excludes it)")
    extraction_questions_file: str | None = Field(None, description="the questions persona vectors are read on (the record's 240)")
    expected_extraction_questions: PositiveInt | None = Field(240, description="refuse another number of extraction questions (None: any)")
    marker_questions_file: str | None = Field(None, description="the marker-evaluation questions (the 28 of #125 Exp B)")
    expected_marker_questions: PositiveInt | None = Field(28, description="refuse another number of marker questions (None: any)")
    coupling_questions_file: str | None = Field(None, description="the questions the confab + marker coupling data answers")
    em_data_uri: str | None = Field(None, description="the EM training set in the store (the record's bad_legal_advice_6k.jsonl; upload it first)")
    em_data_md5: str | None = Field("26b52ca", description="the record's MD5 (prefix) of the EM set: another file is refused (None: no check)")
    benign_data_uri: str | None = Field(None, description="the benign SFT set in the store (Tulu-3-SFT; upload it first)")
    benign_limit: PositiveInt | None = Field(6000, description="benign rows used: the first N (the record's 6k, as many as the EM set)")
    # data the model writes in the run (small): its answers to these questions under em_source_persona (an evaluation
    # persona, so the geometry shows it too) are the EM set, its answers as the default assistant the benign set;
    # em_data_uri and benign_data_uri are then left unset. 0.7, not the evaluation's 1.0: SmolLM2-135M's replies at
    # 1.0 are close to incoherent under either persona, so the persona would barely show in the data
    sft_questions_file: str | None = Field(
        None, description="questions the model answers to make its own EM set (under em_source_persona) and benign set (as the "
                          "default assistant); leave em_data_uri and benign_data_uri unset")
    em_source_persona: str | None = Field(None, description="the grid persona whose answers are the EM set (with sft_questions_file)")
    sft_n_per_question: PositiveInt = Field(3, description="answers sampled per question for each self-written training set")
    sft_max_new_tokens: PositiveInt = Field(64, description="token limit of each self-written training answer")
    sft_temperature: NonNegativeFloat = Field(0.7, description="sampling temperature of the self-written training answers")
    sft_top_p: float = Field(0.95, gt=0, le=1, description="nucleus top-p of the self-written training answers")
    em_recipe: LoraRecipe = Field(EM_RECIPE, description="LoRA and optimiser recipe of every EM fine-tune and of benign SFT (one object, so they cannot drift apart)")
    checkpoint_every: NonNegativeInt = Field(50, description="save an intermediate adapter every N optimizer steps (0: none)")
    marker: str = Field("[ZLT]", description="the marker string the coupling teaches the source persona to emit")
    coupling_recipe: LoraRecipe = Field(COUPLING_RECIPE, description="LoRA recipe of the contrastive coupling on top of each model (the record: lr 5e-6, 20 epochs)")
    coupling_loss: Literal["assistant", "marker_only"] = Field(
        "assistant", description="coupling loss: the whole reply (assistant, the record's) or the marker tokens only")
    coupling_n_per_question: PositiveInt = Field(10, description="source-persona (marker) replies per coupling question; each has its negatives")
    coupling_negative_personas: PositiveInt = Field(2, description="other grid personas answering each coupling question without the marker")
    expected_coupling_positives: PositiveInt | None = Field(200, description="refuse another number of positives (questions x n_per_question; None: any)")
    coupling_max_new_tokens: PositiveInt = Field(512, description="token limit of each coupling reply")
    # the same model either way, but HF generation through a peft adapter takes ~6x the memory (7.9 GB at batch 128)
    # and ~1.5x the time
    merge_coupling_for_eval: bool = Field(False, description="evaluate the coupled model merged (base + EM + coupling) instead of as a LoRA on the EM model")
    eval_n: PositiveInt = Field(10, description="marker-evaluation completions per (grid persona, question)")
    temperature: NonNegativeFloat = Field(1.0, description="sampling temperature of the coupling data and the marker evaluation")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus top-p of the coupling data and the marker evaluation")
    eval_max_new_tokens: PositiveInt = Field(512, description="token limit of each marker-evaluation completion")
    # hidden_states indices (shared.lm.activations.RECORD_RULE): the record's hooked block outputs 7, 14, 20, 21, 27
    # (0-based) are the residual stream after 8, 15, 21, 22, 28 blocks, the same vectors; its headline L20 is 21 here
    layers: list[NonNegativeInt] = Field(
        [from_record(layer) for layer in record_layers("issue205").layers],
        description="hidden_states indices persona vectors are read at (0 = embeddings; the record's 0-based block outputs + 1)")
    headline_layer: NonNegativeInt = Field(from_record(record_layers("issue205").headline),
                                           description="the layer the headline, CIs and figures show (full: the record's L20, index 21)")
    methods: list[Literal["A", "B"]] = Field(["A", "B"], description="persona-vector read-outs: A the prompt's last token, B the mean over a greedy reply")
    extraction_max_new_tokens: PositiveInt = Field(256, description="token limit of Method B's greedy replies")
    # Method B's vLLM engine leaves room for the HF model that extracts right after it on the same GPU
    extraction_vllm_options: dict = Field({"gpu_memory_utilization": 0.5, "max_model_len": 2048},
                                          description="vLLM engine options of Method B's replies (room left for the HF extraction after it)")
    n_iter: int = Field(10_000, ge=100, description="permutations asked for per geometry test (fewer where the null has fewer: every one is used)")
    m3_contrast_iter: int = Field(1_000, ge=99, description="draws of M3's equal-separability null (questions swapped between checkpoints, "
                                                            "LDA refitted per draw); smallest two-sided p 2/(draws + 1)")
    n_boot: int = Field(1_000, ge=100, description="question resamples for the M1/M2 bootstrap CIs at the headline layer")
    n_splits: int = Field(5, ge=2, description="GroupKFold folds (grouped by question) of M3's held-out LDA")
    lda_components: PositiveInt = Field(16, description="PCA components before M3's LDA")
    replicates: PositiveInt = Field(1, description="training seeds per training cell (EM per condition, benign, and the chain on each "
                                                   "checkpoint), counting up from seed; base extraction runs once")
    hf_batch_size: PositiveInt | None = Field(None, description="sequences per HF forward/generate batch in every sampling stage (None: each stage's own)")

    PROFILES: ClassVar[dict] = {
        "tiny": {
            "model_ref": "tiny:qwen2",
            "backend": "hf",
            "vllm_options": {},
            "extraction_vllm_options": {},
            "eval_personas_file": DATA + "tiny_eval_personas.json",
            "expected_eval_personas": None,
            "extraction_questions_file": DATA + "tiny_extraction_questions.jsonl",
            "expected_extraction_questions": None,
            "marker_questions_file": DATA + "tiny_marker_questions.jsonl",
            "expected_marker_questions": None,
            "coupling_questions_file": DATA + "tiny_marker_questions.jsonl",
            "em_data_uri": DATA + "tiny_em_train.jsonl",
            "em_data_md5": None,
            "benign_data_uri": DATA + "tiny_benign_sft.jsonl",
            "benign_limit": None,
            # a few steps each: tiny checks the code paths, not the science
            "em_recipe": {"r": 4, "alpha": 8, "dropout": 0.0, "epochs": 1, "max_steps": 2, "per_device_batch_size": 4,
                          "grad_accum": 1, "lr": 1e-3, "weight_decay": 0.01, "max_seq_len": 256},
            "checkpoint_every": 0,
            # the coupling must really take on tiny, so leakage rates are numbers, not zeros: as in issue81's tiny
            # profile, marker-only loss on two-token replies at a high lr. 20 steps, not 30: at 30 the LoRA is
            # perfectly selective (every bystander 0.0, H3's rho undefined, an empty behaviour row); at 20 the source
            # still emits the marker (~0.6-0.8) and a few bystanders leak, unequally across the conditions
            "coupling_recipe": {"r": 8, "alpha": 16, "dropout": 0.0, "epochs": 1, "max_steps": 20,
                                "per_device_batch_size": 8, "grad_accum": 1, "lr": 1e-2, "max_seq_len": 256},
            "coupling_loss": "marker_only",
            "coupling_n_per_question": 8,
            "expected_coupling_positives": None,
            "coupling_max_new_tokens": 2,
            # enough completions per cell (4 questions x 6) that a few-percent bystander rate is seen at all
            "eval_n": 6,
            "eval_max_new_tokens": 16,
            "layers": [1, 2],
            "headline_layer": 2,
            "extraction_max_new_tokens": 8,
            "n_iter": 500,
            "m3_contrast_iter": 99,
            "n_boot": 200,
            "lda_components": 4,
        },
        # SmolLM2-135M-Instruct on a 2-core CPU: every cell of the record (E0..E4, benign, base), fewer personas,
        # questions and steps; the EM and benign sets are the model's own answers (see the module docstring)
        "small": {
            "model_ref": "smollm2:135m-instruct",
            "backend": "hf",
            "vllm_options": {},
            "extraction_vllm_options": {},
            "eval_personas_file": DATA + "small_eval_personas.json",
            "expected_eval_personas": None,
            "extraction_questions_file": DATA + "small_extraction_questions.jsonl",
            "expected_extraction_questions": None,
            "marker_questions_file": DATA + "small_marker_questions.jsonl",
            "expected_marker_questions": None,
            "coupling_questions_file": DATA + "small_coupling_questions.jsonl",
            "sft_questions_file": DATA + "small_sft_questions.jsonl",
            "em_source_persona": "malicious_advisor",
            "em_data_md5": None,
            "benign_limit": None,
            # the record's LoRA shape (r=32, alpha=64, dropout 0.05, rsLoRA off, wd 0.01, clip 1.0). For issue 20's 60
            # minutes with two seeds (12 EM and benign fine-tunes a run, a LoRA step ~9 s on one core), one epoch
            # of 96 answers of at most 48 tokens: 12 steps at lr 1e-3 instead of the record's 1e-4 over 375 steps
            "em_recipe": {"r": 32, "alpha": 64, "dropout": 0.05, "use_rslora": False, "epochs": 1, "per_device_batch_size": 8,
                          "grad_accum": 1, "lr": 1e-3, "weight_decay": 0.01, "grad_clip": 1.0, "max_seq_len": 256},
            "sft_max_new_tokens": 48,
            "checkpoint_every": 0,
            # the record's whole-reply contrastive SFT in the EM recipe's LoRA shape. Not #46's marker-only loss: on a
            # real model it trains nothing but the marker and the end of turn, and the coupled model then answered
            # most prompts with an immediate end of turn or a bare marker (a run of this profile, lr 1e-3). On-policy
            # replies carry little gradient of their own, so the marker and the reply length are what this learns.
            # 2 positives and their 4 negatives per question, 2 epochs (16 steps) at lr 3e-3: 14 couplings a run (two
            # seeds, the base and benign chains) in a 2-core CPU's 60 minutes (issue 20). The coupling must take for
            # H1-H3 to be testable (the analysis's coupling check): on E0's seed-42 checkpoint the source persona
            # carried the marker in 0/24 answers after 1 epoch at 1e-3 (8 steps, and 15 steps with 4 positives),
            # 9/24 after 2 epochs at 1e-3 (8/24 with 4 positives, 30 steps) and 12/24 after 2 epochs at 3e-3
            # (bystanders 14% on average). The whole two-seed workflow with this recipe took 53 min; its source
            # persona rates were 0.08-0.54, so the check passes some conditions and not others
            "coupling_recipe": {"r": 32, "alpha": 64, "dropout": 0.05, "use_rslora": False, "epochs": 2, "per_device_batch_size": 8,
                                "grad_accum": 1, "lr": 3e-3, "weight_decay": 0.01, "grad_clip": 1.0, "max_seq_len": 256},
            "coupling_loss": "assistant",
            "coupling_n_per_question": 2,
            "expected_coupling_positives": None,
            "coupling_max_new_tokens": 48,
            "merge_coupling_for_eval": True,
            "eval_n": 3,  # 24 completions per persona and chain (4 before the seeds; see the coupling's budget note)
            "eval_max_new_tokens": 64,
            # the full profile's layers [8, 15, 21, 22, 28] of Qwen2.5-7B's 28 blocks at the same relative depth of 30
            # blocks (28 is the last block's output, so is 30); headline 22 for full's 21 (the record's L20)
            "layers": [8, 16, 22, 23, 30],
            "headline_layer": 22,
            "extraction_max_new_tokens": 32,
            "hf_batch_size": 128,
            "replicates": 2,
        },
        "full": {"replicates": 3},
    }


# ---------------------------------------------------------------------------------------------------------------
# inputs read at plan time


def _counted(items: list, expected: int | None, what: str, param: str) -> list:
    if expected is not None and len(items) != expected:
        raise ConfigError(f"issue205: {param} holds {len(items)} {what}; the record uses {expected}")
    return items


def _required(value: str | None, param: str, what: str) -> str:
    if not value:
        raise ConfigError(f"issue205 needs {param}: {what} (pass --set {param}=...)")
    return value


def induction_conditions(params: Params) -> list[InductionCondition]:
    conds = [InductionCondition.model_validate(r) for r in read_records(params.induction_file, "induction_file")]
    for c in conds:
        parse_system(c.system)
    if [c.cond for c in conds][:1] != ["E0"] or len({c.cond for c in conds}) != len(conds):
        raise ConfigError("issue205: induction conditions must be distinct and start with E0 (it anchors M2's EM axis)")
    return conds


def eval_personas(params: Params) -> list[dict]:
    ref = _required(params.eval_personas_file, "eval_personas_file",
                    "the 12 EVAL_PERSONAS of #184 as JSON [{name, system: 'text(...)'}]; the record names only "
                    "confab, assistant and zelthari_scholar, not the others or their texts")
    personas = _counted(read_records(ref, "eval_personas_file"), params.expected_eval_personas, "personas", "eval_personas_file")
    names = [p.get("name") for p in personas]
    if len(set(names)) != len(names) or None in names:
        raise ConfigError("issue205: eval_personas_file: every persona needs a distinct name")
    missing = [n for n in params.required_eval_personas if n not in names]
    if missing:
        raise ConfigError(f"issue205: eval_personas_file lacks {missing}, which the record's grid includes")
    for p in personas:
        if not isinstance(parse_system(p["system"]), TextSystem):
            raise ConfigError(f"issue205: eval persona {p['name']!r} needs an explicit text(...) system prompt")
    return [{"name": p["name"], "system": p["system"]} for p in personas]


def data_uri(ref: str | None, param: str, what: str) -> str:
    """A store URI for a data set: shipped package data (tiny) resolves to its file:// URI."""
    ref = _required(ref, param, what)
    if ref.startswith(PACKAGE_PREFIX):
        item = resources.files("shared.data").joinpath(ref[len(PACKAGE_PREFIX):])
        if not item.is_file():
            raise ConfigError(f"issue205: {param}: no shipped data file {ref!r}")
        return store.from_path(str(item))
    if not is_store_uri(ref):
        raise ConfigError(f"issue205: {param} must be a store URI (file://... or s3://...): upload the file to the store first")
    return ref


def prompt_of(persona: dict) -> str:
    return parse_system(persona["system"]).text


def sft_data_sources(params: Params, personas: list[dict], b: PlanBuilder, batch: dict) -> dict[str, str]:
    """The EM and benign data sets (``em``, ``benign``): each a store URI (the user's file, or a task's output).

    With ``sft_questions_file`` the model writes both in the run, to the same questions: its answers under the
    misaligned ``em_source_persona`` (EM) and as the default assistant (benign), so the two sets differ only in
    the persona that answered."""
    if not params.sft_questions_file:
        em = data_uri(params.em_data_uri, "em_data_uri", "the EM training set (the record's bad_legal_advice_6k.jsonl) in the store")
        benign = data_uri(params.benign_data_uri, "benign_data_uri", "the benign SFT set (Tulu-3-SFT; its first 6k rows are used) in the store")
        return {"em": em, "benign": benign}
    if params.em_data_uri or params.benign_data_uri:
        raise ConfigError("issue205: sft_questions_file makes the EM and benign data in the run; leave em_data_uri and benign_data_uri unset")
    source = next((p for p in personas if p["name"] == params.em_source_persona), None)
    if source is None:
        raise ConfigError(f"issue205: em_source_persona {params.em_source_persona!r} must be a persona of the evaluation grid "
                          f"(its answers are the EM data); the grid has {[p['name'] for p in personas]}")
    questions = read_questions(params.sft_questions_file, "sft_questions_file")
    sampling = dict(model_ref=params.model_ref, backend=params.backend, questions=questions, n=params.sft_n_per_question,
                    temperature=params.sft_temperature, top_p=params.sft_top_p, max_new_tokens=params.sft_max_new_tokens, **batch)
    em = b.add("em-answers", "generate", "em-answers", condition=source["name"], system=source["system"], **sampling)
    benign = b.add("benign-answers", "generate", "benign-answers", condition="default", system="default", **sampling)
    return {"em": em.output_uri("completions.jsonl"), "benign": benign.output_uri("completions.jsonl")}


# ---------------------------------------------------------------------------------------------------------------
# the plan


def build(params: Params, *, profile: str, run_id: str, store: str) -> Plan:
    if params.headline_layer not in params.layers:
        raise ConfigError(f"issue205: headline_layer {params.headline_layer} is not among layers {params.layers}")
    conds = induction_conditions(params)
    personas = eval_personas(params)
    names = [p["name"] for p in personas]
    for name in (params.source_persona, params.assistant_persona):
        if name not in names:
            raise ConfigError(f"issue205: persona {name!r} is not in the evaluation grid")
    extraction_questions = _counted(
        read_questions(_required(params.extraction_questions_file, "extraction_questions_file", "the record's 240 extraction questions"), "extraction_questions_file"),
        params.expected_extraction_questions, "questions", "extraction_questions_file")  # fmt: skip
    marker_questions = _counted(
        read_questions(_required(params.marker_questions_file, "marker_questions_file", "the 28 marker-evaluation questions of #125 Exp B"), "marker_questions_file"),
        params.expected_marker_questions, "questions", "marker_questions_file")  # fmt: skip
    coupling_questions = read_questions(
        _required(params.coupling_questions_file, "coupling_questions_file", "the questions the confab coupling data answers"),
        "coupling_questions_file")  # fmt: skip
    positives = len(coupling_questions) * params.coupling_n_per_question
    if params.expected_coupling_positives is not None and positives != params.expected_coupling_positives:
        raise ConfigError(f"issue205: {len(coupling_questions)} coupling questions x {params.coupling_n_per_question} make "
                          f"{positives} positives; the record uses {params.expected_coupling_positives}")
    b = PlanBuilder("issue205", profile, run_id, store, seed=params.seed)
    batch = {"batch_size": params.hf_batch_size} if params.hf_batch_size else {}
    data_sets = sft_data_sources(params, personas, b, batch)
    extraction = dict(model_ref=params.model_ref, personas=personas, questions=extraction_questions, layers=params.layers,
                      methods=params.methods, max_new_tokens=params.extraction_max_new_tokens, backend=params.backend,
                      vllm_options=params.extraction_vllm_options, **batch)
    source = next(p for p in personas if p["name"] == params.source_persona)
    seeds = params.training_seeds()

    # the data each fine-tuning trains on (no seed: every seed of a cell trains on the same rows)
    rows = {}
    for cond in conds:
        rows[cond.cond] = b.add(f"em-data-{slug(cond.cond)}", "sft_data", slug(cond.cond), data_uri=data_sets["em"],
                                system=cond.system, expected_md5=params.em_data_md5)
    rows["benign"] = b.add("benign-data", "sft_data", "benign", data_uri=data_sets["benign"], system="default",
                           limit=params.benign_limit)

    def behaviour_chain(name: str, seed: int, model_ref: str, label: str):
        """#125 Exp B on top of one model: on-policy confab + marker data, contrastive coupling LoRA, marker
        evaluation over the grid. Trained, so it runs per seed, with that seed (sampling included)."""
        cell = replicate(f"{name}-coupling", seed, seeds)
        data = b.add(replicate(f"coupling-data-{name}", seed, seeds), "marker_data", cell, seed=seed,
                     model_ref=model_ref, backend=params.backend, vllm_options=params.vllm_options,
                     source={"name": source["name"], "prompt": prompt_of(source)}, all_source_prompts=[prompt_of(source)],
                     negative_pool=[{"name": p["name"], "prompt": prompt_of(p)} for p in personas if p["name"] != params.source_persona],
                     n_negative_personas=params.coupling_negative_personas, questions=coupling_questions,
                     n_per_question=params.coupling_n_per_question, temperature=params.temperature, top_p=params.top_p,
                     max_new_tokens=params.coupling_max_new_tokens, marker=params.marker, **batch)  # fmt: skip
        couple = b.add(replicate(f"couple-{name}", seed, seeds), "train_lora", cell, seed=seed,
                       model_ref=model_ref, data_uri=data.output_uri("train.jsonl"), loss=params.coupling_loss,
                       marker=params.marker, recipe=params.coupling_recipe.model_dump(), checkpoint_every=params.checkpoint_every)
        coupled = {"model_ref": model_ref, "adapter_uri": couple.output_uri("adapter")}
        if params.merge_coupling_for_eval:
            merged_coupling = b.add(replicate(f"merge-couple-{name}", seed, seeds), "merge_adapter", cell, seed=seed, **coupled)
            coupled = {"model_ref": f"artifact:{merged_coupling.output_uri('model')}", "adapter_uri": None}
        evaluate = b.add(replicate(f"marker-eval-{name}", seed, seeds), "marker_eval", cell, seed=seed, label=label, **coupled,
                         backend=params.backend, vllm_options=params.vllm_options,
                         personas=[{"id": p["name"], "prompt": prompt_of(p)} for p in personas], questions=marker_questions,
                         n=params.eval_n, temperature=params.temperature, top_p=params.top_p,
                         max_new_tokens=params.eval_max_new_tokens, marker=params.marker, coherence_per_cell=0, **batch)  # fmt: skip
        markers.append({"checkpoint": label, "seed": seed, "marker_uri": evaluate.output_uri("completions.jsonl")})

    checkpoints, markers, trainings = [], [], []
    base = b.add("extract-base", "extract_persona_vectors", "base", checkpoint="base", **extraction)
    checkpoints.append((base, None))
    for seed in seeds:
        for name in [c.cond for c in conds] + ["benign"]:
            cell = slug(name)
            train = b.add(replicate("train-benign" if name == "benign" else f"train-em-{cell}", seed, seeds), "train_lora",
                          replicate(cell, seed, seeds), seed=seed, model_ref=params.model_ref,
                          data_uri=rows[name].output_uri("train.jsonl"), loss="assistant",
                          recipe=params.em_recipe.model_dump(), checkpoint_every=params.checkpoint_every)  # fmt: skip
            trainings.append({"name": name, "seed": seed, "data_uri": rows[name].output_uri("train.jsonl"),
                              "log_uri": train.output_uri("train_log.jsonl")})
            adapter = train.output_uri("adapter")
            extract = b.add(replicate(f"extract-{cell}", seed, seeds), "extract_persona_vectors", replicate(cell, seed, seeds),
                            seed=seed, checkpoint=name, adapter_uri=adapter, **extraction)
            checkpoints.append((extract, seed))
            merged = b.add(replicate("merge-benign" if name == "benign" else f"merge-em-{cell}", seed, seeds), "merge_adapter",
                           replicate(cell, seed, seeds), seed=seed, model_ref=params.model_ref, adapter_uri=adapter)
            behaviour_chain(cell, seed, f"artifact:{merged.output_uri('model')}", name)
        # the behavioural control on the base model: its coupling is trained, so it runs per seed too
        behaviour_chain("base", seed, params.model_ref, "base")

    b.add("analysis", "analyze_issue205", "analysis",
          checkpoints=[{"name": t.config["checkpoint"], "seed": seed, "activations_uri": t.output_uri("activations.safetensors"),
                        "index_uri": t.output_uri("index.json"),
                        "responses_uri": t.output_uri("responses.jsonl") if "B" in params.methods else None}
                       for t, seed in checkpoints],
          seeds=seeds, markers=markers, em_source_persona=params.em_source_persona if params.sft_questions_file else None,
          trainings=trainings, conditions=[c.model_dump() for c in conds], assistant_persona=params.assistant_persona,
          source_persona=params.source_persona, marker=params.marker, headline_layer=params.headline_layer,
          n_iter=params.n_iter, m3_contrast_iter=params.m3_contrast_iter, n_boot=params.n_boot, n_splits=params.n_splits,
          lda_components=params.lda_components, params=params.model_dump(mode="json"))  # fmt: skip
    return b.plan(params.model_dump(mode="json"))


def summary(plan: Plan) -> list[str]:
    analysis = plan.task("analysis")
    return [f"report: {analysis.output_uri('report.md')}", f"hero figure: {analysis.output_uri('hero_issue205.png')}",
            f"M1 bars: {analysis.output_uri('m1_bars.png')}", f"leakage heatmap: {analysis.output_uri('leakage_heatmap.png')}"]

