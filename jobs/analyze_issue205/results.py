"""Part 1 of ``analyze_issue205``: the stage's config (the artifacts it reads) and the results object, every
number read and recomputed from those stored artifacts."""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel

from shared.contract.stage import StageInputError
from shared.core import store
from shared.core.config import StageConfig
from shared.lm.activations import LAYER_CONVENTION

METRICS = ("M1", "M2", "M3")
CI_LEVEL = 0.95  # of the bootstrap CIs over questions
SEED_CI_LEVEL = 0.95  # of the seed-level t intervals
DECISIONS = {"M1": "G1", "M2": "G2", "M3": "G3"}
CONTROLS = ("base", "benign")
GEOMETRY_TITLES = {"raw": "raw geometry", "shift_invariant": "shift-invariant geometry"}


class CheckpointArtifacts(BaseModel):
    name: str  # base, E0..E4, benign
    seed: int | None = None  # the training seed (None: the base model, which has none)
    activations_uri: str
    index_uri: str
    responses_uri: str | None = None  # Method B's greedy replies (the report quotes a few)


class TrainingArtifacts(BaseModel):
    """One fine-tuning behind a checkpoint: the rows it trained on and its per-step losses."""

    name: str  # E0..E4, benign
    seed: int | None = None
    data_uri: str  # sft_data's train.jsonl
    log_uri: str  # train_lora's train_log.jsonl


class MarkerArtifacts(BaseModel):
    """marker_eval's per-completion rows of the coupling chain on top of one checkpoint (E0..E4, benign or base)."""

    checkpoint: str
    seed: int | None = None
    marker_uri: str


class ConditionArtifacts(BaseModel):
    cond: str  # E0..E4
    persona: str  # the induction persona's slug (H1 looks it up in the evaluation grid)
    system: str
    cos_to_assistant: float


class Rules(BaseModel):
    """The pre-registered thresholds (plan v2, sections 5-6), and the referee's replacements where noted."""

    geometry_alpha: float = 0.01  # BH-FDR per cell
    min_layer_fraction: float = 0.6  # ">= 3/5 layers", under both methods
    m3_min_drop: float = 0.05  # 5 pp absolute
    contrast_alpha: float = 0.05  # EM-vs-benign, BH-FDR, at a majority of layers
    monotone_min_abs_rho: float = 0.7
    monotone_alpha: float = 0.05
    # the manipulation check behind H1-H3 (this project's, not the record's): leakage is measured off a marker the
    # source persona was coupled to. A condition took the coupling when its source persona's marker rate is above
    # H2's margin at one-sided confidence 1 - coupling_alpha (Clopper-Pearson over its answers): below that, every
    # persona's leakage may sit inside the margin only because the marker was barely learned, and H2's equivalence
    # would be a floor effect. Checked on the source persona alone: how far the marker spreads is the outcome.
    coupling_alpha: float = 0.05
    h1_min_excess: float = 0.05
    h1_alpha: float = 0.05
    h1_min_fraction: float = 0.75  # "3/4 testable conditions"
    h2_max_range: float = 0.15  # the record's margin, used by the equivalence test
    h2_alpha: float = 0.10  # the record's "p > 0.10" (printed beside the equivalence test, not a decision)
    h2_equivalence_alpha: float = 0.05  # TOST
    h3_min_abs_rho: float = 0.7
    h3_alpha: float = 0.05
    shift_alpha: float = 0.05  # a shared shift counts as measured when its sign-flip test is below this
    seed_alpha: float = 0.05  # seed-level contrasts, BH-FDR over their family
    min_paired_fraction: float = 0.85  # Method B: warn when a persona keeps fewer questions


class Config(StageConfig):
    checkpoints: list[CheckpointArtifacts]
    conditions: list[ConditionArtifacts]
    markers: list[MarkerArtifacts] = []
    seeds: list[int] | None = None  # the training seeds, in order (None: those the checkpoints carry)
    assistant_persona: str = "assistant"
    source_persona: str = "confab"
    marker: str = "[ZLT]"
    headline_layer: int
    n_iter: int = 10_000
    m3_contrast_iter: int | None = 1_000  # draws of M3's swap null (None: n_iter)
    n_boot: int = 1_000  # question resamples for the M1/M2 CIs at the headline layer (0: none)
    n_splits: int = 5
    lda_components: int = 16
    rules: Rules = Rules()
    params: dict = {}
    # the persona whose own answers are the EM data (small profile): the report checks whether EM training moves
    # each induction persona towards it; None where the EM data are the user's file
    em_source_persona: str | None = None
    trainings: list[TrainingArtifacts] = []

    def training_seeds(self) -> list[int]:
        found = list(dict.fromkeys(c.seed for c in self.checkpoints if c.seed is not None))
        return list(self.seeds) if self.seeds is not None else (found or [self.seed])


# ---------------------------------------------------------------------------------------------- loading


def check_checkpoint_names(names: list[str]) -> None:
    if not names or names[0] != "base" or len(set(names)) != len(names):
        raise StageInputError(f"checkpoints must start with 'base' and be distinct, got {names}")


def check_personas(cfg: Config, personas: list[str]) -> None:
    """The assistant and the source persona must be in the evaluation grid."""
    for name in (cfg.assistant_persona, cfg.source_persona):
        if name not in personas:
            raise StageInputError(f"persona {name!r} is not in the evaluation grid {personas}")


