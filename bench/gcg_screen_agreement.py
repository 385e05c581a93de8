"""GCG's candidate screen against the full evaluation, on a real model (SmolLM2-135M-Instruct) on the CPU.

    python -m bench.gcg_screen_agreement                  # writes bench/results/gcg_screen_agreement.{json,md}
    python -m bench.gcg_screen_agreement --steps 2 --out /tmp/x   # a quick look

The screen (``shared.search.gcg.screened_losses``) scores every candidate suffix on a few of a step's (question, teacher
completion) pairs and only the best few on all of them. Whether that picks the candidate the full evaluation
(every candidate on every pair, the record's search) would pick has to be measured on real weights: on random
weights the candidates barely differ.

Here a GCG search runs with the ``small`` profile's shapes (the SmolLM2 student, the villain-prompted SmolLM2
teacher, L=10 system-slot ids, 4 questions x 2 fresh completions = 8 pairs per step, top-k 64, printable suffixes
that round-trip as text) and a wider candidate pool (``--width``), keeping each step's full-evaluation best (the
record's search). At every step the CE of every candidate on every pair is kept as a matrix, and each screen
setting (pairs screened x candidates kept) is replayed on it with the stage's own selection code
(``shared.search.gcg.screen_outcome``), for every possible draw of the screened pairs: so each step gives the
exact share of draws in which the screen picks the full evaluation's best, the pick's mean rank there, and its
mean CE gap to the best. Steps are the unit of the intervals (percentile bootstrap over steps).

The setting the evidence supports is the cheapest one (fewest candidate x pair rows scored) whose mean CE gap is
at most ``GAP_SHARE`` of the mean improvement a full-evaluation step makes over the current suffix: a screen that
keeps nine tenths of what a step gains. The record's cells (512 candidates x 32 pairs) take the same fractions
of pairs and candidates (``full_setting``); that the fractions carry over from SmolLM2 at this width to
Qwen2.5-7B at 512 is an assumption the table cannot test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SCREEN_PAIRS = (1, 2, 4)
SCREEN_KEEP = (1, 2, 4, 8, 16, 32)
GAP_SHARE = 0.10  # the screen may lose at most this share of a full-evaluation step's mean improvement
RECORD_WIDTH, RECORD_PAIRS = 512, 32  # the record's GCG: 512 candidates, 16 questions x 2 completions


def search_matrices(steps: int, width: int, seed: int, log=print, partial: Path | None = None
                    ) -> tuple[list[dict], dict]:
    """Run a full-evaluation GCG search with the small profile's shapes; per step, every candidate's CE on every
    pair (``[rows, pairs]`` sums), each pair's loss tokens and the row of the current suffix (0).

    With ``partial``, every finished step is saved there and a later call with the same settings resumes after the
    last saved step (a step's draws are seeded by its number, so a resumed search is the same search)."""
    import torch

    import workflows
    from shared.lm.generation import derived_seed
    from shared.lm.teacher import TeacherSpec, n_loss_tokens
    from shared.search.gcg import (
        GcgSearch,
        GcgSettings,
        SuffixRules,
        candidate_pair_ce_sums,
        candidate_pool,
        sample_candidates,
        token_gradients,
        with_suffix,
    )
    from shared.search.soft_prompt import LearnedPrompt

    module = workflows.load("issue170")
    params = module.Params.for_profile("small")
    train, val, _test, _ = module.split_questions(params)
    panel = module.panel(params)
    settings = GcgSettings(length=params.gcg_cells[0].length, steps=steps, search_width=width, topk=params.gcg_topk,
                           questions_per_step=params.gcg_questions_per_step,
                           completions_per_question=params.gcg_completions_per_question,
                           temperature=params.teacher_temperature, max_new_tokens=params.teacher_max_new_tokens,
                           val_completions_per_question=1, micro_batch_tokens=params.micro_batch_tokens)
    pair = TeacherSpec(system=params.teacher_system).load(params.model_ref, dtype=params.dtype,
                                                          sample_batch_size=params.sample_batch_size)
    vocab = pair.student_model.get_input_embeddings().weight.shape[0]
    texts = [q["text"] for q in train + val + panel]
    rules = SuffixRules.of(pair.tokenizer, vocab, settings, texts)
    start = rules.random_suffix(settings.length, seed)
    prompt = LearnedPrompt(kind="ids", model_ref=params.model_ref, ids=start)
    search = GcgSearch(pair, prompt, settings, [q["text"] for q in train], [q["text"] for q in val], seed=seed,
                       rules=rules)
    suffix, out = list(start), []
    # the profile's shapes too: a saved step of other pairs or reply lengths is not resumed into this search
    key = {"steps": steps, "width": width, "seed": seed, "start": start, "pairs_per_step": settings.pairs_per_step,
           "max_new_tokens": settings.max_new_tokens, "topk": settings.topk}
    if partial is not None and partial.exists():
        saved = json.loads(partial.read_text())
        if saved["key"] == key:
            out, suffix = saved["steps"], saved["suffix"]
            log(f"resuming after step {len(out)}")
    for step in range(len(out), steps):
        started = time.perf_counter()
        examples = with_suffix(prompt, search.draws.step_examples(step), suffix)
        generator = torch.Generator().manual_seed(derived_seed(seed, step, 1))
        with pair.student() as model:
            grad = token_gradients(model, examples, suffix, search.pad_id, settings.micro_batch_tokens)
            sampled = sample_candidates(suffix, grad, search.allowed_mask, search_width=width, topk=settings.topk,
                                        generator=generator)
            pool = candidate_pool(suffix, sampled, rules.text)
            sums = candidate_pair_ce_sums(model, examples, pool.rows)
        tokens = [n_loss_tokens([e]) for e in examples]
        full = sums.double().sum(dim=1) / sum(tokens)
        best = int(full.argmin()) if float(full.min()) < float(full[0]) else 0
        out.append({"step": step, "rows": int(pool.scored), "pair_tokens": tokens, "pair_sums": sums.tolist(),
                    "current_ce": float(full[0]), "best_ce": float(full[best]), "seconds": time.perf_counter() - started})
        suffix = [int(t) for t in pool.rows[best]]
        if partial is not None:
            partial.write_text(json.dumps({"key": key, "suffix": suffix, "steps": out}))
        log(f"step {step + 1}/{steps}: {pool.scored} rows scored on {len(examples)} pairs, CE {full[0]:.4f} -> "
            f"{full[best]:.4f} ({out[-1]['seconds']:.1f}s)")
    setup = {"model": params.model_ref, "teacher_system": params.teacher_system, "length": settings.length,
             "pairs_per_step": settings.pairs_per_step, "width": width, "topk": settings.topk,
             "max_new_tokens": settings.max_new_tokens, "seed": seed, "start_ids": start, "dtype": params.dtype,
             "round_trip_questions": len(set(texts)), "vocabulary": settings.vocabulary}
    return out, setup


def replay(steps: list[dict], screen_pairs: int, keep: int) -> list[dict]:
    """Per step, over every draw of ``screen_pairs`` of its pairs: the share of draws in which the screen keeps the
    full evaluation's pick, and the pick's mean rank and CE gap there."""
    import torch

    from shared.search.gcg import screen_outcome

    per_step = []
    for s in steps:
        sums = torch.tensor(s["pair_sums"], dtype=torch.float64)
        draws = [screen_outcome(sums, s["pair_tokens"], chosen, keep, current=0)
                 for chosen in itertools.combinations(range(sums.shape[1]), screen_pairs)]
        per_step.append({"agreement": float(np.mean([d.agreed for d in draws])),
                         "rank": float(np.mean([d.rank for d in draws])),
                         "gap": float(np.mean([d.gap for d in draws])),
                         "improvement": s["current_ce"] - s["best_ce"],
                         "rows_share": min(1.0, (s["rows"] * screen_pairs
                                                 + min(keep + 1, s["rows"]) * (sums.shape[1] - screen_pairs))
                                           / (s["rows"] * sums.shape[1]))})
    return per_step


def summarize(per_step: list[dict], *, seed: int = 0) -> dict:
    """Means over steps with percentile bootstrap intervals (steps resampled)."""
    from shared.analysis.stats import bootstrap_ci

    def interval(values):
        ci = bootstrap_ci(np.asarray(values, dtype=float), np.mean, n_boot=2000, rng=seed)
        return {"mean": ci.estimate, "low": ci.low, "high": ci.high}

    improvement = float(np.mean([s["improvement"] for s in per_step]))
    gap = float(np.mean([s["gap"] for s in per_step]))
    return {"steps": len(per_step), "agreement": interval([s["agreement"] for s in per_step]),
            "steps_always_agreeing": sum(s["agreement"] == 1.0 for s in per_step),
            "mean_rank": interval([s["rank"] for s in per_step]), "mean_gap": interval([s["gap"] for s in per_step]),
            "mean_improvement": improvement, "gap_share_of_improvement": gap / improvement if improvement > 0 else None,
            "rows_share": float(np.mean([s["rows_share"] for s in per_step]))}


def supported_setting(table: list[dict], gap_share: float = GAP_SHARE) -> dict | None:
    """The cheapest setting (share of rows scored) whose mean CE gap is at most ``gap_share`` of the mean step
    improvement; None if none is."""
    passing = [row for row in table if row["gap_share_of_improvement"] is not None
               and row["gap_share_of_improvement"] <= gap_share]
    return min(passing, key=lambda row: (row["rows_share"], -row["agreement"]["mean"])) if passing else None


def full_setting(row: dict, pairs_per_step: int, width: int) -> dict:
    """The record-sized setting with the same fractions of pairs screened and candidates kept."""
    return {"screen_pairs": max(1, round(row["screen_pairs"] / pairs_per_step * RECORD_PAIRS)),
            "screen_keep": max(1, round(row["screen_keep"] / width * RECORD_WIDTH))}


def analyse(steps: list[dict], setup: dict) -> dict:
    table = []
    for screen_pairs, keep in itertools.product(SCREEN_PAIRS, SCREEN_KEEP):
        if screen_pairs < setup["pairs_per_step"] and keep < setup["width"]:
            table.append({"screen_pairs": screen_pairs, "screen_keep": keep,
                          **summarize(replay(steps, screen_pairs, keep))})
    chosen = supported_setting(table)
    chance = float(np.mean([1 / s["rows"] for s in steps]))
    return {"setup": setup, "gap_share_rule": GAP_SHARE, "chance_agreement": chance, "table": table,
            "supported": chosen and {"screen_pairs": chosen["screen_pairs"], "screen_keep": chosen["screen_keep"],
                                     "full_profile": full_setting(chosen, setup["pairs_per_step"], setup["width"])},
            "steps": [{k: v for k, v in s.items() if k != "pair_sums"} for s in steps]}


def markdown(result: dict) -> str:
    from shared.analysis.reporting import markdown_table

    setup, supported = result["setup"], result["supported"]

    def ci(entry, digits, scale=1.0):
        return (f"{entry['mean'] * scale:.{digits}f} [{entry['low'] * scale:.{digits}f}, "
                f"{entry['high'] * scale:.{digits}f}]")

    rows = [(r["screen_pairs"], r["screen_keep"], f"{100 * r['rows_share']:.0f}%", ci(r["agreement"], 0, 100),
             f"{r['steps_always_agreeing']}/{r['steps']}", ci(r["mean_rank"], 2), ci(r["mean_gap"], 4),
             "—" if r["gap_share_of_improvement"] is None else f"{100 * r['gap_share_of_improvement']:.1f}%")
            for r in result["table"]]
    steps = result["steps"]
    lines = [
        "# GCG screen agreement on SmolLM2-135M-Instruct (CPU)", "",
        "Generated by `python -m bench.gcg_screen_agreement` (JSON beside this file).", "",
        f"Search: {setup['model']} student, the same model under `{setup['teacher_system']}` as teacher, "
        f"L={setup['length']} system-slot ids (vocabulary `{setup['vocabulary']}`, round trip checked on "
        f"{setup['round_trip_questions']} questions), {setup['pairs_per_step']} pairs per step (fresh teacher "
        f"completions of up to {setup['max_new_tokens']} tokens), {setup['width']} sampled candidates per step "
        f"(top-k {setup['topk']}; {np.mean([s['rows'] for s in steps]):.1f} distinct text candidates scored on "
        f"average), seed {setup['seed']}, {len(steps)} steps, each keeping the full evaluation's best. Mean CE of the "
        f"current suffix on a step's pairs {np.mean([s['current_ce'] for s in steps]):.4f}; a full-evaluation step "
        f"lowers it by {result['table'][0]['mean_improvement']:.4f} nats/token on average.", "",
        markdown_table(["pairs screened", "candidates kept", "rows scored", "agreement, % [95% CI]",
                        "steps always agreeing", "mean rank [95% CI]", "mean CE gap, nats/token [95% CI]",
                        "gap / step improvement"], rows, align="rrrrrrrr"), "",
        "Agreement: the share of draws of the screened pairs in which the screen's pick is the full evaluation's "
        "(every draw enumerated, then averaged over steps); rank 0 is the full evaluation's best; the gap is the "
        "pick's CE minus the best CE on all of the step's pairs. Rows scored: candidate x pair forwards against the "
        f"full evaluation's. Chance agreement (a random row): {100 * result['chance_agreement']:.1f}%. Intervals: "
        "percentile bootstrap over steps.", ""]
    if supported:
        full = supported["full_profile"]
        lines += [f"**Supported setting:** {supported['screen_pairs']} of {setup['pairs_per_step']} pairs screened, "
                  f"{supported['screen_keep']} of {setup['width']} candidates kept: the cheapest whose mean gap is at "
                  f"most {100 * result['gap_share_rule']:.0f}% of a step's mean improvement. At the record's "
                  f"{RECORD_WIDTH} candidates x {RECORD_PAIRS} pairs the same fractions are screen_pairs="
                  f"{full['screen_pairs']}, screen_keep={full['screen_keep']} (the `full` profile's default); that "
                  "they carry over to Qwen2.5-7B at that width is an assumption this table cannot test.", ""]
    else:
        lines += [f"**No screened setting keeps its mean gap within {100 * result['gap_share_rule']:.0f}% of a "
                  "step's mean improvement: the evidence supports the full evaluation (no screen).**", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gcg_screen_agreement", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=16, help="candidates sampled per step")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=str(RESULTS), help="folder for gcg_screen_agreement.{json,md}")
    args = parser.parse_args(argv)
    started, cpu = time.perf_counter(), time.process_time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps, setup = search_matrices(args.steps, args.width, args.seed, partial=out / "gcg_screen_agreement.partial.json")
    result = analyse(steps, setup)
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                         "load_average_at_end": os.getloadavg(), "wall_s_this_call": time.perf_counter() - started,
                         "process_cpu_s_this_call": time.process_time() - cpu,
                         "step_seconds_wall": sum(s["seconds"] for s in steps)}
    (out / "gcg_screen_agreement.json").write_text(json.dumps({**result, "pair_sums": [s["pair_sums"] for s in steps]},
                                                              indent=1) + "\n")
    (out / "gcg_screen_agreement.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
