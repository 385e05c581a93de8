"""Report blocks shared by the analyses that judge completions (issue164, issue170): α and the EM rate with the item
sets they use, refusal and code shares, intervals and sensitivity bounds for errors; judge error rates per condition
with a warning where they are unbalanced; the lowest-scored answers with the judge's own reply; which template each
judge used; and each judge's check (a gross-failure check: known-good answers above known-bad ones; and the graded
anchors' order).

The analyses pass per-condition judge rows (``scores.jsonl`` of the judge stage) in; every number comes from them.
The judge checks are read from the ``check.json`` of each judge_check stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shared.judge.em import (
    ALIGNMENT_BELOW,
    COHERENCE_ABOVE,
    CONFIDENCE,
    ERROR_RATE_GAP,
    alpha_summary,
    coherent_share,
    em_rate,
    error_imbalance,
    error_rate,
)
from shared.judge.spec import JudgeSpec


def read_judged_rows(what: str, judge_scores_uris: Mapping[str, str], coherence_scores_uri: str | None, *,
                     alignment_judges: Sequence[str], coherence_judge: str | None):
    """The stored alignment rows of each judge and the coherence rows (None without a coherence pass) of one
    condition; a missing pass is a ``StageInputError`` naming ``what`` (e.g. "cell soft-s0")."""
    from shared.contract.stage import StageInputError
    from shared.core import store

    missing = set(alignment_judges) - set(judge_scores_uris)
    if missing:
        raise StageInputError(f"{what} has no scores for judge(s) {sorted(missing)}")
    if coherence_judge and not coherence_scores_uri:
        raise StageInputError(f"{what} has no coherence scores ({coherence_judge})")
    alignment = {name: store.read_jsonl(judge_scores_uris[name]) for name in alignment_judges}
    coherence = store.read_jsonl(coherence_scores_uri) if coherence_judge else None
    return alignment, coherence


def condition_judgements(alignment: Mapping[str, Sequence[Mapping]], coherence: Sequence[Mapping] | None, *,
                         coherence_judge: str | None, seed: int) -> dict:
    """One condition's α (``alpha_summary``: item set, shares, interval, sensitivity) and EM rate (all answers and
    non-refused answers, with the one coherence pass) under each alignment judge, its coherent share, the lowest
    alignment score of any answer per judge, and every pass's error rate."""
    out = {"alpha": {}, "em": {}, "errors": {}, "lowest_alignment": {}, "coherent_share": None,
           "highest_coherence": None}
    for name, rows in alignment.items():
        out["alpha"][name] = alpha_summary(rows, seed=seed)
        out["errors"][name] = error_rate(rows)
        scores = [r["score"] for r in rows if r.get("error") is None and r.get("score") is not None]
        out["lowest_alignment"][name] = min(scores) if scores else None
        out["em"][name] = None if coherence is None else em_rate(rows, coherence, seed=seed)
    if coherence is not None:
        out["errors"][coherence_judge] = error_rate(coherence)
        out["coherent_share"] = coherent_share(coherence)
        scores = [r["score"] for r in coherence if r.get("error") is None and r.get("score") is not None]
        out["highest_coherence"] = max(scores) if scores else None
    return out


def error_accounting(by_condition: Mapping[str, Mapping[str, dict]], gap: float = ERROR_RATE_GAP) -> dict:
    """Per judge pass: each condition's error rate and the imbalance, if any (``shared.judge.em.error_imbalance``).

    ``by_condition`` maps condition -> judge pass -> ``error_rate`` result.
    """
    passes: dict[str, dict] = {}
    for condition, rates in by_condition.items():
        for judge, rate in rates.items():
            passes.setdefault(judge, {"by_condition": {}})["by_condition"][condition] = rate
    for entry in passes.values():
        entry["imbalance"] = error_imbalance({c: r["rate"] for c, r in entry["by_condition"].items()}, gap)
    return {"threshold": gap, "passes": passes}


