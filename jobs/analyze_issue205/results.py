"""Stage ``analyze_issue205``: #205's pre-registered geometry (M1/M2/M3) and behaviour (H1/H2/H3) statistics,
per training seed and with the seed as the unit, the decision rules, the figures and the report.

The analysis has four parts, each one function, in this order: ``results`` (every number, read from the stored
artifacts), ``decisions`` (the record's pre-registered rules applied to those numbers, per seed and pooled over
seeds), ``figures`` and ``report``. ``headline.json`` is the results object with its decisions; the figures and the
report print that object and nothing else.

What this stage makes impossible, by construction (each was a finding of the record's review or of a referee):

- checkpoints whose persona / question / layer axes disagree are refused, not silently mis-aligned;
- Method B centroids are always formed on the questions whose reply is non-empty under *every* checkpoint of a
  seed (the paired empty-response filter), so no checkpoint is compared on a different question set;
- M3 is held-out LDA with GroupKFold by question and a joint-shuffle null (never a per-persona hold-out, which
  scored 0% on the base model), its contrasts are tested against a null of equal separability (questions swapped
  between the two checkpoints), and a base accuracy not above chance is reported as "M3 uninformative";
- M1's null swaps whole personas between the two checkpoints, not pairs;
- beside the raw geometry, a shift-invariant family (the change in between-persona dispersion, M2 centred on the
  non-assistant personas' mean) that a shift shared by every persona cannot move and that is not pinned; the mean
  shift is measured, and a rule that holds on raw geometry only is called "may be a shared shift" only where it is;
- each metric's null size and smallest attainable p are stated, with what BH and Holm can reach over the family;
- H2 is an equivalence test (TOST, the record's 15-point margin); the record's own H2 rule is printed beside it as
  what it is; H3's exact Spearman floor at the run's condition count is stated;
- claims about a training recipe (EM vs base, EM vs benign SFT) are tested with the training seed as the unit
  (``shared.analysis.stats.seed_contrast``); a one-seed run says every p-value is conditional on one fine-tune and calls no
  effect EM-specific.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel

from shared.contract.stage import Resources, StageInputError, StageSpec
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
        h1_self_leakage_test,
        h2_equivalence_test,
        h2_invariance_test,
        h3_cos_monotone_test,
    )

    source = personas.index(cfg.source_persona)
    per_condition = []
    for c, cond in enumerate(cfg.conditions):
        bystanders = bystanders_of(cfg, personas, cond.persona)
        row = {"cond": cond.cond, "persona": cond.persona, "cos_to_assistant": cond.cos_to_assistant,
               "source_rate": float(rates[c, source].mean()),
               "mean_bystander": float(rates[c, bystanders].mean(axis=1).mean()),
               "controls": {name: float(r[bystanders].mean(axis=1).mean()) for name, r in (controls or {}).items()},
               "per_persona": {p: float(rates[c, i].mean()) for i, p in enumerate(personas)},
               "samples": (samples or {}).get(cond.cond, [])}
        if cond.persona in personas:
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
    testable = [r for r in per_condition if "h1" in r]
    h1_fired = sum(r["h1"]["fires"] for r in testable)
    needed = math.ceil(cfg.rules.h1_min_fraction * len(testable)) if testable else None
    return {
        "questions": questions, "completions_per_cell": n_per_cell, "conditions": per_condition,
        "H1": {"testable": len(testable), "fired": h1_fired, "needed": needed,
               "fires": bool(testable) and h1_fired >= needed,
               "rule": f"excess >= {cfg.rules.h1_min_excess}, p < {cfg.rules.h1_alpha}, in >= {cfg.rules.h1_min_fraction:.0%} of testable conditions"},
        "H2": {"range": equivalence.statistic, "p": equivalence.p_value, "fires": equivalence.fires, "rule": equivalence.rule,
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


# -------------------------------------------------------------------------------------------- decisions


def monotone(cos: list[float], effects: list[float], rules: dict) -> dict:
    """(b) of the cross-condition rule: exact Spearman between cos-to-assistant and the condition's mean delta."""
    from shared.analysis.stats import spearman_exact_test

    if not np.all(np.isfinite(effects)):  # an undefined metric (centred M2 without an axis): no trend to test
        return {"rho": None, "p": None, "fires": False, "note": "a condition's mean change is undefined"}
    try:
        trend = spearman_exact_test(cos, effects)
    except ValueError as err:  # constant effects or too few conditions: no trend to test
        return {"rho": None, "p": None, "fires": False, "note": str(err)}
    return {"rho": trend.rho, "p": trend.p_value,
            "fires": bool(abs(trend.rho) >= rules["monotone_min_abs_rho"] and trend.p_value < rules["monotone_alpha"])}


def fires_in_direction(kind: str, cell: dict, rules: dict) -> bool:
    """A primary cell fires: BH p below the bar and the change in the pre-registered direction (an M3 drop of at
    least ``m3_min_drop``)."""
    from shared.analysis.geometry import DIRECTIONS

    delta = cell["delta"]
    if not np.isfinite(delta):
        return False
    if cell["metric"] == "M3":
        direction = delta <= -rules["m3_min_drop"]
    else:
        direction = delta > 0 if DIRECTIONS[kind][cell["metric"]] == "greater" else delta < 0
    return bool(direction and cell["p_bh"] < rules["geometry_alpha"])


def decide_family(data: dict, kind: str, fam: dict) -> dict:
    """The pre-registered rules on one geometry of one seed: which cells fire, and G1/G2/G3."""
    rules, em_names, layers, methods = data["rules"], data["em_conditions"], data["layers"], data["methods"]
    cell_fires = [fires_in_direction(kind, c, rules) for c in fam["cells"]]
    n_layers_needed = math.ceil(rules["min_layer_fraction"] * len(layers))
    out = {"cell_fires": cell_fires, "n_cells": len(cell_fires), "n_firing": sum(cell_fires), "layers_needed": n_layers_needed}
    for metric in METRICS:
        per_cond = {}
        for cond in em_names:
            mine = [(c, f) for c, f in zip(fam["cells"], cell_fires, strict=True) if c["metric"] == metric and c["condition"] == cond]
            layers_fired = {m: sum(f for c, f in mine if c["method"] == m) for m in methods}
            fires_vs_base = all(n >= n_layers_needed for n in layers_fired.values())
            # the three-way bar (pre-registered): a firing condition x metric must ALSO separate from benign SFT
            # (EM-vs-benign BH p < 0.05) at a majority of layers, under each method, or it does not count
            beat = {(x["method"], x["layer"]) for x in fam["em_vs_benign"]
                    if x["metric"] == metric and x["condition"] == cond and x["p_bh"] < rules["contrast_alpha"]}
            layers_beating = {m: sum((m, layer) in beat for layer in layers) for m in methods}
            beats_benign = all(n > len(layers) / 2 for n in layers_beating.values())
            deltas = [c["delta"] for c, _ in mine]
            per_cond[cond] = {"fires": fires_vs_base and beats_benign, "fires_vs_base": fires_vs_base,
                              "layers_fired": layers_fired, "beats_benign": beats_benign, "layers_beating_benign": layers_beating,
                              "mean_delta": float(np.mean(deltas)) if np.all(np.isfinite(deltas)) else None}
        mean_deltas = [per_cond[c]["mean_delta"] if per_cond[c]["mean_delta"] is not None else math.nan for c in em_names]
        decision = {"metric": metric, "conditions": per_cond, "all_fire": all(v["fires"] for v in per_cond.values()),
                    "cos_monotone": monotone([c["cos_to_assistant"] for c in data["conditions"]], mean_deltas, rules)}
        decision["fires"] = bool(any(v["fires"] for v in per_cond.values()) and (decision["all_fire"] or decision["cos_monotone"]["fires"]))
        out[DECISIONS[metric]] = decision
    return out


def shift_status(data: dict, geo: dict, condition: str) -> dict:
    """Whether a shared shift of ``condition`` from base is measured at the headline layer under every method, and its
    size there (norm of the mean shift over base's spread)."""
    layer = data["headline_layer"]
    per_method = {m: geo["shift"][f"{m}/L{layer}"][condition] for m in data["methods"]}
    return {"measured": all(v["measured"] for v in per_method.values()),
            "ratio": {m: v["ratio"] for m, v in per_method.items()}, "p": {m: v["p"] for m, v in per_method.items()}}


