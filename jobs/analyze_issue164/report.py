"""Part 4 of ``analyze_issue164``: the markdown report, and what reproduces (for REPRODUCIBILITY.md), from the
results object alone."""

from __future__ import annotations

from jobs.analyze_issue164.figures import condition_label
from shared.judge.spec import JudgeSpec


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