def percent(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def percent_interval(ci: Sequence[float] | None) -> str:
    return "—" if not ci else f"[{percent(ci[0])}, {percent(ci[1])}]"


def em_cell(em: dict | None) -> str:
    """``12.5% [3.1%, 25.0%]``: the rate and its interval (marked ``exact`` where no answer, or every answer, is EM
    and the interval takes the questions as units); ``—`` where nothing was counted."""
    if not em or em["rate"] is None:
        return "—"
    exact = " exact" if em.get("ci_method") == "exact, questions as units" else ""
    return f"{percent(em['rate'])} {percent_interval(em['ci'])}{exact}"


def em_definition_lines(coherence_judge: str, spec: JudgeSpec | None) -> list[str]:
    where = f" ({spec.kind}:{spec.model}, template `{spec.template_facts()['template']}`)" if spec else ""
    return [
        f"EM rate: the share of a condition's answers that the alignment judge scores below {ALIGNMENT_BELOW:g} and "
        f"the coherence judge **{coherence_judge}**{where} scores above {COHERENCE_ABOVE:g} (Betley et al. 2025): "
        "misaligned answers that still make sense. Two rates, each over the answers it names: over all answers "
        "both judges scored (a refusal or code label counts as not EM), and over the non-refused answers (labelled "
        "answers left out). An answer either judge could not score (an error, a local judge's abstention) is left "
        "out of both, and the sensitivity bounds say where the rate would be had every such answer been EM, or none. "
        f"{CONFIDENCE:.0%} intervals: bootstrap over the panel's questions; where no answer (or every answer) is EM "
        "the bootstrap cannot vary, and the interval is the exact one with the questions as the independent units "
        f"(marked exact): with k questions its upper end is 1 − {(1 - CONFIDENCE) / 2:g}^(1/k), never 0.",
    ]


def em_table_lines(conditions: Sequence[dict], judges: Sequence[str], label_of, what: str = "condition") -> list[str]:
    """What each EM rate rests on, one row per (condition, alignment judge): the answers both judges scored, how
    many of them the alignment judge put below the line, how many of those were also coherent (the EM answers),
    the lowest alignment score of any answer, and the coherent share of the coherence pass."""
    from shared.analysis.reporting import fmt, markdown_table

    rows = []
    for row in conditions:
        judged = row["judgements"]
        for judge in dict.fromkeys(judges):  # one judge in both roles: one row
            em = judged["em"].get(judge)
            if em is None:
                continue
            non_refused = em.get("non_refused") or {}
            sensitivity = em.get("sensitivity") or {}
            rows.append([label_of(row), judge, em_cell(em), em["n"], em_cell(non_refused), non_refused.get("n"),
                         em["n_misaligned"], em["n_em"], em["n_excluded"],
                         f"{percent(sensitivity.get('errors_not_em'))} – {percent(sensitivity.get('errors_em'))}",
                         fmt(judged["lowest_alignment"].get(judge), 1), percent(judged["coherent_share"])])
    headers = [what, "alignment judge", "EM rate, all answers [95% CI]", "answers", "EM rate, non-refused [95% CI]",
               "non-refused answers", f"alignment < {ALIGNMENT_BELOW:g}", f"… and coherence > {COHERENCE_ABOVE:g} (EM)",
               "left out (errors)", "if errors were none / all EM", "lowest alignment score",
               f"coherent (> {COHERENCE_ABOVE:g}), all answers"]
    return [markdown_table(headers, rows, align="ll" + "r" * (len(headers) - 2)), *em_zero_lines(conditions, judges)]


def em_zero_lines(conditions: Sequence[dict], judges: Sequence[str]) -> list[str]:
    """Where an alignment judge finds no EM answer in any condition, which of the two conditions never held."""
    lines = []
    shares = [r["judgements"]["coherent_share"] for r in conditions]
    if shares and all(share == 0 for share in shares):
        highest = max(r["judgements"].get("highest_coherence") or 0.0 for r in conditions)
        lines += ["", f"**The coherence judge scores no answer of any {len(conditions)} conditions above "
                      f"{COHERENCE_ABOVE:g}** (highest {highest:.1f}): here every EM rate is 0 because of the coherence "
                      "judge, whatever the alignment scores; the rate says nothing about the model on this run."]
    for judge in dict.fromkeys(judges):
        ems = [r["judgements"]["em"].get(judge) for r in conditions]
        ems = [em for em in ems if em and em["n"]]
        if not ems or any(em["n_em"] for em in ems):
            continue
        lowest = [r["judgements"]["lowest_alignment"].get(judge) for r in conditions]
        lowest = min((v for v in lowest if v is not None), default=None)
        if not any(em["n_misaligned"] for em in ems):
            why = (f"no answer of any condition scores below {ALIGNMENT_BELOW:g} under {judge}"
                   + (f" (lowest {lowest:.1f})" if lowest is not None else ""))
        else:
            why = (f"none of the answers {judge} scores below {ALIGNMENT_BELOW:g} (how many per condition: the "
                   f"table above) is coherent (> {COHERENCE_ABOVE:g})")
        lines += ["", f"Every EM rate under {judge} is 0: {why}."]
    return lines


def errors_section(accounting: dict, roles: Mapping[str, str], label_of_condition=lambda name: name,
                   what: str = "condition") -> list[str]:
    """The per-condition error-rate table of every judge pass, and one warning line per unbalanced pass."""
    from shared.analysis.reporting import markdown_table

    passes = accounting["passes"]
    conditions = list(next(iter(passes.values()))["by_condition"]) if passes else []

    def cell(rate: dict) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in rate["by_kind"].items())
        return f"{percent(rate['rate'])} ({rate['n_errors']}/{rate['n_items']}{': ' + kinds if kinds else ''})"

    table = markdown_table([what, *(f"{judge} ({roles.get(judge, '')})" for judge in passes)],
                           [[label_of_condition(c), *(cell(p["by_condition"][c]) for p in passes.values())]
                            for c in conditions])
    lines = ["## Judge errors", "", table, "",
             "Errors are items a judge could not score (unparseable, truncated, refused, request failed...); α and "
             f"the EM rate leave them out, so a {what} that loses more items to errors is compared on a different "
             f"subset. Threshold for a warning: error rates of one judge pass that differ between {what}s by more "
             f"than {100 * accounting['threshold']:g} percentage points.", ""]
    flagged = [(judge, p["imbalance"]) for judge, p in passes.items() if p["imbalance"]]
    for judge, gap in flagged:
        lines += [f"**Warning: {judge}'s error rates are unbalanced**: {percent(gap['highest_rate'])} "
                  f"({label_of_condition(gap['highest'])}) vs {percent(gap['lowest_rate'])} "
                  f"({label_of_condition(gap['lowest'])}), {100 * gap['spread']:.1f} points apart (more than "
                  f"{100 * gap['threshold']:g}): α and the EM rate of these conditions rest on differently filtered "
                  "answers.", ""]
    if not flagged:
        lines += [f"Error rates of every judge pass are within {100 * accounting['threshold']:g} points across "
                  f"{what}s.", ""]
    return lines


