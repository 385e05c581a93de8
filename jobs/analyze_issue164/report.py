"""Stage ``analyze_issue164``: α and the EM rate under two judges and classifier C per condition, judge error
rates, the judges' checks, the figures and the report.

One shape, four parts: ``results`` reads every number from the stored artifacts (per-item judge scores of the
alignment and coherence passes, classifier scores, judge checks, the classifier bundle; nothing is copied from an
upstream summary) into one results object; ``decisions`` applies the record's pre-registered rules to it;
``figures`` draws it; ``report_text`` writes it. ``headline.json`` is that object, and the report and figures print
nothing that is not in it (tests/test_issue164_analysis.py checks the report's numbers against it).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Literal

import numpy as np
from pydantic import BaseModel

from shared.contract.stage import Resources, StageInputError, StageSpec
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


# ----------------------------------------------------------------------------------------------- 2. decisions


def decisions(data: dict) -> dict:
    """The record's pre-registered rules (thresholds of #164) applied to the results object."""
    rules = data["record_rules"]
    target, falsification, gate = rules["em_target_alpha"], rules["h2_falsification_alpha"], rules["judge_gap_gate"]
    evaluated = [r for r in data["conditions"] if r["role"] == "condition"]
    em_rows = [r for r in data["conditions"] if r["role"] == "em_reference"]
    return {
        "em_target_alpha": target, "h2_falsification_alpha": falsification, "judge_gap_gate": gate,
        "measured_em_reference_alpha": em_rows[0]["alpha_primary"] if em_rows else None,
        "conditions_above_em_target": [r["condition"] for r in evaluated
                                       if r["alpha_primary"] is not None and r["alpha_primary"] > target],
        "conditions_at_or_below_falsification": [r["condition"] for r in evaluated
                                                 if r["alpha_primary"] is not None
                                                 and r["alpha_primary"] <= falsification],
        "conditions_over_judge_gap_gate": [r["condition"] for r in evaluated
                                           if r["gap"] is not None and abs(r["gap"]) >= gate],
        "conditions_without_alpha": [r["condition"] for r in evaluated if r["alpha_primary"] is None],
    }


# ----------------------------------------------------------------------------------------------- 3. figures


def figures(data: dict, out) -> dict:
    """Every figure of the report, drawn from the results object only; ``out(name)`` is where one goes."""
    from shared.analysis.figures import alpha_em_figure

    labelled = [{"label": condition_label(data)(r["condition"]), "judgements": r["judgements"]}
                for r in data["conditions"]]
    return {
        "c_vs_alpha": c_vs_alpha_figure(data, out("c_vs_alpha")),
        "alpha_em": alpha_em_figure(labelled, out("alpha_em"),
                                    judges=[data["judges"]["primary"], data["judges"]["alternate"]],
                                    reference_points=data["reference_points"],
                                    comparable=data["comparable_with_record"]),
    }


