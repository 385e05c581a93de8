"""Issue 22's tables and headline from one machine's ``bench.full_bench`` sections (no number typed by hand).

    python -m bench.full_report OUT/full_bench_*.json [--results bench/results]

Merges the sections into one results object, ``<results>/<device>_full_bench.json``, and prints from it alone the
tables (also written to ``<device>_full_bench.md``) and ``<device>_headline.json``: the medians the bars name
(``soft_step_s``, ``gcg_step_full_s``, ``gcg_step_screened_s``, ``sampling_b320_tok_s``,
``sampling_b1024_embeds_tok_s``) with their spread, bar and baseline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.full_bench import SECTIONS

RESULTS = Path(__file__).resolve().parent / "results"
LENGTHS = {"fixed": "every reply 256", "uniform": "uniform 32-256", "record": "uniform 144-256 (record's ~200)"}
PATHS = {"current": "every example in full", "cache": "each prompt once, KV cache", "packed": "packed, offset mask"}


def merge(paths: list[str]) -> dict:
    """One results object: the sections' measurements side by side, the run's facts once."""
    merged: dict = {"sections": {}}
    for path in paths:
        part = json.loads(Path(path).read_text())
        facts = {k: part[k] for k in ("device", "device_tag", "shape", "model_config", "torch", "transformers",
                                      "peft", "params", "bars", "record")}
        if merged.get("facts", facts) != facts:
            raise ValueError(f"{path}: a section of another run (device, versions or shape differ)")
        merged["facts"] = facts
        merged["sections"][part["section"]] = {k: v for k, v in part.items() if k not in facts}
    return merged


def measured(results: dict, section: str, key: str) -> dict | None:
    value = results["sections"].get(section, {}).get(key)
    return value if isinstance(value, dict) and "error" not in value else None


def headline(results: dict) -> dict:
    facts, bars = results["facts"], results["facts"]["bars"]
    out: dict = {"device": facts["device"], "shape": facts["shape"], "torch": facts["torch"],
                 "transformers": facts["transformers"], "bars": bars, "details": {}}

    def put(name: str, stat: dict | None, config: str, baseline: dict | None = None, lower_is_better=True):
        if stat is None:
            out[name] = None
            out["details"][name] = {"config": config, "missing": "not measured (or failed): see the section's JSON"}
            return
        bar = bars[name]
        out[name] = stat["median"]
        out["details"][name] = {"config": config, "min": stat["min"], "max": stat["max"], "runs": stat["runs"],
                                "bar": bar, "meets_bar": stat["median"] <= bar if lower_is_better
                                else stat["median"] >= bar}
        if baseline is not None:
            out["details"][name] |= {"baseline_median": baseline["median"],
                                     "speedup": stat["median"] / baseline["median"]}

    for name, which, inputs in (("sampling_b320_tok_s", "teacher", "B=320 token ids (16 prompts x 20)"),
                                ("sampling_b1024_embeds_tok_s", "eval", "B=1024 soft(64) via inputs_embeds")):
        fast = measured(results, "sampling", f"fast_{which}_fixed")
        base = measured(results, "sampling" if which == "teacher" else "baseline", f"generate_{which}_fixed")
        put(name, fast and fast["tok_s"], f"fast decoder, {inputs}, every row 256 new tokens",
            base and base["tok_s"], lower_is_better=False)
    soft = {k: v for k, v in results["sections"].get("soft", {}).items()
            if k.startswith("soft_record_") and isinstance(v, dict) and "step_s" in v}
    best = min(soft, key=lambda k: soft[k]["step_s"]["median"], default=None)
    put("soft_step_s", soft[best]["step_s"] if best else None,
        f"fastest configuration at record lengths: {best}" if best else "record lengths")
    gcg = measured(results, "gcg", "gcg")
    put("gcg_step_full_s", gcg and gcg["full_s"], "every candidate on every pair (the record's work)")
    put("gcg_step_screened_s", gcg and gcg["screened_with_check_s"],
        "screened step with the periodic full check counted in")
    return out


def _s(stat: dict, digits: int = 1) -> str:
    return f"{stat['median']:.{digits}f} s [{stat['min']:.{digits}f}-{stat['max']:.{digits}f}]"


def _gib(value) -> str:
    return "--" if value is None else f"{value:.1f} GiB"


def tables(results: dict, head: dict) -> list[str]:
    facts = results["facts"]
    lines = [f"{facts['device']}, torch {facts['torch']}, transformers {facts['transformers']}, peft {facts['peft']}; "
             f"model shape `{facts['shape']}` ({facts['params']['total'] / 1e9:.2f} B parameters, random weights); "
             "median [min-max] of 3 timed runs after an untimed one; commands: "
             + ", ".join(sorted({f"`{s['command']}`" for s in results["sections"].values()}))]
    sampling = [(k, v) for sec in ("sampling", "baseline") for k, v in results["sections"].get(sec, {}).items()
                if k.startswith(("fast_", "generate_")) and isinstance(v, dict) and "tok_s" in v]
    if sampling:
        lines += ["", "| sampling | rows | prompt tokens | lengths | sampler | tok/s median [min-max] | peak |",
                  "| :--- | ---: | :--- | :--- | :--- | ---: | ---: |"]
        for _, s in sampling:
            t = s["tok_s"]
            lines.append(f"| {s['inputs']} | {s['rows']} | {s['prompt_tokens'][0]}-{s['prompt_tokens'][1]} "
                         f"({s['distinct_prompts']} distinct) | {LENGTHS[s['lengths']]} | {s['sampler']} | "
                         f"{t['median']:,.0f} [{t['min']:,.0f}-{t['max']:,.0f}] | {_gib(s['peak_gib'])} |")
    soft = [(k, v) for k, v in results["sections"].get("soft", {}).items() if k.startswith("soft_") and
            isinstance(v, dict) and "step_s" in v]
    if soft:
        lines += ["", "| soft-prefix step (K=64, 16 x 20, separate teacher) | student path | teacher draws | step | "
                  "teacher wait | forward/backward | student tokens (padded) | student floor | peak |",
                  "| :--- | :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for _, s in soft:
            draws = f"{s['draw_steps']} step{'s' if s['draw_steps'] > 1 else ''} a call" + (
                ", overlapped" if s["overlap_teacher"] else "")
            floor = f"{s['student_floor_s']:.1f} s" if "student_floor_s" in s else "--"
            lines.append(f"| {LENGTHS[s['lengths']]} (mean {s['mean_reply_tokens']:.0f}) | {PATHS[s['student_path']]} | "
                         f"{draws} | {_s(s['step_s'])} | {_s(s['teacher_s'])} | {_s(s['forward_backward_s'])} | "
                         f"{s['student_tokens']:,.0f} ({s['student_padded_tokens']:,.0f}) | {floor} | "
                         f"{_gib(s['peak_gib'])} |")
    gcg = measured(results, "gcg", "gcg")
    if gcg:
        lines += ["", f"| GCG step (width {gcg['search_width']}, top-k {gcg['topk']}, {gcg['pairs']} pairs, "
                  f"L={gcg['suffix_length']}, replies {LENGTHS[gcg['lengths']]}) | step | teacher | gradient | "
                  "filter | candidates |", "| :--- | ---: | ---: | ---: | ---: | ---: |"]
        parts = f"{_s(gcg['teacher_s'])} | {_s(gcg['gradient_s'])} | {_s(gcg['filter_s'], 2)}"
        lines.append(f"| the record's work: every candidate on every pair | {_s(gcg['full_s'])} | {parts} | "
                     f"screen {_s(gcg['screen_s'])} + rest {_s(gcg['check_s'])} |")
        lines.append(f"| screened: all on {gcg['screen_pairs']} pairs, best {gcg['screen_keep']} on all | "
                     f"{_s(gcg['screened_s'])} | {parts} | screen {_s(gcg['screen_s'])} + kept {_s(gcg['kept_s'])} |")
        lines.append(f"| screened, the full check every {gcg['screen_check_every']} steps counted in | "
                     f"{_s(gcg['screened_with_check_s'])} | | | | + check / {gcg['screen_check_every']} |")
        lines += ["", f"The record's work at the calibrated GEMM rate: {gcg['full_evaluation_floor_s']:.1f} s of "
                  "candidate forwards. " + gcg["note"] + "."]
    fused = measured(results, "baseline", "candidate_forward")
    if fused:
        lines += ["", f"GCG candidate evaluation ({fused['rows']} candidates on {fused['pairs']} pairs, "
                  f"{fused['model']['tokens']:,} tokens): the model's forward {_s(fused['model']['seconds'], 2)} "
                  f"({fused['model']['tflops_2nP']:.0f} TFLOP/s), one compiled region per layer "
                  f"{_s(fused['fused']['seconds'], 2)} ({fused['fused']['tflops_2nP']:.0f} TFLOP/s; first call "
                  f"{fused['fused']['first_call_s']:.1f} s); CE sums within {fused['max_relative_difference']:.1e} "
                  f"relative, same best candidate: {'yes' if fused['same_best'] else 'no'}."]
    greedy = measured(results, "baseline", "greedy_check")
    if greedy:
        lines += ["", f"Greedy check ({greedy['dtype']}, {greedy['tokens_compared']} tokens): "
                  f"{100 * greedy['agreement']:.1f}% equal the argmax of one plain transformers forward over them; "
                  f"where not, the logits were within {greedy['max_logit_gap_at_disagreement']:.3f}."]
    lines += ["", "| headline | median | bar | met | configuration |", "| :--- | ---: | ---: | :--- | :--- |"]
    for name in head["bars"]:
        d = head["details"][name]
        value = "--" if head[name] is None else f"{head[name]:,.1f}"
        met = "--" if head[name] is None else ("yes" if d["meets_bar"] else "**no**")
        lines.append(f"| `{name}` | {value} | {head['bars'][name]:,} | {met} | {d['config']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.full_report", description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="+", help=f"full_bench_<section>.json files ({', '.join(SECTIONS)})")
    parser.add_argument("--results", default=str(RESULTS), help="folder for the merged results and headline")
    args = parser.parse_args(argv)
    results = merge(args.sections)
    head = headline(results)
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    tag = results["facts"]["device_tag"]
    (folder / f"{tag}_full_bench.json").write_text(json.dumps(results, indent=1) + "\n")
    (folder / f"{tag}_headline.json").write_text(json.dumps(head, indent=1) + "\n")
    text = "\n".join(tables(results, head)) + "\n"
    (folder / f"{tag}_full_bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