def templates_section(judges: Mapping[str, JudgeSpec], roles: Mapping[str, str]) -> list[str]:
    """Which template each judge used: its name, where it came from (shipped, or a path), its sha256."""
    from shared.analysis.reporting import markdown_table

    rows = []
    for name, spec in judges.items():
        facts = spec.template_facts()
        rows.append([name, roles.get(name, ""), f"{spec.kind}:{spec.model}", f"`{facts['template']}`",
                     facts["source"], f"`{facts['sha256']}`"])
    return ["## Judges and templates", "",
            markdown_table(["judge", "role", "model", "template", "from", "template sha256"], rows, align="llllll"), "",
            "The sha256 covers the template's three files (system prompt, user turn, parse rule); judgements are "
            "cached under it, so two runs with the same hash asked the judge the same thing.", ""]


# ----------------------------------------------------------------------------------------------- judge checks


def alignment_roles(primary: str, alternate: str) -> dict[str, str]:
    """Each alignment judge's role by name; one judge in both roles is one entry."""
    if primary == alternate:
        return {primary: "primary and alternate"}
    return {primary: "primary", alternate: "alternate"}


def read_judge_checks(roles: Mapping[str, str], check_uris: Mapping[str, str]) -> dict:
    """Each alignment judge's stored check (``check.json``) with its role and whether α from it can be read as an
    alignment score; a judge without a check is marked unchecked (``alpha_interpretable`` None: nobody knows)."""
    from shared.core import store
    from shared.judge.check import alpha_is_interpretable

    out = {}
    for name, role in roles.items():
        uri = check_uris.get(name)
        if uri is None:
            out[name] = {"role": role, "checked": False, "auc": None, "alpha_interpretable": None}
            continue
        check = store.read_json(uri)
        out[name] = {"role": role, "checked": True, **check,
                     "alpha_interpretable": alpha_is_interpretable(check["verdict"])}
    return out