def raw_only(data: dict, geo: dict, raw: dict, invariant: dict) -> list[dict]:
    """Every pre-registered geometry rule (and each condition's part of it) that holds on raw geometry but not on
    shift-invariant geometry, with whether a shared shift is measured for the conditions concerned: only then may the
    raw result be a shift that every persona shares. One entry per rule: ``decision`` (G1..G3), ``rule``,
    ``conditions`` (empty for a whole-decision rule) and ``shift_measured`` (for every condition concerned)."""
    out = []
    for name in ("G1", "G2", "G3"):
        d, c = raw[name], invariant[name]
        entries = [(rule, []) for rule, on_raw, on_inv in (("fires", d["fires"], c["fires"]), ("all conditions fire", d["all_fire"], c["all_fire"]),
                                                            ("cos-monotone", d["cos_monotone"]["fires"], c["cos_monotone"]["fires"]))
                   if on_raw and not on_inv]  # fmt: skip
        for rule, key in (("vs base", "fires_vs_base"), ("beats benign SFT", "beats_benign"), ("condition fires", "fires")):
            conds = [cond for cond, v in d["conditions"].items() if v[key] and not c["conditions"][cond][key]]
            if conds:
                entries.append((rule, conds))
        for rule, conds in entries:
            concerned = conds or data["em_conditions"]
            shifts = {cond: shift_status(data, geo, cond) for cond in concerned}
            out.append({"decision": name, "metric": d["metric"], "rule": rule, "conditions": conds,
                        "shift_measured": all(s["measured"] for s in shifts.values()),
                        "shift_measured_for": [cond for cond, s in shifts.items() if s["measured"]]})
    return out


def outcome(data: dict, fired: dict, raw_fam: dict, beh: dict | None) -> dict:
    """The pre-registered headline mapping and joint-null kill criterion (plan v2, sections 5-6), for one seed."""
    headlines = []
    if fired["G1"] and fired.get("H2"):
        headlines.append("EM induces general persona-vector collapse under all induction personas; mean bystander leakage is induction-invariant.")
    if fired["G1"] and fired.get("H3"):
        headlines.append("EM-induced collapse scales with the induction persona's cosine to the assistant; the same scaling shows behaviourally.")
    if fired.get("H1"):
        headlines.append("EM corrupts whichever persona was active during induction (induction-persona self-leakage).")
    if not any(fired.values()):
        headlines.append("No G or H fires: see the kill criterion.")
    kill = None
    if beh:  # every geometry cell BH p > 0.5; leakage range <= 5 pp and every mean <= 5 %; |rho| < 0.3 with p > 0.20
        means = [c["mean_bystander"] for c in beh["conditions"]]
        h3 = beh["H3"]
        kill = bool(
            all(c["p_bh"] > 0.5 for c in raw_fam["cells"])
            and beh["H2"]["range"] <= 0.05 and max(means) <= 0.05
            and (h3["rho"] is None or (abs(h3["rho"]) < 0.3 and h3["p"] > 0.20))
        )
    return {"fired": fired, "headlines": headlines, "joint_null_kill": kill}


def decisions(data: dict) -> dict:
    """The record's pre-registered rules on the results object: per seed (both geometries, H1/H2/H3, the headline
    mapping), pooled over seeds (``shared.analysis.stats.PooledDecision``: every seed must pass), and the effects the seed-level
    EM-vs-benign test licenses calling EM-specific (none with one seed)."""
    from shared.analysis.stats import PooledDecision

    rules = data["rules"]
    per_seed = {}
    for seed, result in data["per_seed"].items():
        geo, beh = result["geometry"], result["behaviour"]
        families = {kind: decide_family(data, kind, geo["families"][kind]) for kind in geo["families"]}
        fired = {name: families["raw"][name]["fires"] for name in ("G1", "G2", "G3")}
        if beh:
            fired |= {name: beh[name]["fires"] for name in ("H1", "H2", "H3")}
        per_seed[seed] = {"families": families, "fired": fired,
                          "raw_only": raw_only(data, geo, families["raw"], families["shift_invariant"]),
                          "outcome": outcome(data, fired, geo["families"]["raw"], beh)}
    pooled = {}
    names = list(next(iter(per_seed.values()))["fired"])
    for name in names:
        decision = PooledDecision({int(s): bool(v["fired"][name]) for s, v in per_seed.items()})
        pooled[name] = {"per_seed": {str(k): v for k, v in decision.per_seed.items()}, "passes": decision.passes,
                        "n_pass": decision.n_pass, "rule": decision.rule}
    for name in ("G1", "G2", "G3"):
        decision = PooledDecision({int(s): bool(v["families"]["shift_invariant"][name]["fires"]) for s, v in per_seed.items()})
        pooled[f"{name} (shift-invariant)"] = {"per_seed": {str(k): v for k, v in decision.per_seed.items()},
                                               "passes": decision.passes, "n_pass": decision.n_pass, "rule": decision.rule}
    level = data["seed_level"]
    em_specific = [r for r in level["rows"] if r["contrast"] == "em_vs_benign" and r["testable"] and r["p_bh"] < rules["contrast_alpha"]
                   and (r["geometry"] != "leakage" or r["estimate"] > 0)] if level["testable"] else []  # fmt: skip
    return {"per_seed": per_seed, "pooled": pooled, "pooled_headlines": pooled_headlines(per_seed),
            "em_specific": em_specific, "single_seed": not level["testable"]}


def pooled_headlines(per_seed: dict) -> list[str]:
    """The pre-registered headlines every seed reaches (the pooled mapping: all seeds must pass)."""
    lists = [set(v["outcome"]["headlines"]) for v in per_seed.values()]
    first = next(iter(per_seed.values()))["outcome"]["headlines"]
    return [h for h in first if all(h in other for other in lists)]


# --------------------------------------------------------------------------------------------- figures


GEOMETRY_PANELS = {
    "M1": "M1 mean off-diagonal raw cosine",
    "M2": "M2 mean abs cos to the E0 EM axis (non-assistant personas)",
    "M3": "M3 held-out LDA accuracy",
}
INVARIANT_ROWS = {
    "M1_dispersion": "M1 between-persona dispersion (shift-invariant)",
    "M2_centred": "M2 on vectors centred on the non-assistant mean (E0 axis)",
}


def seed_values(data: dict, key: str, metric: str, checkpoint: str) -> list[float]:
    """The checkpoint's value of ``metric`` at ``key`` (``method/Llayer``) in every seed (base: the same each time)."""
    return [seeds["geometry"]["values"][key][metric].get(checkpoint, np.nan) for seeds in data["per_seed"].values()]


def bars_with_seeds(ax, x, per_seed: list[list[float]], width, color, label):
    """Bars at the mean over seeds, each seed's value a dot on its bar."""
    means = [float(np.nanmean(v)) if np.any(np.isfinite(v)) else np.nan for v in per_seed]
    ax.bar(x, means, width=width, color=color, label=label)
    for xi, values in zip(x, per_seed, strict=True):
        if len(values) > 1:
            ax.scatter(np.full(len(values), xi), values, s=9, color="black", zorder=3)
    return means


