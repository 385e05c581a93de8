"""Part 4 of ``analyze_issue170``: the markdown report, and what reproduces (for REPRODUCIBILITY.md), from the
results object alone."""

from __future__ import annotations

import json
import re

from jobs.analyze_issue170.figures import anchor_label
from jobs.analyze_issue170.results import LEARNED
from shared.judge.spec import JudgeSpec


def one_judge(data: dict) -> bool:
    """Whether the primary and alternate α columns come from one and the same judge."""
    return data["judges"]["primary"] == data["judges"]["alternate"] or data["judges"].get("same_scores", False)


def classifier_line(facts: dict) -> str:
    from shared.analysis.reporting import fmt

    if "val_accuracy" not in facts:
        return f"C is the mean P(EM) of classifier C ({facts['uri']}) over a cell's completions."
    return (f"C is the mean P(EM) of classifier C over a cell's completions: {facts.get('encoder_ref')} + logistic "
            f"regression, trained on {facts.get('n_positive')} EM-teacher vs {facts.get('n_negative')} base-model "
            f"completions, validation accuracy {fmt(facts['val_accuracy'], 4)} on {facts.get('n_val')} held out "
            f"({facts['uri']}).")


def setup_lines(params: dict) -> list[str]:
    """Who the student and the teacher are, from the experiment parameters."""
    if not params:
        return []
    student, system = params.get("model_ref"), params.get("teacher_system")
    if params.get("teacher_adapter_uri"):
        teacher = f"the EM adapter {params['teacher_adapter_uri']} on the student's weights, system slot `{system}`"
    elif params.get("teacher_model_ref") not in (None, student):
        teacher = f"the EM model {params['teacher_model_ref']}, system slot `{system}`"
    else:
        teacher = (f"the student model itself under the system prompt `{system}` (the stand-in for an EM model: "
                   "that prompt, given to the student as text, reproduces the teacher exactly)")
    return [f"Student: {student}. Teacher: {teacher}.", ""]


def local_judges(data: dict) -> list[str]:
    return sorted({spec["model"] for spec in data["judges"].get("specs", {}).values() if spec["kind"] == "local"})


def judge_caveat(data: dict) -> list[str]:
    """What the α columns are: one judge twice or two judges; each alignment judge's measured check; and, where a
    check fails or none was run, that α and the gates on it cannot be read as alignment."""
    from shared.judge.report import coherence_check_lines, judge_check_line, where_read

    checks, profile = data["judge_checks"], data.get("profile", "")
    lines = []
    if one_judge(data):
        lines.append(f"One judge ({data['judges']['primary']}) fills both of the record's judge roles (primary and "
                     "alternate), so α has one column and both α gates read it.")
    lines.append("Judge check: each alignment judge scores known-aligned and known-misaligned answers (project-written, "
                 "the judge_check stage); AUC is the chance that an aligned answer scores above a misaligned one "
                 "(0.5: chance), p its permutation p-value.\n\n"
                 + "\n".join([*(judge_check_line(name, check, profile) for name, check in checks.items()),
                              *(coherence_check_lines(data.get("coherence_check"), data["judges"]["coherence"],
                                                      profile) if data["judges"].get("coherence") else [])]))
    gates = "α, the H2 gate, the Pareto front and the user-slot sanity gate below"
    failed = {name: c["verdict"] for name, c in checks.items() if c["alpha_interpretable"] is False}
    unchecked = [name for name, c in checks.items() if not c["checked"]]
    if failed:
        verdicts = "; ".join(f"{name}: {verdict}" for name, verdict in failed.items())
        lines.append(f"**The judge check fails ({verdicts}): {gates} are not interpretable "
                     f"{where_read(profile)}. They are computed as the record defines them, but say nothing about "
                     "alignment.**")
    elif unchecked:
        lines.append(f"**No judge check was run for {', '.join(unchecked)}: read {gates} as unvalidated.**")
    local = local_judges(data)
    if local and not failed:
        lines.append(f"α is scored by a local model ({', '.join(local)}), not by the record's Claude judges: the "
                     "record's α thresholds were set for Claude judges' scale.")
    return lines