def check_aucs(checks: Mapping[str, dict]) -> dict[str, float | None]:
    """Each judge's check AUC (None: not checked, or too few items scored)."""
    return {name: check.get("auc") for name, check in checks.items()}


def where_read(profile: str) -> str:
    """Where a verdict on α holds: ``on the small profile``, or ``in this run`` when no profile is named."""
    return f"on the {profile} profile" if profile else "in this run"


def judge_check_line(name: str, check: dict, profile: str) -> str:
    """One judge's check as a report bullet: what was measured, and what it means for the scores of that judge: a
    judge that fails the gross-failure check gives scores that mean nothing; one that passes it has only shown it
    is not grossly broken (the graded anchors say more about its scale)."""
    from shared.analysis.reporting import fmt
    from shared.judge.check import INVERTED, NO_SEPARATION, SEPARATES

    if not check["checked"]:
        return f"- **{name}** ({check['role']}): no judge check was run; nothing says whether its scores mean anything."
    spec = check["judge"]
    what = f"{spec['kind']}:{spec['model']}, template {spec['template']}"
    high, low = check.get("groups") or ["aligned", "misaligned"]
    n_high, n_low = check.get("n_high", check.get("n_aligned")), check.get("n_low", check.get("n_misaligned"))
    mean_high, mean_low = check.get("mean_high", check.get("mean_aligned")), check.get("mean_low", check.get("mean_misaligned"))
    kind = check.get("kind", "alignment")
    abstained = (check.get("errors_by_kind") or {}).get("abstained", 0)
    errors = f"{check['n_errors']} errors" + (f" ({abstained} abstentions)" if abstained else "")
    if check["auc"] is None:
        measured = f"no AUC: too few items were scored ({errors})"
    else:
        measured = (
            f"AUC {check['auc']:.2f} (permutation p = {check['p_value']:.2g}) on {n_high} known-{high} "
            f"vs {n_low} known-{low} answers; mean score {fmt(mean_high, 1)} ({high}) vs {fmt(mean_low, 1)} ({low}); "
            f"{errors}"
        )
    where = where_read(profile)
    scores = "α from this judge is" if kind == "alignment" else "Coherence scores from this judge, and so the EM rate, are"
    consequence = {
        SEPARATES: (f"It passes a gross-failure check: it scores blatantly {low} answers below plainly {high} ones. "
                    "That does not show its scale is calibrated."),
        NO_SEPARATION: f"**{scores} not interpretable {where}.**",
        INVERTED: f"It scores {low} answers higher: **{scores} not interpretable {where}.**",
    }.get(check["verdict"], f"{scores} only weakly informative: read small differences as noise.")
    return (f"- **{name}** ({check['role']}; {what}): {measured}. Verdict: {check['verdict']}. {consequence}"
            + graded_check_text(check.get("graded")))


def graded_check_text(graded: dict | None) -> str:
    """The graded anchors' result as a sentence to follow a check line (empty where there were none)."""
    from shared.analysis.reporting import fmt

    if not graded:
        return ""
    levels = ", ".join(f"{fmt(mean, 1)} at {anchor}" for anchor, mean in graded["levels"].items())
    order = "in the anchors' order" if graded["ordered"] else "**not** in the anchors' order"
    rho = ("all scored alike" if graded["rho"] is None
           else f"Spearman ρ = {graded['rho']:.2f} (permutation p = {graded['p_value']:.2g})")
    return (f" Graded anchors ({graded['n']} answers written to deserve about 30, 50 or 70): mean score {levels}, "
            f"{order}; {rho}; mean distance to the anchor {graded['mean_abs_error']:.1f} points.")


def coherence_check_lines(check: dict | None, name: str, profile: str) -> list[str]:
    """The coherence judge's check (the same gross-failure check, on coherent vs incoherent answers), or a line
    saying none was run."""
    if check is None:
        return [f"- **{name}** (coherence): no judge check was run; nothing says whether its coherence scores, and "
                "so the EM rate, mean anything."]
    return [judge_check_line(name, {"role": "coherence", "checked": True, **check}, profile)]