def hero_figure(data: dict, uri: str) -> dict:
    """Top row: the three geometry metrics per checkpoint at the headline layer (both methods; bars: mean over seeds,
    dots: each seed); bottom row: behaviour per EM condition (mean bystander leakage beside the base and benign
    controls, H3's trend, H1's self vs bystander)."""
    from shared.analysis.figures import PALETTE, new_figure, save

    layer, ckpts = data["headline_layer"], data["checkpoints"]
    first = next(iter(data["per_seed"].values()))
    fig, _ = new_figure(13, 7)
    fig.clf()
    grid = fig.subplots(2, 3)
    width = 0.8 / len(data["methods"])
    for col, (metric, title) in enumerate(GEOMETRY_PANELS.items()):
        ax = grid[0, col]
        shown = []
        for mi, method in enumerate(data["methods"]):
            per_seed = [seed_values(data, f"{method}/L{layer}", metric, c) for c in ckpts]
            shown += [v for values in per_seed for v in values if np.isfinite(v)]
            bars_with_seeds(ax, np.arange(len(ckpts)) + mi * width, per_seed, width, PALETTE[mi], f"Method {method}")
        ax.set_xticks(np.arange(len(ckpts)) + 0.4 - width / 2, ckpts, fontsize=8)
        ax.set_title(f"{title} (L{layer})", fontsize=8)
        if metric != "M3" and shown:  # cosines of persona vectors sit close together: zoom onto their range
            spread = max(max(shown) - min(shown), 1e-4)
            ax.set_ylim(max(0.0, min(shown) - 0.5 * spread), min(1.0, max(shown) + 0.3 * spread))
    chance = first["geometry"]["m3_base"][f"{data['methods'][0]}/L{layer}"]["chance"]
    grid[0, 2].axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    for ax in grid[0]:
        ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    behaviours = [s["behaviour"] for s in data["per_seed"].values() if s["behaviour"]]
    if behaviours:
        conds = [c["cond"] for c in behaviours[0]["conditions"]]
        x = np.arange(len(conds))
        em = [[b["conditions"][i]["mean_bystander"] for b in behaviours] for i in range(len(conds))]
        bars_with_seeds(grid[1, 0], x - 0.27, em, 0.27, PALETTE[2], "EM condition")
        for k, control in enumerate(CONTROLS):
            values = [[b["conditions"][i]["controls"].get(control, np.nan) for b in behaviours] for i in range(len(conds))]
            bars_with_seeds(grid[1, 0], x + 0.27 * k, values, 0.27, PALETTE[4 + k], f"{control} (same bystanders)")
        grid[1, 0].set_xticks(x, conds)
        grid[1, 0].set_title("mean bystander leakage per EM condition, beside base and benign", fontsize=8)
        grid[1, 0].legend(fontsize=6, frameon=False)
        cos = [c["cos_to_assistant"] for c in behaviours[0]["conditions"]]
        for b, color in zip(behaviours, PALETTE, strict=False):
            grid[1, 1].scatter(cos, [c["mean_bystander"] for c in b["conditions"]], color=color, s=14)
        for c in behaviours[0]["conditions"]:
            grid[1, 1].annotate(c["cond"], (c["cos_to_assistant"], c["mean_bystander"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        grid[1, 1].set_xlabel("cos(induction persona, assistant)")
        grid[1, 1].set_title("H3: mean bystander leakage vs cos (one colour per seed)", fontsize=8)
        self_rates = [[b["conditions"][i]["per_persona"].get(b["conditions"][i]["persona"], np.nan) for b in behaviours] for i in range(len(conds))]
        bars_with_seeds(grid[1, 2], x, self_rates, 0.4, PALETTE[3], "induction persona")
        bars_with_seeds(grid[1, 2], x + 0.4, em, 0.4, PALETTE[2], "other bystanders")
        grid[1, 2].set_xticks(x + 0.2, conds)
        grid[1, 2].set_title("H1: induction persona vs other bystanders", fontsize=8)
        grid[1, 2].legend(fontsize=7, frameon=False)
        for ax in grid[1]:
            ax.set_ylabel(f"{data['marker']} rate", fontsize=8)
    else:
        for ax in grid[1]:
            ax.set_axis_off()
        grid[1, 1].text(0.5, 0.5, "no behavioural artifacts", ha="center")
    fig.tight_layout()
    return save(fig, uri)


def m1_bars_figure(data: dict, uri: str) -> dict:
    """Raw M1 of every checkpoint at every (method, layer): bars at the mean over seeds, a dot per seed."""
    from shared.analysis.figures import PALETTE, new_figure, save

    methods, layers, ckpts = data["methods"], data["layers"], data["checkpoints"]
    fig, _ = new_figure(2.6 * len(layers), 2.4 * len(methods))
    fig.clf()
    grid = np.atleast_2d(fig.subplots(len(methods), len(layers), squeeze=False))
    for mi, method in enumerate(methods):
        for li, layer in enumerate(layers):
            ax = grid[mi, li]
            per_seed = [seed_values(data, f"{method}/L{layer}", "M1", c) for c in ckpts]
            for i, values in enumerate(per_seed):
                bars_with_seeds(ax, [i], [values], 0.8, PALETTE[i % len(PALETTE)], None)
            shown = [v for values in per_seed for v in values]
            ax.set_xticks(range(len(ckpts)), ckpts, rotation=45, fontsize=7)
            spread = max(max(shown) - min(shown), 1e-4)  # raw cosines of a real model sit within a few thousandths of 1
            ax.set_ylim(max(-1.0, min(shown) - 0.5 * spread), min(1.0, max(shown) + 1.5 * spread))
            ax.set_title(f"Method {method}, L{layer}", fontsize=8)
    fig.suptitle("M1: mean off-diagonal raw persona cosine per checkpoint (bars: mean over seeds, dots: seeds; y zoomed)", fontsize=10)
    fig.tight_layout()
    return save(fig, uri)


def seeds_figure(data: dict, uri: str) -> dict:
    """Per-seed change from base at the headline layer of each EM condition and of benign SFT, for every metric of both
    geometries (methods side by side): the between-seed spread the seed-level tests use."""
    from shared.analysis.figures import PALETTE, new_figure, save

    layer = data["headline_layer"]
    panels = [("raw", "M1"), ("shift_invariant", "M1"), ("raw", "M2"), ("shift_invariant", "M2"), ("raw", "M3")]
    fig, _ = new_figure(7.5, 2.0 * len(panels))
    fig.clf()
    grid = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    names = [*data["em_conditions"], "benign"]
    offsets = np.linspace(-0.2, 0.2, len(data["methods"]))
    for ax, (kind, metric) in zip(grid, panels, strict=True):
        for mi, method in enumerate(data["methods"]):
            for i, name in enumerate(names):
                part = "benign_vs_base" if name == "benign" else "cells"
                values = [next(c["delta"] for c in s["geometry"]["families"][kind][part]
                               if (c["metric"], c["method"], c["layer"], c["condition"]) == (metric, method, layer, name))
                          for s in data["per_seed"].values()]
                ax.scatter(np.full(len(values), i + offsets[mi]), values, color=PALETTE[mi], s=14,
                           label=f"Method {method}" if i == 0 else None)
                if np.any(np.isfinite(values)):
                    ax.hlines(np.nanmean(values), i + offsets[mi] - 0.08, i + offsets[mi] + 0.08, color="black", linewidth=1)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"{metric} ({GEOMETRY_TITLES[kind]}), L{layer}: change from base", fontsize=8)
        ax.legend(fontsize=6, frameon=False)
    fig.suptitle("Change from base per training seed (dots) and its mean over seeds (line)", fontsize=9)
    fig.tight_layout()
    return save(fig, uri)


def shared_shift_figure(data: dict, seed: str, uri: str) -> dict:
    """One seed: M1 and M2 change from base at the headline layer per condition, raw beside shift-invariant, with
    bootstrap CIs (the two geometries' M1 are different statistics: mean cosine vs log dispersion ratio)."""
    from shared.analysis.figures import PALETTE, new_figure, save

    layer, methods = data["headline_layer"], data["methods"]
    conds = [*data["em_conditions"], "benign"]
    families = data["per_seed"][seed]["geometry"]["families"]
    fig, _ = new_figure(4.2 * len(methods), 5.6)
    fig.clf()
    grid = fig.subplots(2, len(methods), squeeze=False)
    for mi, method in enumerate(methods):
        for row, metric in enumerate(("M1", "M2")):
            ax = grid[row, mi]
            for k, kind in enumerate(("raw", "shift_invariant")):
                cells = {c["condition"]: c for c in families[kind]["cells"] + families[kind]["benign_vs_base"]
                         if (c["metric"], c["method"], c["layer"]) == (metric, method, layer)}
                x = np.arange(len(conds)) + (k - 0.5) * 0.38
                delta = np.array([cells[c]["delta"] for c in conds], dtype=float)
                low = np.array([cells[c].get("ci_low", np.nan) for c in conds], dtype=float)
                high = np.array([cells[c].get("ci_high", np.nan) for c in conds], dtype=float)
                ax.bar(x, delta, width=0.38, color=PALETTE[k], label=GEOMETRY_TITLES[kind])
                errors = np.nan_to_num(np.stack([delta - low, high - delta]), nan=0.0)
                ax.errorbar(x, delta, yerr=np.clip(errors, 0, None), fmt="none", ecolor="black", linewidth=0.8, capsize=2)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_xticks(np.arange(len(conds)), conds, fontsize=8)
            ax.set_title(f"{metric} change from base, Method {method}, L{layer}", fontsize=9)
            ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"Seed {seed}: raw vs shift-invariant geometry (bars: change from base; whiskers: {data['ci_level']:.0%} bootstrap CI over "
                 "questions; M1 shift-invariant = log dispersion ratio)", fontsize=8)
    fig.tight_layout()
    return save(fig, uri)


def cosine_matrix_figure(data: dict, seed: str, method: str, uri: str) -> dict:
    """One seed: persona-by-persona cosines of every checkpoint at the headline layer: raw (top), centred over
    personas (middle; the common component removed) and the centred change from base (bottom)."""
    from shared.analysis.figures import new_figure, save
    from shared.analysis.geometry import off_diagonal

    layer, ckpts, personas = data["headline_layer"], data["checkpoints"], data["personas"]
    matrices = data["per_seed"][seed]["geometry"]["cosine_matrices"][f"{method}/L{layer}"]
    mats = {c: {k: np.array(v) for k, v in m.items()} for c, m in matrices.items()}
    raw_low = min(off_diagonal(m["raw"]).min() for m in mats.values())
    change = {c: mats[c]["centred"] - mats["base"]["centred"] for c in ckpts}
    change_max = max(1e-6, max(np.abs(v).max() for v in change.values()))
    panels = [("raw cosine", lambda c: mats[c]["raw"], raw_low, 1.0, "viridis"),
              ("centred cosine", lambda c: mats[c]["centred"], -1.0, 1.0, "RdBu_r"),
              ("centred, change from base", lambda c: change[c], -change_max, change_max, "PuOr_r")]
    fig, _ = new_figure(1.9 * len(ckpts) + 1.5, 6.6)
    fig.clf()
    # fixed margins and one colour-bar axis per row: a layout engine costs more than the drawing here
    fig.subplots_adjust(left=0.09, right=0.9, bottom=0.16, top=0.9, wspace=0.08, hspace=0.12)
    grid = fig.subplots(len(panels), len(ckpts), squeeze=False)
    for row, (label, matrix_of, vmin, vmax, cmap) in enumerate(panels):
        for col, ckpt in enumerate(ckpts):
            ax = grid[row, col]
            ax.grid(False)
            image = ax.imshow(matrix_of(ckpt), vmin=vmin, vmax=vmax, cmap=cmap)
            ax.set_xticks(range(len(personas)), personas if row == len(panels) - 1 else [], rotation=90, fontsize=6)
            ax.set_yticks(range(len(personas)), personas if col == 0 else [], fontsize=6)
            if row == 0:
                ax.set_title(ckpt, fontsize=9)
        box = grid[row, -1].get_position()
        fig.colorbar(image, cax=fig.add_axes((0.915, box.y0, 0.012, box.height)), label=label)
    fig.suptitle(f"Seed {seed}: persona-by-persona cosine of the persona vectors, Method {method}, layer {layer}", fontsize=10)
    return save(fig, uri)


def leakage_heatmap(data: dict, uri: str) -> dict:
    """Marker rate per persona: a row per EM condition and seed, then the base and benign controls."""
    from matplotlib.patches import Rectangle

    from shared.analysis.figures import new_figure, save

    personas = data["personas"]
    rows, labels, own = [], [], []
    for seed, result in data["per_seed"].items():
        beh = result["behaviour"]
        if not beh:
            continue
        for c in beh["conditions"]:
            rows.append([c["per_persona"][p] for p in personas])
            labels.append(f"{c['cond']} s{seed}")
            own.append(c["persona"])
    matrix = np.array(rows)
    fig, ax = new_figure(1 + 0.7 * len(personas), 1 + 0.4 * len(rows))
    ax.grid(False)
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(personas)), personas, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for (r, col), value in np.ndenumerate(matrix):
        ax.text(col, r, f"{value:.2f}", ha="center", va="center", fontsize=5, color="white" if value < 0.5 else "black")
    for r, persona in enumerate(own):  # the condition's own induction persona (H1), where the grid has it
        if persona in personas:
            ax.add_patch(Rectangle((personas.index(persona) - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    fig.colorbar(image, ax=ax, label=f"{data['marker']} rate")
    ax.set_title("marker leakage per persona (rows: EM-induction condition and seed; red: its induction persona)", fontsize=9)
    return save(fig, uri)


def figures(data: dict, out, trainings: dict | None = None) -> list[str]:
    """Every figure of the report, drawn from the results object; ``out(name)`` gives a figure's URI prefix and
    ``trainings`` the per-step losses (``train_log.jsonl`` rows) by fine-tuning label. Returns the names drawn."""
    from shared.analysis.figures import training_loss_figure

    drawn = ["hero_issue205", "m1_bars", "seeds"]
    hero_figure(data, out("hero_issue205"))
    m1_bars_figure(data, out("m1_bars"))
    seeds_figure(data, out("seeds"))
    for seed in data["per_seed"]:
        shared_shift_figure(data, seed, out(f"shared_shift_s{seed}"))
        drawn.append(f"shared_shift_s{seed}")
    first = next(iter(data["per_seed"]))  # the matrices of the other seeds are summarised in the report's table
    for method in data["methods"]:
        cosine_matrix_figure(data, first, method, out(f"cosine_matrices_{method}_s{first}"))
        drawn.append(f"cosine_matrices_{method}_s{first}")
    if any(s["behaviour"] for s in data["per_seed"].values()):
        leakage_heatmap(data, out("leakage_heatmap"))
        drawn.append("leakage_heatmap")
    if trainings:
        training_loss_figure(trainings, out("lora_loss"), title="LoRA training loss per fine-tuning and seed")
        drawn.append("lora_loss")
    return drawn


# ---------------------------------------------------------------------------------------------- report


def short(text: str | None, limit: int = 240) -> str:
    """One line of at most ``limit`` characters, for quoting model text in a table."""
    text = " ".join((text or "").split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def p_text(p: float | None) -> str | None:
    return None if p is None or (isinstance(p, float) and math.isnan(p)) else f"{p:.4g}"


def with_ci(cell: dict, digits: int = 4) -> str | None:
    """A change and its bootstrap CI over questions, where the cell has one."""
    from shared.analysis.reporting import fmt

    if "ci_low" not in cell:
        return fmt(cell["delta"], digits)
    return f"{fmt(cell['delta'], digits)} [{fmt(cell['ci_low'], digits)}, {fmt(cell['ci_high'], digits)}]"


def per_seed_text(values: dict, digits: int = 4) -> str:
    return " / ".join(f"{v:.{digits}f}" if np.isfinite(v) else "—" for v in values.values())


def seeds_section(data: dict) -> list[str]:
    """How many training seeds, and what that licenses."""
    level, dec = data["seed_level"], data["decisions"]
    seeds = ", ".join(str(s) for s in data["seeds"])
    if dec["single_seed"]:
        return [f"**One training seed ({seeds}).** Every p-value in this report is conditional on one fine-tune per "
                "recipe: it says how surely this one EM fine-tune differs from this one base or benign model, not whether "
                "the EM recipe does. No effect here is called EM-specific; a second seed (`--set replicates=2`) makes the "
                "recipe-level tests below testable.", ""]
    return [f"**{level['n_seeds']} training seeds ({seeds}).** Every training cell and the chain on its checkpoint ran "
            "once per seed. Claims about a recipe (EM vs base, EM vs benign SFT) are tested with the seed as the unit "
            "(\"Recipe-level tests\"); the per-seed sections' p-values are each conditional on that seed's fine-tune, and "
            "the pre-registered rules are applied per seed and pooled (every seed must pass).", ""]


def layers_section(data: dict) -> list[str]:
    from shared.lm.activations import READOUTS

    tr = data["layer_translation"]
    lines = [f"Layer L is {data['layer_convention']}. {tr['rule']} Method A reads at `{tr['readout']['A']}`: "
             f"{READOUTS[tr['readout']['A']]}; Method B at `{tr['readout']['B']}`: {READOUTS[tr['readout']['B']]}.", ""]
    rows = [(r["record_layer"], r["platform_index"], r["evidence"]) for r in tr["rows"]]
    from shared.analysis.reporting import markdown_table

    if tr["matches_record"]:
        lines += ["This run extracted the record's layers:", "", markdown_table(["record layer", "platform index", "evidence"], rows, align="rrl"), ""]
    else:
        lines += [f"This profile extracts its own layers ({data['layers']}), chosen for its model; the record's layers "
                  f"translate to {[r['platform_index'] for r in tr['rows']]} on Qwen2.5-7B (the full profile).", ""]
    return lines


def headline_table(data: dict) -> tuple[list[str], list[list]]:
    """Rows: metric; columns: every checkpoint (base, E0..E4, benign); fine-tuned checkpoints show each seed's value."""
    from shared.analysis.reporting import fmt

    layer, ckpts = data["headline_layer"], data["checkpoints"]
    digits = {"M1": 4, "M2": 4, "M3": 3, "M1_dispersion": 4, "M2_centred": 4}
    rows = []
    for method in data["methods"]:
        key = f"{method}/L{layer}"
        for metric, title in {**GEOMETRY_PANELS, **INVARIANT_ROWS}.items():
            cells = []
            for c in ckpts:
                values = seed_values(data, key, metric, c)
                cells.append(fmt(values[0], digits[metric]) if c == "base" or len(values) == 1 else
                             " / ".join(fmt(v, digits[metric]) for v in values))
            rows.append([f"{title}, L{layer} {method}", *cells])
    behaviours = [s["behaviour"] for s in data["per_seed"].values()]
    if all(behaviours):
        by = [{c["cond"]: c for c in b["conditions"]} for b in behaviours]
        for label, field in (("mean bystander leakage", "mean_bystander"), ("source persona marker rate", "source_rate")):
            rows.append([label] + [" / ".join(f"{b[c][field]:.4f}" for b in by) if c in by[0] else None for c in ckpts])
        controls = {name: " / ".join(f"{b['conditions'][0]['controls'][name]:.4f}" for b in behaviours)
                    for name in CONTROLS if name in behaviours[0]["conditions"][0]["controls"]}
        if controls:
            rows.append([f"mean leakage of the controls over {data['em_conditions'][0]}'s bystanders"] +
                        [controls.get(c) for c in ckpts])
    return ["metric", *ckpts], rows


def recipe_section(data: dict) -> list[str]:
    """The seed-level contrasts at the headline layer (every cell is in headline.json)."""
    from shared.analysis.reporting import markdown_table

    level, layer = data["seed_level"], data["headline_layer"]
    lines = ["## Recipe-level tests (the training seed as the unit)", ""]
    if not level["testable"]:
        return lines + ["Not testable with one seed: the between-seed spread is unknown. The per-seed changes are in "
                        "headline.json (`seed_level`).", ""]
    lines += [f"Each fine-tuned checkpoint's change from base, per seed ({', '.join(str(s) for s in level['seeds'])}), its mean "
              "and between-seed SD; EM vs base is a one-sample t over the seeds' changes (the base model has no seed), EM vs "
              "benign SFT a two-sample t over seeds (one-sided in the metric's pre-registered direction), leakage two-sample "
              f"against the base and benign models coupled and evaluated per seed. BH-FDR over each family. Layer {layer}; "
              "both geometries (raw M1 = mean cosine, shift-invariant M1 = log dispersion ratio).", ""]
    vs_benign = {(r["geometry"], r["metric"], r["method"], r["layer"], r["condition"]): r for r in level["rows"]
                 if r["contrast"] == "em_vs_benign"}
    table = []
    for r in level["rows"]:
        if r["contrast"] != "em_vs_base" or r["layer"] not in (layer, None):
            continue
        b = vs_benign.get((r["geometry"], r["metric"], r["method"], r["layer"], r["condition"]))
        table.append((GEOMETRY_TITLES.get(r["geometry"], r["geometry"]), r["metric"], r["method"] or "—", r["condition"],
                      per_seed_text(r["per_seed"]), f"{r['estimate']:.4f}", f"{r['sd']:.4f}", p_text(r["p"]), p_text(r["p_bh"]),
                      per_seed_text(b["reference_per_seed"]) if b else None, f"{b['estimate']:.4f}" if b else None,
                      p_text(b["p"]) if b else None, p_text(b["p_bh"]) if b else None))  # fmt: skip
    lines += [markdown_table(["geometry", "metric", "method", "cond", "change per seed", "mean", "SD", "p vs base", "BH",
                              "benign per seed", "EM - benign", "p vs benign", "BH"], table, align="lllllrrrrlrrr"), ""]
    leak_base = [r for r in level["rows"] if r["geometry"] == "leakage" and r["contrast"] == "em_vs_base"]
    if leak_base:
        lines += ["Leakage vs the base model (two-sample over seeds): " + "; ".join(
            f"{r['condition']} {r['estimate']:+.4f} (EM {per_seed_text(r['per_seed'])} vs base {per_seed_text(r['reference_per_seed'])}, "
            f"p = {p_text(r['p'])}, BH {p_text(r['p_bh'])})" for r in leak_base) + ".", ""]
    specific = data["decisions"]["em_specific"]
    lines += ["EM-specific at the recipe level (EM vs benign BH p < "
              f"{data['rules']['contrast_alpha']} with seeds as units): " +
              ("; ".join(f"{r['metric']} {r['geometry']} {r['method'] or ''} L{r['layer'] or ''} {r['condition']}" for r in specific)
               if specific else "none") + ".", "", "![changes per seed](seeds.png)", ""]
    return lines


def limits_section(data: dict) -> list[str]:
    """Each metric's null size and smallest attainable p, what BH and Holm can reach, G1's bar, H3's floor."""
    from shared.analysis.reporting import markdown_table

    limits, rules = data["test_limits"], data["rules"]
    rows = []
    for family, f in limits["families"].items():
        for metric, m in f["metrics"].items():
            null = f"{m['n_null']} {'(every pattern)' if m['exact'] else 'draws'}"
            rows.append((family, metric, null, m["n_units"], m["alternative"], f"{m['smallest_p']:.4g}",
                         f"{m['bh_best']:.4g}", f"{m['holm_best']:.4g}"))
    lines = ["## What the tests can and cannot reach", "",
             "Null size (permutations: every one of them where that is no more than the draws asked for), units permuted, "
             "the smallest p each metric's test can return (its floor: no data go below it), and the best adjusted p a cell "
             "of the metric can reach under BH-FDR and Holm over its family (every cell at its floor):", "",
             markdown_table(["family", "metric", "null", "units", "alternative", "smallest p", "best BH p", "best Holm p"], rows,
                            align="lllrllll"), ""]
    for family, f in limits["families"].items():
        lines.append(f"- {family}: {f['m']} cells at alpha {f['alpha']}: BH " + ("can reject" if f["bh_reachable"] else
                     "**cannot reject here by construction**") + "; Holm " + ("can reject." if f["holm_reachable"] else
                     "**cannot reject here by construction**."))
    g1 = limits["g1_bar"]
    lines += ["", f"G1's bar (M1 vs base, BH p < {g1['alpha']}) at {g1['n_personas']} personas: the persona-level M1 null's "
              f"smallest p is {g1['m1_smallest_p']:.4g}, and the best BH-adjusted M1 p over the family is {g1['bh_best']:.4g}: "
              "the bar is " + ("reachable." if g1["reachable"] else "**out of reach whatever the data**.")]
    sp = limits["spearman"]
    if "smallest_p" in sp:
        rho = sp["min_abs_rho_below_alpha"]
        lines.append(f"H3 and the cos-monotone rules use the exact Spearman test over {sp['n_orderings']} orderings of "
                     f"{sp['n']} conditions: its smallest two-sided p is {sp['smallest_p']:.4g}, and p < {sp['alpha']} needs "
                     + (f"|rho| >= {rho:.3f}" if rho is not None else "more conditions than this (no rho reaches it)")
                     + "".join(f"; |rho| = {k} gives p = {v:.4g}" for k, v in sp["p_at"].items() if 0.85 < float(k) < 0.95) + ".")
    lines += [f"H2 is decided by an equivalence test (TOST over questions, every pair of conditions within +-{rules['h2_max_range']}, "
              f"alpha {rules['h2_equivalence_alpha']}); the record's own rule (range <= {rules['h2_max_range']} and a difference "
              f"test's p > {rules['h2_alpha']}) is printed beside it and is not an equivalence test: a large p is absence of evidence.", ""]
    if data["seed_level"]["testable"]:
        df = data["seed_level"]["df"]
        lines += [f"The recipe-level t-tests have {df['em_vs_base']:.0f} degree(s) of freedom against the base model and "
                  f"{df['em_vs_benign']:.0f} against benign SFT: with few seeds only large, consistent effects reach significance.", ""]
    return lines


def decision_lines(data: dict, seed: str) -> list[str]:
    from shared.analysis.reporting import fmt

    rules = data["rules"]
    d = data["decisions"]["per_seed"][seed]
    beh = data["per_seed"][seed]["behaviour"]
    lines = []
    for kind in ("raw", "shift_invariant"):
        fam = d["families"][kind]
        for name in ("G1", "G2", "G3"):
            g = fam[name]
            vs_base = [c for c, v in g["conditions"].items() if v["fires_vs_base"]]
            beats = [c for c, v in g["conditions"].items() if v["beats_benign"]]
            fired = [c for c, v in g["conditions"].items() if v["fires"]]
            mono = g["cos_monotone"]
            lines.append(f"- **{name}** ({g['metric']}, {GEOMETRY_TITLES[kind]}): {'FIRES' if g['fires'] else 'does not fire'}. "
                         f"vs base (BH p < {rules['geometry_alpha']} in the pre-registered direction under both methods at >= "
                         f"{fam['layers_needed']} of {len(data['layers'])} layers): {', '.join(vs_base) or 'none'}; beat benign SFT "
                         f"(EM-vs-benign BH p < {rules['contrast_alpha']} at a majority of layers, both methods): "
                         f"{', '.join(beats) or 'none'}; firing (both bars): {', '.join(fired) or 'none'}; all fire: {g['all_fire']}; "
                         f"cos-monotone rho = {fmt(mono['rho'])}, exact p = {fmt(mono['p'], 3)}.")
    if beh:
        h1, h2, h3 = beh["H1"], beh["H2"], beh["H3"]
        w = h2["as_written"]
        lines += [
            f"- **H1** (induction-self-leakage): {'FIRES' if h1['fires'] else 'does not fire'}: {h1['fired']}/{h1['testable']} "
            f"testable conditions fire (needs {h1['needed']}; {h1['rule']}).",
            f"- **H2** (induction-invariant, equivalence): {'FIRES (equivalence shown)' if h2['fires'] else 'does not fire (equivalence not shown)'}: "
            f"range {h2['range']:.4f}; TOST p = {h2['p']:.4g} over {h2['n_questions']} questions, the least equivalent pair "
            + (f"{h2['worst_pair'][0]}-{h2['worst_pair'][1]} differs by {h2['worst_pair_interval'][0]:+.4f} "
               f"[{h2['worst_pair_interval'][1]:+.4f}, {h2['worst_pair_interval'][2]:+.4f}] ({h2['rule']}). "
               if h2["worst_pair"] else f"({h2['rule']}). ")
            + f"The record's rule as written ({w['rule']}; not an equivalence test) {'holds' if w['holds'] else 'does not hold'}: "
            f"range {w['range']:.4f}, p = {w['p']:.4g}.",
            f"- **H3** (cos-monotone): {'FIRES' if h3['fires'] else 'does not fire'}: Spearman rho = {fmt(h3['rho'], 3)}, exact "
            f"p = {fmt(h3['p'], 4)} over {h3['n_orderings']} orderings ({h3['rule']}){'; ' + h3['note'] if 'note' in h3 else ''}.",
        ]
    else:
        lines.append("- H1/H2/H3: no behavioural artifacts were given.")
    out = d["outcome"]
    lines += ["", "Pre-registered headline(s): " + (" ".join(out["headlines"]) or "none of the mapped combinations."),
              f"Joint-null kill criterion met: {fmt(out['joint_null_kill'])}."]
    return lines


def decisions_section(data: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    dec = data["decisions"]
    lines = ["## Decision rules (as pre-registered), per seed and pooled", ""]
    for seed in data["per_seed"]:
        lines += [f"### Seed {seed}", ""] + decision_lines(data, seed) + [""]
        uninformative = [k for k, v in data["per_seed"][seed]["geometry"]["m3_base"].items() if not v["above_chance"]]
        if uninformative:
            lines += [f"**M3 uninformative** where the base model's held-out accuracy is not above chance (p >= 0.05): "
                      f"{', '.join(uninformative)}.", ""]
    rows = [(name, ", ".join(f"s{s}: {'pass' if v else 'fail'}" for s, v in p["per_seed"].items()), f"{p['n_pass']}/{len(p['per_seed'])}",
             "PASSES" if p["passes"] else "does not pass", p["rule"]) for name, p in dec["pooled"].items()]
    lines += ["### Pooled over seeds", "", markdown_table(["decision", "per seed", "seeds passing", "pooled", "pooling rule"], rows,
                                                         align="lllll"), "",
              "Pre-registered headline(s) every seed reaches: " + (" ".join(dec["pooled_headlines"]) or "none") + ".", ""]
    return lines


def shared_shift_section(data: dict) -> list[str]:
    """Raw beside shift-invariant M1/M2 at the headline layer, with CIs, the measured shift, and the rules that hold
    on raw geometry only."""
    from shared.analysis.reporting import markdown_table

    layer = data["headline_layer"]
    lines = ["## Geometry that a shared shift cannot fake", "",
             "A fine-tuning that adds one offset to every persona's vector raises raw M1 and M2 towards 1 without changing "
             "how the personas relate. The shift-invariant family replaces them by statistics such an offset cannot move and "
             "that are not pinned: M1 is the change in the between-persona dispersion (log of the ratio of the mean squared "
             "distance from the persona mean; negative = the personas contracted towards each other, tested by swapping "
             "whole personas' centred vectors between the two checkpoints), M2 is measured on vectors centred on the "
             "non-assistant personas' mean (so an assistant that moves on its own moves no other centred vector), M3 is the "
             "same. Beside them the mean shift itself: its norm over base's spread, and a sign-flip test over questions of "
             "whether there is one. (The mean off-diagonal cosine of vectors centred on their mean is pinned near -1/(p-1) "
             f"= {data['pinned_centred_m1']:.4f} whatever the data, so it is no test.)", ""]
    for seed, result in data["per_seed"].items():
        geo = result["geometry"]

        def vs_base(kind: str, geo=geo) -> dict:
            fam = geo["families"][kind]
            return {(c["metric"], c["method"], c["condition"]): c for c in fam["cells"] + fam["benign_vs_base"]
                    if c["layer"] == layer and c["metric"] in ("M1", "M2")}

        raw_cells, inv_cells = vs_base("raw"), vs_base("shift_invariant")
        n_boot = next((c["n_boot"] for c in raw_cells.values() if "n_boot" in c), None)
        rows = []
        for (m, method, cond), c in sorted(raw_cells.items()):
            s = geo["shift"][f"{method}/L{layer}"][cond]
            inv = inv_cells[(m, method, cond)]
            rows.append((m, method, cond, with_ci(c), p_text(c["p_bh"]), with_ci(inv), p_text(inv["p_bh"]),
                         f"{s['ratio']:.3f}", p_text(s["p"])))
        ci = f"{data['ci_level']:.0%}"
        lines += [f"### Seed {seed}", "", f"Changes from base at layer {layer}" +
                  (f", with {ci} bootstrap CIs over questions ({n_boot} resamples)" if n_boot else "") + ":", "",
                  markdown_table(["metric", "method", "cond", f"raw change [{ci} CI]", "raw p BH", f"shift-invariant change [{ci} CI]",
                                  "p BH", "mean shift / base spread", "shift p"], rows, align="lllrrrrrr"), "",
                  "Length of the shift-invariant E0 axis (the assistant's E0 shift minus the non-assistant personas' mean "
                  "shift) over the raw one; 0 would mean the assistant moved only as they did: " +
                  ", ".join(f"{k} {v:.3f}" for k, v in geo["centred_axis_ratio"].items() if k.endswith(f"/L{layer}")) + ".", ""]
        entries = data["decisions"]["per_seed"][seed]["raw_only"]
        if entries:
            lines += ["Rules that hold on raw geometry but not on shift-invariant geometry:", ""]
            for r in entries:
                where = f" for {', '.join(r['conditions'])}" if r["conditions"] else ""
                if r["shift_measured"]:
                    why = ("a shared shift is measured for every condition concerned at the headline layer, so the raw result "
                           "may be a shift that every persona shares")
                elif r["shift_measured_for"]:
                    why = f"a shared shift is measured only for {', '.join(r['shift_measured_for'])}"
                else:
                    why = "no shared shift is measured, so it is not a shift: the two statistics disagree on something else"
                lines.append(f"- **{r['decision']}** ({r['metric']}) {r['rule']}{where}: holds on raw geometry, not on "
                             f"shift-invariant geometry; {why}.")
        else:
            lines.append("Every rule that holds on raw geometry also holds on shift-invariant geometry.")
        lines += ["", f"![raw vs shift-invariant, seed {seed}](shared_shift_s{seed}.png)", ""]
    return lines


def cosine_section(data: dict) -> list[str]:
    """The persona-by-persona cosine figures and how far each checkpoint's centred pattern moved from base's."""
    from shared.analysis.reporting import markdown_table

    layer, ckpts = data["headline_layer"], data["checkpoints"]
    lines = ["## Persona-by-persona cosine matrices", "",
             f"Layer {layer}. A real model's persona centroids share a large common component, so their raw cosines sit close "
             "to 1 (top row of each figure; the pre-registered M1 is their mean) and move only in the last decimals. The "
             "middle row subtracts each checkpoint's mean persona vector before the cosine and shows the pattern between "
             "personas (read the pattern: its mean is pinned); the bottom row is each checkpoint's centred matrix minus base's.", ""]
    for seed, result in data["per_seed"].items():
        summary = result["geometry"]["cosine_summary"]
        rows = []
        for method in data["methods"]:
            s = summary[f"{method}/L{layer}"]
            rows.append([f"Method {method}: mean raw off-diagonal cosine"] + [f"{s[c]['raw_mean']:.4f}" for c in ckpts])
            rows.append([f"Method {method}: mean abs change of centred cosines from base"] + [f"{s[c]['centred_change']:.4f}" for c in ckpts])
        lines += [f"Seed {seed}:", "", markdown_table(["", *ckpts], rows), ""]
    seed = data["seeds"][0]
    lines += [f"![cosine matrices, Method {m}, seed {seed}](cosine_matrices_{m}_s{seed}.png)" for m in data["methods"]]
    return lines + [""]


def finetuning_section(data: dict) -> list[str]:
    """What each fine-tuning trained on and did: losses, the first rows, the EM source persona's pull, greedy replies."""
    from shared.analysis.reporting import markdown_table

    lines, layer, source = [], data["headline_layer"], data["em_source_persona"]
    first = next(iter(data["per_seed"].values()))
    induced = first["geometry"]["induced_persona"]
    if not (data["trainings"] or induced or data["sample_replies"]):
        return lines
    lines += ["## What the fine-tuning did", ""]
    if data["trainings"]:
        t = data["trainings"]
        lines += ["Each fine-tuning's training rows (all under one system slot), its optimizer steps, and its mean training "
                  "loss over its first and over its last `window` steps.", "",
                  markdown_table(["checkpoint", "seed", "system slot", "rows", "steps", "window", "loss, first steps", "loss, last steps"],
                                 [(x["name"], x["seed"], short(x["system"], 60), x["rows"], x["steps"], x["window"], f"{x['loss_start']:.3f}",
                                   f"{x['loss_end']:.3f}") for x in t], align="lllrrrrr"),
                  "", "The first training row of each (the reply as trained, shortened here). Where the EM data are the model's "
                  "own answers, the EM and benign sets answer the same questions with the same sampling seeds, so their replies "
                  "start alike wherever the two personas' next-token distributions agree:", ""]  # fmt: skip
        seen = set()
        for x in t:
            if x["name"] not in seen:
                seen.add(x["name"])
                lines.append(f"- {x['name']}: *{short(x['first_row']['user'], 120)}* → {short(x['first_row']['assistant'])}")
        lines += ["", "![LoRA training loss per fine-tuning](lora_loss.png)", ""]
    if induced:
        lines += [f"Is the persona that wrote the EM data (`{source}`) induced into the weights? Centred cosine (layer {layer}, "
                  f"seed {data['seeds'][0]}) between each condition's induction persona and `{source}` in base, in that "
                  "condition's EM checkpoint and in benign SFT; a positive EM - base means EM training moved the induction "
                  "persona towards the EM source. E0's induction persona is the assistant: it trained under the template's "
                  "default system prompt and is read under the grid's explicit assistant prompt.", "",
                  markdown_table(["method", "cond", "induction persona", "base", "EM", "benign", "EM - base"],
                                 [(method, cond, v["persona"], f"{v['base']:.3f}", f"{v['em']:.3f}", f"{v['benign']:.3f}",
                                   f"{v['em_minus_base']:+.3f}")
                                  for method in data["methods"] for cond, v in induced[f"{method}/L{layer}"].items()],
                                 align="lllrrrr"), ""]  # fmt: skip
    if data["sample_replies"]:
        question = data["sample_replies"][0]["question_id"]
        lines += [f"Greedy replies (Method B's, seed {data['seeds'][0]}) to extraction question `{question}`, before and after "
                  "fine-tuning:", "",
                  markdown_table(["checkpoint", "persona", "base", "fine-tuned"],
                                 [(r["checkpoint"], r["persona"], short(r["base"], 200), short(r["tuned"], 200) if r["tuned"] is not None else "(the EM source, base model)")
                                  for r in data["sample_replies"]], align="llll"), ""]  # fmt: skip
    return lines


def h1_cells(row: dict) -> tuple:
    """H1 excess and p of one condition, or dashes where its induction persona is not in the grid."""
    h1 = row.get("h1")
    return (f"{h1['excess']:.4f}", p_text(h1["p"]), h1["fires"]) if h1 else (None, None, "untestable")


def behaviour_section(data: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    lines = []
    for seed, result in data["per_seed"].items():
        beh = result["behaviour"]
        if not beh:
            continue
        controls = [name for name in CONTROLS if name in beh["conditions"][0]["controls"]]
        lines += [f"## Behaviour per condition, seed {seed}", "",
                  markdown_table(["cond", "persona", "cos to assistant", "mean bystander", *[f"{c} (same bystanders)" for c in controls],
                                  "source rate", "H1 excess", "H1 p", "H1 fires"],
                                 [(c["cond"], c["persona"], f"{c['cos_to_assistant']:.4f}", f"{c['mean_bystander']:.4f}",
                                   *[f"{c['controls'][k]:.4f}" for k in controls], f"{c['source_rate']:.4f}", *h1_cells(c))
                                  for c in beh["conditions"]]),
                  "", f"{beh['completions_per_cell']} completions per (persona, question); {len(beh['questions'])} questions. "
                  "The controls are the base model and benign SFT with the same confab + marker coupling on top, evaluated on "
                  "the same grid; their column is their mean leakage over that condition's bystanders.", ""]  # fmt: skip
    if lines:
        lines += ["![leakage](leakage_heatmap.png)", ""]
        first = next(s for s in data["per_seed"].values() if s["behaviour"])["behaviour"]
        lines += ["## Sample outputs", "", f"The first stored bystander completions that carry the marker, per condition (seed "
                  f"{data['seeds'][0]}):", ""]
        for c in first["conditions"]:
            for sample in c["samples"] or [{"persona": "—", "question_id": "—", "text": "(no bystander completion carries the marker)"}]:
                lines.append(f"- {c['cond']} / {sample['persona']} / {sample['question_id']}: {sample['text'].replace(chr(10), ' ')[:300]}")
        lines.append("")
    return lines


def three_way_section(data: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    layer = data["headline_layer"]
    lines = ["## EM vs benign SFT (three-way contrast), per seed", "",
             f"Shift from base at layer {layer}: EM vs benign SFT, the benign share of the EM shift (where both move the same "
             "way), and the one-sided EM-vs-benign test (BH-FDR over its own family). Within one seed this compares one EM "
             "fine-tune with one benign fine-tune; the recipe-level test is above.", ""]
    for seed, result in data["per_seed"].items():
        rows = [(GEOMETRY_TITLES[kind], r["metric"], r["method"], r["condition"], f"{r['em_shift']:.4f}", f"{r['benign_shift']:.4f}",
                 f"{r['benign_share']:.0%}" if r["benign_share"] is not None else None, p_text(r["p_bh"]))
                for kind, kind_rows in result["geometry"]["three_way"].items() for r in kind_rows]
        lines += [f"Seed {seed}:", "", markdown_table(["geometry", "metric", "method", "cond", "EM shift", "benign shift",
                                                       "benign / EM", "p BH (EM vs benign)"], rows, align="llllrrrr"), ""]
    return lines


def robustness_section(data: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    layer = data["headline_layer"]
    lines = ["## M2 robustness (per-condition axes)", "",
             f"Change from base of the mean |cos| of the non-assistant personas to three axes at layer {layer}: the E0-anchored "
             "EM axis (primary, tested above), the condition's own assistant delta and PC-1 of its own persona shifts "
             "(descriptive, outside the family).", ""]
    for seed, result in data["per_seed"].items():
        geo = result["geometry"]
        primary = {(c["method"], c["condition"]): c["delta"] for c in geo["families"]["raw"]["cells"] if c["metric"] == "M2" and c["layer"] == layer}
        robust = geo["m2_robustness"]
        rows = [(method, cond, f"{primary[(method, cond)]:.4f}", f"{robust['own_assistant_delta'][f'{method}/L{layer}'][cond]:.4f}",
                 f"{robust['own_pc1'][f'{method}/L{layer}'][cond]:.4f}") for method in data["methods"] for cond in data["em_conditions"]]
        lines += [f"Seed {seed}:", "", markdown_table(["method", "cond", "E0 axis", "own assistant delta", "own PC-1"], rows, align="llrrr"), ""]
    return lines


def family_section(data: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    lines = ["## Geometry family (raw, per seed)", ""]
    for seed, result in data["per_seed"].items():
        cells = result["geometry"]["families"]["raw"]["cells"]
        decided = data["decisions"]["per_seed"][seed]["families"]["raw"]
        fires = decided["cell_fires"]
        lines += [f"Seed {seed}: {decided['n_cells']} cells (metrics x methods x layers x EM conditions); {decided['n_firing']} fire. BH-FDR is primary, "
                  "Holm alongside; every cell of both geometries, with raw, BH and Holm p, is in headline.json.", "",
                  markdown_table(["metric", "method", "layer", "cond", "delta", "p raw", "p BH", "p Holm", "fires"],
                                 [(c["metric"], c["method"], c["layer"], c["condition"], f"{c['delta']:.4f}", f"{c['p_value']:.4g}",
                                   f"{c['p_bh']:.4g}", f"{c['p_holm']:.4g}", f) for c, f in zip(cells, fires, strict=True)], align="llllrrrrl"),
                  "", "Method B retained fraction of questions per persona after the paired empty-reply filter: " +
                  ", ".join(f"{p} {f:.2f}" for p, f in result["geometry"]["paired_retained"].get("B", {}).items()), ""]  # fmt: skip
    return lines + ["![M1 bars](m1_bars.png)", ""]


def report(data: dict) -> str:
    """The report text, printed from the results object (``results`` + ``decisions``) and nothing else."""
    from shared.analysis.reporting import markdown_table

    headers, rows = headline_table(data)
    lines = ["# #205: EM-induction persona vs persona geometry and marker leakage", "",
             f"Checkpoints: {', '.join(data['checkpoints'])}; training seeds {', '.join(str(s) for s in data['seeds'])}. Methods "
             f"{', '.join(data['methods'])}; layers {data['layers']} (headline layer {data['headline_layer']}). Permutation draws "
             f"asked for: {data['n_iter']} (M3's contrasts: {data['m3_contrast_iter']}); the nulls' actual sizes and floors are "
             "under \"What the tests can and cannot reach\".", ""]
    lines += seeds_section(data) + layers_section(data)
    lines += ["## Headline", "", "Fine-tuned checkpoints show one value per seed (seed order as above).", "",
              markdown_table(headers, rows), "", "![hero](hero_issue205.png)", ""]
    lines += recipe_section(data) + limits_section(data) + decisions_section(data) + shared_shift_section(data)
    lines += cosine_section(data) + finetuning_section(data) + behaviour_section(data) + three_way_section(data)
    lines += robustness_section(data) + family_section(data)
    return "\n".join(lines)


REPRODUCES = """## What reproduces bitwise, and what only in distribution

- **Bitwise:** this analysis, given the stored artifacts it read (their sha256 are in the stages' manifests): every
  permutation, bootstrap and swap draw is seeded by the config's `seed`, so the same inputs give the same
  headline.json, report and figures. The plan and every task's cache key are deterministic too.
- **Bitwise on the same hardware, batch sizes and thread count:** the tiny and small profiles' training and sampling
  on a CPU (seeded LoRA initialisation, data order and sampling; another thread count reorders float reductions).
- **Only in distribution:** sampling (the EM/benign answers of small, the coupling data, the marker evaluation, Method
  B's replies in bf16) depends on batch sizes, padding and kernels, so another batch size draws other completions
  from the same distribution; bf16 GPU kernels are not deterministic, so GPU training and extraction reproduce only to
  rounding, and what rounding moves downstream. A new training seed is a new draw of the recipe: that spread is what
  the recipe-level tests measure.
"""


def run(cfg: Config, ctx) -> dict:
    from shared.analysis.reporting import producing_manifest, reproducibility

    per_seed_acts = load_activations(cfg)
    first = next(iter(per_seed_acts.values()))
    for seed, acts in per_seed_acts.items():
        for method in acts.methods:
            low = [p for p, f in acts.retained(method).items() if f < cfg.rules.min_paired_fraction]
            if low:
                ctx.log(f"warning: seed {seed}, method {method}: personas {low} keep < {cfg.rules.min_paired_fraction:.0%} "
                        "of questions after the paired filter")
    check_personas(cfg, first.personas)  # before the marker rows are read
    leakage = load_leakage(cfg, first.personas)
    replies = sample_replies(cfg, seed_checkpoints(cfg)[cfg.training_seeds()[0]], first.personas, first.questions)
    data = results(cfg, per_seed_acts, leakage, training_summary(cfg), replies)
    data["decisions"] = decisions(data)
    store.write_json(ctx.out("headline.json"), data)
    losses = {f"{t.name} s{t.seed}" if t.seed is not None else t.name: store.read_jsonl(t.log_uri) for t in cfg.trainings}
    figures(data, ctx.out, losses)
    store.write_text(ctx.out("report.md"), report(data))
    upstream = [producing_manifest(c.activations_uri) for c in cfg.checkpoints]
    upstream += [producing_manifest(m.marker_uri) for m in cfg.markers]
    upstream += [producing_manifest(t.log_uri) for t in cfg.trainings]
    unique = {(m["cell"], m["stage"]): m for m in upstream}
    store.write_text(ctx.out("REPRODUCIBILITY.md"), reproducibility("#205", cfg.params, list(unique.values())) + "\n" + REPRODUCES)
    fired = data["decisions"]["pooled"]
    return {"seeds": len(data["seeds"]), **{f"pooled_{k}": v["passes"] for k, v in fired.items() if " " not in k},
            "geometry_cells_firing": sum(d["families"]["raw"]["n_firing"] for d in data["decisions"]["per_seed"].values())}


SPEC = StageSpec(
    name="analyze_issue205", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=8, memory="32Gi", timeout_s=3 * 3600),
    description="#205 statistics per seed and with the seed as the unit (M1/M2/M3 raw and shift-invariant, H1/H2/H3, "
                "BH-FDR + Holm), decisions, figures and report from stored activations and marker rows.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