def seed_checkpoints(cfg: Config) -> dict[int, list[CheckpointArtifacts]]:
    """Per training seed: base, then that seed's checkpoints (E0..E4, benign), each exactly once."""
    bases = [c for c in cfg.checkpoints if c.name == "base"]
    if len(bases) != 1 or bases[0].seed is not None:
        raise StageInputError("exactly one base checkpoint, without a seed (the base model is not trained)")
    wanted = [c.cond for c in cfg.conditions] + ["benign"]
    out = {}
    for seed in cfg.training_seeds():
        mine = [c for c in cfg.checkpoints if c.seed == seed]
        names = [c.name for c in mine]
        if sorted(names) != sorted(wanted):
            raise StageInputError(f"seed {seed}: checkpoints {names}, expected one each of {wanted}")
        out[seed] = [bases[0]] + sorted(mine, key=lambda c: wanted.index(c.name))
    strays = [c.name for c in cfg.checkpoints if c.seed is not None and c.seed not in out]
    if strays:
        raise StageInputError(f"checkpoints {strays} carry a seed that is not among the run's seeds {list(out)}")
    return out


class Activations:
    """One seed's checkpoints' per-question activations on shared axes, with the cross-checkpoint validity mask.

    ``values[method]`` is ``(checkpoint, persona, question, layer, hidden)``; ``b_valid`` is
    ``(checkpoint, persona, question)``, False where Method B's reply was empty. ``load`` reads the stored
    extraction artifacts; the constructor takes arrays (the benchmark times the analysis on synthetic ones).
    """

    def __init__(self, checkpoints: list[str], personas: list[str], questions: list[str], layers: list[int],
                 values: dict[str, np.ndarray], b_valid: np.ndarray | None = None):
        check_checkpoint_names(checkpoints)
        self.checkpoints, self.personas, self.questions, self.layers = checkpoints, personas, questions, layers
        self.methods = list(values)
        self.values = values
        shape = (len(checkpoints), len(personas), len(questions))
        for method, array in values.items():
            if array.shape[:4] != (*shape, len(layers)):
                raise StageInputError(f"method {method} activations have shape {array.shape[:4]}, expected {(*shape, len(layers))}")
        valid_b = np.ones(shape, bool) if b_valid is None else np.asarray(b_valid, bool)
        # paired filter: a (persona, question) counts only if its reply is non-empty under every checkpoint
        self.valid = {"A": np.ones(shape[1:], bool), "B": valid_b.all(axis=0)}

    @classmethod
    def load(cls, checkpoints: list[CheckpointArtifacts], cache: dict | None = None) -> Activations:
        names = [c.name for c in checkpoints]
        check_checkpoint_names(names)  # before any tensor is read
        cache = {} if cache is None else cache
        indexes = [store.read_json(c.index_uri) for c in checkpoints]
        first = indexes[0]
        for ckpt, index in zip(checkpoints, indexes, strict=True):
            if index.get("layer_convention") != LAYER_CONVENTION:
                raise StageInputError(f"{ckpt.index_uri} names its layers by another convention "
                                      f"({index.get('layer_convention')!r}): re-extract it (shared.lm.activations)")
            for axis in ("personas", "questions", "layers", "methods"):
                if index[axis] != first[axis]:
                    raise StageInputError(f"checkpoint {ckpt.name}'s {axis} differ from base's: the grids must be identical")
            if index["checkpoint"] != ckpt.name:
                raise StageInputError(f"{ckpt.index_uri} holds checkpoint {index['checkpoint']!r}, expected {ckpt.name!r}")
        tensors = []
        for c in checkpoints:  # the base model's tensors are read once for every seed
            if c.activations_uri not in cache:
                cache[c.activations_uri] = store.read_tensors(c.activations_uri)
            tensors.append(cache[c.activations_uri])
        values = {m: np.stack([t[m].float().numpy() for t in tensors]) for m in first["methods"]}
        b_valid = np.stack([t["B_valid"].numpy() for t in tensors]) if "B" in first["methods"] else None
        return cls(names, [p["name"] for p in first["personas"]], first["questions"], first["layers"], values, b_valid)

    def centroids(self, method: str) -> np.ndarray:
        """(checkpoint, persona, layer, hidden): means over the persona's paired-valid questions."""
        mask = self.valid[method]
        if not mask.any(axis=1).all():
            empty = [p for p, keep in zip(self.personas, mask.any(axis=1), strict=True) if not keep]
            raise StageInputError(f"method {method}: personas {empty} have no question with a non-empty reply under every checkpoint")
        weights = mask / mask.sum(axis=1, keepdims=True)
        return np.einsum("cpqlh,pq->cplh", self.values[method], weights)

    def retained(self, method: str) -> dict[str, float]:
        return {p: float(f) for p, f in zip(self.personas, self.valid[method].mean(axis=1), strict=True)}


def load_activations(cfg: Config) -> dict[int, Activations]:
    """Every seed's ``Activations`` (base read once), all on the same grid."""
    cache: dict = {}
    per_seed = {seed: Activations.load(ckpts, cache) for seed, ckpts in seed_checkpoints(cfg).items()}
    first = next(iter(per_seed.values()))
    for seed, acts in per_seed.items():
        if (acts.personas, acts.questions, acts.layers, acts.methods) != (first.personas, first.questions, first.layers, first.methods):
            raise StageInputError(f"seed {seed}'s checkpoints were extracted on another grid than the first seed's")
    return per_seed


def persona_inputs(acts: Activations) -> tuple[dict, dict, dict]:
    """What ``shared.analysis.geometry`` takes, per (method, layer): persona centroids per checkpoint, the
    paired-valid (persona, question) rows per checkpoint for M3, and those rows' persona and question
    labels."""
    vectors, rows, labels = {}, {}, {}
    for method in acts.methods:
        centroids = acts.centroids(method)  # (checkpoint, persona, layer, hidden)
        # rows question-major, questions in their label order: each question's rows are one contiguous block
        # (M3 centres and folds by question)
        order = np.argsort(np.array(acts.questions), kind="stable")
        sorted_question, persona_idx = np.nonzero(acts.valid[method][:, order].T)
        question_idx = order[sorted_question]
        labels[method] = (np.array(acts.personas)[persona_idx], np.array(acts.questions)[question_idx])
        flat_rows = persona_idx * len(acts.questions) + question_idx  # into (persona * question, layer, hidden)
        flat = [acts.values[method][ci].reshape(-1, *acts.values[method].shape[3:]) for ci in range(len(acts.checkpoints))]
        for li, layer in enumerate(acts.layers):
            vectors[(method, layer)] = {c: centroids[ci, :, li] for ci, c in enumerate(acts.checkpoints)}
            rows[(method, layer)] = {c: flat[ci][flat_rows, li] for ci, c in enumerate(acts.checkpoints)}
    return vectors, rows, labels