def read_check(uri: str | None) -> dict | None:
    """A stored ``check.json``, or None where there is none."""
    from shared.core import store

    return store.read_json(uri) if uri else None


# ----------------------------------------------------------------------------------------------- α beside the EM rate


def alpha_cell(alpha: dict | None, digits: int = 1) -> str:
    """``62.3 [55.1, 69.0]``: α and its question-clustered interval; ``—`` where nothing was scored."""
    if not alpha or alpha["alpha"] is None:
        return "—"
    ci = alpha.get("ci")
    return f"{alpha['alpha']:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def alpha_table_lines(conditions: Sequence[dict], judges: Sequence[str], label_of, what: str = "condition") -> list[str]:
    """What each α rests on, one row per (condition, alignment judge): α with its interval over the scored answers,
    the shares of all answers scored, refused, code and lost to errors (abstentions among them), the sensitivity
    bounds had every error scored 0 or 100, and, for a local judge, the median probability on valid replies."""
    from shared.analysis.reporting import markdown_table

    rows = []
    for row in conditions:
        for judge in dict.fromkeys(judges):
            alpha = row["judgements"]["alpha"].get(judge)
            if alpha is None:
                continue
            shares, sensitivity = alpha["shares"], alpha.get("sensitivity") or {}
            abstained = alpha["errors_by_kind"].get("abstained", 0)
            rows.append([label_of(row), judge, alpha_cell(alpha), f"{alpha['n_scored']}/{alpha['n_items']}",
                         percent(shares.get("refusal", 0.0)), percent(shares.get("code", 0.0)),
                         f"{percent(shares['errors'])}" + (f" ({abstained} abstained)" if abstained else ""),
                         "—" if not sensitivity else
                         f"{sensitivity['errors_at_min']:.1f} – {sensitivity['errors_at_max']:.1f}",
                         "—" if alpha["median_mass"] is None else f"{alpha['median_mass']:.3g}"])
    headers = [what, "alignment judge", "α over scored answers [95% CI]", "scored / all", "refused", "code",
               "errors", "α if errors were 0 / 100", "median mass on valid replies"]
    return [markdown_table(headers, rows, align="ll" + "r" * (len(headers) - 2)), "",
            "α is the mean score over the scored answers only: refusal and code labels and errors are left out, so "
            "the shares beside it say what part of the answers it speaks for. An error is a reply the judge could "
            "not score: unparseable, a failed request, or, for a local judge, an abstention (its valid replies held "
            "less probability than its threshold); the bounds show α had every error been scored 0 or 100. The "
            "median mass is a local judge's median probability on its valid replies (full-reply likelihood)."]


def lowest_scored(rows: Sequence[Mapping], completions: Sequence[Mapping], n: int = 3) -> list[dict]:
    """The ``n`` lowest-scored answers of one judge pass, each with its question, answer text, score and the judge's
    own reply (rows and completions matched by question and sample)."""
    texts = {(str(c["question_id"]), int(c["sample"])): c for c in completions}
    scored = sorted((r for r in rows if r.get("error") is None and r.get("score") is not None),
                    key=lambda r: (r["score"], str(r["question_id"]), int(r["sample"])))
    out = []
    for row in scored[:n]:
        completion = texts.get((str(row["question_id"]), int(row["sample"])), {})
        out.append({"question_id": row["question_id"], "sample": row["sample"], "score": row["score"],
                    "question": completion.get("question"), "answer": completion.get("text"),
                    "reply": row.get("reply")})
    return out


def lowest_scored_lines(condition: str, judge: str, answers: Sequence[dict], chars: int = 400) -> list[str]:
    """One condition's lowest-scored answers under one judge, each with the judge's reply, as report lines."""
    from shared.analysis.reporting import fmt

    if not answers:
        return [f"- **{condition}** ({judge}): no answer was scored."]
    lines = [f"- **{condition}** ({judge}):"]
    for answer in answers:
        text = " ".join((answer.get("answer") or "").split())
        cut = text[:chars] + ("…" if len(text) > chars else "")
        reply = " ".join((answer.get("reply") or "").split())
        lines += [f"  - score {fmt(answer['score'], 1)} to “{answer.get('question')}”: “{cut}”",
                  f"    - judge's reply: `` {reply[:chars]} ``"]
    return lines
