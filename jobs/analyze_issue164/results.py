"""Part 1 of ``analyze_issue164``: the stage's config (the artifacts it reads) and the results object, every
number read and recomputed from those stored artifacts."""

from __future__ import annotations

import json
from importlib import resources
from typing import Literal

import numpy as np
from pydantic import BaseModel

from shared.contract.stage import StageInputError
from shared.core import store
from shared.core.config import StageConfig
from shared.judge.spec import JudgeSpec

REFERENCE_FILE = "issue164/reference_points.json"
SAMPLE_CHARS = 280  # how much of one sample answer per condition the report quotes
N_BOOT = 2_000
STRONG_ACCURACY = 0.8  # a held-out accuracy below this is reported as a weak classifier
N_LOWEST = 3  # lowest-scored answers shown per condition and judge


class ConditionArtifacts(BaseModel):
    name: str
    system: str
    c_scores_uri: str
    judge_scores_uris: dict[str, str]
    # "em_reference": the EM reference model itself on the evaluation panel, a measured point rather than a condition
    role: Literal["condition", "em_reference"] = "condition"
    completions_uri: str | None = None
    coherence_scores_uri: str | None = None  # the coherence pass over the same completions (for the EM rate)


class Config(StageConfig):
    conditions: list[ConditionArtifacts]
    primary_judge: str
    alternate_judge: str
    classifier_uri: str
    judge_check_uris: dict[str, str] = {}  # judge name -> check.json of the judge_check stage
    coherence_check_uri: str | None = None  # check.json of the coherence judge's judge_check stage
    coherence_judge: str | None = None  # the name of the coherence pass (None: no EM rate)
    judges: dict[str, JudgeSpec] = {}  # every judge's spec by name: the report names their templates
    profile: str = ""
    params: dict = {}


def reference_points() -> dict:
    return json.loads(resources.files("shared.data").joinpath(REFERENCE_FILE).read_text())


def question_bootstrap_ci(question_ids: list[str], values: list[float], *, seed: int,
                          n_boot: int = N_BOOT) -> list[float] | None:
    """95% CI of the mean of ``values`` by resampling whole questions (a question's completions share its prompt)."""
    from shared.analysis.stats import cluster_bootstrap_ci

    if not values:
        return None
    ci = cluster_bootstrap_ci(question_ids, values, n_boot=n_boot, rng=seed)
    return [ci.low, ci.high]


def c_of(c_scores_uri: str, seed: int = 0) -> dict:
    rows = store.read_jsonl(c_scores_uri)
    if not rows:
        raise StageInputError(f"no classifier scores in {c_scores_uri}")
    values = [r["c"] for r in rows]
    return {"c": float(np.mean(values)), "n": len(values),
            "c_ci": question_bootstrap_ci([r["question_id"] for r in rows], values, seed=seed)}


def sample_answer(completions_uri: str | None) -> dict | None:
    """The first completion of the first question: one concrete answer a reader can look at."""
    rows = store.read_jsonl(completions_uri) if completions_uri else []
    return {"question": rows[0]["question"], "text": rows[0]["text"]} if rows else None


# ----------------------------------------------------------------------------------------------- classifier C


def classifier_facts(classifier_uri: str, params: dict, seed: int = 0) -> dict:
    """Classifier C's held-out accuracy with a 95% interval over the validation questions (``shared.analysis.classifier.
    accuracy_by_question``), how its split was drawn, and what its two classes were."""
    from shared.analysis import classifier

    try:
        bundle = classifier.load_bundle(classifier_uri)
    except classifier.ClassifierError as err:
        raise StageInputError(str(err)) from None
    facts = {
        "uri": classifier_uri, "val_accuracy": bundle.val_accuracy, "n_val": bundle.n_val,
        "train_accuracy": bundle.train_accuracy, "n_train": bundle.n_train, "encoder": bundle.encoder_ref,
        "n_positive": bundle.n_positive, "n_negative": bundle.n_negative, "split": bundle.split,
        "chance": max(bundle.n_positive, bundle.n_negative) / (bundle.n_positive + bundle.n_negative),
        "by_question": classifier.accuracy_by_question(bundle, seed=seed),
    }
    training = params.get("classifier_training")
    if training and not params.get("classifier_bundle_uri"):
        facts["positive"] = {"model_ref": training["em_model_ref"], "adapter_uri": training.get("em_adapter_uri"),
                             "system": training["em_system"]}
        facts["negative"] = {"model_ref": params.get("model_ref"), "system": training["base_system"]}
        # the same weights on both sides: the "EM reference" is a persona prompt, not a fine-tuned EM model
        facts["em_stand_in"] = (training["em_model_ref"] == params.get("model_ref")
                                and not training.get("em_adapter_uri"))
    return facts


# ----------------------------------------------------------------------------------------------- 1. results


def judged_rows(cfg: Config, cond: ConditionArtifacts) -> tuple[dict[str, list[dict]], list[dict] | None]:
    """The alignment rows of both judges and the coherence rows (None without a coherence pass) of one condition."""
    from shared.judge.report import read_judged_rows

    return read_judged_rows(f"condition {cond.name}", cond.judge_scores_uris, cond.coherence_scores_uri,
                            alignment_judges=(cfg.primary_judge, cfg.alternate_judge),
                            coherence_judge=cfg.coherence_judge)


