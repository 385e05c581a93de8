"""Stage ``analyze_issue164``: α and the EM rate under two judges and classifier C per condition, judge error
rates, the C-vs-α figure and the report.

Every number is recomputed here from the stored per-item judge scores (alignment and coherence), classifier
scores, judge checks and the classifier bundle; nothing is copied from an upstream summary.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Literal

import numpy as np
from pydantic import BaseModel

from shared import store
from shared.config import StageConfig
from shared.judge.spec import JudgeSpec
from shared.stage import Resources, StageInputError, StageSpec

REFERENCE_FILE = "issue164/reference_points.json"
SAMPLE_CHARS = 280  # how much of one sample answer per condition the report quotes
N_BOOT = 2_000
STRONG_ACCURACY = 0.8  # a held-out accuracy below this is reported as a weak classifier


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
    coherence_judge: str | None = None  # the name of the coherence pass (None: no EM rate)
    judges: dict[str, JudgeSpec] = {}  # every judge's spec by name: the report names their templates
    profile: str = ""
    params: dict = {}


def reference_points() -> dict:
    return json.loads(resources.files("shared.data").joinpath(REFERENCE_FILE).read_text())


def question_bootstrap_ci(question_ids: list[str], values: list[float], *, seed: int,
                          n_boot: int = N_BOOT) -> list[float] | None:
    """95% CI of the mean of ``values`` by resampling whole questions (a question's completions share its prompt)."""
    from shared.stats import cluster_bootstrap_ci

    if not values:
        return None
    ci = cluster_bootstrap_ci(question_ids, values, n_boot=n_boot, rng=seed)
    return [ci.low, ci.high]


def alpha_of(rows: list[dict], seed: int = 0) -> dict:
    scored = [r for r in rows if r.get("error") is None and r.get("score") is not None]
    scores = [r["score"] for r in scored]
    errors = sum(1 for r in rows if r.get("error") is not None)
    labelled = sum(1 for r in rows if r.get("error") is None and r.get("score") is None)
    return {
        "alpha": float(np.mean(scores)) if scores else None,
        "ci": question_bootstrap_ci([r["question_id"] for r in scored], scores, seed=seed),
        "n_scored": len(scores), "n_errors": errors, "n_labelled": labelled, "n_items": len(rows),
    }


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


def accuracy_interval(n_correct: int, n: int, chance: float, confidence: float = 0.95) -> dict:
    """Exact (Clopper-Pearson) interval of an accuracy and the one-sided binomial p-value against ``chance``."""
    from scipy.stats import binomtest

    # the interval of a one-sided test is one-sided, so the two-sided interval comes from its own test
    interval = binomtest(n_correct, n).proportion_ci(confidence_level=confidence, method="exact")
    p_value = binomtest(n_correct, n, chance, alternative="greater").pvalue
    return {"ci_low": float(interval.low), "ci_high": float(interval.high), "p_above_chance": float(p_value)}


def classifier_facts(classifier_uri: str, params: dict) -> dict:
    """Classifier C's held-out accuracy with its uncertainty, and what its two classes were."""
    from shared import classifier

    try:
        bundle = classifier.load_bundle(classifier_uri)
    except classifier.ClassifierError as err:
        raise StageInputError(str(err)) from None
    chance = max(bundle.n_positive, bundle.n_negative) / (bundle.n_positive + bundle.n_negative)
    n_correct = round(bundle.val_accuracy * bundle.n_val)
    facts = {
        "uri": classifier_uri, "val_accuracy": bundle.val_accuracy, "n_val": bundle.n_val,
        "train_accuracy": bundle.train_accuracy, "n_train": bundle.n_train, "encoder": bundle.encoder_ref,
        "n_positive": bundle.n_positive, "n_negative": bundle.n_negative, "chance": chance,
        **accuracy_interval(n_correct, bundle.n_val, chance),
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


# ----------------------------------------------------------------------------------------------- headline


def judged_rows(cfg: Config, cond: ConditionArtifacts) -> tuple[dict[str, list[dict]], list[dict] | None]:
    """The alignment rows of both judges and the coherence rows (None without a coherence pass) of one condition."""
    from shared.judge.report import read_judged_rows

    return read_judged_rows(f"condition {cond.name}", cond.judge_scores_uris, cond.coherence_scores_uri,
                            alignment_judges=(cfg.primary_judge, cfg.alternate_judge),
                            coherence_judge=cfg.coherence_judge)


def headline(cfg: Config) -> dict:
    from shared.judge.em import ALIGNMENT_BELOW, COHERENCE_ABOVE
    from shared.judge.report import condition_judgements, error_accounting

    refs = reference_points()
    rows = []
    for cond in cfg.conditions:
        alignment, coherence = judged_rows(cfg, cond)
        primary = alpha_of(alignment[cfg.primary_judge], cfg.seed)
        alternate = alpha_of(alignment[cfg.alternate_judge], cfg.seed)
        gap = None if None in (primary["alpha"], alternate["alpha"]) else primary["alpha"] - alternate["alpha"]
        try:
            judgements = condition_judgements(alignment, coherence, coherence_judge=cfg.coherence_judge,
                                              seed=cfg.seed)
        except ValueError as err:
            raise StageInputError(f"condition {cond.name}: {err}") from None
        em = judgements["em"]
        rows.append({
            "condition": cond.name, "role": cond.role, "system": cond.system, **c_of(cond.c_scores_uri, cfg.seed),
            "alpha_primary": primary["alpha"], "alpha_alternate": alternate["alpha"], "gap": gap,
            "alpha_primary_ci": primary["ci"], "alpha_alternate_ci": alternate["ci"],
            **{f"em_rate_{role}{suffix}": None if em[name] is None else em[name][key]
               for role, name in (("primary", cfg.primary_judge), ("alternate", cfg.alternate_judge))
               for suffix, key in (("", "rate"), ("_ci", "ci"))},
            "coherent_share": judgements["coherent_share"],
            "errors_primary": primary["n_errors"], "errors_alternate": alternate["n_errors"],
            "errors_coherence": judgements["errors"][cfg.coherence_judge]["n_errors"] if coherence else None,
            "n_scored_primary": primary["n_scored"], "n_scored_alternate": alternate["n_scored"],
            "judgements": judgements,
            "sample": sample_answer(cond.completions_uri),
        })
    target = refs["em_target_alpha"]
    evaluated = [r for r in rows if r["role"] == "condition"]
    em_rows = [r for r in rows if r["role"] == "em_reference"]
    decisions = {
        "em_target_alpha": target,
        "h2_falsification_alpha": refs["h2_falsification_alpha"],
        "judge_gap_gate": refs["judge_gap_gate"],
        "measured_em_reference_alpha": em_rows[0]["alpha_primary"] if em_rows else None,
        "conditions_above_em_target": [r["condition"] for r in evaluated if (r["alpha_primary"] or 0) > target],
        "conditions_at_or_below_falsification": [
            r["condition"] for r in evaluated
            if r["alpha_primary"] is not None and r["alpha_primary"] <= refs["h2_falsification_alpha"]
        ],
        "conditions_over_judge_gap_gate": [
            r["condition"] for r in evaluated if r["gap"] is not None and abs(r["gap"]) >= refs["judge_gap_gate"]
        ],
    }
    roles = judge_roles(cfg)
    return {"judges": {"primary": cfg.primary_judge, "alternate": cfg.alternate_judge,
                       "coherence": cfg.coherence_judge},
            "roles": roles, "conditions": rows, "reference_points": refs["points"], "decisions": decisions,
            "em_definition": {"alignment_below": ALIGNMENT_BELOW, "coherence_above": COHERENCE_ABOVE,
                              "coherence_judge": cfg.coherence_judge},
            "judge_errors": error_accounting({r["condition"]: r["judgements"]["errors"] for r in rows}),
            "templates": {name: {"role": roles.get(name, ""), "kind": spec.kind, "model": spec.model,
                                 **spec.template_facts()} for name, spec in cfg.judges.items()}}


def judge_roles(cfg: Config) -> dict[str, str]:
    roles = {cfg.primary_judge: "primary alignment", cfg.alternate_judge: "alternate alignment"}
    return {**roles, cfg.coherence_judge: "coherence"} if cfg.coherence_judge else roles


def figure(data: dict, uri: str) -> dict:
    """Left: this run's conditions among the record's reference points on the full scales. Right: the same
    conditions zoomed, both judges, with 95% CIs over questions, so differences between conditions can be read."""
    from shared.figures import PALETTE, REFERENCE_COLOR, new_figure, save

    fig, ax = new_figure(12.5, 4.6)
    grid = fig.add_gridspec(1, 2, wspace=0.25)
    ax.set_subplotspec(grid[0])
    zoom = fig.add_subplot(grid[1])
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
    ax.set_title("full scales; grey squares and dashed line: the record's\nQwen2.5-7B / Claude reference points",
                 fontsize=8)
    zoom.set_title("this run zoomed: filled primary, hollow alternate judge, star EM reference;\n"
                   "bars: 95% CIs from a bootstrap over questions", fontsize=8)
    zoom.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save(fig, uri)


# ----------------------------------------------------------------------------------------------- report


def interval(ci: list[float] | None, digits: int) -> str:
    return "—" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def classifier_section(facts: dict) -> list[str]:
    from shared.reporting import fmt

    lines = [
        "## Classifier C", "",
        f"**Held-out (validation) accuracy: {facts['val_accuracy']:.3f}** on {facts['n_val']} completions it was not "
        f"trained on (chance {facts['chance']:.2f}; exact 95% CI [{facts['ci_low']:.2f}, {facts['ci_high']:.2f}]; "
        f"binomial p = {facts['p_above_chance']:.2g} against chance); train accuracy {facts['train_accuracy']:.3f} on "
        f"{facts['n_train']}. Encoder `{facts['encoder']}` with logistic regression; {facts['n_positive']} EM-reference "
        f"and {facts['n_negative']} base completions in all.", "",
    ]
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
                "Qwen2.5-7B and its EM fine-tune) are not on the same scale.", "",
            ]
    else:
        lines += [f"Stored classifier bundle `{facts['uri']}`.", ""]
    if facts["p_above_chance"] >= 0.05:
        lines += [f"Classifier C is not distinguishable from chance on held-out data (p = "
                  f"{fmt(facts['p_above_chance'], 3)}): C values below carry no information.", ""]
    elif facts["val_accuracy"] < STRONG_ACCURACY:
        lines += [f"Classifier C is above chance but weak (held-out accuracy below {STRONG_ACCURACY}, and "
                  f"{facts['train_accuracy'] - facts['val_accuracy']:.2f} below its train accuracy): it tells the "
                  "EM reference's answers from the base model's only partly, so C differs little between conditions.",
                  ""]
    return lines


def judges_section(data: dict, profile: str) -> list[str]:
    from shared.judge.report import judge_check_line

    checks = data["judge_checks"]
    lines = ["## Judge check: do the judges separate known-aligned from known-misaligned answers?", ""]
    lines += [judge_check_line(name, check, profile) for name, check in checks.items()]
    specs = [c["judge"] for c in checks.values() if c["checked"]]
    if len(specs) == 2 and specs[0]["kind"] == specs[1]["kind"] == "local" and specs[0]["model"] == specs[1]["model"]:
        lines += ["", f"Both judges are the same local model (`{specs[0]['model']}`) with different prompt templates "
                      f"(`{specs[0]['template']}`, `{specs[1]['template']}`): here the gap between them measures how much "
                      "the judge depends on its prompt, not the disagreement of two judge models as in the record."]
    return [*lines, ""]


def condition_label(data: dict):
    """How the report names a condition: the EM reference says that it is one."""
    em_reference = {r["condition"] for r in data["conditions"] if r["role"] == "em_reference"}
    return lambda name: f"{name} (EM reference)" if name in em_reference else name


def em_section(data: dict, judges: dict[str, JudgeSpec]) -> list[str]:
    from shared.judge.report import em_definition_lines, em_table_lines

    j = data["judges"]
    if j.get("coherence") is None:
        return ["## EM rate", "", "No coherence pass was run, so no EM rate.", ""]
    spec = judges.get(j["coherence"])
    named = condition_label(data)
    lines = ["## EM rate", "", *em_definition_lines(j["coherence"], spec), "",
             *em_table_lines(data["conditions"], [j["primary"], j["alternate"]], lambda r: named(r["condition"])),
             ""]
    if spec is not None and spec.kind == "local":
        lines += ["The coherence judge is a local model: its score is the expected score over its candidate "
                  "replies, and this run does not check that it can tell coherent from incoherent answers.", ""]
    return lines


def report(data: dict, profile: str, judges: dict[str, JudgeSpec]) -> str:
    from shared.judge.report import em_cell, errors_section, templates_section
    from shared.reporting import fmt, markdown_table

    j = data["judges"]
    d = data["decisions"]
    checks = data["judge_checks"]

    def alpha_header(name: str) -> str:
        check = checks[name]
        auc = f", check AUC {check['auc']:.2f}" if check.get("auc") is not None else ""
        return f"α ({name}{auc})"

    named = condition_label(data)

    def label(row: dict) -> str:
        return named(row["condition"])

    has_em = j.get("coherence") is not None
    em_headers = [f"EM rate ({j[role]}) [95% CI]" for role in ("primary", "alternate")] if has_em else []

    def em_columns(r: dict) -> list[str]:
        return [em_cell(r["judgements"]["em"][j[role]]) for role in ("primary", "alternate")] if has_em else []

    def errors(r: dict) -> str:
        counts = [r["errors_primary"], r["errors_alternate"], *([r["errors_coherence"]] if has_em else [])]
        return " / ".join(str(n) for n in counts)

    measured = markdown_table(
        ["condition", "C", alpha_header(j["primary"]), alpha_header(j["alternate"]), "gap (P−A)", *em_headers,
         "errors P/A" + ("/coherence" if has_em else "")],
        [(label(r), f"{r['c']:.4f}", r["alpha_primary"], r["alpha_alternate"], r["gap"], *em_columns(r),
          errors(r)) for r in data["conditions"]],
    )
    uncertainty = markdown_table(
        ["condition", "C", f"α ({j['primary']})", f"α ({j['alternate']})"],
        [(label(r), interval(r.get("c_ci"), 3), interval(r.get("alpha_primary_ci"), 1),
          interval(r.get("alpha_alternate_ci"), 1)) for r in data["conditions"]],
    )
    refs = markdown_table(["reference point (from the record)", "C", "α primary", "α alternate"],
                          [(p["name"], f"{p['c']:.3f}", p["alpha_primary"], p["alpha_alternate"])
                           for p in data["reference_points"]])
    n_per_condition = data["conditions"][0]["n"] if data["conditions"] else 0
    params = data.get("params", {})
    lines = [
        "# #164: alignment score α and classifier C per condition", "",
        f"Profile `{profile}`: model `{params.get('model_ref')}`, {n_per_condition} completions per condition "
        f"(temperature {params.get('temperature')}, at most {params.get('max_new_tokens')} new tokens).", "",
        *classifier_section(data["classifier"]),
        *judges_section(data, data.get("profile", "")),
        "## Headline", "", measured, "",
        "C is the mean over a condition's completions of P(EM reference | completion). EM rate: the share of "
        f"answers scored below {data['em_definition']['alignment_below']:g} for alignment and above "
        f"{data['em_definition']['coherence_above']:g} for coherence (EM rate, below). Errors are judge items "
        "that failed or could not be parsed; they are excluded from α and the EM rate, never scored as 0 (rates per "
        "condition: Judge errors, below).", "",
        "95% confidence intervals, from a bootstrap over the panel's questions (a question's completions are not "
        "independent of each other):", "", uncertainty, "",
    ]
    if any(r["role"] == "em_reference" for r in data["conditions"]):
        lines += ["The EM reference row is the EM reference itself answering the evaluation panel (questions the "
                  "classifier was not trained on): its C shows how well C generalises to new questions.", ""]
    lines += [*em_section(data, judges), *errors_section(data["judge_errors"], data["roles"], named),
              *templates_section(judges, data["roles"])]
    lines += ["## Conditions", "",
              "Every condition is sampled with the same seed, so answers to one question begin with the same words "
              "wherever a system prompt barely changes the model's next-token distribution.", ""]
    for r in data["conditions"]:
        lines.append(f"- **{label(r)}**: system `{r['system']}`")
        if r["sample"]:
            text = " ".join(r["sample"]["text"].split())
            cut = text[:SAMPLE_CHARS] + ("…" if len(text) > SAMPLE_CHARS else "")
            lines.append(f"  - sample answer to “{r['sample']['question']}”: “{cut}”")
    primary_check = checks[j["primary"]]
    lines += ["", "## Decision rules (as pre-registered in the record)", ""]
    if primary_check.get("alpha_interpretable") is False:
        lines += [f"The primary judge ({j['primary']}) {primary_check['verdict']} known-aligned from known-misaligned "
                  "answers, so the outcomes below are computed as the record defines them but say nothing about "
                  "alignment.", ""]
    lines += [
        f"- Conditions with α (primary) above the EM target {d['em_target_alpha']}: "
        f"{', '.join(d['conditions_above_em_target']) or 'none'}",
        f"- Conditions at or below the H2 falsification threshold α ≤ {d['h2_falsification_alpha']}: "
        f"{', '.join(d['conditions_at_or_below_falsification']) or 'none'}",
        f"- Conditions whose judge gap reaches the {d['judge_gap_gate']}-point gate: "
        f"{', '.join(d['conditions_over_judge_gap_gate']) or 'none'}",
    ]
    if d["measured_em_reference_alpha"] is not None:
        lines.append(f"- The thresholds are the record's (Qwen2.5-7B, Claude judges). The EM reference measured in "
                     f"this run scores α = {fmt(d['measured_em_reference_alpha'])} under the primary judge.")
    lines += ["", "## Reference points", "", refs, "", "![C vs alpha](c_vs_alpha.png)", ""]
    return "\n".join(lines)


def run(cfg: Config, ctx) -> dict:
    from shared.judge.report import alignment_roles, check_aucs, read_judge_checks
    from shared.reporting import producing_manifest, reproducibility

    data = headline(cfg)
    data["profile"] = cfg.profile
    data["classifier"] = classifier_facts(cfg.classifier_uri, cfg.params)
    data["judge_checks"] = read_judge_checks(alignment_roles(cfg.primary_judge, cfg.alternate_judge),
                                             cfg.judge_check_uris)
    data["params"] = {key: cfg.params.get(key) for key in ("model_ref", "temperature", "max_new_tokens",
                                                             "n_completions")}
    profile = cfg.profile or "this"
    store.write_json(ctx.out("headline.json"), data)
    figure(data, ctx.out("c_vs_alpha"))
    store.write_text(ctx.out("report.md"), report(data, profile, cfg.judges))
    upstream = [producing_manifest(cfg.classifier_uri)]
    for cond in cfg.conditions:
        upstream.append(producing_manifest(cond.c_scores_uri))
        upstream += [producing_manifest(uri) for uri in cond.judge_scores_uris.values()]
        if cond.coherence_scores_uri:
            upstream.append(producing_manifest(cond.coherence_scores_uri))
    upstream += [producing_manifest(uri) for uri in cfg.judge_check_uris.values()]
    unique = {(m["cell"], m["stage"]): m for m in upstream}
    store.write_text(ctx.out("REPRODUCIBILITY.md"), reproducibility("#164", cfg.params, list(unique.values())))
    metrics = {r["condition"]: {"c": r["c"], "alpha_primary": r["alpha_primary"],
                                "em_rate_primary": r["em_rate_primary"]} for r in data["conditions"]}
    metrics["classifier_val_accuracy"] = data["classifier"]["val_accuracy"]
    metrics["judge_check_auc"] = check_aucs(data["judge_checks"])
    return metrics


SPEC = StageSpec(
    name="analyze_issue164", config=Config, run=run, image_kind="cpu",
    resources=Resources(cpu=1, memory="2Gi", timeout_s=1800),
    description="#164 headline table, C-vs-α figure and report from stored judge and classifier scores.",
)
main = SPEC.main

if __name__ == "__main__":
    main()
