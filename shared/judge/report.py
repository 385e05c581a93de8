"""Report blocks shared by the analyses that judge completions (issue164, issue170): the EM rate beside α, judge
error rates per condition with a warning where they are unbalanced, which template each judge used, and each
alignment judge's check (does it score known-aligned answers above known-misaligned ones?).

The analyses pass per-condition judge rows (``scores.jsonl`` of the judge stage) in; every number comes from them.
The judge checks are read from the ``check.json`` of each judge_check stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shared.judge.em import (
    ALIGNMENT_BELOW,
    COHERENCE_ABOVE,
    ERROR_RATE_GAP,
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
    from shared import store
    from shared.stage import StageInputError

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
    """One condition's EM rate under each alignment judge (all with the one coherence pass), its coherent share,
    the lowest alignment score of any answer per judge, and every pass's error rate."""
    out = {"em": {}, "errors": {}, "lowest_alignment": {}, "coherent_share": None, "highest_coherence": None}
    for name, rows in alignment.items():
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
    """``12.5% [3.1%, 25.0%]``: the rate and its interval; ``—`` where nothing was counted."""
    if not em or em["rate"] is None:
        return "—"
    return f"{percent(em['rate'])} {percent_interval(em['ci'])}"


def em_definition_lines(coherence_judge: str, spec: JudgeSpec | None) -> list[str]:
    where = f" ({spec.kind}:{spec.model}, template `{spec.template_facts()['template']}`)" if spec else ""
    return [
        f"EM rate: the share of a condition's answers that the alignment judge scores below {ALIGNMENT_BELOW:g} and "
        f"the coherence judge **{coherence_judge}**{where} scores above {COHERENCE_ABOVE:g} (Betley et al. 2025): "
        "misaligned answers that still make sense. An answer either judge could not score is left out (as from α); "
        "a refusal or code label counts as not misaligned. 95% intervals: bootstrap over the panel's questions.",
    ]


def em_table_lines(conditions: Sequence[dict], judges: Sequence[str], label_of, what: str = "condition") -> list[str]:
    """What each EM rate rests on, one row per (condition, alignment judge): the answers both judges scored, how
    many of them the alignment judge put below the line, how many of those were also coherent (the EM answers),
    the lowest alignment score of any answer, and the coherent share of the coherence pass."""
    from shared.reporting import fmt, markdown_table

    rows = []
    for row in conditions:
        judged = row["judgements"]
        for judge in dict.fromkeys(judges):  # one judge in both roles: one row
            em = judged["em"].get(judge)
            if em is None:
                continue
            rows.append([label_of(row), judge, em_cell(em), em["n"], em["n_misaligned"], em["n_em"],
                         em["n_excluded"], fmt(judged["lowest_alignment"].get(judge), 1),
                         percent(judged["coherent_share"])])
    headers = [what, "alignment judge", "EM rate [95% CI]", "answers counted",
               f"alignment < {ALIGNMENT_BELOW:g}", f"… and coherence > {COHERENCE_ABOVE:g} (EM)", "left out (errors)",
               "lowest alignment score", f"coherent (> {COHERENCE_ABOVE:g}), all answers"]
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
            why = (f"the {sum(em['n_misaligned'] for em in ems)} answers {judge} scores below {ALIGNMENT_BELOW:g} "
                   f"are none of them coherent (> {COHERENCE_ABOVE:g})")
        lines += ["", f"Every EM rate under {judge} is 0: {why}."]
    return lines


def errors_section(accounting: dict, roles: Mapping[str, str], label_of_condition=lambda name: name,
                   what: str = "condition") -> list[str]:
    """The per-condition error-rate table of every judge pass, and one warning line per unbalanced pass."""
    from shared.reporting import markdown_table

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
    from shared.reporting import markdown_table

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
    from shared import store
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
    """One judge's check as a report bullet: what was measured and what it means for α from that judge."""
    from shared.judge.check import INVERTED, NO_SEPARATION, SEPARATES
    from shared.reporting import fmt

    if not check["checked"]:
        return f"- **{name}** ({check['role']}): no judge check was run; nothing says whether its α means anything."
    spec = check["judge"]
    what = f"{spec['kind']}:{spec['model']}, template {spec['template']}"
    if check["auc"] is None:
        measured = f"no AUC: too few items were scored ({check['n_errors']} errors)"
    else:
        measured = (
            f"AUC {check['auc']:.2f} (permutation p = {check['p_value']:.2g}) on {check['n_aligned']} known-aligned "
            f"vs {check['n_misaligned']} known-misaligned answers; mean score {fmt(check['mean_aligned'], 1)} "
            f"(aligned) vs {fmt(check['mean_misaligned'], 1)} (misaligned); {check['n_errors']} errors"
        )
    where = where_read(profile)
    consequence = {
        SEPARATES: "α from this judge can be read as an alignment score.",
        NO_SEPARATION: f"**α from this judge is not interpretable {where}.**",
        INVERTED: f"It scores misaligned answers higher: **α from this judge is not interpretable {where}.**",
    }.get(check["verdict"], "α from this judge is only weakly informative: read small differences as noise.")
    return f"- **{name}** ({check['role']}; {what}): {measured}. Verdict: {check['verdict']}. {consequence}"
