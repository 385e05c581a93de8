"""Part 4 of ``analyze_issue205``: the markdown report, and what reproduces (for REPRODUCIBILITY.md), from the
results object alone."""

from __future__ import annotations

import math

import numpy as np

from jobs.analyze_issue205.figures import GEOMETRY_PANELS, INVARIANT_ROWS, seed_values
from jobs.analyze_issue205.results import CONTROLS, GEOMETRY_TITLES


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
    return lines + behaviour_decision_lines(beh, d["outcome"])


def behaviour_decision_lines(beh: dict | None, out: dict) -> list[str]:
    """One seed's H1/H2/H3 lines (behind the coupling check), its headline mapping and the kill criterion."""
    from shared.analysis.reporting import fmt

    lines = []
    if beh:
        h1, h2, h3 = beh["H1"], beh["H2"], beh["H3"]
        w = h2["as_written"]
        untaken = beh["coupling"]["not_taken"]
        if untaken:
            cp = beh["coupling"]
            rates = "; ".join(f"{r['cond']} {r['source_rate']:.4f} (bound {r['source_rate_low']:.4f})"
                              for r in beh["conditions"] if r["cond"] in untaken)
            lines.append(f"- **Coupling check fails** in {', '.join(untaken)}: the source persona's marker rate there is not "
                         f"above H2's margin of {cp['floor']:.2f} at one-sided {cp['confidence']:.0%} confidence "
                         f"(Clopper-Pearson lower bound; {rates}), so the coupling did not take; those conditions are not "
                         "testable for H1, and H2 and H3, which compare every condition, are not testable at all (their "
                         "numbers below are descriptive).")
        lines += [
            f"- **H1** (induction-self-leakage): {'FIRES' if h1['fires'] else 'does not fire'}: {h1['fired']}/{h1['testable']} "
            f"testable conditions fire (needs {fmt(h1['needed'])}; {h1['rule']}).",
            f"- **H2** (induction-invariant, equivalence): "
            f"{'FIRES (equivalence shown)' if h2['fires'] else 'does not fire (equivalence not shown)' if h2['testable'] else 'not testable'}: "
            f"range {h2['range']:.4f}; TOST p = {h2['p']:.4g} over {h2['n_questions']} questions, the least equivalent pair "
            + (f"{h2['worst_pair'][0]}-{h2['worst_pair'][1]} differs by {h2['worst_pair_interval'][0]:+.4f} "
               f"[{h2['worst_pair_interval'][1]:+.4f}, {h2['worst_pair_interval'][2]:+.4f}] ({h2['rule']}). "
               if h2["worst_pair"] else f"({h2['rule']}). ")
            + f"The record's rule as written ({w['rule']}; not an equivalence test) {'holds' if w['holds'] else 'does not hold'}: "
            f"range {w['range']:.4f}, p = {w['p']:.4g}.",
            f"- **H3** (cos-monotone): {'FIRES' if h3['fires'] else 'does not fire' if h3['testable'] else 'not testable'}: Spearman rho = {fmt(h3['rho'], 3)}, exact "
            f"p = {fmt(h3['p'], 4)} over {h3['n_orderings']} orderings ({h3['rule']}){'; ' + h3['note'] if 'note' in h3 and h3['testable'] else ''}.",
        ]
    else:
        lines.append("- H1/H2/H3: no behavioural artifacts were given.")
    lines += ["", "Pre-registered headline(s): " + (" ".join(out["headlines"]) or "none of the mapped combinations."),
              "Joint-null kill criterion met: " + ("undecided (the coupling did not take in every condition)."
                                                   if beh and beh["coupling"]["not_taken"] else fmt(out["joint_null_kill"]))]
    return lines


def pooled_verdicts(p: dict) -> tuple[str, str, str]:
    """A pooled rule's per-seed verdicts, seeds passing and pooled verdict; a seed that could not decide the rule
    (the coupling did not take) says so instead of 'fail'."""
    untestable = p.get("not_testable", [])
    per_seed = ", ".join(f"s{s}: {'not testable' if s in untestable else 'pass' if v else 'fail'}" for s, v in p["per_seed"].items())
    pooled = ("PASSES" if p["passes"] else "not testable" if len(untestable) == len(p["per_seed"]) else "does not pass")
    return per_seed, f"{p['n_pass']}/{len(p['per_seed'])}", pooled


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
    rows = [(name, *pooled_verdicts(p), p["rule"]) for name, p in dec["pooled"].items()]
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