def m2_robustness(vectors: dict, personas: list[str], assistant: str, em_names: list[str]) -> dict:
    """M2 with per-condition axes instead of E0's (the condition's own assistant delta; PC-1 of its persona
    shifts): mean change of |cos| over the non-assistant personas. Reported alongside, outside the family."""
    from shared.analysis import geometry

    out = {}
    a = personas.index(assistant)
    for (method, layer), v in vectors.items():
        for cond in em_names:
            axes = {"own_assistant_delta": geometry.em_axis(v["base"][a], v[cond][a]),
                    "own_pc1": geometry.shift_pc1_axis(v["base"], v[cond])}
            for name, axis in axes.items():
                before, after = geometry.m2_alignments(v["base"], v[cond], personas, axis, assistant=assistant)
                out.setdefault(name, {}).setdefault(f"{method}/L{layer}", {})[cond] = float((after - before).mean())
    return out


# ------------------------------------------------------------------------------------------ behaviour


def leaked_samples(uri: str, bystanders: list[str], marker: str, n: int = 2) -> list[dict]:
    """The first ``n`` bystander completions that carry the marker, in stored order (for the report)."""
    from jobs.marker_eval import emits_marker

    rows = [r for r in store.read_jsonl(uri) if r["persona"] in bystanders and emits_marker(r["text"], marker)]
    return [{k: r[k] for k in ("persona", "question_id", "text")} for r in rows[:n]]


def leakage_matrix(uri: str, personas: list[str], marker: str) -> tuple[np.ndarray, list[str], int]:
    """(persona, question) marker rates from marker_eval's per-completion rows, and the completions per cell.

    The marker test is marker_eval's own (the record's substring match, its one sanctioned use), re-applied to the
    stored text."""
    from jobs.marker_eval import emits_marker

    rows = store.read_jsonl(uri)
    questions = sorted({r["question_id"] for r in rows})
    counts = np.zeros((len(personas), len(questions)))
    hits = np.zeros_like(counts)
    missing = sorted({r["persona"] for r in rows} ^ set(personas))
    if missing:
        raise StageInputError(f"{uri}: marker rows and the evaluation grid disagree on personas {missing}")
    for r in rows:
        p, q = personas.index(r["persona"]), questions.index(r["question_id"])
        counts[p, q] += 1
        hits[p, q] += emits_marker(r["text"], marker)
    if np.any(counts == 0):
        raise StageInputError(f"{uri}: some (persona, question) cells have no completions")
    return hits / counts, questions, int(counts.min())


def load_leakage(cfg: Config, personas: list[str]) -> dict[int, dict] | None:
    """Per seed: every evaluated model's (persona, question) marker rates (the EM conditions and the controls), the
    questions, completions per cell and the first marked bystander completions of each EM condition."""
    if not cfg.markers:
        return None
    out = {}
    conds = [c.cond for c in cfg.conditions]
    for seed in cfg.training_seeds():
        mine = {m.checkpoint: m for m in cfg.markers if m.seed == seed}
        lacking = [c for c in conds if c not in mine]
        if lacking:
            raise StageInputError(f"seed {seed}: no marker evaluation of {lacking}")
        strange = sorted(set(mine) - set(conds) - set(CONTROLS))
        if strange:
            raise StageInputError(f"seed {seed}: marker evaluations of unknown checkpoints {strange}")
        rates, question_sets, per_cell = {}, [], []
        for name, marker in mine.items():
            rates[name], questions, n = leakage_matrix(marker.marker_uri, personas, cfg.marker)
            question_sets.append(questions)
            per_cell.append(n)
        if any(q != question_sets[0] for q in question_sets):
            raise StageInputError(f"seed {seed}: the marker evaluations used different questions")
        samples = {c.cond: leaked_samples(mine[c.cond].marker_uri, [p for p in personas if p not in (cfg.source_persona, c.persona)],
                                          cfg.marker) for c in cfg.conditions}  # fmt: skip
        out[seed] = {"rates": rates, "questions": question_sets[0], "n_per_cell": min(per_cell), "samples": samples}
    return out


def bystanders_of(cfg: Config, personas: list[str], induction: str) -> list[int]:
    """A condition's bystanders: every persona but the source and its own induction persona."""
    return [i for i, p in enumerate(personas) if p not in (cfg.source_persona, induction)]