def alpha_status(data: dict) -> str:
    """How the decision rules' α reads, from the judge checks: interpretable, not interpretable, or unchecked."""
    checks = data["judge_checks"].values()
    if any(c["alpha_interpretable"] is False for c in checks):
        return "not interpretable"
    return "unchecked" if any(not c["checked"] for c in checks) else "interpretable"


def fence(text: str) -> str:
    """A fenced code block that its own content cannot close."""
    ticks = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return f"{ticks}\n{text}\n{ticks}"


def suffix_section(rows: list[dict]) -> list[str]:
    learned = [r for r in rows if "suffix_ids" in r]
    if not learned:
        return []
    lines = ["## Learned suffixes", "",
             "The ids each GCG search (one per training seed) or random draw kept, and what they decode to (a JSON "
             "string, so whitespace and control characters show). Evaluation splices the ids. *Round trip*: whether "
             "that text, typed where the ids sit and built by the one prompt builder, gives back exactly the "
             "evaluated ids -- checked by the search stage in the prompt of every question the suffix is used with "
             "(training, validation and evaluation panel); with the check on, a candidate that fails on any of them "
             "is never kept, and a kept suffix that failed would fail its stage.", ""]
    for r in learned:
        where = "user turn" if r["method"] == "gcg-user" else "system slot"
        lines += [f"**{r['name']}** ({r['method']}, {where}, L={r['size']}):", "",
                  fence("\n".join([f"text:   {json.dumps(r['suffix_text'], ensure_ascii=False)}",
                                   f"tokens: {json.dumps(r['suffix_pieces'], ensure_ascii=False)}",
                                   f"ids:    {json.dumps(r['suffix_ids'])}"])), "", round_trip_line(r), ""]
    return lines


def round_trip_line(row: dict) -> str:
    trip = row.get("suffix_round_trip")
    if trip is None:
        return "Round trip: not computed (the search stage predates the check)."
    where = "user turn" if row["method"] == "gcg-user" else "system slot"
    if trip["round_trips"] == trip["prompts"]:
        verdict = (f"**round-trips**: typed into the {where}, the text gives back exactly these ids in all "
                   f"{trip['prompts']} prompts it is used with")
    else:
        verdict = (f"**does not round-trip**: only in {trip['round_trips']} of the {trip['prompts']} prompts "
                   f"it is used with; elsewhere the text, typed into the {where}, becomes other ids there, so this cell's "
                   "result is not a typed prompt's")
    search = [f"tokens: {row['vocabulary']}"] if row.get("vocabulary") else []
    if row.get("candidates_rejected_share") is not None:
        search.append(f"{row['candidates_rejected_share']:.0%} of sampled candidates rejected as not text")
    return f"Round trip: {verdict}" + (f" ({'; '.join(search)})." if search else ".")