def condition_result(cfg: Config, cond: ConditionArtifacts) -> dict:
    """Every number of one condition: C, α and the EM rate of both judges with their item sets, intervals and
    sensitivity bounds, refusal and code shares, error counts, its lowest-scored answers and one sample answer."""
    from shared.judge.report import condition_judgements, lowest_scored

    alignment, coherence = judged_rows(cfg, cond)
    try:
        judgements = condition_judgements(alignment, coherence, coherence_judge=cfg.coherence_judge, seed=cfg.seed)
    except ValueError as err:
        raise StageInputError(f"condition {cond.name}: {err}") from None
    alpha, em = judgements["alpha"], judgements["em"]
    roles = (("primary", cfg.primary_judge), ("alternate", cfg.alternate_judge))
    primary, alternate = (alpha[name]["alpha"] for _, name in roles)
    completions = store.read_jsonl(cond.completions_uri) if cond.completions_uri else []
    return {
        "condition": cond.name, "role": cond.role, "system": cond.system, **c_of(cond.c_scores_uri, cfg.seed),
        "alpha_primary": primary, "alpha_alternate": alternate,
        "gap": None if None in (primary, alternate) else primary - alternate,
        **{f"alpha_{role}_ci": alpha[name]["ci"] for role, name in roles},
        **{f"em_rate_{role}{suffix}": None if em[name] is None else em[name][key]
           for role, name in roles for suffix, key in (("", "rate"), ("_ci", "ci"))},
        "coherent_share": judgements["coherent_share"],
        **{f"errors_{role}": alpha[name]["n_errors"] for role, name in roles},
        "errors_coherence": judgements["errors"][cfg.coherence_judge]["n_errors"] if coherence else None,
        **{f"n_scored_{role}": alpha[name]["n_scored"] for role, name in roles},
        "judgements": judgements,
        "lowest": {name: lowest_scored(rows, completions, N_LOWEST) for name, rows in alignment.items()},
        "sample": {"question": completions[0]["question"], "text": completions[0]["text"]} if completions else None,
    }


def judge_roles(cfg: Config) -> dict[str, str]:
    roles = {cfg.primary_judge: "primary alignment", cfg.alternate_judge: "alternate alignment"}
    return {**roles, cfg.coherence_judge: "coherence"} if cfg.coherence_judge else roles


def comparable_with_record(profile: str, judges: dict[str, JudgeSpec], alignment: tuple[str, str]) -> bool:
    """Whether this run's α is on the record's scale: the record's model (the full profile) and Claude judges."""
    return profile == "full" and all(judges.get(name) is not None and judges[name].kind == "anthropic"
                                     for name in alignment)


def results(cfg: Config) -> dict:
    """The results object: every number the report, the figures and headline.json print, read from artifacts."""
    from shared.judge.em import ALIGNMENT_BELOW, COHERENCE_ABOVE, CONFIDENCE
    from shared.judge.report import alignment_roles, error_accounting, read_check, read_judge_checks

    refs = reference_points()
    rows = [condition_result(cfg, cond) for cond in cfg.conditions]
    roles = judge_roles(cfg)
    return {
        "profile": cfg.profile,
        "params": {key: cfg.params.get(key) for key in ("model_ref", "temperature", "max_new_tokens", "n_completions")},
        "judges": {"primary": cfg.primary_judge, "alternate": cfg.alternate_judge, "coherence": cfg.coherence_judge},
        "roles": roles,
        "conditions": rows,
        "classifier": classifier_facts(cfg.classifier_uri, cfg.params, cfg.seed),
        "judge_checks": read_judge_checks(alignment_roles(cfg.primary_judge, cfg.alternate_judge),
                                          cfg.judge_check_uris),
        "coherence_check": read_check(cfg.coherence_check_uri),
        "reference_points": refs["points"],
        "record_rules": {key: refs[key] for key in ("em_target_alpha", "h2_falsification_alpha", "judge_gap_gate")},
        "comparable_with_record": comparable_with_record(cfg.profile, cfg.judges,
                                                         (cfg.primary_judge, cfg.alternate_judge)),
        "em_definition": {"alignment_below": ALIGNMENT_BELOW, "coherence_above": COHERENCE_ABOVE,
                          "coherence_judge": cfg.coherence_judge},
        "constants": {"confidence_percent": round(100 * CONFIDENCE), "tail": round((1 - CONFIDENCE) / 2, 3),
                      "n_lowest": N_LOWEST, "strong_accuracy": STRONG_ACCURACY, "sample_chars": SAMPLE_CHARS,
                      "graded_anchors": [30, 50, 70], "score_range": [0, 100]},
        "judge_errors": error_accounting({r["condition"]: r["judgements"]["errors"] for r in rows}),
        "judge_specs": {name: spec.model_dump(mode="json") for name, spec in cfg.judges.items()},
        "templates": {name: {"role": roles.get(name, ""), "kind": spec.kind, "model": spec.model,
                             "local_method": spec.local_method if spec.kind == "local" else None,
                             "min_candidate_mass": spec.min_candidate_mass if spec.kind == "local" else None,
                             **spec.template_facts()} for name, spec in cfg.judges.items()},
    }