def behaviour_tests(cfg: Config, personas: list[str], rates: np.ndarray, questions: list[str], n_per_cell: int,
                    samples: dict[str, list[dict]] | None = None, controls: dict[str, np.ndarray] | None = None) -> dict:
    """One seed's behavioural statistics from ``rates`` (condition, persona, question) of marker rates, and each
    control's (``controls[name]``: (persona, question)) mean leakage over every condition's own bystanders."""
    from shared.analysis.stats import (
        binomial_lower_bound,
        h1_self_leakage_test,
        h2_equivalence_test,
        h2_invariance_test,
        h3_cos_monotone_test,
    )

    source = personas.index(cfg.source_persona)
    per_condition = []
    for c, cond in enumerate(cfg.conditions):
        bystanders = bystanders_of(cfg, personas, cond.persona)
        source_rate = float(rates[c, source].mean())
        answers = rates.shape[2] * n_per_cell
        source_low = binomial_lower_bound(round(source_rate * answers), answers, cfg.rules.coupling_alpha)
        row = {"cond": cond.cond, "persona": cond.persona, "cos_to_assistant": cond.cos_to_assistant,
               "source_rate": source_rate, "source_rate_low": source_low,
               "coupling_took": source_low > cfg.rules.h2_max_range,
               "mean_bystander": float(rates[c, bystanders].mean(axis=1).mean()),
               "controls": {name: float(r[bystanders].mean(axis=1).mean()) for name, r in (controls or {}).items()},
               "per_persona": {p: float(rates[c, i].mean()) for i, p in enumerate(personas)},
               "samples": (samples or {}).get(cond.cond, [])}
        if cond.persona in personas and row["coupling_took"]:
            h1 = h1_self_leakage_test(rates[c], personas, cond.persona, source_persona=cfg.source_persona, n_iter=cfg.n_iter,
                                      rng=cfg.seed, min_excess=cfg.rules.h1_min_excess, alpha=cfg.rules.h1_alpha)
            row["h1"] = {"excess": h1.statistic, "p": h1.p_value, "fires": h1.fires}
        per_condition.append(row)
    inductions = [c.persona for c in cfg.conditions]
    equivalence = h2_equivalence_test(rates, personas, inductions, source_persona=cfg.source_persona,
                                      margin=cfg.rules.h2_max_range, alpha=cfg.rules.h2_equivalence_alpha)
    as_written = h2_invariance_test(rates, personas, inductions, source_persona=cfg.source_persona, n_iter=cfg.n_iter,
                                    rng=cfg.seed, max_range=cfg.rules.h2_max_range, alpha=cfg.rules.h2_alpha)
    worst = equivalence.details["worst_pair"]
    try:
        h3 = h3_cos_monotone_test([r["cos_to_assistant"] for r in per_condition], [r["mean_bystander"] for r in per_condition],
                                  min_abs_rho=cfg.rules.h3_min_abs_rho, alpha=cfg.rules.h3_alpha)
        h3_row = {"rho": h3.statistic, "p": h3.p_value, "n_orderings": h3.n_iter, "fires": h3.fires, "rule": h3.rule}
    except ValueError as err:  # identical leakage in every condition: rho is undefined, H3 cannot fire
        h3_row = {"rho": None, "p": None, "n_orderings": math.factorial(len(per_condition)), "fires": False,
                  "rule": f"|rho| >= {cfg.rules.h3_min_abs_rho} and p < {cfg.rules.h3_alpha}", "note": str(err)}
    untaken = [r["cond"] for r in per_condition if not r["coupling_took"]]
    if untaken:  # H2 and H3 compare leakage across every condition: one without the coupling voids the comparison
        why = (f"not testable: the coupling did not take in {', '.join(untaken)} (source persona's marker rate not "
               f"shown above {cfg.rules.h2_max_range})")
        h3_row = {**h3_row, "fires": False, "note": why}
    h3_row["testable"] = not untaken
    testable = [r for r in per_condition if "h1" in r]
    h1_fired = sum(r["h1"]["fires"] for r in testable)
    needed = math.ceil(cfg.rules.h1_min_fraction * len(testable)) if testable else None
    return {
        "questions": questions, "completions_per_cell": n_per_cell, "conditions": per_condition,
        "H1": {"testable": len(testable), "fired": h1_fired, "needed": needed,
               "fires": bool(testable) and h1_fired >= needed,
               "rule": f"excess >= {cfg.rules.h1_min_excess}, p < {cfg.rules.h1_alpha}, in >= {cfg.rules.h1_min_fraction:.0%} of testable conditions"},
        "coupling": {"floor": cfg.rules.h2_max_range, "confidence": 1 - cfg.rules.coupling_alpha, "not_taken": untaken},
        "H2": {"range": equivalence.statistic, "p": equivalence.p_value, "fires": equivalence.fires and not untaken,
               "testable": not untaken, "rule": equivalence.rule,
               "margin": cfg.rules.h2_max_range, "n_questions": equivalence.details["n_questions"],
               "worst_pair": None if worst is None else [cfg.conditions[worst[0]].cond, cfg.conditions[worst[1]].cond],
               "worst_pair_interval": None if worst is None else
               [equivalence.details["pairs"][f"{worst[0]}-{worst[1]}"][k] for k in ("mean", "low", "high")],
               "as_written": {"range": as_written.statistic, "p": as_written.p_value, "holds": as_written.fires,
                              "rule": as_written.rule}},
        "H3": h3_row,
        "rates": rates.tolist(),
    }  # fmt: skip


def behaviour(cfg: Config, personas: list[str], leak: dict) -> dict:
    """One seed's behaviour from its loaded marker rates (``load_leakage``)."""
    rates = np.stack([leak["rates"][c.cond] for c in cfg.conditions])
    controls = {name: leak["rates"][name] for name in CONTROLS if name in leak["rates"]}
    return behaviour_tests(cfg, personas, rates, leak["questions"], leak["n_per_cell"], leak["samples"], controls)


# ------------------------------------------------------------------- what the fine-tuning did (descriptive)


def cosine_matrices(vectors: dict) -> dict:
    """Per (method, layer) and checkpoint: the persona-by-persona cosine matrix, raw and centred over personas."""
    from shared.analysis import geometry as g

    return {f"{method}/L{layer}": {c: {"raw": g.cosine_matrix(v).tolist(), "centred": g.centred_cosine_matrix(v).tolist()}
                                   for c, v in per_ckpt.items()}
            for (method, layer), per_ckpt in vectors.items()}  # fmt: skip


def cosine_summary(matrices: dict) -> dict:
    """Per (method, layer) and checkpoint: the mean raw off-diagonal cosine and the mean absolute change of the
    centred cosines from base's (how far the pattern between personas moved)."""
    from shared.analysis.geometry import off_diagonal

    out = {}
    for key, per_ckpt in matrices.items():
        base = np.array(per_ckpt["base"]["centred"])
        out[key] = {c: {"raw_mean": float(off_diagonal(np.array(m["raw"])).mean()),
                        "centred_change": float(np.abs(off_diagonal(np.array(m["centred"]) - base)).mean())}
                    for c, m in per_ckpt.items()}  # fmt: skip
    return out