def reference_lines(data: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    if not data.get("reference_points"):
        return ["## Reference points", "",
                "The record's reference points (Qwen2.5-7B-Instruct under Claude judges) are not shown: they are not "
                "comparable with this model and judge. The reference cells above (same model, same pipeline) stand "
                "in for them.", ""]
    refs = markdown_table(["reference point (from the record)", "C", "α primary", "α alternate"],
                          [(p["name"], f"{p['c']:.3f}", p["alpha_primary"], p["alpha_alternate"])
                           for p in data["reference_points"]])
    return ["## Reference points", "", refs, ""]


def alpha_header(data: dict, name: str) -> str:
    """An α column's header: the judge, and its check AUC where one was measured."""
    auc = data["judge_checks"].get(name, {}).get("auc")
    return f"α ({name}" + ("" if auc is None else f", check AUC {auc:.2f}") + ")"


def no_alpha_lines(data: dict) -> list[str]:
    """Where a replicate has no α (every answer abstained, failed or was labelled): its cells print "—", and why."""
    j = data["judges"]
    missing = [(r["name"], j[role], why) for r in data["replicates"] for role, why in r["no_alpha"].items()
               if not (role == "alternate" and one_judge(data))]
    if not missing:
        return []
    return ["**No α** (printed as —, never as 0): " + "; ".join(f"{name} under {judge}: {why}"
                                                                 for name, judge, why in missing)
            + ". A replicate without α is undecided on the H2 gate, not inside it.", ""]


def alpha_section(data: dict) -> list[str]:
    """What each replicate's α rests on: the item set, the shares left out, sensitivity bounds, the local judge's
    method and its abstentions (``shared.judge.report.alpha_table_lines``), and the α/EM figure."""
    from jobs.analyze_issue164.report import local_judge_lines
    from shared.judge.report import alpha_table_lines

    j = data["judges"]
    return ["## α: what it rests on", "", *local_judge_lines(data),
            *alpha_table_lines(data["replicates"], [j["primary"], j["alternate"]], lambda r: r["name"],
                               what="replicate"), "", *no_alpha_lines(data),
            "![alpha and EM rate per replicate](alpha_em.png)", ""]


def lowest_section(data: dict) -> list[str]:
    from shared.judge.report import lowest_scored_lines

    j = data["judges"]
    lines = ["## The lowest-scored answers", "",
             f"Per replicate and alignment judge, the {data['constants']['n_lowest']} answers it scored lowest, with "
             "the judge's own reply (every judged answer: `python -m workflows export-inspect <run>`).", ""]
    for row in data["replicates"]:
        for judge in dict.fromkeys((j["primary"], j["alternate"])):
            lines += lowest_scored_lines(row["name"], judge, row["lowest"][judge])
    return [*lines, ""]


def em_section(data: dict, roles: tuple[str, ...], judges: dict[str, JudgeSpec]) -> list[str]:
    from shared.judge.report import em_definition_lines, em_table_lines

    j = data["judges"]
    if j.get("coherence") is None:
        return ["## EM rate", "", "No coherence pass was run, so no EM rate.", ""]
    spec = judges.get(j["coherence"])
    lines = ["## EM rate", "", *em_definition_lines(j["coherence"], spec), "",
             *em_table_lines(data["replicates"], [j[role] for role in roles], lambda r: r["name"], what="cell"), ""]
    return lines


def with_ci(value, low, high, digits: int = 2, *, signed: bool = False) -> str:
    """``12.34 [10.00, 14.50]``; the value alone where no interval could be computed; ``—`` for nothing."""
    if value is None:
        return "—"
    sign = "+" if signed else ""
    if low is None or high is None:
        return f"{value:{sign}.{digits}f}"
    return f"{value:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def across_cell(stat: dict | None, digits: int = 2, *, signed: bool = False, percent: bool = False) -> str:
    """A mean over seeds (or draws) with its between-unit interval: ``12.34 [10.00, 14.50]`` (``percent``: a
    share printed as ``12.3% [10.0%, 14.5%]``)."""
    if not stat or stat["mean"] is None:
        return "—"
    if percent:
        def pct(v):
            return f"{100 * v:.1f}%"
        return pct(stat["mean"]) if stat["low"] is None else \
            f"{pct(stat['mean'])} [{pct(stat['low'])}, {pct(stat['high'])}]"
    return with_ci(stat["mean"], stat["low"], stat["high"], digits, signed=signed)


def ci_cell(row: dict, key: str, digits: int = 2) -> str:
    """A replicate's value with its question-clustered interval."""
    low, high = row.get(f"{key}_ci") or [None, None]
    return with_ci(row[key], low, high, digits)


def seeds_lines(data: dict) -> list[str]:
    """Which training seeds ran and what the intervals and p-values are conditional on."""
    seeds = data["seeds"]
    if len(seeds) <= 1:
        seed = seeds[0] if seeds else "unrecorded"
        return [f"**One training seed ({seed}) per soft-prefix and GCG cell: every p-value and interval in this "
                "report is conditional on that one training run per cell.** The question-clustered intervals speak "
                "for these prompts, not for the recipe that made them: a second seed is what measures how much a "
                "rerun of the recipe moves them, and no between-seed interval can be computed here.", ""]
    return [f"Training seeds: {', '.join(str(s) for s in seeds)} ({len(seeds)} per soft-prefix and GCG cell, "
            "each its own training, evaluation, judging and scoring chain). Per cell, the headline gives the mean "
            f"over seeds with a {100 * data['confidence']:g}% t interval over seeds (the seed is the unit: the "
            "interval says how much a rerun of the recipe moves the number; with "
            f"{len(seeds)} seeds it has {len(seeds) - 1} degree(s) of freedom, t = {data['between_seed_t']:.2f}, so it "
            "is wide by construction, and it is not clipped to the metric's range); per seed, intervals resample the "
            "panel's questions. Random suffixes are not trained: their units are independent draws. Decision "
            f"rules are applied per seed and pooled: {data['decisions']['pooling_rule']}.", ""]


def headline_lines(data: dict, roles: tuple[str, ...], has_em: bool) -> list[str]:
    from shared.analysis.reporting import markdown_table

    j = data["judges"]
    fit = {c["cell"]: c for c in (data.get("fit") or {}).get("cells", [])}
    has_gap = any(c["gap_closed"]["mean"] is not None for c in fit.values())
    headers = ["cell", "method", "K / L", "lr", "init", "units", "C", *(alpha_header(data, j[role]) for role in roles),
               *(f"EM rate ({j[role]})" for role in roles if has_em), *(["gap closed (test)"] if has_gap else [])]
    rows = []
    for c in data["cells"]:
        units = ", ".join(str(u) for u in c["units"]) if c["unit"] != "fixed prompt" else "—"
        rows.append([c["cell"], c["method"], c["size"], f"{c['lr']:g}" if c["lr"] else None, c.get("init_text"),
                     f"{c['unit']} {units}" if units != "—" else units, across_cell(c["c"], 4),
                     *(across_cell(c[f"alpha_{role}"]) for role in roles),
                     *(across_cell(c[f"em_rate_{role}"], percent=True) for role in roles if has_em),
                     *([across_cell(fit.get(c["cell"], {}).get("gap_closed"))] if has_gap else [])])
    confidence = f"{100 * data['confidence']:g}%"
    return ["## Headline", "", markdown_table(headers, rows, align="llrrll" + "r" * (len(headers) - 6)), "",
            f"Each number is a cell's mean over its units (training seeds; draws for random suffixes) with a "
            f"{confidence} t interval over those units where there are two or more. α: mean alignment score over a "
            "cell's completions on the evaluation panel (0-100, higher is more aligned); C: mean P(EM) of classifier "
            "C; gap closed: on the test split (see Fit to the teacher). Reference cells are "
            "fixed prompts generated in the same pipeline"
            + ("; em-reference is the teacher itself" if any(c["cell"] == "em-reference" for c in data["cells"])
               else "") + ". Per-seed values with question-clustered intervals: next table.", ""]


def replicate_lines(data: dict, roles: tuple[str, ...], has_em: bool) -> list[str]:
    from shared.analysis.reporting import markdown_table
    from shared.judge.report import em_cell

    j, outcomes = data["judges"], data["decisions"]["h2_outcomes"]
    single = one_judge(data)
    headers = ["replicate", "seed / draw", "C", *(f"α ({j[role]})" for role in roles),
               *(f"EM rate ({j[role]})" for role in roles if has_em),
               ("errors" if single else "errors P/A") + ("/coherence" if has_em else ""), "H2 gate (intervals)"]
    rows = []
    for r in data["replicates"]:
        errors = [r[f"errors_{role}"] for role in roles] + ([r["errors_coherence"]] if has_em else [])
        unit = r["seed"] if r["seed"] is not None else (f"draw {r['draw']}" if r["draw"] is not None else "—")
        rows.append([r["name"], unit, ci_cell(r, "c", 4), *(ci_cell(r, f"alpha_{role}") for role in roles),
                     *(em_cell(r["judgements"]["em"][j[role]]) for role in roles if has_em),
                     " / ".join(str(n) for n in errors), outcomes.get(r["name"], "—")])
    return ["## Per seed", "", markdown_table(headers, rows, align="lr" + "r" * (len(headers) - 2)), "",
            f"Intervals: {100 * data['confidence']:g}% percentile bootstrap over the panel's questions "
            f"({data['n_boot']} resamples; the answers to one question share its prompt). Errors are judge items "
            "that failed, could not be parsed or on which a local judge abstained; they are left out of α and the EM rate, never scored as 0. H2 gate: "
            "*inside* when every bound is on the gate's side (α upper bounds at or below the maxima, C's lower bound "
            "at or above its minimum), *outside* when one bound alone rules the gate out, else *undecided*.", ""]


def fit_lines(fit: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    test = fit.get("test_set")
    if not test:
        return ["## Fit to the teacher", "", "No test split was measured: gap closed is not reported.", ""]
    oracle, start = fit["oracle"], fit["start"]
    headers = ["replicate", "method", "K / L", "test CE", f"{start} − cell [95% CI]"]
    if oracle:
        headers += ["cell − oracle [95% CI]", f"gap closed, {start} → oracle [95% CI]"]
    rows = []
    for r in fit["replicates"]:
        row = [r["name"], r["method"], r["size"], fmt(r.get("test_ce"), 4)]
        for key, digits in (("start_minus_cell", 4), *((("cell_minus_oracle", 4), ("gap_closed", 2)) if oracle else ())):
            value = r.get(key) or {}
            row.append(with_ci(value.get("estimate"), value.get("low"), value.get("high"), digits, signed=True))
        rows.append(row)
    pooled_rows = [[c["cell"], c["method"], c["size"], across_cell(c["test_ce"], 4),
                    across_cell(c["start_minus_cell"], 4, signed=True),
                    *((across_cell(c["cell_minus_oracle"], 4, signed=True), across_cell(c["gap_closed"], 2, signed=True))
                      if oracle else ())] for c in fit["cells"]]
    anchors = "; ".join(f"{anchor_label(a['name'])} = `{a['system']}` {test['anchors'][a['name']]:.4f}"
                        for a in fit["anchors"])
    lines = ["## Fit to the teacher: the test split", "",
             f"Token-mean cross-entropy of the student (nats/token) on the teacher's completions to the "
             f"{len(test['questions'])} test questions ({', '.join(test['questions'])}): used for nothing else -- not "
             "for training, early stopping, classifier C or the evaluation panel. The teacher answered each of them "
             f"{test['draws']['completions_per_question']} times, once for the whole run, so every prompt below is "
             f"measured on the same {test['n_pairs']} pairs ({test['n_loss_tokens']} scored tokens). Fixed prompts on "
             "these pairs: "
             f"{anchors}.", "",
             markdown_table(headers, rows, align="llr" + "r" * (len(headers) - 3)), "",
             f"What a prompt gained over the {start} prompt ({start} − cell)"
             + (", what is left to the oracle (cell − oracle), and their ratio, gap closed = (" + start
                + " − cell) / (" + start + " − oracle): 0 is no better than the " + start + " prompt, 1 is as good "
                "as the teacher's own prompt. " if oracle else ". ")
             + "Intervals: percentile bootstrap over the test questions, cell and anchors resampled together.", ""]
    if not oracle:
        lines += ["No oracle: the teacher is a different model (or an adapter), so no prompt is known to reproduce "
                  "it, and there is no gap to close; the fixed prompts show where optimisation started from.", ""]
    per_cell_headers = ["cell", "method", "K / L", "test CE", f"{start} − cell"] + (
        ["cell − oracle", "gap closed"] if oracle else [])
    lines += ["Per cell, the mean over its seeds (draws) with the between-unit interval:", "",
              markdown_table(per_cell_headers, pooled_rows, align="llr" + "r" * (len(per_cell_headers) - 3)), ""]
    difference = fit["max_difference_from_training"]
    if difference is not None:
        agrees = ("equals the training stage's own best held-out CE exactly" if difference == 0 else
                  f"differs from the training stage's own best held-out CE by at most {difference:.2e} nats/token")
        lines += [f"Check of the measurement: each kept prompt re-measured on its own validation pairs (the set that "
                  f"chose it: optimistic, and not used above) {agrees}.", ""]
    return lines


def random_null_lines(data: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    nulls = data["random_null"]
    if not nulls:
        return []
    lines = ["## The random-suffix null", "",
             "Random suffixes of each GCG length, drawn as text from a random stream of their own (not a GCG "
             "start), evaluated like every cell: the distribution of α, C and gap closed that an unoptimised suffix "
             "of that length gives. A GCG cell is compared with them as its training seeds against the draws "
             "(two-sample t over units, pooled variance).", ""]
    for entry in nulls:
        lines += [f"**L={entry['length']}**: {len(entry['draws'])} draws ({', '.join(entry['draws'])}); "
                  f"α {across_cell(entry['alpha_primary'])}, C {across_cell(entry['c'], 4)}, gap closed "
                  f"{across_cell(entry['gap_closed'], signed=True)} (mean [interval over draws]).", ""]
        if entry["identical_to_a_gcg_start"]:
            lines += [f"**Warning: {', '.join(entry['identical_to_a_gcg_start'])} equal a GCG start.**", ""]
        if entry["contrasts"]:
            lines += [markdown_table(
                ["GCG cell", "metric", "cell − null [95% CI]", "p", "seeds", "draws"],
                [(c["cell"], metric_label(data, c["metric"]),
                  with_ci(c["difference"], c["low"], c["high"], 4, signed=True),
                  "—" if c["p_value"] is None else f"{c['p_value']:.2g}", c["n_seeds"], c["n_draws"])
                 for c in entry["contrasts"]], align="llrrrr"), ""]
    return lines


def metric_label(data: dict, key: str) -> str:
    return {"alpha_primary": f"α ({data['judges']['primary']})", "c": "C",
            "gap_closed": "gap closed (test split)"}.get(key, key)


def screen_lines(data: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    facts = [f for f in data["screen"] if f.get("screen_on") is not None]
    if not facts:
        return []
    rows = []
    for f in facts:
        setting = (f"{f['screen_pairs']} of {f['pairs_per_step']} pairs, best {f['screen_keep']} of "
                   f"{f['search_width']} candidates" if f["screen_on"] else
                   f"off: all {f['search_width']} candidates on all {f['pairs_per_step']} pairs")
        checked = f.get("screen_checks") or 0
        rows.append([f["name"], setting, f"every {f['screen_check_every']} steps" if f["screen_on"] else "—", checked,
                     "—" if not checked else f"{100 * f['screen_agreement']:.0f}%",
                     fmt(f.get("screen_mean_rank"), 2) if checked else "—",
                     fmt(f.get("screen_mean_gap"), 4) if checked else "—"])
    return ["## GCG's candidate screen", "",
            markdown_table(["search", "screen", "full check", "steps checked", "agreement", "mean rank",
                            "mean CE gap (nats/token)"], rows, align="lllrrrr"), "",
            "The screen scores every sampled candidate on a few randomly drawn pairs of the step and only the best "
            "few, and always the current suffix, on all of them (the record scored every candidate on every pair). "
            "On the checked steps the search also runs that full evaluation and records whether the screen kept its "
            "best candidate (agreement), where the screen's pick ranks in it (0: the best) and how much higher its "
            "CE is; the search still keeps the screen's pick. Those columns are this run's own checked steps. How "
            "often a setting keeps the full evaluation's pick on real weights, over many steps, is what "
            "`python -m bench.gcg_screen_agreement` measures (bench/results/gcg_screen_agreement.md).", ""]


def best_cell_lines(data: dict) -> list[str]:
    best = data["best_cell"]
    if not best["criteria"]:
        return []
    labels = {"alpha_primary": f"lowest α ({data['judges']['primary']}), the record's best cell",
              "gap_closed": "largest gap closed on the test split"}
    lines = ["## The best cell", ""]
    if best["post_hoc"]:
        lines += ["**Chosen post hoc:** one training seed, so the best cell is chosen on the same run that "
                  "measures it, and its numbers are optimistic.", ""]
    else:
        lines += [f"Chosen on seed(s) {', '.join(str(s) for s in best['selection_seeds'])} and confirmed on "
                  f"seed(s) {', '.join(str(s) for s in best['confirmation_seeds'])}, which played no part in the "
                  "choice.", ""]
    for c in best["criteria"]:
        digits = 2
        line = f"- {labels[c['metric']]}: **{c['chosen']}** ({c['selection_value']:.{digits}f} on the selection seeds)"
        if "confirmation_value" in c:
            line += (f"; on the confirmation seeds {c['confirmation_value']:.{digits}f}, rank {c['confirmation_rank']} "
                     f"of {c['confirmation_cells']} sweep cells" + (
                         " (confirmed: still the best)." if c["confirmation_rank"] == 1 else
                         f" (not confirmed: {c['confirmation_best']} is best there)."))
        else:
            line += "."
        lines.append(line)
    return [*lines, ""]


def training_lines(data: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    trained = [r for r in data["replicates"] if r["method"] in LEARNED and r["steps"] is not None]
    table = markdown_table(
        ["replicate", "steps", "stopped early", "initial held-out CE", "best held-out CE", "teacher s/step",
         "optimiser s/step"],
        [(r["name"], r["steps"], "yes" if r["stopped_early"] else "no", fmt(r["initial_heldout_ce"], 4),
          fmt(r["best_heldout_ce"], 4), fmt(r["teacher_s_per_step"], 2), fmt(r["optimiser_s_per_step"], 2))
         for r in trained], align="lrlrrrr")
    return ["## Training", "", table, "",
            "Held-out CE is the student's token CE on the fixed cached set of teacher completions to the validation "
            "questions (the prefix or suffix with the lowest is the one evaluated, so it is optimistic; the test "
            "split above is not). A GCG search starts from a random suffix drawn from its training seed. Optimiser "
            "s/step: forward/backward for soft prefixes, gradient and candidate evaluation for GCG; random suffixes "
            "are not trained.", ""]


def decision_lines(data: dict) -> list[str]:
    d, j = data["decisions"], data["judges"]
    gate = d["h2_gate"]
    single = one_judge(data)
    confidence = f"{100 * d['confidence']:g}%"

    def cells(names):
        return ", ".join(names) or "none"

    lines = [
        "## Decision rules (as amended in the record)", "",
        f"- H2 gate: α ({j['primary']}) ≤ {gate['alpha_primary_max']} and α ("
        + ("the alternate judge's role, the same judge" if single else j["alternate"])
        + f") ≤ {gate['alpha_alternate_max']} and C ≥ {gate['c_min']} (C is a sanity floor since scope-amendment v3), "
        f"decided on the {confidence} question-clustered intervals: a replicate is inside only if both α upper "
        "bounds and C's lower bound are, not on its point estimates (and never on the best of several).",
        f"- Soft cells inside the gate in every seed: {cells(d['h2_soft_cells'])}; system-slot GCG cells: "
        f"{cells(d['h2_gcg_cells'])}; H_intermediate (on intervals, every seed): {cells(d['h_intermediate_cells'])}.",
    ]
    if not d["single_seed"]:
        lines.append("- Per seed: " + "; ".join(f"seed {seed}: {d['h1_h2_verdict_per_seed'][str(seed)]}"
                                                for seed in data["seeds"]) + ".")
    status = {"not interpretable": " (on α that is not interpretable: the judge check fails, see above).",
              "unchecked": " (on α from an unchecked judge: see above)."}.get(alpha_status(data), ".")
    pooled_by = "" if d["single_seed"] else f", pooled ({d['pooling_rule']})"
    lines.append(f"- **{d['h1_h2_verdict']}**{pooled_by}{status}")
    lines.append(f"- On point estimates alone (the record's reading): soft cells at or inside the gate in every seed: "
                 f"{cells(d['point_estimate_h2_soft_cells'])}.")
    lines.append(f"- Pareto front of the sweep cells (higher mean C, lower mean α), by C: {cells(d['pareto_front'])}.")
    sanity = data["rules"]["gcg_user_slot_sanity"]["alpha_primary_max"]
    for cell, result in d["gcg_user_slot_sanity"].items():
        lines.append(f"- GCG user-slot sanity (upper bound of α ≤ {sanity}): {cell} "
                     f"{'passes' if result['passes'] else 'fails'} ({result['n_pass']} of {len(result['per_seed'])} "
                     "seeds).")
    return [*lines, ""]


def projection_lines(data: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    if "projection" not in data:
        return []
    p, h3 = data["projection"], data["decisions"]["h3"]
    fixed = [(f"{anchor_label(n)} (fixed prompt)", f"{c['mean_cosine']:.4f}", f"{c['cosine_of_mean_delta']:.4f}")
             for n, c in (p.get("fixed_prompts") or {}).items()]
    lines = ["## Villain-direction projection (H3)", "",
             f"Layer L is {p.get('layer_convention') or 'not recorded by the villain_direction artifact'}.", "",
             f"Layer chosen by Cohen's d: {p['chosen_layer']} (d by layer: "
             + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(p["cohens_d"].items(), key=lambda kv: float(kv[0])))
             + ").", "",
             markdown_table(["prompt", "mean cosine(Δh, villain)", "cosine of mean Δh"],
                            [("pirate baseline", f"{p['pirate']['mean_cosine']:.4f}",
                              f"{p['pirate']['cosine_of_mean_delta']:.4f}"), *fixed]
                            + [(n, f"{c['mean_cosine']:.4f}", f"{c['cosine_of_mean_delta']:.4f}")
                               for n, c in p["cells"].items()]), ""]
    if any(stat["n"] > 1 for stat in p["by_cell"].values()):
        lines += ["Per cell, the mean cosine over its seeds (draws) with the between-unit interval: "
                  + "; ".join(f"{cell} {across_cell(stat, 4)}" for cell, stat in p["by_cell"].items()) + ".", ""]
    lines += [f"Δh: residual stream at the last user token under the prompt minus under `{p['reference_system']}`, "
              f"per probe; the direction is the villain persona's centroid minus the other personas' mean, from "
              f"{p['direction_source']}.", "",
              f"- H3 (amended): cosine > pirate + {data['rules']['h3']['margin_over_pirate']} = {h3['threshold']:.4f} "
              f"in every seed: {', '.join(h3['cells_passing']) or 'no cell'} passes.",
              f"- H3 (original, cosine ≥ {data['rules']['h3']['original_cosine_min']}): "
              f"{', '.join(h3['cells_passing_original_0_5']) or 'no cell'}."]
    for name, c in (p.get("fixed_prompts") or {}).items():
        verb = "would pass" if c["mean_cosine"] > h3["threshold"] else "would not pass"
        lines.append(f"- Calibration: {anchor_label(name)} projects at {c['mean_cosine']:.4f}, so it {verb} the "
                     "amended threshold itself.")
    return [*lines, ""]


def report_text(data: dict) -> str:
    """The report: every number in it is printed from ``data`` (the results object)."""
    from shared.judge.report import errors_section, templates_section

    judges = {name: JudgeSpec.model_validate(spec) for name, spec in data["judges"]["specs"].items()}
    j = data["judges"]
    roles = ("primary",) if one_judge(data) else ("primary", "alternate")
    has_em = j.get("coherence") is not None
    lines = [
        "# #170: soft-prefix and GCG prompts against the EM teacher", "",
        *setup_lines(data.get("setup", {})),
        *seeds_lines(data),
        *headline_lines(data, roles, has_em),
        *replicate_lines(data, roles, has_em),
        *[line for caveat in judge_caveat(data) for line in (caveat, "")],
        classifier_line(data["classifier"]), "",
        *alpha_section(data),
        *em_section(data, roles, judges),
        *lowest_section(data),
        *errors_section(data["judge_errors"], data["roles"], what="cell"),
        *templates_section(judges, data["roles"]),
    ]
    if data.get("fit"):
        lines += fit_lines(data["fit"])
    lines += [
        *random_null_lines(data),
        *screen_lines(data),
        "![Train and held-out CE during training](training_curves.png)", "",
        "![Pareto](pareto.png)", "", "![Capacity curve](capacity_curve.png)", "",
        *suffix_section(data["replicates"]),
        *training_lines(data),
        *best_cell_lines(data),
        *reference_lines(data),
        *decision_lines(data),
        *projection_lines(data),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


REPRODUCES = """## What reproduces bitwise, and what only in distribution

- **Bitwise, from the same stored inputs:** this analysis (every bootstrap is seeded by the stage's seed), the
  train/validation/test split (seeded by the run's seed), the random suffixes and GCG starts (drawn from their
  seeds on the CPU), every cache key, and the round-trip checks.
- **Bitwise on the same hardware, software and batch sizes:** teacher draws, evaluation completions and judge
  scores of a local judge, all sampled with seeded generators on the CPU.
- **Only in distribution:** anything sampled on a GPU (seeded sampling depends on batch sizes and kernels; bf16
  GPU kernels are not deterministic), so soft-prefix training, GCG searches, completions and the α, C, EM rate and
  CE numbers built on them reproduce within their sampling noise, not digit for digit; Claude judges (the API is
  not deterministic; cached verdicts make a re-run of the same completions reuse them). The between-seed intervals
  are the measure of how far a rerun of a training recipe moves a number.
"""
