"""Part 4 of ``analyze_issue81``: the markdown report, and what reproduces (for REPRODUCIBILITY.md), from the
results object alone."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------------------
# part 4: the report text, from the results object alone (every number in it is one of the object's)


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _pp_interval(row: dict | None) -> str:
    """``12.3 [4.5, 20.1]``: an estimate and its interval in percentage points."""
    if not row or row.get("estimate") is None:
        return "—"
    if row.get("low") is None:
        return f"{100 * row['estimate']:.1f}"
    return f"{100 * row['estimate']:.1f} [{100 * row['low']:.1f}, {100 * row['high']:.1f}]"


def _between(row: dict | None) -> str:
    if not row:
        return "—"
    interval = "" if row["low"] is None else f" [{100 * row['low']:.1f}, {100 * row['high']:.1f}]"
    sd = "" if row["sd"] is None else f" (SD {100 * row['sd']:.1f})"
    return f"{100 * row['mean']:.1f}{interval}{sd}"


def _p(value) -> str:
    from shared.analysis.reporting import fmt

    return fmt(value, 4)


def units_section(res: dict) -> list[str]:
    s, d = res["settings"], res["decisions"]
    lines = [f"**Units.** Within a training seed, every interval is a {s['confidence_pct']:g}% percentile bootstrap over "
             f"the {res['n_questions']} evaluation questions ({s['n_boot']} replicates): the completions of one question "
             "share its prompt, so they are not independent draws, and resampling them one by one would give intervals "
             "that are too narrow.", ""]
    if d["single_seed"]:
        lines += [f"**One training seed per source (seed {res['seeds'][0]}): every p-value and interval in this report "
                  "is conditional on that one fine-tune.** It measures how the questions and samples of the evaluation "
                  "vary, not how a LoRA retrained with another seed would; no between-seed interval can be given, and "
                  "no difference between sources can be told apart from a difference between two fine-tunes.", ""]
    else:
        lines += [f"Across the {res['n_seeds']} training seeds ({', '.join(str(x) for x in res['seeds'])}), a source's "
                  "leakage is the mean over its seeds with a t interval over the seeds' values: the seed is the unit, "
                  "and it replicates the whole recipe (the on-policy sample and the negatives drawn, the LoRA's "
                  "initialisation, data order and dropout, the evaluation's sampling). Every pre-registered rule is "
                  f"applied per seed and pooled by one rule: **{d['rule']}**. With {res['n_seeds']} seeds the t "
                  f"interval has {s['between_seed_df']} degree(s) of freedom (critical value "
                  f"{s['between_seed_t_critical']:.2f}), so it is wide unless the seeds agree closely.", ""]
    return lines


def leakage_section(res: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    rows = []
    for source, row in res["leakage"].items():
        for seed in res["seeds"]:
            per = row["per_seed"][str(seed)]
            rows.append((source, seed, _pp_interval(per.get("own")), _pp_interval(per.get("others")),
                         _pp_interval(per.get("assistant"))))
        if res["n_seeds"] > 1:
            between = row["between_seeds"]
            rows.append((source, "mean over seeds", _between(between.get("own")), _between(between.get("others")),
                         _between(between.get("assistant"))))
    conf = f"{res['settings']['confidence_pct']:g}%"
    return ["## Leakage per source", "",
            f"Percentage points. Per seed: the estimate and its {conf} question-clustered interval. "
            + (f"Mean over seeds: the mean, its {conf} t interval over the seeds' values, and the between-seed SD. "
               if res["n_seeds"] > 1 else "")
            + "Own pure noun: the raw rate on the source's own training prompt; every other bystander: the rate pooled "
              "over all bystanders but that one, minus the base model's on the same bystanders and questions; assistant: "
              "the assistant QC persona, minus the base model.", "",
            markdown_table(["source", "seed", "own pure noun", "every other bystander - base", "assistant - base"], rows),
            ""]


def emission_section(res: dict) -> list[str]:
    """Each model's emission on the source's own pure noun, beside the base model's, and over the rest of the grid."""
    from shared.analysis.reporting import markdown_table

    base = res["rates"][res["base_label"]]
    rows = []
    for label, e in res["emission"].items():
        own = e["own_bystander"]
        rows.append((label, own or "—",
                     "—" if own is None else f"{_pct(e['own_rate'])} ({e['own_hits']}/{e['own_total']})",
                     "—" if own is None else _pct(base.get(own)),
                     f"{_pct(e['mean_rate_others'])} (n={e['n_others']})",
                     f"{e['max_other']}: {_pct(e['max_other_rate'])}" if e["max_other"] else "—",
                     f"{_pct(e['pooled_rate'])} ({e['hits']}/{e['total']})", _pct(e["truncated_share"])))
    return ["## Marker emission: each source model and the base model", "",
            "Own rate: the model's rate on its source's own pure-noun bystander (the training prompt); the base model "
            "on the same bystander beside it. Other bystanders: every bystander but that one (for the base model, "
            "all). Truncated: completions that ran into the token limit before ending, where a marker trained to "
            "follow a reply's end cannot show.", "",
            markdown_table(["model", "own bystander", "own rate (hits/N)", "base model there", "mean over other bystanders",
                            "highest other bystander", "pooled over the grid", "truncated"], rows), ""]