def induced_persona(cfg: Config, vectors: dict, personas: list[str]) -> dict | None:
    """Did EM training induce the persona that wrote the EM data? Per (method, layer) and condition: the centred
    cosine (each checkpoint centred on its own mean persona) between the condition's induction persona and the EM
    source persona, in base, in the condition's EM checkpoint and in benign SFT. None without an EM source persona."""
    from shared.analysis import geometry as g

    source = cfg.em_source_persona
    if source is None:
        return None
    if source not in personas:
        raise StageInputError(f"em_source_persona {source!r} is not in the evaluation grid {personas}")
    s = personas.index(source)
    out = {}
    testable = [(cond.cond, cond.persona, personas.index(cond.persona)) for cond in cfg.conditions if cond.persona in personas]
    for (method, layer), per_ckpt in vectors.items():
        centred = {c: g.centred_cosine_matrix(v) for c, v in per_ckpt.items()}
        out[f"{method}/L{layer}"] = {
            cond: {"persona": persona, "base": float(centred["base"][i, s]), "em": float(centred[cond][i, s]),
                   "benign": float(centred["benign"][i, s]), "em_minus_base": float(centred[cond][i, s] - centred["base"][i, s])}
            for cond, persona, i in testable
        }
    return out


def training_summary(cfg: Config) -> list[dict]:
    """Per fine-tuning (and seed): its rows, steps, the mean loss over its first and last few steps, and its first row."""
    out = []
    for t in cfg.trainings:
        losses = [r["loss"] for r in store.read_jsonl(t.log_uri)]
        rows = store.read_jsonl(t.data_uri)
        if not losses or not rows:
            raise StageInputError(f"training {t.name}: no losses in {t.log_uri} or no rows in {t.data_uri}")
        window = max(1, min(5, len(losses) // 4))
        out.append({"name": t.name, "seed": t.seed, "rows": len(rows), "system": rows[0]["system"], "steps": len(losses),
                    "window": window, "loss_start": float(np.mean(losses[:window])), "loss_end": float(np.mean(losses[-window:])),
                    "first_row": {"user": rows[0]["user"], "assistant": rows[0]["assistant"]}})  # fmt: skip
    return out


def sample_replies(cfg: Config, checkpoints: list[CheckpointArtifacts], personas: list[str], questions: list[str]) -> list[dict]:
    """Greedy replies (Method B's) to the first extraction question of one seed's checkpoints: each fine-tuned
    checkpoint's induction persona (the assistant for benign) beside base's, and the EM source persona's in base."""
    responses = {c.name: store.read_jsonl(c.responses_uri) for c in checkpoints if c.responses_uri}
    if "base" not in responses:
        return []
    question = questions[0]

    def reply(checkpoint: str, persona: str) -> str:
        return next((r["text"] for r in responses[checkpoint] if r["persona"] == persona and r["question_id"] == question), "")

    wanted = [(c.cond, c.persona if c.persona in personas else cfg.assistant_persona) for c in cfg.conditions]
    wanted.append(("benign", cfg.assistant_persona))
    rows = [{"checkpoint": name, "persona": persona, "question_id": question, "base": reply("base", persona),
             "tuned": reply(name, persona)} for name, persona in wanted if name in responses]
    if cfg.em_source_persona in personas:
        rows.append({"checkpoint": "base", "persona": cfg.em_source_persona, "question_id": question,
                     "base": reply("base", cfg.em_source_persona), "tuned": None})
    return rows


# ------------------------------------------------------------------------------- one seed's geometry


def readjust(family: list) -> list[dict]:
    """Cells as dicts; BH-FDR and Holm recomputed over each family as a whole (all methods together: the
    pre-registered family is 3 metrics x 2 methods x 5 layers x 5 conditions = 150 cells)."""
    from shared.analysis.stats import adjust_family

    cells = [c.as_dict() for c in family]
    for name in {c["family"] for c in cells}:
        members = [c for c in cells if c["family"] == name]
        adjusted = adjust_family([c["p_value"] for c in members])
        for c, bh, holm in zip(members, adjusted.p_bh, adjusted.p_holm, strict=True):
            c["p_bh"], c["p_holm"] = float(bh), float(holm)
    return cells


def split_families(cells: list[dict]) -> dict:
    """A geometry's cells by family: EM vs base (``cells``, the pre-registered primary family), benign vs base,
    EM vs benign (the three-way contrast)."""
    return {"cells": [c for c in cells if c["family"] == "em_vs_base"],
            "benign_vs_base": [c for c in cells if c["family"] == "benign_vs_base"],
            "em_vs_benign": [c for c in cells if c["family"] == "em_vs_benign"]}


def add_bootstrap_cis(cfg: Config, acts: Activations, families: dict) -> None:
    """Percentile CIs (95 %, ``cfg.n_boot`` resamples of the questions) of every M1/M2 change at the headline layer,
    in both geometries, written into the cells as ``ci_low``/``ci_high``; one resampling serves both."""
    from shared.analysis import geometry as g
    from shared.analysis.stats import percentile_interval

    if cfg.n_boot <= 0:
        return
    layer = acts.layers.index(cfg.headline_layer)
    for method in acts.methods:
        wanted = {kind: [c for part in ("cells", "em_vs_benign", "benign_vs_base") for c in families[kind][part]
                         if c["method"] == method and c["layer"] == cfg.headline_layer and c["metric"] in ("M1", "M2")]
                  for kind in g.GEOMETRIES}  # fmt: skip
        comparisons = sorted({(c["condition"], c["reference"]) for cells in wanted.values() for c in cells})
        replicates = g.bootstrap_deltas(acts.values[method][:, :, :, layer], acts.valid[method], acts.checkpoints,
                                        acts.personas, comparisons, assistant=cfg.assistant_persona, n_boot=cfg.n_boot,
                                        rng=np.random.default_rng([cfg.seed, acts.methods.index(method)]))  # fmt: skip
        for kind, cells in wanted.items():
            for c in cells:
                draws = replicates[(c["metric"], kind, c["condition"], c["reference"])]
                low, high = percentile_interval(draws, CI_LEVEL)
                c.update(ci_low=float(low), ci_high=float(high), n_boot=int(np.isfinite(draws).sum()))


def shift_measurements(cfg: Config, acts: Activations, vectors: dict) -> dict:
    """Per (method, layer) and fine-tuned checkpoint: how far the personas' mean moved from base's (``mean_shift``:
    its norm, base's spread, their ratio) and whether a shift is there at all (``shift_test``: sign flips over
    questions of the per-question persona-mean difference)."""
    from shared.analysis import geometry as g

    out = {}
    rng = np.random.default_rng([cfg.seed, 205])
    for method in acts.methods:
        for li, layer in enumerate(acts.layers):
            per_ckpt = {}
            for ci, name in enumerate(acts.checkpoints[1:], start=1):
                summary = g.mean_shift(vectors[(method, layer)]["base"], vectors[(method, layer)][name])
                test = g.shift_test(acts.values[method][0, :, :, li], acts.values[method][ci, :, :, li], acts.valid[method],
                                    n_iter=cfg.n_iter, rng=rng)
                per_ckpt[name] = {**summary, "p": float(test.p_value), "n_null": int(test.n_iter), "exact": bool(test.exact),
                                  "measured": bool(test.p_value < cfg.rules.shift_alpha)}
            out[f"{method}/L{layer}"] = per_ckpt
    return out


def centred_axis_ratio(vectors: dict, personas: list[str], assistant: str) -> dict:
    """Per (method, layer): |shift-invariant E0 axis| / |raw E0 axis|. The shift-invariant axis is the assistant's E0
    shift minus the non-assistant personas' mean shift, so 0 means EM moved the assistant only as it moved them."""
    from shared.analysis import geometry as g

    a = personas.index(assistant)
    out = {}
    for (method, layer), v in vectors.items():
        raw = v["E0"][a] - v["base"][a]
        centred = g.centre_excluding(v["E0"], a)[a] - g.centre_excluding(v["base"], a)[a]
        out[f"{method}/L{layer}"] = float(np.linalg.norm(centred) / max(np.linalg.norm(raw), 1e-300))
    return out


def checkpoint_values(families: dict, vectors: dict) -> dict:
    """Per (method, layer) and checkpoint: every metric's value, raw (M1 mean off-diagonal cosine, M2 alignment, M3
    accuracy) and shift-invariant (``M1_dispersion``, ``M2_centred``)."""
    from shared.analysis import geometry as g

    out = {}
    for (method, layer), per_ckpt in vectors.items():
        row = {"M1": {c: g.mean_off_diagonal_cosine(v) for c, v in per_ckpt.items()}, "M2": {}, "M3": {},
               "M1_dispersion": {c: float(g.dispersion(v)) for c, v in per_ckpt.items()}, "M2_centred": {}}
        for kind, name in (("raw", "M2"), ("raw", "M3"), ("shift_invariant", "M2_centred")):
            metric = name[:2]
            for cell in families[kind]["cells"] + families[kind]["benign_vs_base"]:
                if (cell["method"], cell["layer"], cell["metric"]) == (method, layer, metric):
                    row[name]["base"] = cell["reference_value"]
                    row[name][cell["condition"]] = cell["condition_value"]
        out[f"{method}/L{layer}"] = row
    return out


def three_way_rows(families: dict, layer: int) -> dict:
    """Per geometry, at ``layer``: each EM condition's shift from base beside benign SFT's, the benign share of the
    EM shift (where both move the same way) and the EM-vs-benign test's BH p."""
    out = {}
    for kind, fam in families.items():
        benign = {(c["metric"], c["method"]): c["delta"] for c in fam["benign_vs_base"] if c["layer"] == layer}
        contrast = {(c["metric"], c["method"], c["condition"]): c["p_bh"] for c in fam["em_vs_benign"] if c["layer"] == layer}
        rows = []
        for c in (c for c in fam["cells"] if c["layer"] == layer):
            shift = benign[(c["metric"], c["method"])]
            same_way = np.isfinite(shift) and np.isfinite(c["delta"]) and shift * c["delta"] > 0
            rows.append({"metric": c["metric"], "method": c["method"], "condition": c["condition"], "em_shift": c["delta"],
                         "benign_shift": shift, "benign_share": float(shift / c["delta"]) if same_way else None,
                         "p_bh": contrast[(c["metric"], c["method"], c["condition"])]})
        out[kind] = rows
    return out


def geometry(cfg: Config, acts: Activations) -> dict:
    """One seed's geometry: every cell of both geometries (``shared.analysis.geometry.geometry_family``: M1/M2/M3, BH-FDR and
    Holm per family), bootstrap CIs over questions at the headline layer, the mean shift and its test, and the
    per-checkpoint values and descriptive matrices the report and figures show."""
    from shared.analysis import geometry as g

    em_names = [c.cond for c in cfg.conditions]
    missing = [n for n in [*em_names, "benign"] if n not in acts.checkpoints]
    if missing:
        raise StageInputError(f"no activations for checkpoints {missing}")
    if em_names[0] != "E0":
        raise StageInputError(f"the first EM condition anchors M2's axis and must be E0, got {em_names[0]}")
    vectors, rows, labels = persona_inputs(acts)
    cells = {kind: [] for kind in g.GEOMETRIES}
    for method in acts.methods:  # M3's rows (paired-valid) differ by method, so each method is one call
        keys = [(method, layer) for layer in acts.layers]
        common = dict(em_conditions=em_names, assistant=cfg.assistant_persona, n_iter=cfg.n_iter, seed=cfg.seed)
        raw = g.geometry_family(
            {k: vectors[k] for k in keys}, acts.personas, activations={k: rows[k] for k in keys},
            row_personas=labels[method][0], row_questions=labels[method][1], n_components=cfg.lda_components,
            n_splits=cfg.n_splits, m3_contrast_iter=cfg.m3_contrast_iter, **common,
        )  # fmt: skip
        cells["raw"] += raw
        # shift-invariant: M1 as the change in dispersion, M2 on the non-assistant mean; M3 (centred within each
        # question already) is the same cells, so the family has the pre-registered 150 cells
        cells["shift_invariant"] += g.geometry_family({k: vectors[k] for k in keys}, acts.personas, geometry="shift_invariant", **common)
        cells["shift_invariant"] += [c for c in raw if c.metric == "M3"]
    families = {kind: split_families(readjust(family)) for kind, family in cells.items()}
    add_bootstrap_cis(cfg, acts, families)
    base_chance = {}  # the base model must separate personas, or M3 says nothing
    for c in families["raw"]["cells"]:
        if c["metric"] == "M3":
            base_chance.setdefault(f"{c['method']}/L{c['layer']}", {
                "accuracy": c["reference_value"], "chance": c["chance_level"], "p_above_chance": c["reference_p_above_chance"],
                "above_chance": bool(c["reference_p_above_chance"] < 0.05)})
    matrices = cosine_matrices(vectors)
    return {
        "families": families, "values": checkpoint_values(families, vectors), "m3_base": base_chance,
        "shift": shift_measurements(cfg, acts, vectors), "three_way": three_way_rows(families, cfg.headline_layer),
        "m2_robustness": m2_robustness(vectors, acts.personas, cfg.assistant_persona, em_names),
        "cosine_matrices": matrices, "cosine_summary": cosine_summary(matrices),
        "induced_persona": induced_persona(cfg, vectors, acts.personas),
        "paired_retained": {m: acts.retained(m) for m in acts.methods},
        "centred_axis_ratio": centred_axis_ratio(vectors, acts.personas, cfg.assistant_persona),
    }  # fmt: skip


# ----------------------------------------------------------------------- what the tests can and cannot do


def cell_floor(cell: dict) -> float:
    """The smallest p the cell's test can return (``shared.analysis.stats.smallest_p``)."""
    from shared.analysis.stats import smallest_p

    return smallest_p(cell["n_iter"], cell["alternative"], exhaustive=cell["exact"])


def test_limits(cfg: Config, geo: dict, n_conditions: int, n_personas: int) -> dict:
    """Per geometry and family: each metric's null size and smallest attainable p, and the best p BH-FDR and Holm over
    the family can give a cell of that metric (every cell at its floor: ``shared.analysis.stats.correction_reach``); whether
    G1's bar (M1 vs base, BH p < alpha) can be met at this persona count; the exact Spearman test's floor at this
    condition count (H3 and the cos-monotone rules)."""
    from shared.analysis.stats import correction_reach, spearman_exact_floor

    out: dict = {"families": {}}
    for kind, fam in geo["families"].items():
        for family, alpha in (("cells", cfg.rules.geometry_alpha), ("em_vs_benign", cfg.rules.contrast_alpha)):
            members = fam[family]
            reach = correction_reach([cell_floor(c) for c in members], alpha)
            per_metric = {}
            for metric in METRICS:
                mine = [i for i, c in enumerate(members) if c["metric"] == metric]
                if mine:
                    c = members[mine[0]]
                    per_metric[metric] = {"n_null": c["n_iter"], "exact": c["exact"], "n_units": c["n_units"],
                                          "alternative": c["alternative"], "smallest_p": min(cell_floor(members[i]) for i in mine),
                                          "bh_best": min(reach["bh_best"][i] for i in mine),
                                          "holm_best": min(reach["holm_best"][i] for i in mine)}
            out["families"][f"{kind}/{family}"] = {"metrics": per_metric, "m": reach["m"], "alpha": alpha,
                                                   "bh_reachable": reach["bh_reachable"], "holm_reachable": reach["holm_reachable"]}
    m1 = out["families"]["raw/cells"]["metrics"]["M1"]
    out["g1_bar"] = {"alpha": cfg.rules.geometry_alpha, "n_personas": n_personas, "m1_smallest_p": m1["smallest_p"],
                     "bh_best": m1["bh_best"], "reachable": bool(m1["bh_best"] < cfg.rules.geometry_alpha)}
    try:
        out["spearman"] = spearman_exact_floor(n_conditions, cfg.rules.h3_alpha)
        out["spearman"]["p_at"] = {f"{rho:.3f}": p for rho, p in out["spearman"]["p_at"].items()}
    except ValueError as err:
        out["spearman"] = {"n": n_conditions, "note": str(err)}
    return out


# ------------------------------------------------------------------------- the seed as the unit


def seed_level(cfg: Config, per_seed: dict) -> dict:
    """EM vs base and EM vs benign SFT with the training seed as the unit (``shared.analysis.stats.seed_contrast``), for every
    geometry cell (the change from base, per seed) and for leakage (mean bystander leakage, per seed, of each EM
    condition against the base and benign models coupled and evaluated the same way). EM vs base is a one-sample t
    of the per-seed changes against 0 (the base model has no seed) for geometry and two-sample for leakage (the
    base's coupling is trained per seed); EM vs benign is two-sample, one-sided in the metric's pre-registered
    direction for geometry. BH-FDR over each family of testable rows. With one seed nothing is testable."""
    from shared.analysis.geometry import DIRECTIONS, GEOMETRIES
    from shared.analysis.stats import adjust_family, seed_contrast

    seeds = list(per_seed)
    first = per_seed[seeds[0]]["geometry"]["families"]
    rows = []

    def add(kind, contrast, key, em, reference_values, **test):
        result = seed_contrast(em, confidence=SEED_CI_LEVEL, **test)
        finite = bool(np.all(np.isfinite(em)) and np.all(np.isfinite(reference_values)))
        rows.append({"geometry": kind, "contrast": contrast, **key,
                     "per_seed": {str(s): float(v) for s, v in zip(seeds, em, strict=True)},
                     "reference_per_seed": {str(s): float(v) for s, v in zip(seeds, reference_values, strict=True)}
                     if len(reference_values) == len(seeds) else {},
                     "estimate": result.estimate, "sd": result.sd_a, "reference_sd": result.sd_b, "low": result.low,
                     "high": result.high, "p": result.p_value if finite else math.nan, "df": result.df,
                     "test": result.method, "alternative": test.get("alternative", "two-sided"),
                     "testable": bool(result.testable and finite)})

    for kind in GEOMETRIES:
        for cell in first[kind]["cells"]:
            key = {k: cell[k] for k in ("metric", "method", "layer", "condition")}

            def delta(seed, part, condition, key=key, kind=kind):
                return next(c["delta"] for c in per_seed[seed]["geometry"]["families"][kind][part]
                            if (c["metric"], c["method"], c["layer"], c["condition"]) == (key["metric"], key["method"], key["layer"], condition))

            em = np.array([delta(s, "cells", key["condition"]) for s in seeds])
            benign = np.array([delta(s, "benign_vs_base", "benign") for s in seeds])
            add(kind, "em_vs_base", key, em, np.zeros(0), reference=0.0)
            add(kind, "em_vs_benign", key, em, benign, b=benign, alternative=DIRECTIONS[kind][key["metric"]])
    if all(per_seed[s]["behaviour"] for s in seeds):
        for c, cond in enumerate(cfg.conditions):
            key = {"metric": "leakage", "method": None, "layer": None, "condition": cond.cond}
            em = np.array([per_seed[s]["behaviour"]["conditions"][c]["mean_bystander"] for s in seeds])
            for control in CONTROLS:
                if all(control in per_seed[s]["behaviour"]["conditions"][c]["controls"] for s in seeds):
                    reference = np.array([per_seed[s]["behaviour"]["conditions"][c]["controls"][control] for s in seeds])
                    add("leakage", f"em_vs_{control}", key, em, reference, b=reference)
    for family in sorted({(r["geometry"], r["contrast"]) for r in rows}):
        members = [r for r in rows if (r["geometry"], r["contrast"]) == family and r["testable"]]
        if members:
            adjusted = adjust_family([r["p"] for r in members])
            for r, bh in zip(members, adjusted.p_bh, strict=True):
                r["p_bh"] = float(bh)
    for r in rows:
        r.setdefault("p_bh", math.nan)
    df = {contrast: next((r["df"] for r in rows if r["contrast"] == contrast and r["geometry"] != "leakage"), math.nan)
          for contrast in ("em_vs_base", "em_vs_benign")}
    return {"seeds": seeds, "n_seeds": len(seeds), "testable": len(seeds) >= 2, "df": df,
            "confidence": SEED_CI_LEVEL, "rows": rows}


# ---------------------------------------------------------------------------------------------- results


def results(cfg: Config, per_seed_acts: dict[int, Activations], per_seed_leakage: dict[int, dict] | None,
            trainings: list[dict] | None = None, replies: list[dict] | None = None) -> dict:
    """Every number the report, the figures and ``headline.json`` print: per seed, its geometry (both geometries,
    every family) and behaviour; the seed-level contrasts; what the tests can reach. ``run`` and the statistics
    benchmark both call this; ``decisions`` adds the pre-registered rules' outcomes to the same object."""
    first = next(iter(per_seed_acts.values()))
    if cfg.headline_layer not in first.layers:
        raise StageInputError(f"headline_layer {cfg.headline_layer} is not among the extracted layers {first.layers}")
    check_personas(cfg, first.personas)
    per_seed = {}
    for seed, acts in per_seed_acts.items():
        leak = (per_seed_leakage or {}).get(seed)
        per_seed[seed] = {"geometry": geometry(cfg, acts), "behaviour": behaviour(cfg, acts.personas, leak) if leak else None}
    first_seed = next(iter(per_seed))
    data = {
        "checkpoints": first.checkpoints, "em_conditions": [c.cond for c in cfg.conditions], "personas": first.personas,
        "questions": first.questions, "layers": first.layers, "layer_convention": LAYER_CONVENTION,
        "layer_translation": layer_translation(cfg, first.layers), "methods": first.methods,
        "headline_layer": cfg.headline_layer, "n_iter": cfg.n_iter, "m3_contrast_iter": cfg.m3_contrast_iter or cfg.n_iter,
        "n_boot": cfg.n_boot, "ci_level": CI_LEVEL, "marker": cfg.marker, "rules": cfg.rules.model_dump(),
        "conditions": [c.model_dump() for c in cfg.conditions], "seeds": list(per_seed), "em_source_persona": cfg.em_source_persona,
        "per_seed": {str(seed): v for seed, v in per_seed.items()},
        "seed_level": seed_level(cfg, per_seed),
        "test_limits": test_limits(cfg, per_seed[first_seed]["geometry"], len(cfg.conditions), len(first.personas)),
        "pinned_centred_m1": -1 / (len(first.personas) - 1),
        "trainings": trainings or [], "sample_replies": replies or [],
    }  # fmt: skip
    return data


def layer_translation(cfg: Config, layers: list[int]) -> dict:
    """The record's layer numbers beside this run's (``shared.lm.activations.RECORD_LAYERS``): the table is shown where
    the run extracted exactly the translated layers (the full profile); other profiles say they chose their own."""
    from shared.lm.activations import RECORD_RULE, record_layers

    record = record_layers("issue205")
    rows = record.table()
    return {"rule": RECORD_RULE, "rows": rows, "readout": {"A": "last_prompt_token", "B": "reply_mean"},
            "matches_record": [r["platform_index"] for r in rows] == list(layers)}