def c_vs_alpha_figure(data: dict, uri: str) -> dict:
    """Left: the record's reference points on the full scales, with this run's conditions only where the run is on
    the record's scale (full profile, Claude judges); otherwise alone, titled as another model's. Right: this run's
    conditions, both judges, with 95% CIs over questions."""
    from shared.analysis.figures import PALETTE, REFERENCE_COLOR, new_figure, save

    fig, ax = new_figure(12.5, 4.6)
    grid = fig.add_gridspec(1, 2, wspace=0.25)
    ax.set_subplotspec(grid[0])
    zoom = fig.add_subplot(grid[1])
    comparable = data["comparable_with_record"]
    for point in data["reference_points"]:
        ax.scatter(point["c"], point["alpha_primary"], marker="s", color=REFERENCE_COLOR, zorder=2)
        right_edge = point["c"] > 0.7  # label to the left so it stays inside the axes
        ax.annotate(point["name"], (point["c"], point["alpha_primary"]), fontsize=7, color=REFERENCE_COLOR,
                    xytext=(-4 if right_edge else 4, 4), textcoords="offset points",
                    ha="right" if right_edge else "left")
    ax.axhline(data["decisions"]["em_target_alpha"], color=REFERENCE_COLOR, linestyle="--", linewidth=1)
    for i, row in enumerate(data["conditions"]):
        color = PALETTE[i % len(PALETTE)]
        marker, size = ("*", 120) if row["role"] == "em_reference" else ("o", 50)
        for judge, filled in (("primary", True), ("alternate", False)):
            alpha = row[f"alpha_{judge}"]
            if alpha is None:
                continue
            style = {"color": color} if filled else {"facecolors": "none", "edgecolors": color}
            if comparable:
                ax.scatter(row["c"], alpha, s=size, marker=marker, zorder=3, **style)
            zoom.scatter(row["c"], alpha, s=size, marker=marker, zorder=3, **style,
                         label=f"{row['condition']} ({data['judges'][judge]})")
            c_ci, a_ci = row.get("c_ci"), row.get(f"alpha_{judge}_ci")
            if c_ci and a_ci:
                zoom.errorbar(row["c"], alpha, xerr=[[row["c"] - c_ci[0]], [c_ci[1] - row["c"]]],
                              yerr=[[alpha - a_ci[0]], [a_ci[1] - alpha]], color=color, linewidth=0.8, capsize=2,
                              linestyle="none" if filled else ":", alpha=1.0 if filled else 0.6, zorder=2)
    for axis in (ax, zoom):
        axis.set_xlabel("classifier C (distributional EM match)")
        axis.set_ylabel("alignment score α (0-100)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-2, 102)
    if comparable:
        ax.set_title("full scales: this run among the record's reference points (grey squares;\n"
                     "dashed line: EM target)", fontsize=8)
    else:
        ax.set_facecolor("#f2f2f2")
        ax.set_title("the record's points only: Qwen2.5-7B under Claude judges, another model\nand judge than "
                     "this run (not on its scale; this run is on the right)", fontsize=8, color=REFERENCE_COLOR)
    zoom.set_title("this run: filled primary, hollow alternate judge, star EM reference;\n"
                   "bars: 95% CIs from a bootstrap over questions", fontsize=8)
    if zoom.get_legend_handles_labels()[0]:
        zoom.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:  # every condition's α is missing: say why instead of an empty plot
        zoom.text(0.5, 0.5, "no α in this run: the judges scored no answer\n(see the report's α section)",
                  transform=zoom.transAxes, ha="center", va="center", fontsize=9, color=REFERENCE_COLOR)
    return save(fig, uri)


# ----------------------------------------------------------------------------------------------- 4. report text


def interval(ci: list[float] | None, digits: int) -> str:
    return "—" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def classifier_section(facts: dict, constants: dict) -> list[str]:
    head = ["## Classifier C", ""]
    by_question = facts.get("by_question")
    if by_question:
        head += [
            f"**Held-out (validation) accuracy: {facts['val_accuracy']:.3f}** on {facts['n_val']} completions to "
            f"{by_question['n_val_questions']} question(s) held out of training whole (chance {facts['chance']:.2f}; "
            f"{constants['confidence_percent']}% CI [{by_question['ci_low']:.2f}, {by_question['ci_high']:.2f}] from "
            f"a bootstrap over those questions); train accuracy {facts['train_accuracy']:.3f} on {facts['n_train']}. "
            f"Encoder `{facts['encoder']}` with logistic regression; {facts['n_positive']} EM-reference and "
            f"{facts['n_negative']} base completions in all, trained on questions disjoint from the evaluation panel.",
            ""]
    else:
        head += [
            f"**Held-out (validation) accuracy: {facts['val_accuracy']:.3f}** on {facts['n_val']} completions it was "
            f"not trained on (split: {facts['split']}; the bundle keeps no per-question record, so no interval); "
            f"train accuracy {facts['train_accuracy']:.3f} on {facts['n_train']}. Encoder `{facts['encoder']}`.", ""]
    lines = head
    if "positive" in facts:
        pos, neg = facts["positive"], facts["negative"]
        adapter = f" with adapter `{pos['adapter_uri']}`" if pos.get("adapter_uri") else ""
        lines += [f"- positive class (EM reference): `{pos['model_ref']}`{adapter} under system `{pos['system']}`",
                  f"- negative class (base): `{neg['model_ref']}` under system `{neg['system']}`", ""]
        if facts["em_stand_in"]:
            lines += [
                "The EM reference here is a **stand-in**: the base model itself under a misaligned persona system "
                "prompt, not the record's fine-tuned EM model (c6_vanilla_em). C therefore measures how much a "
                "condition's answers resemble that persona's answers, and the record's reference C values (from "
                "Qwen2.5-7B and its EM fine-tune) are not on the same scale.", ""]
    else:
        lines += [f"Stored classifier bundle `{facts['uri']}`.", ""]
    if by_question and not by_question["above_chance"]:
        lines += ["Classifier C is not distinguishable from chance on held-out questions (the interval reaches "
                  "chance): C values below carry no information.", ""]
    elif facts["val_accuracy"] < constants["strong_accuracy"]:
        lines += [f"Classifier C is weak (held-out accuracy below {constants['strong_accuracy']}, and "
                  f"{facts['train_accuracy'] - facts['val_accuracy']:.2f} below its train accuracy): it tells the "
                  "EM reference's answers from the base model's only partly, so C differs little between conditions.",
                  ""]
    return lines


def checks_section(data: dict) -> list[str]:
    from shared.judge.report import coherence_check_lines, judge_check_line

    checks, profile = data["judge_checks"], data.get("profile", "")
    lines = ["## Judge checks", "",
             "Each judge scores project-written answers (shared/data/judges/): plainly good against blatantly bad "
             "ones, a gross-failure check (AUC: the chance that a good answer scores above a bad one; 0.5 is "
             "chance), and graded answers written to deserve about 30, 50 and 70, which say whether its scale is "
             "ordered. A judge that fails the gross-failure check gives scores that mean nothing; passing it shows "
             "only that the judge is not grossly broken.", ""]
    lines += [judge_check_line(name, check, profile) for name, check in checks.items()]
    if data["judges"].get("coherence"):
        lines += coherence_check_lines(data.get("coherence_check"), data["judges"]["coherence"], profile)
    specs = [c["judge"] for c in checks.values() if c["checked"]]
    if len(specs) == 2 and specs[0]["kind"] == specs[1]["kind"] == "local" and specs[0]["model"] == specs[1]["model"]:
        lines += ["", f"Both alignment judges are the same local model (`{specs[0]['model']}`) with different prompt "
                      f"templates (`{specs[0]['template']}`, `{specs[1]['template']}`): the gap between them measures "
                      "how much the judge depends on its prompt, not the disagreement of two judge models."]
    return [*lines, ""]


def condition_label(data: dict):
    """How the report names a condition: the EM reference says that it is one."""
    em_reference = {r["condition"] for r in data["conditions"] if r["role"] == "em_reference"}
    return lambda name: f"{name} (EM reference)" if name in em_reference else name


def local_judge_lines(data: dict) -> list[str]:
    """What a local judge's scores are and when it abstains, where the run has one."""
    local = {name: t for name, t in data["templates"].items() if t["kind"] == "local"}
    if not local:
        return []
    methods = sorted({f"{'full-reply likelihood' if t['local_method'] == 'full_reply' else 'first-token probability'}"
                      f", abstaining below {t['min_candidate_mass']:g}" for t in local.values()})
    return [f"The local judges ({', '.join(local)}) do not sample a reply: each valid reply (every score "
            f"{data['constants']['score_range'][0]}-{data['constants']['score_range'][1]} and each sentinel word) is "
            f"scored by its probability under the judge model ({'; '.join(methods)}). Where the valid replies hold "
            "less probability than that threshold the judge abstains (counted as an error, never a score); "
            "otherwise the kind of reply with the most probability wins (a score is the probability-weighted "
            "mean of the score replies).", ""]


def alpha_section(data: dict, named) -> list[str]:
    from shared.judge.report import alpha_table_lines

    j = data["judges"]
    return ["## α: what it rests on", "", *local_judge_lines(data),
            *alpha_table_lines(data["conditions"], [j["primary"], j["alternate"]], lambda r: named(r["condition"])),
            "", "![alpha and EM rate per condition](alpha_em.png)", ""]


def em_section(data: dict, judges: dict[str, JudgeSpec], named) -> list[str]:
    from shared.judge.report import em_definition_lines, em_table_lines

    j = data["judges"]
    if j.get("coherence") is None:
        return ["## EM rate", "", "No coherence pass was run, so no EM rate.", ""]
    return ["## EM rate", "", *em_definition_lines(j["coherence"], judges.get(j["coherence"])), "",
            *em_table_lines(data["conditions"], [j["primary"], j["alternate"]], lambda r: named(r["condition"])), ""]


def lowest_section(data: dict, named) -> list[str]:
    from shared.judge.report import lowest_scored_lines

    j = data["judges"]
    lines = ["## The lowest-scored answers", "",
             f"Per condition and alignment judge, the {data['constants']['n_lowest']} answers it scored lowest, with "
             "the judge's own reply (every judged answer: `python -m workflows export-inspect <run>`).", ""]
    for row in data["conditions"]:
        for judge in dict.fromkeys((j["primary"], j["alternate"])):
            lines += lowest_scored_lines(named(row["condition"]), judge, row["lowest"][judge])
    return [*lines, ""]


def judge_specs(data: dict) -> dict[str, JudgeSpec]:
    """The judges' specs from the results object, in the order of their roles (primary, alternate, coherence)."""
    j = data["judges"]
    order = [name for name in (j["primary"], j["alternate"], j.get("coherence")) if name in data["judge_specs"]]
    order += [name for name in data["judge_specs"] if name not in order]
    return {name: JudgeSpec.model_validate(data["judge_specs"][name]) for name in order}


def report_text(data: dict) -> str:
    """The report, from the results object only."""
    from shared.analysis.reporting import fmt, markdown_table
    from shared.judge.report import em_cell, errors_section, templates_section

    j, d, checks = data["judges"], data["decisions"], data["judge_checks"]
    judges = judge_specs(data)
    named = condition_label(data)
    profile = data.get("profile") or "this"
    conf = data["constants"]["confidence_percent"]

    def alpha_header(name: str) -> str:
        auc = checks[name].get("auc")
        return f"α ({name}" + (f", check AUC {auc:.2f})" if auc is not None else ")")

    has_em = j.get("coherence") is not None
    em_headers = [f"EM rate ({j[role]}) [{conf}% CI]" for role in ("primary", "alternate")] if has_em else []

    def em_columns(r: dict) -> list[str]:
        return [em_cell(r["judgements"]["em"][j[role]]) for role in ("primary", "alternate")] if has_em else []

    def errors(r: dict) -> str:
        counts = [r["errors_primary"], r["errors_alternate"], *([r["errors_coherence"]] if has_em else [])]
        return " / ".join(str(n) for n in counts)

    measured = markdown_table(
        ["condition", "C", alpha_header(j["primary"]), alpha_header(j["alternate"]), "gap (P−A)", *em_headers,
         "errors P/A" + ("/coherence" if has_em else "")],
        [(named(r["condition"]), f"{r['c']:.4f}", r["alpha_primary"], r["alpha_alternate"], r["gap"],
          *em_columns(r), errors(r)) for r in data["conditions"]],
    )
    uncertainty = markdown_table(
        ["condition", "C", f"α ({j['primary']})", f"α ({j['alternate']})"],
        [(named(r["condition"]), interval(r.get("c_ci"), 3), interval(r.get("alpha_primary_ci"), 1),
          interval(r.get("alpha_alternate_ci"), 1)) for r in data["conditions"]],
    )
    refs = markdown_table(["reference point (from the record)", "C", "α primary", "α alternate"],
                          [(p["name"], f"{p['c']:.3f}", p["alpha_primary"], p["alpha_alternate"])
                           for p in data["reference_points"]])
    n_per_condition = data["conditions"][0]["n"] if data["conditions"] else 0
    params = data["params"]
    lines = [
        "# #164: alignment score α and classifier C per condition", "",
        f"Profile `{profile}`: model `{params.get('model_ref')}`, {n_per_condition} completions per condition "
        f"(temperature {params.get('temperature')}, at most {params.get('max_new_tokens')} new tokens).", "",
        *classifier_section(data["classifier"], data["constants"]),
        *checks_section(data),
        "## Headline", "", measured, "",
        "C is the mean over a condition's completions of P(EM reference | completion). α is the mean alignment score "
        "over the scored answers (refusal and code labels and errors left out; what part of the answers that is: "
        "α, below). EM rate: the share of all answers both judges scored that are below "
        f"{data['em_definition']['alignment_below']:g} for alignment and above "
        f"{data['em_definition']['coherence_above']:g} for coherence (EM rate, below, also over the non-refused "
        "answers). Errors are judge items that failed, could not be parsed or where a local judge abstained; they "
        "are excluded from α and the EM rate, never scored as 0.", "",
        f"{conf}% confidence intervals, from a bootstrap over the panel's questions (a question's completions are not "
        "independent of each other):", "", uncertainty, "",
    ]
    if any(r["role"] == "em_reference" for r in data["conditions"]):
        lines += ["The EM reference row is the EM reference itself answering the evaluation panel, questions the "
                  "classifier was not trained on: its C shows how well C generalises to new questions.", ""]
    if d["conditions_without_alpha"]:
        lines += [f"**No α for {', '.join(d['conditions_without_alpha'])}**: the primary judge scored none of their "
                  "answers (see α, below, for what it did instead).", ""]
    lines += [*alpha_section(data, named), *em_section(data, judges, named), *lowest_section(data, named),
              *errors_section(data["judge_errors"], data["roles"], named), *templates_section(judges, data["roles"])]
    lines += ["## Conditions", "",
              "Every condition is sampled with the same seed, so answers to one question begin with the same words "
              "wherever a system prompt barely changes the model's next-token distribution.", ""]
    for r in data["conditions"]:
        lines.append(f"- **{named(r['condition'])}**: system `{r['system']}`")
        if r["sample"]:
            text = " ".join(r["sample"]["text"].split())
            cut = text[:data["constants"]["sample_chars"]] + ("…" if len(text) > data["constants"]["sample_chars"] else "")
            lines.append(f"  - sample answer to “{r['sample']['question']}”: “{cut}”")
    primary_check = checks[j["primary"]]
    lines += ["", "## Decision rules (as pre-registered in the record)", ""]
    if primary_check.get("alpha_interpretable") is False:
        lines += [f"The primary judge ({j['primary']}) {primary_check['verdict']} on known-aligned vs known-misaligned "
                  "answers, so the outcomes below are computed as the record defines them but say nothing about "
                  "alignment.", ""]
    elif primary_check.get("alpha_interpretable") is None:
        lines += [f"The primary judge ({j['primary']}) was not checked: read the outcomes below as unvalidated.", ""]
    lines += [
        f"- Conditions with α (primary) above the EM target {d['em_target_alpha']}: "
        f"{', '.join(d['conditions_above_em_target']) or 'none'}",
        f"- Conditions at or below the H2 falsification threshold α ≤ {d['h2_falsification_alpha']}: "
        f"{', '.join(d['conditions_at_or_below_falsification']) or 'none'}",
        f"- Conditions whose judge gap reaches the {d['judge_gap_gate']}-point gate: "
        f"{', '.join(d['conditions_over_judge_gap_gate']) or 'none'}",
    ]
    if d["conditions_without_alpha"]:
        lines.append(f"- Conditions with no α (no rule applies): {', '.join(d['conditions_without_alpha'])}")
    if d["measured_em_reference_alpha"] is not None:
        lines.append(f"- The thresholds are the record's (Qwen2.5-7B, Claude judges). The EM reference measured in "
                     f"this run scores α = {fmt(d['measured_em_reference_alpha'])} under the primary judge.")
    where = ("on the same axes as this run (full profile, Claude judges)" if data["comparable_with_record"] else
             "in a panel of their own, apart from this run's numbers: they come from another model and judge")
    lines += ["", "## Reference points", "",
              f"The record's reference points (Qwen2.5-7B-Instruct, Claude judges) are drawn {where}.", "", refs, "",
              "![C vs alpha](c_vs_alpha.png)", ""]
    return "\n".join(lines)


def reproducibility_notes(data: dict) -> str:
    """What reproduces bitwise and what only in distribution, for REPRODUCIBILITY.md."""
    kinds = {t["kind"] for t in data["templates"].values()}
    lines = ["", "## What reproduces bitwise, and what only in distribution", "",
             "- **Bitwise, from the stored artifacts:** this analysis (every interval's bootstrap is seeded), classifier "
             "C's training and scores (seeded logistic regression on MiniLM embeddings computed on the CPU), and every "
             "stage whose result the store reuses (a task with the same code fingerprint, config and input hashes is "
             "served its stored outputs, checked against their sha256)."]
    if "local" in kinds:
        lines.append("- **Bitwise on the same hardware and dtype:** a local judge's verdicts (no sampling: the "
                     "probabilities of fixed replies), given the same completions; CPU kernels of another build, or a "
                     "GPU's reduced-precision kernels, can move the probabilities in their last bits and so a verdict "
                     "that sits on the abstention threshold.")
    lines.append("- **Only in distribution:** the completions (seeded sampling, but its random stream depends on the "
                 "batch size, the backend (vLLM or transformers) and the hardware, and bf16 GPU kernels are not "
                 "deterministic), and everything computed from them: α, the EM rate and C of a condition move within "
                 "their intervals when the completions are drawn again.")
    if "anthropic" in kinds:
        lines.append("- **Only in distribution:** Claude judges' replies (the API takes no seed, and a model's "
                     "serving stack can change under one model id); the judge cache keeps each reply, so a re-run "
                     "re-uses them bitwise, but a fresh store asks again.")
    return "\n".join(lines) + "\n"


def run(cfg: Config, ctx) -> dict:
    from shared.analysis.reporting import producing_manifest, reproducibility

    data = results(cfg)
    data["decisions"] = decisions(data)
    store.write_json(ctx.out("headline.json"), data)
    data = store.read_json(ctx.out("headline.json"))  # the figures and report print exactly what was stored
    figures(data, ctx.out)
    store.write_text(ctx.out("report.md"), report_text(data))
    upstream = [producing_manifest(cfg.classifier_uri)]
    for cond in cfg.conditions:
        upstream.append(producing_manifest(cond.c_scores_uri))
        upstream += [producing_manifest(uri) for uri in cond.judge_scores_uris.values()]
        if cond.coherence_scores_uri:
            upstream.append(producing_manifest(cond.coherence_scores_uri))
    upstream += [producing_manifest(uri) for uri in [*cfg.judge_check_uris.values(), cfg.coherence_check_uri] if uri]
    unique = {(m["cell"], m["stage"]): m for m in upstream}
    store.write_text(ctx.out("REPRODUCIBILITY.md"),
                     reproducibility("#164", cfg.params, list(unique.values())) + reproducibility_notes(data))
    metrics = {r["condition"]: {"c": r["c"], "alpha_primary": r["alpha_primary"],
                                "em_rate_primary": r["em_rate_primary"]} for r in data["conditions"]}
    metrics["classifier_val_accuracy"] = data["classifier"]["val_accuracy"]
    metrics["judge_check_auc"] = {name: check.get("auc") for name, check in data["judge_checks"].items()}
    return metrics


SPEC = StageSpec(
    name="analyze_issue164", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=1, memory="2Gi", timeout_s=1800),
    description="#164 headline table, C-vs-α figure and report from stored judge and classifier scores.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
