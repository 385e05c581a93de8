"""The fast-paths tables of bench/README.md, rendered from the stored results (no number typed by hand).

    python -m bench.summary bench/results/gpu_h200_qwen7b_fast_paths.json bench/results/cpu_smollm2_sampling.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _gib(value) -> str:
    return "--" if value is None else f"{value:.1f} GiB"


def gpu_tables(r: dict) -> list[str]:
    lines = [f"{r['device']}, torch {r['torch']}, transformers {r['transformers']}, peft {r.get('peft', '?')}; "
             f"`{r['command']}`"]
    if any(k.startswith("sampling_") for k in r):
        lines += ["", "| sampling (256 new tokens, T=1) | lengths | fast decoder | `model.generate` | speed-up | "
                  "peak: fast, generate |", "| :--- | :--- | ---: | ---: | ---: | ---: |"]
    for rows, inputs in ((320, "ids"), (1024, "embeds")):
        for lengths in ("fixed", "uniform"):
            fast = r.get(f"sampling_fast_B{rows}_{inputs}_{lengths}", {})
            base = r.get(f"sampling_generate_B{rows}_{inputs}_{lengths}", {})
            if "new_tokens_per_s" not in fast:
                continue
            what = f"B={rows}, " + ("token ids" if inputs == "ids" else "soft prefix K=64 via inputs_embeds")
            span = "every row 256" if lengths == "fixed" else "uniform 32-256, stop honoured"
            base_rate = base.get("new_tokens_per_s")
            lines.append(f"| {what} | {span} | {fast['new_tokens_per_s']:,.0f} tok/s | "
                         + (f"{base_rate:,.0f} tok/s | {fast['new_tokens_per_s'] / base_rate:.1f}x"
                            if base_rate else "-- | --")
                         + f" | {_gib(fast.get('peak_gib'))}, {_gib(base.get('peak_gib'))} |")
    steps = [r[k] for k in r if k.startswith("decode_step_B") and "ms_per_step" in r[k]]
    compiles = [f"{name} {r[key]['compile_s']:.1f} s" for name, key in
                (("plain model", "compile_plain"), ("LoRA teacher", "compile_lora_teacher"),
                 ("separate teacher", "compile_separate_teacher")) if "compile_s" in r.get(key, {})]
    if steps:
        lines += ["", "Decode step of the fast decoder (prefill excluded): " + ", ".join(
            f"B={s['rows']}: {s['ms_per_step']:.1f} ms" for s in steps) + "."]
    if compiles:
        lines += ["", "Compile: " + ", ".join(compiles) + " (once per process)."]
    greedy = r.get("greedy_check")
    if greedy:
        lines += ["", f"Greedy check ({greedy['dtype']}, {greedy['tokens_compared']} tokens): "
                  f"{100 * greedy['agreement']:.1f}% equal the argmax of one plain transformers forward over them; "
                  f"where not, the two logits were within {greedy['max_logit_gap_at_disagreement']:.3f} "
                  f"(median top-1/top-2 gap {greedy['median_top1_top2_logit_gap']:.3f}: random weights, near-ties)."]
    if any(k.startswith("soft_train_step") for k in r):
        lines += ["", "| soft-prefix training step (K=64, 16 x 20, 256 tokens) | step | teacher | forward/backward | "
                  "peak |", "| :--- | ---: | ---: | ---: | ---: |"]
    for key in sorted(k for k in r if k.startswith("soft_train_step")):
        s = r[key]
        if "step_s" not in s:
            continue
        what = ("fast teacher, length-bucketed" if s["sampler"] == "fast" else "current: generate teacher, draw order")
        if key.startswith("soft_train_step_separate"):
            what = "fast teacher as a separate merged model (the full profile's), length-bucketed"
        lines.append(f"| {what}, micro-batch {s['micro_batch_tokens']} tokens | {s['step_s']:.1f} s | "
                     f"{s['teacher_s']:.1f} s | {s['forward_backward_s']:.1f} s | {_gib(s['peak_gib'])} |")
    lines += student_path_table(r)
    g = r.get("gcg_step_screened")
    if g and "step_s" in g:
        sc = g["screen"]
        current_teacher = r.get("gcg_teacher_draw_current", {}).get("seconds")
        lines += ["", "| GCG step (width 512, top-k 256, 32 pairs, L=20) | step | teacher | gradient | candidates | peak |",
                  "| :--- | ---: | ---: | ---: | ---: | ---: |",
                  f"| screen: all candidates on {sc['pairs']} pairs, best {sc['kept']} on all | {g['step_s']:.1f} s | "
                  f"{g['teacher_s']:.1f} s | {g['gradient_s']:.1f} s | {g['candidates_s']:.1f} s | "
                  f"{_gib(g['peak_gib'])} |"]
        if current_teacher:
            total = current_teacher + g["gradient_s"] + g["full_evaluation_s"]
            lines.append(f"| current: generate teacher, every candidate on every pair (same run, parts) | "
                         f"{total:.1f} s | {current_teacher:.1f} s | {g['gradient_s']:.1f} s | "
                         f"{g['full_evaluation_s']:.1f} s | -- |")
        lines += ["", f"Screen check on that step: the screen's pick ranked {sc['rank']} in the full evaluation "
                  f"(0 = best), {sc['gap']:.4f} nats above the best; the full evaluation took "
                  f"{g['full_evaluation_s']:.1f} s ({g['full_evaluation_floor_s_at_matmul_rate']:.1f} s at the "
                  "calibrated GEMM rate)."]
    return lines


TEACHERS = {"separate": "separate model", "adapter": "LoRA adapter (shared weights)"}


def student_path_table(r: dict) -> list[str]:
    """The soft-prefix step's student paths: every example in full (current) against each prompt once (shared)."""
    steps = [(k, r[k]) for k in r if k.startswith("soft_step_") and "step_s" in r[k]]
    if not steps:
        return []
    lines = ["", "| soft-prefix step (K=64, 16 x 20) | teacher | replies | student path | micro-batch | step | "
             "teacher | forward/backward | student tokens | floor | peak |",
             "| :--- | :--- | :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for _, s in steps:
        replies = (f"{s['max_new_tokens']} tokens each" if s["lengths"] == "fixed"
                   else f"uniform 32-256, stop honoured (mean {s['mean_reply_tokens']:.0f})")
        path = "each prompt once (shared)" if s["shared_prompt"] else "every example in full (current)"
        lines.append(f"| {s['pairs']} pairs, {s['loss_tokens']:,} loss tokens | {TEACHERS[s['teacher']]} | {replies} | "
                     f"{path} | {s['micro_batch_tokens']} | {s['step_s']:.1f} s | {s['teacher_s']:.1f} s | "
                     f"{s['forward_backward_s']:.1f} s | {s['student_tokens']:,} | "
                     f"{s.get('floor_s_at_matmul_rate', float('nan')):.1f} s | {_gib(s['peak_gib'])} |")
    lines += ["", "floor: " + next(s["floor_formula"] for _, s in steps if "floor_formula" in s) + f" (calibrated "
              f"{r['matmul_calibration']['tflops']:.0f} TFLOP/s)"] if any("floor_formula" in s for _, s in steps) else []
    return lines


def cpu_table(r: dict) -> list[str]:
    lines = [f"{r['model']} ({r['dtype']}), {r['cpu_count']} cores, torch {r['torch']}, {r['max_new_tokens']} new "
             f"tokens, {r['sampling']}; load average before {r['load_average_before'][0]:.1f}, after "
             f"{r['load_average_after'][0]:.1f} (a shared machine); `{r['command']}`", "",
             "| batch | fast decoder | `model.generate` | speed-up |", "| ---: | ---: | ---: | ---: |"]
    for key, m in r["median"].items():
        lines.append(f"| {key.removeprefix('batch')} | {m['fast_new_tokens_per_s']:,.0f} tok/s | "
                     f"{m['generate_new_tokens_per_s']:,.0f} tok/s | {m['speedup']:.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results JSON files (GPU fast paths, CPU sampling)")
    args = parser.parse_args(argv)
    for path in args.results:
        r = json.loads(Path(path).read_text())
        print("\n".join(cpu_table(r) if "median" in r else gpu_tables(r)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