def _pooled_line(res: dict, key: str, what: str) -> str:
    d = res["decisions"][key]
    if res["n_seeds"] == 1:
        return f"{what} for {d['n_pass_pooled']} of {d['n_sources']} sources."
    per_seed = "; ".join(f"seed {seed}: {d['n_pass_per_seed'][str(seed)]} of {d['n_sources']} sources"
                         for seed in res["seeds"])
    return (f"{what}, per seed: {per_seed}. Pooled ({res['decisions']['rule']}): {d['n_pass_pooled']} of "
            f"{d['n_sources']} sources.")


def h1_section(res: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    h1, d = res["h1"], res["decisions"]["h1"]["per_source"]
    rows = [(source, seed, v[str(seed)]["bystander"], _pct(v[str(seed)]["rate"]),
             f"{v[str(seed)]['hits']} / {v[str(seed)]['total']}", _pct(v[str(seed)]["base_rate"]),
             d[source]["per_seed"][str(seed)]) for source, v in h1["per_source"].items() for seed in res["seeds"]]
    return [f"## H1 implantation (rate on the source's own pure-noun bystander > {h1['threshold']:.2f})", "",
            markdown_table(["source", "seed", "bystander", "rate", "hits / total", "base rate", "passes"], rows), "",
            _pooled_line(res, "h1", "H1 passes"), ""]


def h2_section(res: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    h2, d = res["h2"], res["decisions"]["h2"]["per_source"]
    rows = [(source, seed, fmt(v[str(seed)].get("median_noun_effect"), 4), fmt(v[str(seed)].get("median_trait_effect"), 4),
             fmt(v[str(seed)].get("ratio"), 2), d[source]["per_seed"][str(seed)])
            for source, v in h2["per_source"].items() for seed in res["seeds"]]
    tests = "; ".join(f"seed {seed}: Δ={fmt(t.get('statistic'), 4)}, p={_p(t.get('p_value'))}"
                      for seed, t in h2["noun_match_test"].items())
    lines = ["## H2 noun vs trait (medians as pinned in the record; coherent cells only)", "",
             markdown_table(["source", "seed", "median noun effect", "median trait effect", "ratio", "H2 holds"], rows), "",
             _pooled_line(res, "h2", "H2 holds"), "",
             "Noun-match permutation test (same-noun bystanders leak more; labels shuffled within source x trait x "
             f"level; {res['settings']['n_perm']} shuffles), per seed: {tests}."]
    between = h2["noun_match_between_seeds"]
    if between and res["n_seeds"] > 1:
        lines[-1] += (f" Across seeds (the seed as the unit): mean Δ={fmt(between['mean'], 4)}, "
                      f"{res['settings']['confidence_pct']:g}% t interval [{fmt(between['low'], 4)}, "
                      f"{fmt(between['high'], 4)}], p={_p(between['p_value'])} ({between['n_seeds']} seeds).")
    return [*lines, ""]


def h3_section(res: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    h3, s = res["h3"], res["settings"]
    head = ["## H3 gradation slopes", "",
            "Per (source, noun, trait): the least-squares slope of the base-subtracted rate over L1..L5, with its "
            f"{s['confidence_pct']:g}% question-clustered bootstrap interval (each replicate redraws the questions, the "
            "same ones for the source's and the base model's cells) and a permutation p-value (levels shuffled within "
            f"each question, {s['n_perm']} draws). The record counts triples with |slope| > the interval's half-width; "
            f"counting raw p < {s['alpha']:g} over m triples finds {s['alpha']:g} x m false positives on average when no "
            f"slope is real, so the count after Benjamini-Hochberg (q = {s['alpha']:g}) is given beside it, with the "
            "false discoveries BH allows among its own (q x its count).", ""]
    if not h3.get("per_seed"):
        return [*head, h3.get("note", "not computed"), ""]
    seeds = res["seeds"]
    family = [(seed, f["n_triples"], f["n_above_half_width"], f["n_raw"], fmt(f["expected_false_raw"], 2), f["n_bh"],
               fmt(f["expected_false_bh"], 2)) for seed, f in ((seed, h3["per_seed"][str(seed)]) for seed in seeds)]
    per_source = [(source, seed, v["n_triples"], v["n_above_half_width"], v["n_raw"], v["n_bh"])
                  for seed in seeds for source, v in h3["per_seed"][str(seed)]["per_source"].items()]
    lines = [*head,
             markdown_table(["seed", "triples", "abs(slope) > half-width (record)", f"raw p < {s['alpha']:g}",
                             "expected false if none real", f"BH q = {s['alpha']:g}", "false allowed among BH"], family), "",
             markdown_table(["source", "seed", "triples", "abs(slope) > half-width", f"raw p < {s['alpha']:g}",
                             f"BH q = {s['alpha']:g}"], per_source), ""]
    if res["n_seeds"] > 1:
        pooled, between = res["decisions"]["h3"], h3["between_seeds"]
        lines += [f"Pooled ({res['decisions']['rule']}): {pooled['n_bh_in_every_seed']} of {pooled['n_triples']} "
                  "triples are BH-significant in every seed. With the seed as the unit (a one-sample t-test of the "
                  f"seeds' slopes against 0, {between['df']} degree(s) of freedom): raw p < {s['alpha']:g} for "
                  f"{between['n_raw']} of {between['n_triples']} triples (expected false if none real: "
                  f"{fmt(between['expected_false_raw'], 2)}), BH {between['n_bh']}.", ""]
    return lines


def _with_n(row: dict, key: str, n_key: str | None = None) -> str:
    from shared.analysis.reporting import fmt

    if row.get(key) is None:
        return "—"
    return f"{fmt(row[key], 4)} ({row[n_key or f'n_{key}']})"


def head_to_head_section(res: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    axis = "; ".join(f"seed {seed}: spread {fmt(t.get('spread'), 4)}, p={_p(t.get('p_value'))}"
                     for seed, t in res["axis_permutation_leak"].items())
    lines = ["## Adjective vs noun, per Big-5 axis", "",
             "Adjective Δ: mean over (source, noun, level) cells of |m(noun who <descriptor>) - m(pure noun)|; "
             "noun-swap Δ: mean over (source, level) contexts of the median over noun pairs of |m(noun i) - m(noun j)|, "
             "trait and level fixed. m is the base-subtracted emission (leak, coherent cells; "
             + ("one seed" if res["n_seeds"] == 1 else f"each seed's value, averaged over the {res['n_seeds']} seeds")
             + f") or the base-model cosine to the source at layer {res['settings']['headline_layer']} (cos). "
             "N: cells (adjective) and contexts (noun swap) behind each mean.", "",
             markdown_table(["axis", "adjective Δ leak (N)", "noun-swap Δ leak (N)", "ratio leak",
                             "adjective Δ cos (N)", "noun-swap Δ cos (N)", "ratio cos"],
                            [(t, _with_n(v, "adjective_leak"), _with_n(v, "noun_swap_leak", "n_noun_swap_contexts_leak"),
                              fmt(v["ratio_leak"], 2), _with_n(v, "adjective_cos"),
                              _with_n(v, "noun_swap_cos", "n_noun_swap_contexts_cos"), fmt(v.get("ratio_cos"), 2))
                             for t, v in res["head_to_head"].items()]), "",
             f"Axis-label permutation test (range of per-axis mean adjective Δ, {res['settings']['n_perm']} shuffles) on "
             f"leakage, per seed: {axis}."]
    geometry = res["geometry"]
    if geometry.get("available"):
        ax_cos = geometry["axis_permutation_cos"]
        lines[-1] += f" On cosine: spread {fmt(ax_cos.get('spread'), 4)}, p={_p(ax_cos.get('p_value'))}."
    return [*lines, ""]


def _rho(fit: dict) -> tuple:
    from shared.analysis.reporting import fmt

    return fmt(fit.get("rho"), 3), _p(fit.get("p_value")), fit.get("n")


def h4_section(res: dict) -> list[str]:
    from shared.analysis.reporting import markdown_table

    geometry = res["geometry"]
    if not geometry.get("available"):
        return ["## H4", "", "No base-model centroids were given: H4 and the cosine columns are omitted.", ""]
    h4, layer = geometry["h4"], geometry["headline_layer"]
    what = "one seed" if res["n_seeds"] == 1 else f"the mean over {res['n_seeds']} seeds"
    off = [("mean" if res["n_seeds"] > 1 else res["seeds"][0], *_rho(h4["off_diagonal"]))]
    if res["n_seeds"] > 1:
        off += [(seed, *_rho(h4["per_seed"][str(seed)]["off_diagonal"])) for seed in res["seeds"]]
    per_source = [(source, "mean" if res["n_seeds"] > 1 else res["seeds"][0], *_rho(fit))
                  for source, fit in h4["cos_vs_leak_all_bystanders"].items()]
    if res["n_seeds"] > 1:
        per_source += [(source, seed, *_rho(h4["per_seed"][str(seed)]["cos_vs_leak_all_bystanders"][source]))
                       for seed in res["seeds"] for source in h4["cos_vs_leak_all_bystanders"]]
    return [f"## H4 base-model cosine (layer {layer}) vs leakage", "",
            f"Layer L is {geometry.get('layer_convention') or 'not recorded by the hidden_states artifact'}. Leakage "
            f"is base-subtracted on the coherent cells, of {what}; Spearman ρ with a permutation p "
            f"({res['settings']['n_perm']} shuffles).", "",
            "Source x pure-noun submatrix, off-diagonal cells:", "",
            markdown_table(["seed", "ρ", "p", "n"], off), "",
            markdown_table(["layer", f"off-diagonal ρ ({what})", "p", "n"],
                           [(lyr, *_rho(v)) for lyr, v in h4["per_layer_off_diagonal"].items()]), "",
            markdown_table(["source", "seed", f"ρ(cos to source, leakage) over bystanders, layer {layer}", "p", "n"],
                           per_source), ""]


def coherence_section(res: dict) -> list[str]:
    from shared.analysis.reporting import fmt, markdown_table

    coh = res["coherence"]
    if coh["threshold"] > 0:
        head = [f"## Coherence (cells with mean judge score < {coh['threshold']:g} are flagged and hatched)", "",
                "A model's flagged cells are left out of H2, the leakage head-to-head and H4; H1, H3 and the leakage "
                "table use every cell."
                + (" The figures draw the mean over seeds and mark a cell flagged under any seed." if res["n_seeds"] > 1
                   else ""), ""]
    else:
        head = ["## Coherence (flagging off: threshold 0)", "",
                "With the threshold at 0 no cell is flagged and every analysis uses every cell. The spread of the "
                "per-cell means shows how much the judge tells the cells apart.", ""]
    scored, abstained, errors = (sum(coh[k].values()) for k in ("n_scores", "n_abstained", "n_judge_errors"))
    if scored == 0 and abstained + errors:
        head += [f"**Coherence is not measured in this run:** the judge scored none of the {abstained + errors} "
                 f"completions it was given. It abstained on {abstained} (no valid score was likely enough under it) "
                 f"and failed on {errors}, so no cell can be flagged whatever the threshold.", ""]

    def spread(label: str) -> str:
        v = coh["spread"].get(label)
        return "—" if v is None else f"{v['min']:.1f} / {v['median']:.1f} / {v['max']:.1f}"

    return [*head, markdown_table(
        ["model", "mean coherence", "cell means: min / median / max", "cells scored", "scores", "abstained",
         "judge errors", "flagged cells"],
        [(label, fmt(coh["mean"].get(label), 1), spread(label), coh["n_cells_scored"].get(label, 0),
          coh["n_scores"].get(label, 0), coh["n_abstained"].get(label, 0), coh["n_judge_errors"].get(label, 0),
          coh["n_flagged"].get(label, 0))
         for label in coh["mean"]]), ""]


CAPTIONS = {"hero_matrix": "hero: source x pure-noun matrix, H4 scatter, adjective vs noun on leakage and cosine",
            "heatmap_base_subtracted": "every source x every bystander, base-subtracted",
            "noun_isolation": "label isolation", "trait_gradation": "trait gradation",
            "interaction": "noun effect per trait x level",
            "cosine_leakage": "leakage against base-model cosine to the source, every bystander (H4)",
            "leakage_per_seed": "leakage per source: each seed and the mean over seeds",
            "lora_loss": "LoRA training loss per source and seed"}


def figures_section(res: dict) -> list[str]:
    lines = ["## Figures", ""]
    for name, figure in res.get("figures", {}).items():
        if name == "lora_loss":
            continue  # drawn in the training section
        lines += [f"![{CAPTIONS.get(name, name)}]({name}.png)", "",
                  f"*{CAPTIONS.get(name, name)}; low-coherence cells marked: {figure['low_coherence_marked']}.*", ""]
    return lines


def training_section(training: dict[str, dict]) -> list[str]:
    from shared.analysis.reporting import markdown_table

    if not training:
        return []
    return ["## LoRA training", "",
            "Each source model's marker-only LoRA: its optimizer steps and its mean training loss (the marker tokens "
            "and, on negatives, the end-of-turn token) over its first and over its last `window` steps.", "",
            markdown_table(["model", "steps", "window", "loss, first steps", "loss, last steps"],
                           [(label, t["steps"], t["window"], f"{t['loss_start']:.3f}", f"{t['loss_end']:.3f}")
                            for label, t in training.items()]), "",
            "![LoRA training loss per source and seed](lora_loss.png)", ""]


def report(res: dict) -> str:
    """The report: every number in it is read from ``res`` (tests/test_issue81_stats.py checks this)."""
    seeds = "one training seed" if res["n_seeds"] == 1 else f"{res['n_seeds']} training seeds"
    sections = [
        [f"# #81: {res['marker']} leakage over the Big-5 bystander grid", "",
         f"{res['n_sources']} sources x {res['n_bystanders']} bystanders x {seeds} per source, plus the base model as "
         f"reference; {res['n_questions']} evaluation questions, "
         f"{'/'.join(str(n) for n in res['completions_per_cell'][res['base_label']])} completions per (model, "
         f"bystander). Marker matching: {res['matching']}.", ""],
        units_section(res), leakage_section(res), emission_section(res), h1_section(res), h2_section(res),
        h3_section(res), head_to_head_section(res), h4_section(res), coherence_section(res), figures_section(res),
        training_section(res["training"]),
    ]
    return "\n".join(line for section in sections for line in section)


# ---------------------------------------------------------------------------------------------------------------
# what reproduces (REPRODUCIBILITY.md)


REPRODUCIBILITY_NOTES = """
## What reproduces bitwise, and what only in distribution

- **This analysis, from the stored artifacts: bitwise.** Every number of `report.md`, `headline.json` and the
  figures is recomputed from the stored marker counts, judge scores and centroids; every bootstrap and permutation
  draws from a numpy Generator seeded by the config's seed, the purpose of the draw, the training seed and the
  source, so the same inputs and package versions give the same bytes (and one source or seed more does not move
  another's numbers).
- **A re-run of the workflow: bitwise, from the store.** A task whose code, config and inputs are unchanged is not
  recomputed: its stored result is reused (cached or hard-linked), so the report is rebuilt from the same bytes.
- **The plan and the prompts: bitwise.** The bystander grid, the prompts, their token ids (`shared.lm.chat`) and the
  negatives drawn for each source (seeded by the training seed and the source's name, not Python's `hash`) do not
  depend on the machine.
- **Recomputing a stage that samples or trains: in distribution only.** On-policy data, the LoRA and the
  evaluation are seeded (the training seed), but seeded sampling depends on the batch sizes and the batching the
  backend chooses (vLLM schedules requests together), bf16 GPU kernels are not deterministic, and thread counts
  change CPU reductions; a recomputed stage on other hardware, another batch size or another package version gives
  other completions from the same distribution. That is what the seed replicates measure: the between-seed spread
  includes this sampling noise.
- **Judges.** Judgements are cached by content (model, template bytes, question, answer), so a re-run re-judges
  nothing; a Claude judge asked again answers from its distribution, and the local judge's expected score is
  deterministic on one machine but carries the same kernel caveats.
"""
